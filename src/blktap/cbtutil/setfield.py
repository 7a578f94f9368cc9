"""``cbt-util set``: rewrite header fields of a log, and grow its bitmap with ``-s``."""

from __future__ import annotations

import dataclasses
import os
import uuid

from blktap.cbtutil.logfile import open_log, read_header, sync, write_at, write_changed
from blktap.errors import InvalidArgument
from blktap.proto import cbt


def set_fields(
    path: str,
    *,
    parent: uuid.UUID | None = None,
    child: uuid.UUID | None = None,
    consistent: bool | None = None,
    size: int | None = None,
) -> cbt.CbtHeader:
    """Set the given fields of the log at ``path``; return the new header.

    ``size`` (bytes) grows the disk the log covers, as ``cbt-util set -s``: the bitmap is
    extended with zero bits; a size below the current one raises InvalidArgument ("Size
    smaller than current file size (N)") and changes nothing. Raises LogOpenError and the
    :class:`blktap.proto.cbt.CbtLogError` subclasses for a file that is not a valid log.

    Order (each step durable before the next): the new bitmap bytes are zeroed and the
    file cut to its new length, then the header is rewritten. A crash in between leaves
    the old header over a longer file, which ``get`` reports as a size mismatch and which
    the same ``set -s`` completes (it accepts the longer file when growing).
    """
    with open_log(path, writable=True) as fd:
        header = read_header(fd, path, allow_trailing=size is not None)
        new = header
        if parent is not None:
            new = dataclasses.replace(new, parent=parent)
        if child is not None:
            new = dataclasses.replace(new, child=child)
        if consistent is not None:
            new = dataclasses.replace(new, consistent=consistent)
        if size is not None:
            if size < header.size:
                raise InvalidArgument(f"Size smaller than current file size ({header.size})")
            new = dataclasses.replace(new, size=size)
            extra = new.bitmap_size - header.bitmap_size
            if extra or os.fstat(fd).st_size != new.log_size:
                _zero(fd, header.log_size, extra)
                os.ftruncate(fd, new.log_size)
                sync(fd)
        write_changed(fd, header.encode(), new.encode(), 0)
        sync(fd)
        return new


def _zero(fd: int, offset: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(chunk))
        write_at(fd, memoryview(chunk)[:n], offset)
        offset += n
        length -= n
