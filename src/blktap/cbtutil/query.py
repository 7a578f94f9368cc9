"""``cbt-util get``: read a log's header fields or its bitmap."""

from __future__ import annotations

from blktap.cbtutil.logfile import open_log, read_header, read_log
from blktap.proto import cbt


def get_header(path: str) -> cbt.CbtHeader:
    """The header of the log at ``path``, after checking the file's length against it.
    Raises LogOpenError and the :class:`blktap.proto.cbt.CbtLogError` subclasses."""
    with open_log(path) as fd:
        return read_header(fd, path)


def get_log(path: str) -> cbt.CbtLog:
    """The whole log at ``path`` (header and bitmap), validated. Raises as
    :func:`get_header`."""
    with open_log(path) as fd:
        return read_log(fd, path)
