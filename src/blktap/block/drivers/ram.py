"""The ``ram`` driver: an image held in memory (the C ``block-ram.c``).

``ram:/path`` reads the whole file (or block device) at ``path`` into memory when it is
opened; reads and writes are then served from memory and writes are never written back:
closing the image discards them. The file is opened read-only with ``O_NOATIME`` where
permitted, so opening it changes nothing on disk, not even its access time.

Differences from the C driver: every open holds its own copy (the C one shares a single
process-wide buffer between opens of the same image), and the size is the file size
rounded down to whole sectors, as in C.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from blktap.block.driver import (
    SECTOR_SIZE,
    Alloc,
    Extent,
    FastIO,
    ImageInfo,
    OpenOptions,
    register,
)
from blktap.errors import ImageFormatError, ReadOnly

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


def _open_noatime(path: str) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        # O_NOATIME needs ownership or CAP_FOWNER; without it fall back to a plain open.
        return os.open(path, flags)


def _load(path: str) -> bytearray:
    fd = _open_noatime(path)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise ImageFormatError(
                "not a regular file or block device", path=path, errno=errno.EINVAL
            )
        size -= size % SECTOR_SIZE
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done : min(size, done + _CHUNK)]], done)
            if n == 0:
                raise OSError(errno.EIO, f"{path}: file shrank while loading it into memory")
            done += n
        return data
    finally:
        os.close(fd)


class RamImage:
    """An open ``ram`` image. All I/O completes without waiting."""

    type_name = "ram"
    parent = None
    fully_allocated = True

    def __init__(self, path: str, data: bytearray, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.info = ImageInfo(size=len(data))
        self._data: bytearray | None = data
        self._view = memoryview(data)

    def fast_io(self) -> FastIO:
        """Memory never waits: synchronous reads and writes."""
        return FastIO(read_now=self.read_now, write_now=self.write_now)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        """Always one DATA extent: the whole image is held."""
        return [Extent(offset, length, Alloc.DATA)]

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Always one DATA extent (holes are not tracked in memory)."""
        return [Extent(offset, length, Alloc.DATA)]

    async def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._view[offset : offset + len(buf)]

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """:meth:`read`, synchronously (see blktap.block.driver)."""
        buf[:] = self._view[offset : offset + len(buf)]
        return True

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.path}: the ram image is open read-only")

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Copy ``data`` into memory (``fua`` changes nothing: memory is all there is)."""
        self._check_writable()
        self._view[offset : offset + len(data)] = data

    def write_now(self, offset: int, data: memoryview, fua: bool = False) -> bool:
        """:meth:`write`, synchronously (see blktap.block.driver)."""
        self._check_writable()
        self._view[offset : offset + len(data)] = data
        return True

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check_writable()
        self._view[offset : offset + length] = bytes(length)

    async def discard(self, offset: int, length: int) -> None:
        """Zeroes the range (a discard may read back as zeros)."""
        self._check_writable()
        self._view[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        """Nothing to do: writes to a ram image are never written back."""

    async def close(self) -> None:
        """Drop the memory. Idempotent."""
        self._view.release()
        self._data = None


async def open_ram(path: str, options: OpenOptions) -> RamImage:
    """Open ``ram:path``: load the file into memory.

    Raises OSError (ENOENT for a missing file, ...) or ImageFormatError for a path that is
    neither a regular file nor a block device. ``options.direct`` is ignored.
    """
    data = _load(path)
    log.debug("ram: loaded %s (%d bytes)", path, len(data))
    return RamImage(path, data, options.read_only)


register("ram", open_ram)
