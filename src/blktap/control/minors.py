"""Minor numbers: reserved by marker files, as the current C libblktapctl does.

``allocate`` takes the lowest free minor 0..16383 while holding an exclusive ``flock`` on
the ``tapdisk/`` directory, and creates its marker (mode 0600). A tapdisk holds an
exclusive ``flock`` on the marker of each minor attached to it, so ``free`` (a
non-blocking exclusive ``flock``, then ``unlink``) fails with EWOULDBLOCK while it is
attached.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from blktap.control.errors import ControlError, MinorBusy
from blktap.control.rundir import MAX_MINOR, RunDir
from blktap.errors import InvalidArgument, NotFound

__all__ = ["allocate", "check_minor", "free", "is_held", "list_minors", "locked_dir"]

log = logging.getLogger(__name__)

_MARKER_NAME = re.compile(r"tapdisk-([0-9]+)")


def check_minor(minor: int) -> None:
    """Raise :class:`InvalidArgument` unless ``0 <= minor <= 16383``."""
    if not 0 <= minor <= MAX_MINOR:
        raise InvalidArgument(f"minor {minor} is outside 0..{MAX_MINOR}")


@contextmanager
def locked_dir(rundir: RunDir) -> Iterator[None]:
    """Hold the exclusive ``flock`` on ``tapdisk/`` that ``allocate`` and ``free`` take."""
    rundir.ensure()
    fd = os.open(rundir.minors_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def list_minors(rundir: RunDir) -> list[int]:
    """The minors that have a marker, ascending (held by a tapdisk or not)."""
    try:
        names = os.listdir(rundir.minors_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _MARKER_NAME.fullmatch(name)
        if match is not None and int(match.group(1)) <= MAX_MINOR:
            found.append(int(match.group(1)))
    return sorted(found)


def allocate(rundir: RunDir) -> int:
    """Reserve the lowest free minor; its marker exists (mode 0600) when this returns.

    Raises :class:`ControlError` (ENOSPC) when all 16384 minors are taken, or OSError-derived
    errors from the file system. On failure no marker was created.
    """
    with locked_dir(rundir):
        used = set(list_minors(rundir))
        for minor in range(MAX_MINOR + 1):
            if minor in used:
                continue
            path = rundir.marker(minor)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # made by someone who does not take the lock
                continue
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            log.debug("allocated minor %d", minor)
            return minor
    raise ControlError(f"no free minor in 0..{MAX_MINOR}", errno=errno.ENOSPC)


def free(rundir: RunDir, minor: int) -> None:
    """Release ``minor``: remove its marker.

    Raises :class:`InvalidArgument` for an out-of-range minor, :class:`NotFound` (ENOENT) if
    it is not allocated, :class:`MinorBusy` (EWOULDBLOCK) while a tapdisk holds it; in those
    cases the marker is left as it was.
    """
    check_minor(minor)
    path = rundir.marker(minor)
    with locked_dir(rundir):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"minor {minor} is not allocated ({path} does not exist)") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MinorBusy(f"minor {minor} is attached to a tapdisk") from None
            os.unlink(path)
        finally:
            os.close(fd)
    log.debug("freed minor %d", minor)


def is_held(rundir: RunDir, minor: int) -> bool:
    """True if a tapdisk holds the marker of ``minor`` (False if there is no marker)."""
    try:
        fd = os.open(rundir.marker(minor), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
