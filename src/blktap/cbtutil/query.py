"""``cbt-util get``: read a log's header fields or its bitmap."""

from __future__ import annotations

from collections.abc import Iterator

from blktap.cbtutil.logfile import open_log, read_exact, read_header, read_log
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


def iter_bitmap(path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The bitmap of the log at ``path`` in chunks of ``chunk_size`` bytes (the last may
    be shorter), after validating the file as :func:`get_header`: a log for a huge disk
    is never held in memory whole. The header is checked before the first chunk is
    yielded; raises BitmapTooSmallError if the file shrinks while it is read."""
    with open_log(path) as fd:
        header = read_header(fd, path)
        done = 0
        while done < header.bitmap_size:
            want = min(chunk_size, header.bitmap_size - done)
            chunk = read_exact(fd, want, cbt.HEADER_SIZE + done)
            if len(chunk) != want:
                raise cbt.BitmapTooSmallError(header.bitmap_size, done + len(chunk),
                                              header.size, path=path)
            yield chunk
            done += want
