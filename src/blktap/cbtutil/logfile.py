"""Opening, reading and rewriting a ``.cbtlog`` file in place.

Reads validate the whole file against the header (length included) before anything is
returned: see :func:`blktap.proto.cbt.parse_log` for the errors. Writes go through
:func:`write_at` and :func:`sync`; nothing here truncates a file except :func:`resize`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from blktap.errors import BlktapError
from blktap.proto import cbt


class LogOpenError(BlktapError):
    """The log file cannot be opened (its errno is the system's)."""

    def __init__(self, path: str, exc: OSError) -> None:
        # The C tool's words: "Failed to open log file NAME. <strerror>".
        super().__init__(f"Failed to open log file {path}. {exc.strerror or exc}",
                         errno=exc.errno or errno.EIO)
        self.path = path


@contextlib.contextmanager
def open_log(path: str, *, writable: bool = False, create: bool = False) -> Iterator[int]:
    """A descriptor for ``path``, closed on exit. ``create`` makes (or empties) the file
    with mode 0666 less the umask, as the C tool's ``fopen(name, "w+")``. Raises
    LogOpenError."""
    flags = os.O_CLOEXEC | (os.O_RDWR if writable or create else os.O_RDONLY)
    if create:
        flags |= os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        raise LogOpenError(path, exc) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def read_exact(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; fewer only at the end of the file."""
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def write_at(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (retrying short writes)."""
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        offset += done
        view = view[done:]


def read_header(fd: int, path: str, *, allow_trailing: bool = False) -> cbt.CbtHeader:
    """The header of the open log ``fd``, after checking that the file's length is what
    the header's disk size gives (as :func:`blktap.proto.cbt.parse_log`, without reading
    the bitmap). Raises the :class:`blktap.proto.cbt.CbtLogError` subclasses."""
    header = cbt.parse_header(read_exact(fd, cbt.HEADER_SIZE, 0), path=path)
    length = os.fstat(fd).st_size
    available = length - cbt.HEADER_SIZE
    if available < header.bitmap_size:
        raise cbt.BitmapTooSmallError(header.bitmap_size, available, header.size, path=path)
    if available > header.bitmap_size and not allow_trailing:
        raise cbt.SizeMismatchError(header.log_size, length, header.size, path=path)
    return header


def read_log(fd: int, path: str, *, allow_trailing: bool = False) -> cbt.CbtLog:
    """The whole log of the open ``fd``, validated (see :func:`read_header`)."""
    header = read_header(fd, path, allow_trailing=allow_trailing)
    bitmap = read_exact(fd, header.bitmap_size, cbt.HEADER_SIZE)
    if len(bitmap) != header.bitmap_size:  # the file shrank under us
        raise cbt.BitmapTooSmallError(header.bitmap_size, len(bitmap), header.size, path=path)
    return cbt.CbtLog(header, bitmap)


def write_changed(fd: int, old: bytes, new: bytes, offset: int) -> None:
    """Write the span of ``new`` that differs from ``old`` (equal lengths) at ``offset``
    plus its position; nothing when they are equal. Keeps the window in which a tapdisk
    marking bits in the same file could lose a bit to this read-modify-write as small as
    the change itself."""
    assert len(old) == len(new)
    diff = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    if not diff:
        return
    first = ((diff & -diff).bit_length() - 1) >> 3
    last = (diff.bit_length() - 1) >> 3
    write_at(fd, memoryview(new)[first:last + 1], offset + first)


def sync(fd: int) -> None:
    """Make what was written durable."""
    os.fsync(fd)


def sync_directory(path: str) -> None:
    """Make a new directory entry for ``path`` durable (best effort: some file systems
    refuse fsync on a directory)."""
    parent = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(OSError):
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
