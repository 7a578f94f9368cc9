"""Linux native AIO (io_setup / io_submit / io_getevents) for asyncio, through ctypes.

One :class:`AioContext` serves every image of an event loop (as the C tapdisk has one
``tapdisk-queue`` per process). Requests return asyncio futures:

* requests queued during one loop iteration go to the kernel together, in one
  ``io_submit`` scheduled with ``loop.call_soon`` once per batch, or in a few growing
  batches when the device is busy with fewer (see ``submit_batch``); a request that
  finds nothing in flight goes to the kernel at once;
* every iocb carries ``IOCB_FLAG_RESFD`` so that completions bump an eventfd the loop
  watches (``loop.add_reader``); one wake-up reaps every completed event at once, as one
  :class:`blktap.util.eager.Batch` (eager waiters resume there and then); on x86_64 the
  events are read straight from the completion ring the kernel maps into the process
  (as QEMU and fio do), elsewhere with ``io_getevents``;
* a batch's iocbs are packed with a precompiled ``struct.Struct`` into one preallocated
  array whose pointer array never changes (the kernel copies iocbs at submission): a
  request allocates no ctypes object of its own;
* vectored requests (``preadv``/``pwritev``, IOCB_CMD_PREADV/PWRITEV) write their iovec
  array into a per-slot area, also preallocated;
* at most ``depth`` requests are in the kernel; more wait in a FIFO and go in as slots
  free up. ``EAGAIN`` from ``io_submit`` leaves requests queued for a later retry;
* :meth:`AioContext.may_block` tells a caller when doing one I/O synchronously instead
  would cost nothing in parallelism (nothing of ours in flight, and the load lately one
  request at a time).

The futures (:class:`~blktap.util.eager.EagerFuture`) resolve to the kernel's result
(bytes transferred, possibly short) or fail with ``OSError`` carrying the errno of a
negative result. A request's buffer must stay
valid until its future is done; the ``keep`` argument holds a reference for that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import platform
import struct
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from blktap.errors import Shutdown
from blktap.util.eager import Batch, EagerFuture

log = logging.getLogger(__name__)

# include/uapi/linux/aio_abi.h
IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1 << 0

# include/uapi/linux/fs.h (__kernel_rwf_t flags for aio_rw_flags / pwritev2)
RWF_HIPRI = 0x1
RWF_DSYNC = 0x2
RWF_SYNC = 0x4

_SYSCALLS = {
    # machine: (io_setup, io_destroy, io_submit, io_getevents)
    "x86_64": (206, 207, 209, 208),
    "aarch64": (0, 1, 2, 4),
    "arm64": (0, 1, 2, 4),
}

# struct iocb, little-endian layout (aio_key before aio_rw_flags):
# data u64, key u32, rw_flags i32, opcode u16, reqprio i16, fildes u32, buf u64,
# nbytes u64, offset i64, reserved2 u64, flags u32, resfd u32  -> 64 bytes
_IOCB = struct.Struct("<QIiHhIQQqQII")
IOCB_SIZE = _IOCB.size
# struct io_event: data u64, obj u64, res i64, res2 i64 -> 32 bytes
_EVENT = struct.Struct("<QQqq")
EVENT_SIZE = _EVENT.size

# struct aio_ring (fs/aio.c): id, nr, head, tail, magic, compat and incompat features,
# header length (u32 each), then nr io_events. Mapped at the address io_setup returns.
_RING = struct.Struct("<IIIIIIII")
_RING_HEADER = _RING.size
_RING_MAGIC = 0xA10A10A1

DEFAULT_DEPTH = 256
IOV_PER_REQUEST = 64
"""Most (address, length) pairs one preadv/pwritev request may carry."""
_IOVEC = struct.Struct("<QQ")  # struct iovec: base, len
DEFAULT_SUBMIT_BATCH = 4
_BUSY_DEPTH = 128  # may_block: no, once submissions find half a request in flight on average


class AioUnavailable(OSError):
    """Linux AIO cannot be used here (unsupported machine, or io_setup failed)."""


def _syscall_numbers() -> tuple[int, int, int, int]:
    machine = platform.machine()
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise AioUnavailable(errno.ENOSYS, f"Linux AIO syscalls unknown on {machine}") from None


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall


def _map_ring(ctx: int) -> tuple[memoryview | None, Any, Any]:
    """The completion ring of context ``ctx`` for user-space reaping, with its head and
    tail words; (None, None, None) where io_getevents must be used instead."""
    if platform.machine() != "x86_64":
        return None, None, None  # elsewhere reading it needs memory barriers
    _id, nr, _head, _tail, magic, _compat, incompat, header_length = _RING.unpack(
        ctypes.string_at(ctx, _RING_HEADER))
    if magic != _RING_MAGIC or incompat or header_length != _RING_HEADER:
        return None, None, None
    ring = (ctypes.c_char * (_RING_HEADER + nr * EVENT_SIZE)).from_address(ctx)
    return (memoryview(ring).cast("B"), ctypes.c_uint.from_address(ctx + 8),
            ctypes.c_uint.from_address(ctx + 12))


class AioContext:
    """One kernel AIO context plus its eventfd, driven by an asyncio loop.

    Use :meth:`for_loop` to share the context of the running loop and :meth:`release`
    when done; the last release destroys it. All methods must be called from the loop's
    thread.
    """

    _by_loop: ClassVar[dict[asyncio.AbstractEventLoop, AioContext]] = {}

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        depth: int = DEFAULT_DEPTH,
        submit_batch: int = DEFAULT_SUBMIT_BATCH,
    ) -> None:
        """Create a context for ``depth`` in-flight requests, watched by ``loop``.

        A request that finds nothing in the kernel goes there at once. Others go at the
        end of the loop iteration that queued them, or earlier, as soon as at least
        ``submit_batch`` of them wait and they are at least as many as those already in
        the kernel: the device starts on the first requests while the rest are still
        being prepared (batches of 1, 4, 5, 10, 20, ...), and a busy device gets
        whole-iteration batches.

        Raises AioUnavailable (an OSError) when the kernel refuses (ENOSYS, EAGAIN when
        fs.aio-max-nr is exhausted). Nothing is left open after a failure.
        """
        self._nr_setup, self._nr_destroy, self._nr_submit, self._nr_getevents = (
            _syscall_numbers()
        )
        self._loop = loop
        self.depth = depth
        self.submit_batch = submit_batch
        self._refs = 0
        self._closed = False

        ctx = ctypes.c_ulong(0)
        if _syscall(self._nr_setup, depth, ctypes.byref(ctx)) < 0:
            err = ctypes.get_errno()
            raise AioUnavailable(err, f"io_setup({depth}): {os.strerror(err)}")
        self._ctx = ctx.value
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            _syscall(self._nr_destroy, ctypes.c_ulong(self._ctx))
            raise

        # Constant syscall arguments, wrapped once (a bare Python int is passed as C int).
        self._ctx_arg = ctypes.c_ulong(self._ctx)
        self._iocbs = (ctypes.c_char * (IOCB_SIZE * depth))()
        self._iocbs_view = memoryview(self._iocbs).cast("B")
        self._iocb_base = ctypes.addressof(self._iocbs)
        self._ptrs = (ctypes.c_uint64 * depth)(
            *[self._iocb_base + i * IOCB_SIZE for i in range(depth)]
        )
        self._ptrs_base = ctypes.addressof(self._ptrs)
        self._ptrs_arg = ctypes.c_void_p(self._ptrs_base)
        self._events = (ctypes.c_char * (EVENT_SIZE * depth))()
        self._events_view = memoryview(self._events).cast("B")
        self._events_arg = ctypes.c_void_p(ctypes.addressof(self._events))
        # One iovec array per slot for vectored requests.
        self._iovs = (ctypes.c_char * (_IOVEC.size * IOV_PER_REQUEST * depth))()
        self._iovs_view = memoryview(self._iovs).cast("B")
        self._iovs_base = ctypes.addressof(self._iovs)
        self._zero_timeout = (ctypes.c_long * 2)(0, 0)
        self._timeout_arg = ctypes.c_void_p(ctypes.addressof(self._zero_timeout))

        # Per-slot state: the future to resolve and what must stay alive meanwhile.
        self._futs: list[EagerFuture[int] | None] = [None] * depth
        self._keep: list[Any] = [None] * depth
        self._free = list(range(depth - 1, -1, -1))
        self._pending: list[int] = []  # filled slots not yet accepted by io_submit
        self._overflow: deque[tuple[Any, ...]] = deque()  # requests waiting for a slot
        self._inflight = 0
        self._flush_scheduled = False
        self._retry_handle: asyncio.TimerHandle | None = None
        self._batch = Batch(loop)
        self._ring, self._ring_head, self._ring_tail = _map_ring(self._ctx)
        self._blocked = False  # a caller did its I/O synchronously this loop iteration
        self._depth_seen = 0  # see _submit and may_block
        try:
            loop.add_reader(self._efd, self._on_eventfd)
        except BaseException:
            os.close(self._efd)
            _syscall(self._nr_destroy, self._ctx_arg)
            raise

    # ------------------------------------------------------------- sharing
    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop | None = None) -> AioContext:
        """The context shared by everything on ``loop`` (default: the running loop).

        Each call takes a reference; pair it with :meth:`release`.
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        ctx = cls._by_loop.get(loop)
        if ctx is None or ctx._closed:
            ctx = cls(loop)
            cls._by_loop[loop] = ctx
        ctx._refs += 1
        return ctx

    def release(self) -> None:
        """Drop one reference from :meth:`for_loop`; the last one closes the context."""
        self._refs -= 1
        if self._refs <= 0:
            if AioContext._by_loop.get(self._loop) is self:
                del AioContext._by_loop[self._loop]
            self.close()

    @property
    def inflight(self) -> int:
        """Requests submitted to the kernel and not yet reaped."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Requests accepted by this object but not yet submitted to the kernel."""
        return len(self._pending) + len(self._overflow)

    def may_block(self) -> bool:
        """May the caller do one I/O synchronously, blocking the loop, instead of
        submitting it here?

        Yes when none of this context's requests are in the kernel or waiting to go
        there, requests submitted lately found few others in flight (the load is one
        request at a time, not several clients whose requests merely happen to leave
        the kernel empty for a moment), and no other caller got a yes in this loop
        iteration: requests that arrive together still go to the kernel together. A yes
        counts as used: ask right before doing the I/O.
        """
        if (self._inflight or self._pending or self._overflow or self._blocked
                or self._depth_seen >= _BUSY_DEPTH or self._closed):
            return False
        self._blocked = True
        self._loop.call_soon(self._unblock)
        return True

    def _unblock(self) -> None:
        self._blocked = False

    # ------------------------------------------------------------ requests
    def pread(self, fd: int, addr: int, nbytes: int, offset: int, keep: Any) -> EagerFuture[int]:
        """Read ``nbytes`` at ``offset`` into memory at ``addr`` (kept alive by ``keep``)."""
        return self._submit(IOCB_CMD_PREAD, fd, addr, nbytes, offset, 0, keep)

    def pwrite(
        self, fd: int, addr: int, nbytes: int, offset: int, keep: Any, rw_flags: int = 0
    ) -> EagerFuture[int]:
        """Write ``nbytes`` from ``addr`` at ``offset``; ``rw_flags`` may hold RWF_DSYNC."""
        return self._submit(IOCB_CMD_PWRITE, fd, addr, nbytes, offset, rw_flags, keep)

    def preadv(
        self, fd: int, iov: Sequence[tuple[int, int]], offset: int, keep: Any
    ) -> EagerFuture[int]:
        """Scatter-read at ``offset`` into the ``(address, length)`` pairs of ``iov``.

        At most IOV_PER_REQUEST pairs (ValueError otherwise); ``keep`` keeps every buffer
        alive. The result is the total byte count, possibly short.
        """
        return self._submit_vec(IOCB_CMD_PREADV, fd, iov, offset, 0, keep)

    def pwritev(
        self, fd: int, iov: Sequence[tuple[int, int]], offset: int, keep: Any, rw_flags: int = 0
    ) -> EagerFuture[int]:
        """Gather-write the ``(address, length)`` pairs of ``iov`` at ``offset``."""
        return self._submit_vec(IOCB_CMD_PWRITEV, fd, iov, offset, rw_flags, keep)

    def _submit_vec(
        self,
        opcode: int,
        fd: int,
        iov: Sequence[tuple[int, int]],
        offset: int,
        rw_flags: int,
        keep: Any,
    ) -> EagerFuture[int]:
        if not 0 < len(iov) <= IOV_PER_REQUEST:
            raise ValueError(f"{len(iov)} buffers in one request (1..{IOV_PER_REQUEST})")
        # The iovec array is written into the slot's area once the slot is known.
        return self._submit(opcode, fd, 0, len(iov), offset, rw_flags, (keep, iov))

    def _iov_addr(self, slot: int, iov: Sequence[tuple[int, int]]) -> int:
        pos = slot * IOV_PER_REQUEST * _IOVEC.size
        view = self._iovs_view
        for base, length in iov:
            _IOVEC.pack_into(view, pos, base, length)
            pos += _IOVEC.size
        return self._iovs_base + slot * IOV_PER_REQUEST * _IOVEC.size

    def fdsync(self, fd: int) -> EagerFuture[int]:
        """fdatasync ``fd`` asynchronously (fails with EINVAL where the kernel lacks it)."""
        return self._submit(IOCB_CMD_FDSYNC, fd, 0, 0, 0, 0, None)

    def _submit(
        self, opcode: int, fd: int, addr: int, nbytes: int, offset: int, rw_flags: int, keep: Any
    ) -> EagerFuture[int]:
        if self._closed:
            raise Shutdown("the AIO context is closed", errno=errno.ESHUTDOWN)
        fut: EagerFuture[int] = EagerFuture(loop=self._loop)
        # How many requests a new one usually finds in the kernel (x256, moving average).
        self._depth_seen += ((self._inflight << 8) - self._depth_seen) >> 4
        free = self._free
        if free and not self._overflow:
            self._enqueue(fut, opcode, fd, addr, nbytes, offset, rw_flags, keep)
            pending = self._pending
            inflight = self._inflight
            if not inflight or (len(pending) >= self.submit_batch and len(pending) >= inflight):
                # The device has little to do: start it on these now rather than at the
                # end of the iteration (batches grow as the device gets busier).
                self._submit_pending()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        else:
            self._overflow.append((fut, opcode, fd, addr, nbytes, offset, rw_flags, keep))
        return fut

    def _enqueue(
        self, fut: EagerFuture[int], opcode: int, fd: int, addr: int, nbytes: int,
        offset: int, rw_flags: int, keep: Any,
    ) -> None:
        """Put a request in a free slot and append its iocb to the pending batch."""
        slot = self._free.pop()
        if opcode >= IOCB_CMD_PREADV:
            addr = self._iov_addr(slot, keep[1])
        pending = self._pending
        # The kernel copies iocbs during io_submit, so the batch array is reused:
        # entry i of a batch sits at i * IOCB_SIZE; aio_data names the slot.
        _IOCB.pack_into(
            self._iocbs_view, len(pending) * IOCB_SIZE,
            slot, 0, rw_flags, opcode, 0, fd, addr, nbytes, offset, 0,
            IOCB_FLAG_RESFD, self._efd,
        )  # fmt: skip
        self._futs[slot] = fut
        self._keep[slot] = keep
        pending.append(slot)

    def _flush(self) -> None:
        """The end-of-iteration submission scheduled by the first request of a batch."""
        self._flush_scheduled = False
        self._submit_pending()

    def _submit_pending(self) -> None:
        """Submit the pending batch (several io_submit calls if the kernel takes part)."""
        pending = self._pending
        n = len(pending)
        done = 0
        while done < n and not self._closed:
            ptrs = self._ptrs_arg if done == 0 else ctypes.c_void_p(self._ptrs_base + 8 * done)
            rc = _syscall(self._nr_submit, self._ctx_arg, n - done, ptrs)
            if rc > 0:
                self._inflight += rc
                done += rc
                continue
            err = ctypes.get_errno() if rc < 0 else errno.EAGAIN
            if err in (errno.EAGAIN, errno.EINTR):
                # Kernel resources exhausted: retry when completions come back, or soon.
                if self._inflight == 0 and self._retry_handle is None:
                    self._retry_handle = self._loop.call_later(0.001, self._retry)
                break
            # iocb number ``done`` is invalid (EBADF, EINVAL, ...): fail it alone.
            self._fail_slot(pending[done], err)
            done += 1
        if done == n:
            pending.clear()
        elif done:
            # Keep the unsubmitted tail as the start of the next batch.
            view = self._iocbs_view
            view[: (n - done) * IOCB_SIZE] = view[done * IOCB_SIZE : n * IOCB_SIZE]
            del pending[:done]

    def _fail_slot(self, slot: int, err: int) -> None:
        fut = self._futs[slot]
        self._futs[slot] = None
        self._keep[slot] = None
        self._free.append(slot)
        if fut is not None and not fut.done():
            # Woken next turn: this runs inside _submit_pending, which a waiter resumed
            # here could re-enter.
            fut.set_exception(OSError(err, os.strerror(err)))
            self._loop.call_soon(fut.wake)

    def _retry(self) -> None:
        self._retry_handle = None
        self._submit_pending()

    # --------------------------------------------------------- completions
    def _on_eventfd(self) -> None:
        try:
            os.read(self._efd, 8)
        except BlockingIOError:  # spurious: every completion bumps the counter
            return
        with self._batch:
            self.reap()

    def reap(self) -> int:
        """Resolve the futures of every completed request; returns how many.

        Eager waiters resume inside (see :mod:`blktap.util.eager`) and may queue or
        submit new requests, even reap again: the events are copied out first.
        """
        total = 0
        if self._closed:
            return 0  # the ring is gone with the context
        while self._inflight:
            events = self._take_events()
            if not events:
                break
            n = len(events) // EVENT_SIZE
            self._inflight -= n
            total += n
            futs = self._futs
            keep = self._keep
            free = self._free
            done = []
            for slot, _obj, res, _res2 in _EVENT.iter_unpack(events):
                fut = futs[slot]
                futs[slot] = None
                keep[slot] = None
                free.append(slot)
                if fut is not None and not fut.done():  # else cancelled by its waiter
                    done.append((fut, res))
            for fut, res in done:
                if res >= 0:
                    fut.resolve(res)
                else:
                    fut.fail(OSError(-res, os.strerror(-res)))
            if (self._ring is None and n < self.depth) or self._closed:
                # io_getevents returned all there was, or a waiter closed the context.
                break
        if self._overflow:
            self._admit_overflow()
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return total

    def _take_events(self) -> bytes:
        """Copy out and consume the completed events (none: empty)."""
        ring = self._ring
        if ring is not None:
            # User-space reaping, as the kernel's io_getevents does it: events from head
            # to tail, then head moves on (x86: loads are not reordered with loads, and
            # the kernel publishes an event before the tail that covers it).
            head = self._ring_head.value
            tail = self._ring_tail.value
            if head == tail:
                return b""
            start = _RING_HEADER + head * EVENT_SIZE
            end = _RING_HEADER + tail * EVENT_SIZE
            if head < tail:
                out = bytes(ring[start:end])
            else:  # wrapped around the end of the ring
                out = bytes(ring[start:]) + bytes(ring[_RING_HEADER:end])
            self._ring_head.value = tail
            return out
        while True:
            n = _syscall(
                self._nr_getevents, self._ctx_arg, 0, self.depth, self._events_arg,
                self._timeout_arg,
            )  # fmt: skip
            if n >= 0:
                return bytes(self._events_view[: n * EVENT_SIZE])
            err = ctypes.get_errno()
            if err != errno.EINTR:
                log.error("io_getevents: %s", os.strerror(err))
                return b""

    def _admit_overflow(self) -> None:
        free = self._free
        overflow = self._overflow
        while free and overflow:
            fut, opcode, fd, addr, nbytes, offset, rw_flags, keep = overflow.popleft()
            if fut.done():
                continue
            self._enqueue(fut, opcode, fd, addr, nbytes, offset, rw_flags, keep)

    # -------------------------------------------------------------- closing
    def close(self) -> None:
        """Tear down the context. Idempotent; never blocks the loop.

        Completed requests are reaped first (their futures get real results); every
        other request fails with Shutdown (ESHUTDOWN). Requests still in the kernel (a
        hung device) are left to ``io_destroy`` in a background thread, which keeps
        their buffers alive until the kernel lets go of them.
        """
        if self._closed:
            return
        self.reap()
        self._closed = True
        self._ring = self._ring_head = self._ring_tail = None  # unmapped by io_destroy
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.remove_reader(self._efd)
        if self._inflight:
            log.warning("closing the AIO context with %d requests in flight", self._inflight)
            keep = list(self._keep)
            threading.Thread(
                target=self._destroy, args=(keep,), name="aio-destroy", daemon=True
            ).start()
        else:
            self._destroy([])
        for slot, fut in enumerate(self._futs):
            self._futs[slot] = None
            self._keep[slot] = None
            if fut is not None and not fut.done():
                fut.fail(Shutdown("the AIO context was closed"))
        while self._overflow:
            fut = self._overflow.popleft()[0]
            if not fut.done():
                fut.fail(Shutdown("the AIO context was closed"))
        self._pending.clear()

    def _destroy(self, keep: list[Any]) -> None:
        # io_destroy waits for every request in the kernel; ``keep`` holds their buffers.
        if _syscall(self._nr_destroy, self._ctx_arg) < 0:
            log.error("io_destroy: %s", os.strerror(ctypes.get_errno()))
        os.close(self._efd)
        keep.clear()
