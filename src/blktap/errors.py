"""The exception hierarchy.

Every error the project raises on purpose derives from :class:`BlktapError` and carries
a positive ``errno`` so that each edge (the NBD wire, the control wire, a CLI exit code)
can map it with one function.
"""

from __future__ import annotations

import errno as _errno


class BlktapError(Exception):
    """Base class. ``errno`` is the positive errno an edge reports for this error."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(BlktapError):
    """A request, message or argument is malformed or out of range (the caller's fault)."""

    errno = _errno.EINVAL


class NotFound(BlktapError):
    """A named thing (image, driver type, minor, tapdisk) does not exist."""

    errno = _errno.ENOENT


class Busy(BlktapError):
    """The resource is in use (a VBD still open, a minor held by a tapdisk)."""

    errno = _errno.EBUSY


class ReadOnly(BlktapError):
    """A write was sent to something opened read-only."""

    errno = _errno.EPERM


class NoSpace(BlktapError):
    """A write lies past the end of the device, or the image cannot grow."""

    errno = _errno.ENOSPC


class Shutdown(BlktapError):
    """The device is closing or failed to resume; the request cannot be served."""

    errno = _errno.ESHUTDOWN


class ProtocolError(BlktapError):
    """A peer broke a wire protocol. ``remote`` says whose fault it is."""

    errno = _errno.EINVAL

    def __init__(self, message: str, *, remote: bool = True, errno: int | None = None) -> None:
        super().__init__(message, errno=errno)
        self.remote = remote


class ImageFormatError(BlktapError):
    """An image file is malformed. Says which file, structure, field and value."""

    errno = _errno.EINVAL

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        structure: str | None = None,
        field: str | None = None,
        value: object = None,
        errno: int | None = None,
    ) -> None:
        where = ": ".join(p for p in (path, structure, field) if p)
        text = f"{where}: {message}" if where else message
        if value is not None:
            text += f" (value {value!r})"
        super().__init__(text, errno=errno)
        self.path = path
        self.structure = structure
        self.field = field
        self.value = value


def errno_of(exc: BaseException) -> int:
    """The positive errno an edge should report for ``exc`` (EIO when it has none)."""
    if isinstance(exc, BlktapError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO
