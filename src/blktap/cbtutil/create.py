"""``cbt-util create -n NAME -s SIZE``: a fresh log for a disk of SIZE bytes."""

from __future__ import annotations

import contextlib
import errno
import os

from blktap.cbtutil.logfile import open_log, sync, sync_directory, write_at
from blktap.errors import InvalidArgument
from blktap.proto import cbt


def create(path: str, size: int) -> cbt.CbtHeader:
    """Write a new log at ``path`` for a disk of ``size`` bytes (1..2**64-1): zero UUIDs,
    ``consistent`` 0, every bit clear - the C tool's bytes. An existing file is emptied
    and rewritten, as the C tool does. Durable when this returns; returns the header.

    Raises InvalidArgument for a bad size, LogOpenError, OSError (ENOSPC, EFBIG). On
    failure after the file was opened it is removed (its old content, if any, was
    already emptied, as by the C tool).
    """
    if not 0 < size <= cbt.MAX_DISK_SIZE:
        raise InvalidArgument(f"invalid size {size}: must be 1..2**64-1 bytes")
    header = cbt.CbtHeader(size=size)
    with open_log(path, create=True) as fd:
        try:
            # The bitmap is all zeros: size the file, then allocate it so that a tapdisk
            # marking bits later cannot fail for want of space (the C tool writes zeros).
            os.ftruncate(fd, header.log_size)
            try:
                os.posix_fallocate(fd, 0, header.log_size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
            write_at(fd, header.encode(), 0)
            sync(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(exc, OSError) and exc.filename is None:
                raise OSError(exc.errno, exc.strerror, path) from exc
            raise
    sync_directory(path)
    return header
