"""Writes handed to the kernel's own worker threads through io_uring, for asyncio.

Used for large buffered writes (blktap.block.drivers.aio): copying a MiB into the page
cache takes a few hundred microseconds of CPU. A Python worker thread doing it contends
with the event loop for the GIL on every hand-off (a dozen futex calls per MiB); an
io_uring request with IOSQE_ASYNC is copied by a kernel io-wq thread, on another CPU,
with no Python thread involved: the loop submits with one ``io_uring_enter`` and learns
of the completion through an eventfd it watches, as for Linux AIO.

Only what that needs: one submission queue and completion queue mapped into the
process, IORING_OP_WRITE requests, an eventfd registered for completions. x86_64 only
(elsewhere reading and writing the rings needs memory barriers Python cannot express);
:func:`for_loop` returns None wherever io_uring cannot be set up, and callers keep their
other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
import threading
from collections import deque
from typing import Any, ClassVar

from blktap.util.eager import Batch, EagerFuture

log = logging.getLogger(__name__)

# include/uapi/linux/io_uring.h, x86_64 system call numbers
_NR_SETUP, _NR_ENTER, _NR_REGISTER = 425, 426, 427
_OFF_SQ_RING, _OFF_SQES = 0, 0x10000000  # (the CQ ring shares the SQ ring's mapping)
_FEAT_SINGLE_MMAP = 1 << 0
_REGISTER_EVENTFD = 4
_OP_WRITE = 23
_SQE_ASYNC = 1 << 4
# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets (8 u32 and
# a u64 each).
_PARAMS = struct.Struct("<10I8IQ8IQ")
# struct io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data,
# buf_index, personality, splice_fd_in, addr3, pad
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
_CQE = struct.Struct("<QiI")  # user_data, res, flags
CQE = _CQE
"""struct io_uring_cqe (16 bytes): user_data, res, flags."""

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall


class Rings:
    """An io_uring's mapped submission and completion rings, shared by the rings of
    this package and blktap.frontends.fuse_uring: :func:`open_rings` makes one.

    The ``c_uint32`` views (``sq_tail``, ``cq_head``, ...) are the kernel's ring
    indexes, read and written in place; ``sq_mask``, ``cq_mask``, ``sq_entries`` and
    ``cqes`` (the CQE array's offset in ``rings``) are plain values. Each submission
    slot names the SQE of the same index, for good."""

    def __init__(self, fd: int, params: tuple[int, ...], sqe_size: int) -> None:
        if not params[5] & _FEAT_SINGLE_MMAP:  # features
            raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP")
        self.fd = fd
        self.maps: list[mmap.mmap] = []
        try:
            self._map_all(params, sqe_size)
        except BaseException:
            self.unmap()
            raise

    def _map_all(self, params: tuple[int, ...], sqe_size: int) -> None:
        sq_entries, cq_entries = params[:2]
        (_sq_head, sq_tail, sq_mask, _n, sq_flags, _dropped, sq_array) = params[10:17]
        (cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes, cq_flags) = params[19:26]
        self.rings = rings = self._map(
            max(sq_array + sq_entries * 4, cqes + cq_entries * _CQE.size), _OFF_SQ_RING)
        self.sqes = self._map(sq_entries * sqe_size, _OFF_SQES)
        self.sq_entries = sq_entries
        self.sq_tail = ctypes.c_uint32.from_buffer(rings, sq_tail)
        self.sq_mask = ctypes.c_uint32.from_buffer(rings, sq_mask).value
        self.sq_flags = ctypes.c_uint32.from_buffer(rings, sq_flags)
        self.cq_head = ctypes.c_uint32.from_buffer(rings, cq_head)
        self.cq_tail = ctypes.c_uint32.from_buffer(rings, cq_tail)
        self.cq_mask = ctypes.c_uint32.from_buffer(rings, cq_mask).value
        self.cq_flags = ctypes.c_uint32.from_buffer(rings, cq_flags)
        self.cqes = cqes
        for i in range(sq_entries):
            struct.pack_into("<I", rings, sq_array + 4 * i, i)

    def _map(self, size: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.maps.append(m)
        return m

    def unmap(self) -> None:
        """Drop the views (they export the mappings' buffers) and unmap what can be."""
        self.sq_tail = self.sq_flags = None  # type: ignore[assignment]
        self.cq_head = self.cq_tail = self.cq_flags = None  # type: ignore[assignment]
        for m in self.maps:
            with contextlib.suppress(BufferError):
                m.close()
        self.maps.clear()


def setup(entries: int, flags: int = 0) -> tuple[int, tuple[int, ...]]:
    """``io_uring_setup(entries)`` with ``flags`` (IORING_SETUP_*): the ring's
    descriptor and its ``struct io_uring_params``, unpacked. Raises OSError."""
    raw = ctypes.create_string_buffer(_PARAMS.size)
    struct.pack_into("<I", raw, 8, flags)
    while (fd := _syscall(_NR_SETUP, entries, raw)) < 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
    return fd, _PARAMS.unpack(raw.raw)


def open_rings(fd: int, params: tuple[int, ...], sqe_size: int) -> Rings:
    """Map the rings of the io_uring ``fd`` made by :func:`setup` (``sqe_size``: 64, or
    128 with IORING_SETUP_SQE128). Raises OSError; unmaps what it mapped then."""
    return Rings(fd, params, sqe_size)


def register_eventfd(fd: int) -> int:
    """A new non-blocking eventfd registered with the io_uring ``fd`` (signalled on
    completions). Raises OSError (the eventfd closed)."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    arg = ctypes.c_int32(efd)
    if _syscall(_NR_REGISTER, fd, _REGISTER_EVENTFD, ctypes.byref(arg), 1) < 0:
        err = ctypes.get_errno()
        os.close(efd)
        raise OSError(err, f"io_uring_register(EVENTFD): {os.strerror(err)}")
    return efd


DEPTH = 64
"""Most writes in the kernel at once; more wait in order."""


class Uring:
    """One io_uring of an event loop, for writes. Create it with :func:`for_loop`."""

    _by_loop: ClassVar[dict[asyncio.AbstractEventLoop, Uring]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, entries: int = DEPTH) -> None:
        self._loop = loop
        fd, params = setup(entries)
        self._fd = fd
        try:
            r = self._r = open_rings(fd, params, _SQE.size)
        except BaseException:
            os.close(fd)
            raise
        try:
            self._efd = register_eventfd(fd)
        except BaseException:
            r.unmap()
            os.close(fd)
            raise
        # Without SQPOLL the kernel takes each SQE during our io_uring_enter: the
        # submission queue never holds more than the one being submitted.
        self._rings, self._sqes, self._cqes = r.rings, r.sqes, r.cqes
        self._sq_tail, self._sq_mask, self._sq_entries = r.sq_tail, r.sq_mask, r.sq_entries
        self._cq_head, self._cq_tail, self._cq_mask = r.cq_head, r.cq_tail, r.cq_mask
        self._futs: dict[int, tuple[EagerFuture[int], Any]] = {}
        # Requests past DEPTH: (tag, future, fd, addr, nbytes, offset, keep, rw_flags).
        self._waiting: deque[tuple[int, EagerFuture[int], int, int, int, int, Any, int]] = deque()
        self._serial = 0
        self._batch = Batch(loop)
        self._closed = False
        self._refs = 0
        loop.add_reader(self._efd, self._on_completions)

    # ------------------------------------------------------------------ requests
    def write(self, fd: int, addr: int, nbytes: int, offset: int, keep: Any,
              rw_flags: int = 0) -> EagerFuture[int]:
        """Write ``nbytes`` from memory at ``addr`` (kept alive by ``keep``) to ``fd`` at
        ``offset`` in a kernel worker; resolves to the bytes written (maybe short) or
        fails with OSError."""
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the io_uring is closed")
        fut: EagerFuture[int] = EagerFuture(loop=self._loop)
        self._serial += 1
        request = (self._serial, fut, fd, addr, nbytes, offset, keep, rw_flags)
        if len(self._futs) >= self._sq_entries:
            self._waiting.append(request)
        else:
            self._submit(*request)
        return fut

    def _submit(self, tag: int, fut: EagerFuture[int], fd: int, addr: int, nbytes: int,
                offset: int, keep: Any, rw_flags: int) -> None:
        tail = self._sq_tail.value
        index = tail & self._sq_mask
        _SQE.pack_into(self._sqes, index * _SQE.size, _OP_WRITE, _SQE_ASYNC, 0, fd, offset,
                       addr, nbytes, rw_flags, tag, 0, 0, 0, 0, 0)
        # x86: the SQE's stores are seen before the tail's (the kernel reads the tail
        # with acquire semantics).
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF
        self._futs[tag] = (fut, keep)
        while _syscall(_NR_ENTER, self._fd, 1, 0, 0, None, 0) < 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                # The SQE stays in the ring (a later enter may still take it): its
                # buffer stays referenced until it completes; the write failed.
                fut.fail(OSError(err, f"io_uring_enter: {os.strerror(err)}"))
                return

    def _on_completions(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._batch:
            self._reap()

    def _reap(self) -> None:
        rings = self._rings
        head = self._cq_head.value
        tail = self._cq_tail.value
        done = []
        futs = self._futs
        while head != tail:
            tag, res, _flags = _CQE.unpack_from(
                rings, self._cqes + (head & self._cq_mask) * _CQE.size)
            head = (head + 1) & 0xFFFFFFFF
            entry = futs.pop(tag, None)
            if entry is not None:
                done.append((entry[0], res))
        self._cq_head.value = head
        waiting = self._waiting
        while waiting and len(futs) < self._sq_entries:
            self._submit(*waiting.popleft())
        for fut, res in done:
            if fut.done():
                continue
            if res >= 0:
                fut.resolve(res)
            else:
                fut.fail(OSError(-res, os.strerror(-res)))

    # ------------------------------------------------------------------- closing
    def release(self) -> None:
        """Drop one reference from :func:`for_loop`; the last one closes the ring."""
        self._refs -= 1
        if self._refs <= 0:
            self.close()

    def close(self) -> None:
        """Stop watching completions and release the ring once no write is in the
        kernel (a thread waits for them otherwise). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if Uring._by_loop.get(self._loop) is self:
            del Uring._by_loop[self._loop]
        with contextlib.suppress(RuntimeError):
            self._loop.remove_reader(self._efd)
        for fut, _keep in self._futs.values():
            if not fut.done():
                fut.fail(OSError(errno.ESHUTDOWN, "the io_uring was closed"))
        for request in self._waiting:
            if not request[1].done():
                request[1].fail(OSError(errno.ESHUTDOWN, "the io_uring was closed"))
        self._waiting.clear()
        inflight = len(self._futs)
        keep = [k for _f, k in self._futs.values()]
        self._futs.clear()
        self._unmap()
        os.close(self._efd)
        if not inflight:
            os.close(self._fd)
            return
        # Writes still in the kernel read their buffers: keep them until done.
        log.warning("closing the io_uring with %d writes in flight", inflight)
        threading.Thread(target=_wait_and_close, args=(self._fd, inflight, keep),
                         name="uring-close", daemon=True).start()

    def _unmap(self) -> None:
        # The ctypes views export the mapping's buffer: drop them so that it can close.
        self._sq_tail = self._cq_head = self._cq_tail = None  # type: ignore[assignment]
        self._r.unmap()


def _wait_and_close(fd: int, inflight: int, keep: list[Any]) -> None:
    # IORING_ENTER_GETEVENTS: wait for that many completions (nobody reaps them).
    if _syscall(_NR_ENTER, fd, 0, inflight, 1, None, 0) < 0:
        log.error("io_uring_enter: %s", os.strerror(ctypes.get_errno()))
    os.close(fd)
    keep.clear()


_unavailable: set[str] = set()


def for_loop(loop: asyncio.AbstractEventLoop) -> Uring | None:
    """The io_uring of ``loop`` (created on first use), with a reference taken: pair
    with :meth:`Uring.release`. None where io_uring cannot be used (not x86_64,
    disabled, too old a kernel): logged once."""
    ring = Uring._by_loop.get(loop)
    if ring is not None:
        ring._refs += 1
        return ring
    if _unavailable:
        return None
    if platform.machine() != "x86_64":
        _unavailable.add("machine")
        return None
    try:
        ring = Uring(loop)
    except OSError as exc:
        _unavailable.add(str(exc))
        log.info("io_uring unavailable (%s): large buffered writes use a worker thread", exc)
        return None
    Uring._by_loop[loop] = ring
    ring._refs = 1
    return ring
