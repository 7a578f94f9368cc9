"""The ``aio`` driver: a raw image in a regular file or on a block device.

Two modes, chosen by :attr:`OpenOptions.direct` (the C tapdisk opens with ``O_DIRECT``
unless the OPEN message carries NO_O_DIRECT):

* **direct** — ``O_DIRECT`` with Linux native AIO (:mod:`blktap.util.linux_aio`): no page
  cache, many requests in flight, one ``io_submit`` per loop iteration. Buffers the
  caller passes that the device cannot take (memory address or length not aligned to its
  DIO alignment) go through an aligned bounce buffer. On a device whose logical block is
  larger than a sector (e.g. 4096), sector-aligned requests are widened to whole blocks:
  reads through a bounce buffer, writes by read-modify-write, with overlapping writes
  serialised so that two writes sharing a block both survive. When the filesystem
  refuses ``O_DIRECT`` the image falls back to buffered mode (logged once per
  filesystem). A read that finds the device idle (nothing of ours in flight) and fast is
  done synchronously instead, as ``read_now``: at queue depth 1 that answers sooner.
* **buffered** — plain synchronous ``os.preadv``/``os.pwritev`` from the coroutine, which
  then completes without waiting (a page-cache hit costs one system call); also offered
  as ``read_now``/``write_now``. Writes of ``SYNC_WRITE_MAX`` or more are copied into the
  page cache by a kernel worker (io_uring, :mod:`blktap.util.uring`) or, where io_uring
  cannot be used, a worker thread, overlapping the event loop's work.

``fua`` writes are written with ``RWF_DSYNC``. ``flush`` is ``fdatasync`` (an AIO
``IOCB_CMD_FDSYNC`` where the kernel has it, otherwise in a worker thread).
``write_zeroes`` uses ``fallocate`` (ZERO_RANGE, or PUNCH_HOLE when unmapping is
allowed) and falls back to writing zeros; ``discard`` punches holes in files and sends
BLKDISCARD to block devices, ignoring EOPNOTSUPP (a discard is advisory).

A read-only image is opened ``O_RDONLY`` with ``O_NOATIME`` (where permitted) and never
written, synced or otherwise modified: its timestamps stay as they were.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from blktap.block.driver import (
    SECTOR_SIZE,
    SYNC_WRITE_MAX,
    Alloc,
    Extent,
    FastIO,
    ImageInfo,
    OpenOptions,
    register,
)
from blktap.errors import ImageFormatError, ReadOnly
from blktap.util import uring
from blktap.util.buffers import aligned
from blktap.util.linux_aio import RWF_DSYNC, AioContext, AioUnavailable

log = logging.getLogger(__name__)

# include/uapi/linux/fs.h
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKGETSIZE64 = 0x80081272
# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# include/uapi/linux/stat.h, fcntl.h
STATX_DIOALIGN = 0x2000
AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 256
_STATX_MASK = struct.Struct("<I")
_STATX_DIOALIGN = struct.Struct("<II")  # stx_dio_mem_align, stx_dio_offset_align @152
_STATX_DIOALIGN_OFFSET = 152

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_statx = getattr(_libc, "statx", None)

_ZERO_CHUNK = 1 << 20
_NO_TAIL = 1 << 63
SYNC_READ_MAX = 64 * 1024
"""Direct reads larger than this always go to the kernel asynchronously."""
SYNC_READ_SLOW_NS = 200_000
"""When synchronous direct reads take longer than this on average (a slow or busy
device)..."""
SYNC_READ_BACKOFF_NS = 2_000_000_000
"""... makes direct reads asynchronous again for this long (then one is tried again)."""
_now_ns = time.perf_counter_ns
_BOUNCE_KEEP = 32  # free bounce buffers kept per size class
_BOUNCE_MAX = 1 << 20  # larger ones are not kept

_Bounce = tuple[memoryview, Any, int]  # (aligned buffer, its ctypes handle, its address)
_zero_buf: memoryview | None = None

# Filesystems (st_dev) on which a refused O_DIRECT has already been logged.
_buffered_fallback_logged: set[int] = set()

_c_char_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2). Raises OSError with the call's errno."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """``(memory, offset)`` alignment O_DIRECT needs on ``fd``, from statx STATX_DIOALIGN.

    None when the kernel or filesystem does not say; ``(0, 0)`` when the file does not
    support O_DIRECT at all.
    """
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf) != 0:
        return None
    (mask,) = _STATX_MASK.unpack_from(buf, 0)
    if not mask & STATX_DIOALIGN:
        return None
    mem, off = _STATX_DIOALIGN.unpack_from(buf, _STATX_DIOALIGN_OFFSET)
    return int(mem), int(off)


def _zeros() -> memoryview:
    global _zero_buf
    if _zero_buf is None:
        _zero_buf = aligned(_ZERO_CHUNK)
    return _zero_buf


class AioImage:
    """An open ``aio`` image. Create it with :func:`open_aio`.

    Also usable as the file I/O engine of another driver (O_DIRECT with bounce buffers
    and Linux AIO): :meth:`read`, :meth:`write` and :meth:`flush` then work anywhere in
    the file, and sector-aligned writes past :attr:`info` ``.size`` extend it (unless
    the size at open was not a multiple of the O_DIRECT alignment).
    """

    type_name = "aio"
    parent = None
    fully_allocated = True

    def __init__(
        self,
        path: str,
        fd: int,
        *,
        size: int,
        read_only: bool,
        is_block: bool,
        direct: bool,
        offset_align: int,
        mem_align: int,
        aio: AioContext | None,
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.info = ImageInfo(size=size)
        self.direct = direct
        """True when the image really is open with O_DIRECT."""
        self.offset_align = offset_align
        """Offset/length alignment of O_DIRECT I/O (SECTOR_SIZE in buffered mode)."""
        self.mem_align = mem_align
        self.is_block_device = is_block
        self._fd = fd
        self._aio = aio
        self._amask = offset_align - 1
        self._mmask = mem_align - 1
        self._rmw = direct and offset_align > SECTOR_SIZE
        # Bounce buffers by exact size, each with its ctypes handle and address.
        self._bounces: dict[int, list[_Bounce]] = {}
        self._written = False
        self._closed = False
        self._fdsync_aio = aio is not None
        # Overlapping writes in flight, only tracked in read-modify-write mode.
        self._write_ranges: list[tuple[int, int, asyncio.Future[None]]] = []
        # A buffered descriptor for the tail of a file whose size is not a multiple of
        # offset_align (O_DIRECT cannot write a partial block without growing the file).
        # Otherwise there is no tail: O_DIRECT may also extend the file (appends).
        tail = size % offset_align if direct else 0
        self._tail_start = size - tail if tail else _NO_TAIL
        self._tail_fd: int | None = None
        # Buffered I/O never waits for the loop: offer it synchronously too. So are
        # direct reads while the device is idle and fast (see _read_direct_now).
        self.read_now: Callable[[int, memoryview], bool] = (
            self._read_direct_now if aio is not None else self._read_buffered)
        self.write_now: Callable[[int, memoryview, bool], bool] | None = (
            None if aio is not None else self._write_buffered)
        # Any thread may read as the loop's synchronous reads do, minus their rules for
        # when blocking the loop is worth it (see _read_direct_blocking).
        self.read_blocking: Callable[[int, memoryview], bool] = (
            self._read_direct_blocking if aio is not None else self._read_buffered)
        # Buffered writes from any thread too (the page cache copy of a large one takes a
        # while: the thread's, not the loop's); direct ones go through AIO only.
        self.write_blocking: Callable[[int, memoryview, bool], bool] | None = (
            None if aio is not None else self._write_buffered)
        self._sync_reads_from = 0  # perf_counter_ns before which direct reads go async
        self._sync_read_ns = 0  # how long synchronous direct reads take, on average
        self._uring: uring.Uring | None = None  # large buffered writes (on the first one)
        self._uring_tried = False

    # ---------------------------------------------------------------- status
    def allocation(self, offset: int, length: int) -> list[Extent]:
        """Always one DATA extent: a raw image holds every byte."""
        return [Extent(offset, length, Alloc.DATA)]

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """DATA and ZERO (hole) extents from SEEK_DATA/SEEK_HOLE; all DATA on devices."""
        if self.is_block_device:
            return [Extent(offset, length, Alloc.DATA)]
        end = offset + length
        out: list[Extent] = []
        pos = offset
        fd = self._fd
        try:
            while pos < end:
                try:
                    data = min(end, os.lseek(fd, pos, os.SEEK_DATA))
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no data at or after pos
                        raise
                    data = end
                if data > pos:
                    out.append(Extent(pos, data - pos, Alloc.ZERO))
                    pos = data
                if pos >= end:
                    break
                try:
                    hole = min(end, os.lseek(fd, pos, os.SEEK_HOLE))
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    hole = end
                if hole <= pos:  # the file changed under us; do not loop forever
                    hole = end
                out.append(Extent(pos, hole - pos, Alloc.DATA))
                pos = hole
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, *_UNSUPPORTED):
                raise
            # No SEEK_DATA on this filesystem: everything is data.
            return [Extent(offset, length, Alloc.DATA)]
        return out

    # ----------------------------------------------------------------- reads
    def _read_buffered(self, offset: int, buf: memoryview) -> bool:
        if os.preadv(self._fd, (buf,), offset) != len(buf):
            _pread_full(self._fd, buf, offset)  # short (rare): again, to the end
        return True

    def _read_direct_now(self, offset: int, buf: memoryview) -> bool:
        """An O_DIRECT read done synchronously, blocking the event loop, when that is
        faster than asking the kernel asynchronously: nothing of ours is in flight and
        the load is one request at a time (AioContext.may_block; checked first, cheaply,
        with ``inflight``), the request is aligned and at most SYNC_READ_MAX bytes,
        and such reads have taken less than SYNC_READ_SLOW_NS on average.

        One request at a time (queue depth 1) is where this pays: on a fast device the
        read costs the same, and the AIO round trip (submission, eventfd wake-up,
        completion, Python resuming a coroutine after it) is what a client waits for.
        When they get slower, reads go asynchronous for SYNC_READ_BACKOFF_NS: a slow
        device blocks the loop for a few reads every few seconds, no more. Returns
        False, having done nothing, otherwise (also when O_DIRECT refuses the memory:
        read() bounces it).
        """
        aio = self._aio
        assert aio is not None
        n = len(buf)
        if (aio.inflight or n > SYNC_READ_MAX or (offset | n) & self._amask
                or offset + n > self._tail_start
                or (self._sync_reads_from and _now_ns() < self._sync_reads_from)
                or not aio.may_block()):
            return False  # declined: read() sends it to the kernel
        start = _now_ns()
        if not self._read_direct_blocking(offset, buf):
            return False  # memory O_DIRECT refuses: read() bounces it
        # A moving average of how long these reads take (one outlier weighs little).
        took = min(_now_ns() - start, 4 * SYNC_READ_SLOW_NS)
        average = self._sync_read_ns = self._sync_read_ns + ((took - self._sync_read_ns) >> 3)
        if average > SYNC_READ_SLOW_NS:
            self._sync_reads_from = start + SYNC_READ_BACKOFF_NS
            self._sync_read_ns = 0
        elif self._sync_reads_from:
            self._sync_reads_from = 0  # the back-off is over
        return True

    def _read_direct_blocking(self, offset: int, buf: memoryview) -> bool:
        """A direct read with one ``preadv``, in whatever thread calls it (this is
        ``read_blocking``; ``_read_direct_now`` adds the loop's rules): an aligned request
        within the aligned part of the image. Declines (False) what needs a bounce buffer
        or the tail descriptor."""
        n = len(buf)
        if (offset | n) & self._amask or offset + n > self._tail_start:
            return False
        try:
            got = os.preadv(self._fd, (buf,), offset)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False  # memory O_DIRECT refuses: read() bounces it
            raise
        if got != n:
            raise OSError(errno.EIO, f"{self.path}: short read ({got} of {n} bytes at {offset})")
        return True

    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``. Raises OSError (EIO for a short read).

        On failure ``buf`` is undefined. In direct mode the kernel may still be filling
        ``buf`` after a cancellation: a cancelled caller must not reuse it at once.
        """
        aio = self._aio
        n = len(buf)
        if aio is None:
            _pread_full(self._fd, buf, offset)
            return
        if not (offset | n) & self._amask and offset + n <= self._tail_start:
            obj = _c_char_from_buffer(buf)
            addr = _addressof(obj)
            if not addr & self._mmask:
                res = await aio.pread(self._fd, addr, n, offset, obj)
                if res != n:
                    await self._direct_rest(False, addr, n, offset, obj, res, 0)
                return
        await self._read_bounce(offset, buf)

    async def _read_bounce(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        lo = offset & ~self._amask
        hi = (offset + n + self._amask) & ~self._amask
        if hi > self._tail_start:
            _pread_full(self._tail(), buf, offset)
            return
        bounce = self._bounce_get(hi - lo)
        view, obj, addr = bounce
        assert self._aio is not None
        res = await self._aio.pread(self._fd, addr, hi - lo, lo, obj)
        if res != hi - lo:
            await self._direct_rest(False, addr, hi - lo, lo, obj, res, 0)
        buf[:] = view[offset - lo : offset - lo + n]
        # Only a bounce buffer no longer in the kernel's hands goes back to the pool (after
        # an error or a cancellation it may still be in flight: it is simply dropped).
        self._bounce_put(bounce)

    def _bounce_get(self, size: int) -> _Bounce:
        """An aligned buffer of at least ``size`` bytes (a power of two, one page or more)."""
        cls = 4096
        while cls < size:
            cls <<= 1
        free = self._bounces.get(cls)
        if free:
            return free.pop()
        view = aligned(cls)
        obj = _c_char_from_buffer(view)
        return view, obj, _addressof(obj)

    def _bounce_put(self, bounce: _Bounce) -> None:
        size = len(bounce[0])
        if size > _BOUNCE_MAX:
            return
        free = self._bounces.setdefault(size, [])
        if len(free) < _BOUNCE_KEEP:
            free.append(bounce)

    async def _direct_io(self, write: bool, buf: memoryview, offset: int, rw_flags: int) -> None:
        """Whole-buffer O_DIRECT I/O; ``buf`` must be aligned."""
        assert self._aio is not None
        obj = _c_char_from_buffer(buf)
        addr = _addressof(obj)
        n = len(buf)
        if write:
            res = await self._aio.pwrite(self._fd, addr, n, offset, obj, rw_flags)
        else:
            res = await self._aio.pread(self._fd, addr, n, offset, obj)
        if res != n:
            await self._direct_rest(write, addr, n, offset, obj, res, rw_flags)

    async def _direct_rest(
        self, write: bool, addr: int, n: int, offset: int, keep: Any, done: int, rw_flags: int
    ) -> None:
        """Continue a request the kernel completed short (``done`` of ``n`` bytes)."""
        assert self._aio is not None
        res = done
        while done < n:
            if res == 0 or done & self._amask:  # end of file, or cannot continue aligned
                what = "write" if write else "read"
                raise OSError(
                    errno.EIO, f"{self.path}: short {what} ({done} of {n} bytes at {offset})"
                )
            if write:
                res = await self._aio.pwrite(
                    self._fd, addr + done, n - done, offset + done, keep, rw_flags
                )
            else:
                res = await self._aio.pread(self._fd, addr + done, n - done, offset + done, keep)
            done += res

    # ---------------------------------------------------------------- writes
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.path}: the image is open read-only")

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` durable (RWF_DSYNC) on return.

        Raises ReadOnly, OSError; on failure (or cancellation) the range's contents are
        undefined and bytes outside it are untouched.
        """
        aio = self._aio
        if aio is None and len(data) < SYNC_WRITE_MAX:
            self._write_buffered(offset, data, fua)
            return
        if self.read_only:
            self._check_writable()
        self._written = True
        if aio is None:
            # A large copy into the page cache runs in a kernel worker (io_uring) or,
            # without io_uring, in a worker thread, while the loop receives the next
            # requests.
            flags = os.RWF_DSYNC if fua else 0
            loop = asyncio.get_running_loop()
            ring = self._uring
            if ring is None and not self._uring_tried:
                self._uring_tried = True
                ring = self._uring = uring.for_loop(loop)
            if ring is not None:
                try:
                    held = _c_char_from_buffer(data)
                except TypeError:  # read-only memory: no address for the kernel
                    pass
                else:
                    n = len(data)
                    done = await ring.write(self._fd, _addressof(held), n, offset, held, flags)
                    if done < n:  # short (rare): the rest synchronously
                        _pwrite_full(self._fd, data[done:], offset + done, flags)
                    return
            await loop.run_in_executor(_copier(), _pwrite_full, self._fd, data, offset, flags)
            return
        n = len(data)
        if not self._rmw and not (offset | n) & self._amask and offset + n <= self._tail_start:
            try:
                obj = _c_char_from_buffer(data)
            except TypeError:  # a read-only buffer: the kernel only reads it, but ctypes
                obj = None  # cannot give its address; bounce it
            if obj is not None:
                addr = _addressof(obj)
                if not addr & self._mmask:
                    flags = RWF_DSYNC if fua else 0
                    res = await aio.pwrite(self._fd, addr, n, offset, obj, flags)
                    if res != n:
                        await self._direct_rest(True, addr, n, offset, obj, res, flags)
                    return
        await self._write_slow(offset, data, fua)

    def fast_io(self) -> FastIO:
        """Synchronous and blocking reads always (direct ones only while the device is
        idle and fast); writes and the lent descriptor in buffered mode only."""
        return FastIO(read_now=self.read_now, write_now=self.write_now,
                      read_blocking=self.read_blocking, write_blocking=self.write_blocking,
                      sync_fd=self.sync_fd if self._aio is None else None)

    def sync_fd(self) -> int | None:
        """The descriptor for requests served without the driver (see Image's ``sync_fd``):
        buffered mode only (O_DIRECT needs aligned memory and goes through AIO)."""
        if self._aio is not None:
            return None
        if not self.read_only:
            self._written = True  # the caller may write through it: close flushes
        return self._fd

    def _write_buffered(self, offset: int, data: memoryview, fua: bool = False) -> bool:
        if self.read_only:
            self._check_writable()
        self._written = True
        flags = os.RWF_DSYNC if fua else 0
        if os.pwritev(self._fd, (data,), offset, flags) != len(data):
            _pwrite_full(self._fd, data, offset, flags)  # short (rare): again, whole
        return True

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        n = len(data)
        hi = (offset + n + self._amask) & ~self._amask
        if not self._rmw and hi > self._tail_start:
            _pwrite_full(self._tail(), data, offset, os.RWF_DSYNC if fua else 0)
            return
        if not self._rmw:  # aligned range, unaligned memory: copy to an aligned buffer
            bounce = self._bounce_get(n)
            view, obj, addr = bounce
            view[:n] = data
            assert self._aio is not None
            flags = RWF_DSYNC if fua else 0
            res = await self._aio.pwrite(self._fd, addr, n, offset, obj, flags)
            if res != n:
                await self._direct_rest(True, addr, n, offset, obj, res, flags)
            self._bounce_put(bounce)  # not after a failure: see _read_bounce
            return
        # Shielded: a cancelled caller must not release the range while its block write
        # may still be in flight (a later read-modify-write would race with it).
        await asyncio.shield(self._write_rmw(offset, data, fua))

    async def _write_rmw(self, offset: int, data: memoryview, fua: bool) -> None:
        """Read-modify-write whole blocks, excluding any overlapping write meanwhile."""
        n = len(data)
        lo = offset & ~self._amask
        hi = (offset + n + self._amask) & ~self._amask
        await self._lock_range(lo, hi)
        try:
            if hi > self._tail_start:
                _pwrite_full(self._tail(), data, offset, os.RWF_DSYNC if fua else 0)
                return
            bounce = self._bounce_get(hi - lo)
            view = bounce[0][: hi - lo]
            block = self._amask + 1
            if lo < offset:
                await self._direct_io(False, view[:block], lo, 0)
            if offset + n < hi and (hi - block > lo or lo == offset):
                await self._direct_io(False, view[hi - lo - block :], hi - block, 0)
            view[offset - lo : offset - lo + n] = data
            await self._direct_io(True, view, lo, RWF_DSYNC if fua else 0)
            self._bounce_put(bounce)  # not after a failure: see _read_bounce
        finally:
            self._unlock_range(lo, hi)

    async def _lock_range(self, lo: int, hi: int) -> None:
        while True:
            for a, b, fut in self._write_ranges:
                if a < hi and lo < b:
                    await asyncio.shield(fut)
                    break
            else:
                break
        self._write_ranges.append((lo, hi, asyncio.get_running_loop().create_future()))

    def _unlock_range(self, lo: int, hi: int) -> None:
        for i, (a, b, fut) in enumerate(self._write_ranges):
            if a == lo and b == hi:
                del self._write_ranges[i]
                if not fut.done():
                    fut.set_result(None)
                return

    def _tail(self) -> int:
        """A buffered descriptor on the same file, for the partial last block."""
        if self._tail_fd is None:
            self._tail_fd = _open_fd(f"/proc/self/fd/{self._fd}", self.read_only, False)
        return self._tail_fd

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeros: fallocate, else write zero bytes."""
        self._check_writable()
        self._written = True
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if may_unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        if self.is_block_device and (offset | length) & self._amask:
            modes = []  # the device takes only whole logical blocks
        if modes:
            # In read-modify-write mode a concurrent write to the rest of a shared block
            # must not write back what this call zeroes.
            lo = offset & ~self._amask
            hi = (offset + length + self._amask) & ~self._amask
            if self._rmw:
                await self._lock_range(lo, hi)
            try:
                for mode in modes:
                    try:
                        await self._fallocate(mode, offset, length)
                        return
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, *_UNSUPPORTED):
                            raise
            finally:
                if self._rmw:
                    self._unlock_range(lo, hi)
        zeros = _zeros()
        pos = offset
        end = offset + length
        while pos < end:
            chunk = min(end - pos, _ZERO_CHUNK)
            await self.write(pos, zeros[:chunk])
            pos += chunk

    async def discard(self, offset: int, length: int) -> None:
        """Advisory: punch a hole (files) or BLKDISCARD (devices); EOPNOTSUPP is ignored."""
        self._check_writable()
        self._written = True
        try:
            if self.is_block_device:
                lo = (offset + self._amask) & ~self._amask
                hi = (offset + length) & ~self._amask
                if lo < hi:
                    rng = struct.pack("=QQ", lo, hi - lo)
                    await asyncio.get_running_loop().run_in_executor(
                        None, fcntl.ioctl, self._fd, BLKDISCARD, rng
                    )
            else:
                lo = offset & ~self._amask
                hi = (offset + length + self._amask) & ~self._amask
                if self._rmw:  # see write_zeroes
                    await self._lock_range(lo, hi)
                try:
                    fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                finally:
                    if self._rmw:
                        self._unlock_range(lo, hi)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.debug("%s: discard not supported: %s", self.path, exc)

    async def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if self.is_block_device:  # may write zeros for a long time: keep the loop free
            await asyncio.get_running_loop().run_in_executor(
                None, fallocate, self._fd, mode, offset, length
            )
        else:
            fallocate(self._fd, mode, offset, length)

    # ----------------------------------------------------------------- flush
    async def flush(self) -> None:
        """fdatasync: every write completed before the call is durable when it returns.

        A read-only image is never synced.
        """
        if self.read_only:
            return
        if self._fdsync_aio and self._aio is not None:
            try:
                await self._aio.fdsync(self._fd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, *_UNSUPPORTED):
                    raise
                log.info("%s: no AIO fdatasync here, using a thread", self.path)
                self._fdsync_aio = False
        await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self._fd)

    async def close(self) -> None:
        """Flush if anything was written, then close. Idempotent.

        The descriptors are closed and the AIO context released even when the final
        flush fails; its error is raised afterwards.
        """
        if self._closed:
            return
        try:
            if self._written and not self.read_only:
                await self.flush()
        finally:
            self._closed = True
            self._bounces.clear()
            if self._aio is not None:
                self._aio.release()
                self._aio = None
            if self._uring is not None:
                self._uring.release()
                self._uring = None
            if self._tail_fd is not None:
                os.close(self._tail_fd)
                self._tail_fd = None
            os.close(self._fd)


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    n = os.preadv(fd, (buf,), offset)
    if n == len(buf):
        return
    done = n
    while done < len(buf):
        if n == 0:
            raise OSError(errno.EIO, f"short read at {offset + done} (end of file)")
        n = os.preadv(fd, (buf[done:],), offset + done)
        done += n


_copier_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _copier() -> concurrent.futures.ThreadPoolExecutor:
    """The one worker thread of the process for large buffered writes (created on first
    use; one is enough to overlap the copy with the event loop, and keeps them in order)."""
    global _copier_pool
    if _copier_pool is None:
        _copier_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aio-copy")
    return _copier_pool


def _pwrite_full(fd: int, data: memoryview, offset: int, flags: int) -> None:
    n = os.pwritev(fd, (data,), offset, flags)
    done = n
    while done < len(data):
        if n == 0:
            raise OSError(errno.EIO, f"short write at {offset + done}")
        n = os.pwritev(fd, (data[done:],), offset + done, flags)
        done += n


def _open_fd(path: str, read_only: bool, direct: bool) -> int:
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    if read_only:
        try:
            return os.open(path, flags | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
            pass
    return os.open(path, flags)


def _log_buffered_fallback(path: str, st_dev: int, why: str) -> None:
    if st_dev in _buffered_fallback_logged:
        return
    _buffered_fallback_logged.add(st_dev)
    log.warning("%s: O_DIRECT is not available (%s); using buffered I/O", path, why)


def _probe_offset_align(fd: int, size: int) -> int:
    """Find the O_DIRECT offset alignment of a file by trying a 512-byte read."""
    if size < 4096:
        return SECTOR_SIZE
    buf = aligned(SECTOR_SIZE)
    try:
        os.preadv(fd, (buf,), 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return 4096
    return SECTOR_SIZE


async def open_aio(path: str, options: OpenOptions) -> AioImage:
    """Open ``aio:path`` (a regular file or a block device).

    Raises OSError (ENOENT, EACCES, ...) or ImageFormatError when ``path`` is neither a
    regular file nor a block device. Nothing stays open after a failure.
    """
    read_only = options.read_only
    direct = options.direct
    st = os.stat(path)
    try:
        fd = _open_fd(path, read_only, direct)
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        _log_buffered_fallback(path, st.st_dev, "refused at open")
        direct = False
        fd = _open_fd(path, read_only, False)
    aio: AioContext | None = None
    try:
        st = os.fstat(fd)
        is_block = stat.S_ISBLK(st.st_mode)
        if is_block:
            size = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            raise ImageFormatError(
                "not a regular file or block device", path=path, errno=errno.EINVAL
            )
        if size % SECTOR_SIZE:
            log.debug("%s: size %d is not a whole number of sectors; rounding down", path, size)
            size -= size % SECTOR_SIZE
        offset_align = mem_align = SECTOR_SIZE
        if direct:
            dio = dio_alignment(fd)
            if dio == (0, 0):
                _log_buffered_fallback(path, st.st_dev, "the filesystem does not support it")
                os.close(fd)
                fd = -1
                fd = _open_fd(path, read_only, False)
                direct = False
            elif dio is not None:
                mem_align, offset_align = dio
            elif is_block:
                lbs = struct.unpack("=i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
                offset_align = mem_align = int(lbs)
            else:
                offset_align = _probe_offset_align(fd, size)
                mem_align = offset_align
        offset_align = max(offset_align, SECTOR_SIZE)
        mem_align = max(mem_align, 1)
        if direct:
            try:
                aio = AioContext.for_loop()
            except AioUnavailable as exc:
                log.warning("%s: Linux AIO unavailable (%s); using buffered I/O", path, exc)
                os.close(fd)
                fd = -1
                fd = _open_fd(path, read_only, False)
                direct = False
        if not direct:
            offset_align = mem_align = SECTOR_SIZE
        image = AioImage(
            path, fd, size=size, read_only=read_only, is_block=is_block, direct=direct,
            offset_align=offset_align, mem_align=mem_align, aio=aio,
        )  # fmt: skip
    except BaseException:
        if aio is not None:
            aio.release()
        if fd >= 0:
            os.close(fd)
        raise
    log.debug(
        "aio: opened %s size=%d direct=%s align=%d/%d%s", path, size, direct, offset_align,
        mem_align, " read-only" if read_only else "",
    )  # fmt: skip
    return image


register("aio", open_aio)
