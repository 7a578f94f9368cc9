"""Compatibility with the toolstacks that drive blktap: their exact command lines and parsing."""
