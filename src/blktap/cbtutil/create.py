"""``cbt-util create -n NAME -s SIZE``: a fresh log for a disk of SIZE bytes."""

from __future__ import annotations

import errno
import os

from blktap.cbtutil.logfile import open_log, sync, sync_directory, write_at
from blktap.errors import InvalidArgument
from blktap.proto import cbt


def create(path: str, size: int) -> cbt.CbtLog:
    """Write a new log at ``path`` for a disk of ``size`` bytes (1..2**64-1): zero UUIDs,
    ``consistent`` 0, every bit clear - the C tool's bytes. An existing file is emptied
    and rewritten, as the C tool does. Durable when this returns.

    Raises InvalidArgument for a bad size, LogOpenError, OSError (ENOSPC, EFBIG). On
    failure the file may exist with part of the log.
    """
    if not 0 < size <= cbt.MAX_DISK_SIZE:
        raise InvalidArgument(f"invalid size {size}: must be 1..2**64-1 bytes")
    log = cbt.CbtLog.new(size)
    with open_log(path, create=True) as fd:
        # The bitmap is all zeros: size the file, then allocate it so that a tapdisk
        # marking bits later cannot fail for want of space (the C tool writes the zeros).
        os.ftruncate(fd, log.header.log_size)
        try:
            os.posix_fallocate(fd, 0, log.header.log_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        write_at(fd, log.header.encode(), 0)
        sync(fd)
    sync_directory(path)
    return log
