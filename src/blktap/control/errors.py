"""Errors of the control library, each carrying the errno tap-ctl exits with."""

from __future__ import annotations

import errno as _errno

from blktap.errors import BlktapError, Busy, NotFound

__all__ = ["ControlError", "MinorBusy", "NoSuchTapdisk", "SpawnError", "TapdiskError", "TimedOut"]


class ControlError(BlktapError):
    """A control operation failed; ``errno`` says why (EIO unless stated)."""


class TimedOut(ControlError):
    """A tapdisk did not answer within the caller's timeout (ETIMEDOUT)."""

    errno = _errno.ETIMEDOUT


class TapdiskError(ControlError):
    """A tapdisk answered a request with ERROR; ``errno`` is the errno it sent.

    ``pid`` and ``minor`` say which tapdisk and VBD, ``request`` the request's type name.
    """

    def __init__(self, message: str, *, errno: int, pid: int, minor: int | None, request: str):
        super().__init__(message, errno=errno)
        self.pid = pid
        self.minor = minor
        self.request = request


class NoSuchTapdisk(NotFound):
    """No tapdisk with that pid serves the run directory (ENOENT): no or a stale socket."""


class MinorBusy(Busy):
    """The minor is held by a tapdisk, so it cannot be freed (EWOULDBLOCK, 11)."""

    errno = _errno.EWOULDBLOCK


class SpawnError(ControlError):
    """Starting a tapdisk failed; ``errno`` is its exit status when that is an errno."""
