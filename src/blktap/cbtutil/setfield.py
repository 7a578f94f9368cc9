"""``cbt-util set``: rewrite header fields of a log, and grow its bitmap with ``-s``."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import uuid

from blktap.cbtutil.logfile import open_log, read_header, sync, write_changed
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

    Order (each step durable before the next): the file is extended to its new length
    with zero bytes (allocated), then the header is rewritten. A file system that cannot
    hold the new length (EFBIG, ENOSPC) leaves the log as it was. A crash in between
    leaves the old header over a longer file, which ``get`` reports as a size mismatch
    and which the same ``set -s`` completes (it accepts the longer file when growing).
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
            if new.log_size != header.log_size or os.fstat(fd).st_size != new.log_size:
                _grow_file(fd, path, header.log_size, new.log_size)
        write_changed(fd, header.encode(), new.encode(), 0)
        sync(fd)
        return new


def _grow_file(fd: int, path: str, old_length: int, new_length: int) -> None:
    """Make the file ``new_length`` bytes, everything past ``old_length`` zero and
    allocated (so that marking bits later cannot fail for want of space). Bytes past
    ``old_length`` (left by an interrupted grow) are dropped first. On failure the file
    is cut back to ``old_length`` and OSError (naming ``path``) is raised."""
    try:
        os.ftruncate(fd, old_length)
        os.ftruncate(fd, new_length)
        try:
            os.posix_fallocate(fd, old_length, new_length - old_length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        sync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, old_length)
        raise OSError(exc.errno, exc.strerror, path) from exc
