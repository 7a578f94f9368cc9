"""The io_uring that carries one FUSE connection's ring entries (FUSE over io_uring).

:class:`FuseRing` owns an io_uring made with 128-byte SQEs, the entries' header and
payload buffers (``blktap.proto.fuse_uring`` describes what they hold) and the event
loop's watch on its completions. It knows nothing of FUSE requests: each completed entry
is handed to ``on_request(index)``, and the server answers with :meth:`FuseRing.commit`;
the commits of one loop turn go to the kernel with one ``io_uring_enter``.

Completions are taken in the event loop's thread. The ring is made with
IORING_SETUP_DEFER_TASKRUN where the kernel has it: the kernel copies a request into an
entry when this thread enters the ring (after the registered eventfd said there is work),
not by interrupting whatever the thread is doing.

x86_64 only (elsewhere the rings need memory barriers Python cannot express);
:meth:`FuseRing.create` raises OSError wherever the ring cannot be made.
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
from collections.abc import Callable

from blktap.proto import fuse_uring
from blktap.util import eager, uring

log = logging.getLogger(__name__)

# include/uapi/linux/io_uring.h (x86_64 system call numbers)
_NR_ENTER = 426
_SETUP_SQE128 = 1 << 10
_SETUP_SINGLE_ISSUER = 1 << 12
_SETUP_DEFER_TASKRUN = 1 << 13
_SETUP_TASKRUN_FLAG = 1 << 9
_SQ_TASKRUN = 1 << 2  # sq_flags: deferred task work waits for an enter
_CQ_EVENTFD_DISABLED = 1 << 0  # cq_flags, the application's: completions do not signal
_ROUNDS = 8
"""Enter-and-reap rounds per eventfd wake-up before the loop gets a turn."""
_ENTER_GETEVENTS = 1 << 0
_OP_URING_CMD = 46
# struct io_uring_sqe up to its command area: opcode, flags, ioprio, fd, cmd_op, pad1,
# addr, len, uring_cmd_flags, user_data, buf_index, personality, splice_fd_in.
# ... and with the command area's fuse_uring_cmd_req (flags, commit_id, qid): the rest of
# the area stays zero (nothing else is ever written there).
_SQE_CMD = struct.Struct("<BBHiIIQIIQHHiQQH6x")
_SQE_SIZE = 128
_CQE = uring.CQE
_HEADER_STRIDE = 512
_COMMIT = int(fuse_uring.Cmd.COMMIT_AND_FETCH)
_IOVEC = struct.Struct("=QQ")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long] * 7


def _sys(*args: int) -> int:
    padded = list(args) + [0] * (7 - len(args))
    while True:
        res = int(_syscall(*padded))
        if res >= 0:
            return res
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def possible_cpus() -> int:
    """How many queues the kernel makes per connection: the possible CPUs."""
    try:
        with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    highest = 0
    for part in text.split(","):
        highest = max(highest, int(part.split("-")[-1]))
    return highest + 1


class FuseRing:
    """``queues`` x ``depth`` ring entries of one ``/dev/fuse`` connection.

    Use: :meth:`create` before the mount (so that INIT is answered with
    FUSE_OVER_IO_URING only when a ring exists), :meth:`register` once INIT is
    answered, :meth:`close` after the connection ends.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, queues: int, depth: int,
                 payload_size: int) -> None:
        self.queues = queues
        self.depth = depth
        self.entries = queues * depth
        self.payload_size = payload_size
        self.on_request: Callable[[int], None] = _unset
        self.live = 0
        """Entries registered and not torn down (CQE with an error) since."""
        self.closed = False
        self._loop = loop
        self._fd = -1
        self._efd = -1
        self._maps: list[mmap.mmap] = []
        self._pending = 0  # SQEs written and not yet submitted
        self._flush_scheduled = False
        self._reaping = False
        self._defer = False

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop, *, queues: int, depth: int,
               payload_size: int) -> FuseRing:
        """Make the io_uring and the entries' buffers. Raises OSError (ENOSYS on another
        machine than x86_64, or io_uring_setup's error) with nothing left behind."""
        if platform.machine() != "x86_64":
            raise OSError(errno.ENOSYS, f"FUSE over io_uring is x86_64 only here, not "
                          f"{platform.machine()}")
        ring = cls(loop, queues, depth, payload_size)
        try:
            ring._setup()
        except BaseException:
            ring.close()
            raise
        return ring

    def _setup(self) -> None:
        sq_size = 1
        while sq_size < self.entries:
            sq_size <<= 1
        modes = [_SETUP_SQE128 | _SETUP_SINGLE_ISSUER | _SETUP_DEFER_TASKRUN
                 | _SETUP_TASKRUN_FLAG, _SETUP_SQE128]
        for flags in modes:
            try:
                self._fd, params = uring.setup(sq_size, flags)
            except OSError as exc:
                if exc.errno == errno.EINVAL and flags & _SETUP_DEFER_TASKRUN:
                    continue  # before 6.1: no deferred task work
                raise
            self._defer = bool(flags & _SETUP_DEFER_TASKRUN)
            break
        r = self._r = uring.open_rings(self._fd, params, _SQE_SIZE)
        self._maps.extend(r.maps)
        self._rings, self._sqes, self._cqes = r.rings, r.sqes, r.cqes
        self._sq_tail, self._sq_mask, self._sq_entries = r.sq_tail, r.sq_mask, r.sq_entries
        self._cq_head, self._cq_tail, self._cq_mask = r.cq_head, r.cq_tail, r.cq_mask
        self._sq_flags, self._cq_flags = r.sq_flags, r.cq_flags
        # The entries' buffers: untouched pages cost nothing (the kernel fills an entry
        # with a request's bytes only, and reuses the most recently freed entry first).
        self.headers = self._map_anon(self.entries * _HEADER_STRIDE)
        self._payloads = self._map_anon(self.entries * self.payload_size)
        view = memoryview(self._payloads)
        size = self.payload_size
        self.payloads = [view[i * size:(i + 1) * size] for i in range(self.entries)]
        self.header_views = [memoryview(self.headers)[i * _HEADER_STRIDE:(i + 1) * _HEADER_STRIDE]
                             for i in range(self.entries)]
        self._iovecs = ctypes.create_string_buffer(self.entries * 2 * _IOVEC.size)
        head_base = ctypes.addressof(ctypes.c_char.from_buffer(self.headers))
        payload_base = ctypes.addressof(ctypes.c_char.from_buffer(self._payloads))
        for i in range(self.entries):
            _IOVEC.pack_into(self._iovecs, 2 * i * _IOVEC.size,
                             head_base + i * _HEADER_STRIDE, _HEADER_STRIDE)
            _IOVEC.pack_into(self._iovecs, (2 * i + 1) * _IOVEC.size,
                             payload_base + i * size, size)
        self._efd = uring.register_eventfd(self._fd)

    def _map_anon(self, size: int) -> mmap.mmap:
        m = mmap.mmap(-1, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps.append(m)
        return m

    def register(self, fuse_fd: int) -> None:
        """Hand every entry to the kernel (REGISTER on each queue), the connection's INIT
        being answered with FUSE_OVER_IO_URING; from then on completed entries go to
        ``on_request``. Raises OSError with the kernel's error when it refuses an entry
        (the kernel then keeps the connection on ``/dev/fuse``)."""
        self._fuse_fd = fuse_fd
        iov_base = ctypes.addressof(self._iovecs)
        for index in range(self.entries):
            self._put(index, fuse_uring.Cmd.REGISTER, iov_base + index * 2 * _IOVEC.size, 2, 0)
        self._submit()
        self.live = self.entries
        self._submit(getevents=True)  # deferred task work: the refusals are posted by it
        refused = self._reap()[1]
        self._loop.add_reader(self._efd, self._on_event)
        if refused:
            raise OSError(refused, f"FUSE_IO_URING_CMD_REGISTER: {os.strerror(refused)}")

    # ------------------------------------------------------------------ requests
    def queue_of(self, index: int) -> int:
        return index // self.depth

    def commit(self, index: int, unique: int) -> None:
        """Send the reply written in entry ``index`` (header and payload) for request
        ``unique`` and let the entry take the next request. Goes to the kernel at the end
        of this loop turn at the latest."""
        if self.closed:
            return
        self._put(index, _COMMIT, 0, 0, unique)
        if not self._reaping and not self._flush_scheduled:
            # At the end of the completions being handled (the AIO reaper's batch), else
            # in the next loop turn: one io_uring_enter for all of them.
            self._flush_scheduled = True
            eager.defer(self._loop, self._flush)

    def _put(self, index: int, cmd: int, addr: int, length: int, commit_id: int) -> None:
        if self._pending >= self._sq_entries:
            self._submit()
        tail = self._sq_tail.value
        _SQE_CMD.pack_into(self._sqes, (tail & self._sq_mask) * _SQE_SIZE, _OP_URING_CMD, 0, 0,
                           self._fuse_fd, cmd, 0, addr, length, 0, index, 0, 0, 0,
                           0, commit_id, index // self.depth)
        # x86: the SQE's stores are seen before the tail's.
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def _submit(self, getevents: bool = False) -> None:
        count = self._pending
        self._pending = 0
        flags = _ENTER_GETEVENTS if getevents and self._defer else 0
        if not count and not flags:
            return
        try:
            _sys(_NR_ENTER, self._fd, count, 0, flags, 0, 0)
        except OSError as exc:
            # The commits stay in the ring (a later enter takes them).
            self._pending += count
            log.error("io_uring_enter: %s", exc)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed:
            self._submit()

    def _on_event(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        if self.closed:
            return
        if not self._defer:
            self._reap()
            self._submit()
            return
        # With deferred task work, entering the ring is what fills the entries. The
        # completions our own enters post would signal the eventfd again for nothing:
        # off meanwhile, and the work that came in the while is seen in sq_flags.
        self._cq_flags.value |= _CQ_EVENTFD_DISABLED
        try:
            for _round in range(_ROUNDS):
                self._submit(getevents=True)
                self._reap()
                if not self._sq_flags.value & _SQ_TASKRUN:
                    break
        finally:
            if not self.closed:
                self._cq_flags.value &= ~_CQ_EVENTFD_DISABLED
        if self.closed:
            return
        self._submit()
        if self._sq_flags.value & _SQ_TASKRUN or self._cq_head.value != self._cq_tail.value:
            self._loop.call_soon(self._on_event)

    def _reap(self) -> tuple[int, int]:
        """Hand completed entries to ``on_request``; return how many completions there
        were and the last REGISTER error."""
        refused = 0
        count = 0
        rings = self._rings
        mask = self._cq_mask
        base = self._cqes
        unpack = _CQE.unpack_from
        self._reaping = True
        try:
            while True:
                head = self._cq_head.value
                tail = self._cq_tail.value
                if head == tail:
                    break
                count += (tail - head) & 0xFFFFFFFF
                while head != tail:
                    index, res, _flags = unpack(rings, base + (head & mask) * _CQE.size)
                    head = (head + 1) & 0xFFFFFFFF
                    self._cq_head.value = head
                    if res == 0:
                        self.on_request(index)
                        continue
                    self.live -= 1
                    if res not in (-errno.ENOTCONN, -errno.ECANCELED):
                        refused = -res
                        log.debug("FUSE ring entry %d ended: %s", index, os.strerror(-res))
        finally:
            self._reaping = False
        return count, refused

    # ------------------------------------------------------------------- closing
    def close(self) -> None:
        """Stop watching completions and close the ring: the kernel cancels the entries
        it holds (their requests fail if the connection is still up). Idempotent. The
        buffers stay mapped while requests still use them."""
        if self.closed:
            return
        self.closed = True
        if self._efd >= 0:
            with contextlib.suppress(RuntimeError, ValueError):
                self._loop.remove_reader(self._efd)
            os.close(self._efd)
            self._efd = -1
        self._sq_tail = self._cq_head = self._cq_tail = None  # type: ignore[assignment]
        self._sq_flags = self._cq_flags = None  # type: ignore[assignment]
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _unset(index: int) -> None:
    raise AssertionError(f"FUSE ring entry {index} completed before on_request was set")
