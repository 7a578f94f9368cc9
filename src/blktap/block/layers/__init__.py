"""Layers over the image chain, one module each (see :mod:`blktap.block.layer` for the
interface and how to write one). Importing a module registers its layer."""
