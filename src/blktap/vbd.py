"""One virtual block device (VBD): the image chain of a minor, its state and statistics.

Every I/O request from a frontend enters here and is validated once (range, read-only,
state); code below asserts. While the VBD is pausing or paused, I/O waits; it fails with
ESHUTDOWN only when a resume failed or the VBD is closing.

State machine (reported on the wire as the C tapdisk's state bits, see ``state_bits``)::

    CLOSED --open--> RUNNING --pause--> PAUSING --(in-flight I/O done, chain closed)--> PAUSED
    PAUSED --resume--> RUNNING            PAUSED --resume fails--> RESUME_FAILED
    RESUME_FAILED --resume--> RUNNING
    RUNNING|PAUSED|RESUME_FAILED --close--> CLOSING --> CLOSED
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blktap.block.capabilities import NO_ROUTES, Capabilities, WriteObserver
from blktap.block.chain import Chain, ImageStats, StatusExtent
from blktap.block.driver import SECTOR_SIZE, SYNC_WRITE_MAX, Image, OpenOptions
from blktap.block.layer import DirtyBitmap, Layer, LayerOpener, Stack, open_stack, split_layers
from blktap.block.retry import REQUEST_TIMEOUT_S, retry_transient
from blktap.errors import (
    BlktapError,
    Busy,
    InvalidArgument,
    NoSpace,
    NotFound,
    ReadOnly,
    Shutdown,
)

log = logging.getLogger(__name__)


class VBDState(enum.Enum):
    CLOSED = "closed"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUME_FAILED = "resume-failed"
    CLOSING = "closing"


# The reference's state bits (tapdisk-control-protocol.md, "VBD state bits").
_DEAD, _CLOSED, _QUIESCE_REQ, _QUIESCED, _PAUSE_REQ, _PAUSED = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
_SHUTDOWN_REQ, _RESUME_FAILED = 0x40, 0x200

STATE_BITS: dict[VBDState, int] = {
    VBDState.CLOSED: _CLOSED,
    VBDState.RUNNING: 0,
    VBDState.PAUSING: _QUIESCE_REQ | _PAUSE_REQ,
    VBDState.PAUSED: _CLOSED | _QUIESCED | _PAUSED,
    VBDState.RESUME_FAILED: _CLOSED | _QUIESCED | _PAUSED | _RESUME_FAILED,
    VBDState.CLOSING: _SHUTDOWN_REQ,
}

THREAD_IO_POLL = 0.0002
"""Seconds between looks at whether other threads still do I/O (pause, close)."""
_RUNNING = VBDState.RUNNING  # a module constant: the enum attribute lookup costs ~0.2 us
_SECTOR_MASK = SECTOR_SIZE - 1

# Which transitions each operation may start from.
_TRANSITIONS: dict[str, tuple[frozenset[VBDState], VBDState]] = {
    "open": (frozenset({VBDState.CLOSED}), VBDState.RUNNING),
    "pause": (frozenset({VBDState.RUNNING}), VBDState.PAUSING),
    "resume": (frozenset({VBDState.PAUSED, VBDState.RESUME_FAILED}), VBDState.RUNNING),
    "close": (
        frozenset({VBDState.RUNNING, VBDState.PAUSED, VBDState.RESUME_FAILED}),
        VBDState.CLOSING,
    ),
}


@dataclass(frozen=True, slots=True)
class SyncFile:
    """A VBD's one image as a descriptor on which its caller serves requests itself, at
    once: any request with ``offset`` and ``length`` multiples of 512 and
    ``offset + length <= size`` is one ``os.preadv`` (``os.pwritev``, with RWF_DSYNC
    for FUA, when ``writable`` and ``fua``) of ``fd`` at ``offset``, where a write calls
    ``pwritev`` instead of ``os.pwritev``. See :meth:`VBD.sync_file`."""

    fd: int
    size: int
    writable: bool
    pwritev: Callable[[int, Sequence[memoryview], int, int], int] = os.pwritev
    """``os.pwritev``, or when the stack has write observers (a changed-block log) a
    function with its arguments and result that calls them before it writes."""
    fua: bool = True
    """FUA writes may be served here; False with write observers (their sync would block
    the event loop): the caller sends FUA writes through :meth:`VBD.write`."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The one rule that admits a request to a fast route, and the routes it may take.

    Built when the stack changes (open, resume; none while paused or closed) from the
    stack's capabilities (blktap.block.capabilities) and what the one image offers;
    present (``VBD._admission``) only while the VBD runs, so that ``None`` means "not
    running". A request is admitted when :meth:`admits` says so: offset and length
    multiples of 512, inside the device, and (a write) the stack writable, which is
    ``offset + length <= write_limit`` with ``write_limit`` -1 when not writable.

    When the stack has write observers (Capabilities.observers: a changed-block log),
    every write route here is wrapped to call them before the write is issued
    (:class:`_Observed`); without observers the routes are the driver's own functions.

    Threads (:class:`ThreadIO`) call :meth:`admits`; the event loop's fast paths copy it
    inline for speed (a call per request costs more than the rest of the check): each
    copy says so, and
    tests/unit/test_fast_route_rules.py pins them to it.
    """

    read_limit: int
    write_limit: int
    read_image: Image | None
    """The one image, when reads may go to its coroutine directly (Routes.direct)."""
    write_direct: Callable[[int, memoryview, bool], Awaitable[None]] | None
    """The one image's ``write`` (with the stack's write observers called first, if it
    has any), when writes may go to it directly (Routes.direct)."""
    read_now: Callable[[int, memoryview], bool] | None
    write_now: Callable[[int, memoryview, bool], bool] | None
    read_blocking: Callable[[int, memoryview], bool] | None
    write_blocking: Callable[[int, memoryview, bool], bool] | None
    sync: SyncFile | None
    stats: ImageStats
    """The one image's counters (what the fast routes count into)."""

    def admits(self, offset: int, length: int, write: bool) -> bool:
        """Whether a request of ``length`` bytes at ``offset`` may take a fast route."""
        limit = self.write_limit if write else self.read_limit
        return not (offset | length) & _SECTOR_MASK and offset >= 0 and offset + length <= limit


@dataclass(slots=True)
class IOCounts:
    """Requests served by a route that bypasses the VBD's methods, and the bytes they
    moved, gathered over one batch (or by one thread) and added to their owners at once:
    :meth:`VBD.count` for the VBD's statistics, a frontend's own for its. Requests served
    by the VBD's methods are counted there."""

    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    written_bytes: int = 0

    def add(self, other: IOCounts) -> None:
        self.reads += other.reads
        self.read_bytes += other.read_bytes
        self.writes += other.writes
        self.written_bytes += other.written_bytes


class ThreadIO:
    """I/O of a VBD from one thread other than the event loop's (a thread of an NBD
    connection's lane): get it with :meth:`VBD.thread_io`, give it back with
    :meth:`VBD.release_thread_io` once that thread no longer uses it.

    :meth:`read` and :meth:`write` serve what ``VBD.read_now``/``write_now`` would (an
    aligned request of a running VBD whose one image holds every byte) when the image
    offers ``read_blocking``/``write_blocking``, and decline everything else, failures
    included: the caller then sends the request through the loop, which answers and
    counts it as usual. The VBD waits for I/O in progress here before it closes the image
    (pause, close); :attr:`counts` are this thread's alone and the VBD adds them to its
    own (:meth:`VBD.count`) when the thread is done or the VBD pauses.
    """

    __slots__ = ("_vbd", "busy", "counts")

    def __init__(self, vbd: VBD) -> None:
        self._vbd = vbd
        self.busy = False
        self.counts = IOCounts()

    @property
    def reads(self) -> int:
        return self.counts.reads

    @reads.setter
    def reads(self, value: int) -> None:
        self.counts.reads = value

    @property
    def writes(self) -> int:
        return self.counts.writes

    @writes.setter
    def writes(self, value: int) -> None:
        self.counts.writes = value

    @property
    def sectors(self) -> list[int]:
        """Sectors read and written (not yet taken by the VBD)."""
        return [self.counts.read_bytes >> 9, self.counts.written_bytes >> 9]

    def read(self, offset: int, buf: memoryview) -> bool:
        """Fill ``buf`` from ``offset``, blocking this thread; False having done nothing
        when the loop must serve it (never raises for the request's failure)."""
        # Busy before the state is looked at; the loop changes the state before it
        # looks at busy: one of the two sees the other (the GIL orders them).
        self.busy = True
        try:
            adm = self._vbd._admission
            length = len(buf)
            if (adm is None or (read := adm.read_blocking) is None
                    or not adm.admits(offset, length, False)):
                return False
            try:
                if not read(offset, buf):
                    return False
            except Exception:
                return False  # the loop tries again and reports the failure
            counts = self.counts
            counts.reads += 1
            counts.read_bytes += length
            return True
        finally:
            self.busy = False

    def write(self, offset: int, data: memoryview, fua: bool = False) -> bool:
        """Write ``data`` at ``offset`` (durably with ``fua``), blocking this thread;
        False having written nothing the caller may rely on: the loop must serve it
        (never raises for the request's failure; a failed write is simply done again)."""
        self.busy = True
        try:
            adm = self._vbd._admission
            length = len(data)
            if (adm is None or (write := adm.write_blocking) is None
                    or not adm.admits(offset, length, True)):
                return False
            try:
                if not write(offset, data, fua):
                    return False
            except Exception:
                return False  # the loop writes it again and reports the failure
            counts = self.counts
            counts.writes += 1
            counts.written_bytes += length
            return True
        finally:
            self.busy = False


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """``[layer:]...type:path`` as the control protocol carries it: the layers, top
    first (blktap.block.layer), then the leaf's driver type and path."""

    type: str
    path: str
    layers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """Parse ``[layer:]...type:path``. Raises InvalidArgument when there is no type or
        no path."""
        layers, rest = split_layers(text)
        kind, sep, path = rest.partition(":")
        if not sep or not kind or not path:
            raise InvalidArgument(f"image must be type:/path, not {text!r}")
        return cls(kind, path, layers)

    def __str__(self) -> str:
        return "".join(f"{name}:" for name in self.layers) + f"{self.type}:{self.path}"


class VBD:
    """A VBD bound to ``minor``. Created CLOSED; ``open`` makes it serve I/O."""

    RESUME_TRIES = 10
    RESUME_RETRY_DELAY = 1.0

    def __init__(self, minor: int) -> None:
        self.minor = minor
        self._ready: Admission | None = None  # the stack's, whatever the state
        self._admission: Admission | None = None  # _ready while RUNNING, else None
        self._state = VBDState.CLOSED
        self.spec: ImageSpec | None = None
        self.options = OpenOptions()
        self.secondary: str | None = None
        self._chain: Chain | None = None
        self._stack: Stack | None = None
        self._top_layers: tuple[LayerOpener, ...] = ()
        self._caps = Capabilities(writable=False)
        self._bitmap_name: str | None = None  # the stack's DirtyBitmap's, kept while paused
        self._now_stats = ImageStats()  # the one image's (what the fast routes count)
        self._thread_ios: set[ThreadIO] = set()
        self._size = 0
        self._inflight = 0
        self._drained: asyncio.Future[None] | None = None
        self._running: asyncio.Future[None] | None = None
        self.sectors = [0, 0]  # sectors read, written
        self.errors = [0, 0]  # failed reads, writes
        self.request_timeout_s = REQUEST_TIMEOUT_S
        """How long a request failing with EAGAIN/EBUSY is retried (blktap.block.retry)."""
        self.log_context: dict[str, object] = {"minor": minor, "image": "-"}
        """Every log record about this VBD carries these (updated on open and resume)."""
        self.log = logging.LoggerAdapter(log, self.log_context)

    # ---------------------------------------------------------------- properties
    @property
    def state(self) -> VBDState:
        return self._state

    @state.setter
    def state(self, state: VBDState) -> None:
        # The fast routes admit requests only while RUNNING (Admission).
        self._state = state
        self._admission = self._ready if state is _RUNNING else None

    @property
    def capabilities(self) -> Capabilities:
        """What the VBD's stack can do (blktap.block.capabilities): computed at open and
        resume, narrowed by each layer; kept while paused. Frontends read it once per
        connection (advertised flags) or per batch. When the stack has write observers
        (a changed-block log), ``writes`` is NO_ROUTES here: a frontend must not write
        past the VBD on its own (FUSE passthrough); the VBD's own fast routes
        (:attr:`admission`) call the observers and stay."""
        return self._caps

    @property
    def dirty_bitmap_name(self) -> str | None:
        """The name of the changed-block record (:class:`DirtyBitmap`: the CBT log) of
        the stack as of its last open or resume, or None when it keeps none. Kept while
        paused, like :attr:`capabilities`; a resume may change it (``tap-ctl unpause
        -c`` adds or switches the log)."""
        return self._bitmap_name

    @property
    def admission(self) -> Admission | None:
        """The rule and routes of the fast paths while running (see :class:`Admission`),
        else None. Read it once per batch; valid until the caller yields to the loop."""
        return self._admission

    @property
    def size(self) -> int:
        """Size in bytes (fixed from open until close; resume must not change it)."""
        return self._size

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    @property
    def chain(self) -> Chain | None:
        return self._chain

    @property
    def state_bits(self) -> int:
        return STATE_BITS[self.state]

    @property
    def inflight(self) -> int:
        return self._inflight

    def _transition(self, op: str) -> None:
        allowed, target = _TRANSITIONS[op]
        if self.state not in allowed:
            raise Busy(f"minor {self.minor}: cannot {op} while {self.state.value}",
                       errno=errno.EBUSY if self.state != VBDState.CLOSED else errno.EINVAL)
        self.state = target

    # ------------------------------------------------------------------ control
    async def open(self, spec: ImageSpec, options: OpenOptions,
                   layers: Sequence[LayerOpener] = ()) -> None:
        """Open the stack for ``spec``: its chain, its layers, and on top ``layers`` (top
        first: layers whose settings do not come in the image string, such as the CBT
        log; opened again at each resume). On failure the VBD stays CLOSED with nothing
        open."""
        if self.state != VBDState.CLOSED:
            raise Busy(f"minor {self.minor} is already open")
        stack = await _open_stack(spec, options, layers)
        self.spec, self.options, self._top_layers = spec, options, tuple(layers)
        self._size = stack.size
        self._set_stack(stack)
        self.sectors, self.errors = [0, 0], [0, 0]
        self._transition("open")
        self.log_context["image"] = str(spec)
        self.log.info("opened %s (%d bytes%s)", spec, self._size,
                      ", read-only" if options.read_only else "")

    async def pause(self) -> None:
        """Stop taking new I/O, wait for in-flight I/O, close the chain. New I/O waits.

        Pausing a paused VBD succeeds at once. On a chain close error the VBD is still
        PAUSED (the images are closed as far as possible) and the error is raised.
        """
        if self.state in (VBDState.PAUSED, VBDState.RESUME_FAILED):
            return
        self._transition("pause")
        self._running = asyncio.get_running_loop().create_future()
        await self._drain()
        await self._threads_idle()
        stack = self._stack
        self._set_stack(None)
        self.state = VBDState.PAUSED
        assert stack is not None
        await stack.close()
        self.log.info("paused")

    async def resume(self, spec: ImageSpec | None = None) -> None:
        """Reopen the chain, from ``spec`` if given (the live-snapshot primitive).

        Tries RESUME_TRIES times, RESUME_RETRY_DELAY apart. The size must not change
        (EMEDIUMTYPE). On failure the state is RESUME_FAILED and waiting I/O fails with
        ESHUTDOWN; a later resume may still succeed.
        """
        if self.state not in (VBDState.PAUSED, VBDState.RESUME_FAILED):
            raise InvalidArgument(f"minor {self.minor} is not paused")
        new_spec = spec or self.spec
        assert new_spec is not None
        last: BaseException | None = None
        for attempt in range(self.RESUME_TRIES):
            if attempt:
                await asyncio.sleep(self.RESUME_RETRY_DELAY)
            try:
                stack = await _open_stack(new_spec, self.options, self._top_layers)
            except BlktapError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOENT):
                    last = exc
                    break
                last = exc
                continue
            except OSError as exc:
                last = exc
                continue
            if stack.size != self._size:
                await stack.close()
                last = BlktapError(
                    f"resume: size changed from {self._size} to {stack.size}",
                    errno=errno.EMEDIUMTYPE,
                )
                break
            self._set_stack(stack)
            self.spec = new_spec
            self.log_context["image"] = str(new_spec)
            self.state = VBDState.RUNNING
            self._wake_waiters(None)
            self.log.info("resumed on %s", new_spec)
            return
        self.state = VBDState.RESUME_FAILED
        self._wake_waiters(Shutdown(f"minor {self.minor}: resume failed"))
        self.log.error("resume of %s failed: %s", new_spec, last)
        assert last is not None
        raise last

    async def close(self, force: bool = False) -> None:
        """Close the chain. Waits for in-flight I/O unless ``force`` (I/O by other
        threads, :class:`ThreadIO`, is waited for even then: it uses the image's
        descriptor). Ends CLOSED."""
        if self.state == VBDState.CLOSED:
            return
        if self.state == VBDState.PAUSING:
            await self._drain()
        self._transition("close")
        self._wake_waiters(Shutdown(f"minor {self.minor} is closing"))
        if not force:
            await self._drain()
        await self._threads_idle()  # even forced: their I/O uses the image's descriptor
        stack = self._stack
        self._set_stack(None)
        try:
            if stack is not None:
                await stack.close()
        finally:
            self.state = VBDState.CLOSED
            self.log.info("closed")

    def fail_waiting_io(self) -> None:
        """Fail the I/O waiting for a paused VBD with ESHUTDOWN (before closing it).

        Later I/O fails too until a resume; in-flight I/O is not affected.
        """
        self._wake_waiters(Shutdown(f"minor {self.minor} is closing while paused"))

    async def _drain(self) -> None:
        if self._inflight:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    async def _threads_idle(self) -> None:
        """Wait until no thread does I/O on the image; then count their I/O as ours."""
        ios = self._thread_ios
        while any(io.busy for io in ios):
            await asyncio.sleep(THREAD_IO_POLL)
        for io in ios:
            self._take_counts(io)

    def thread_io_possible(self, write: bool = False) -> bool:
        """Whether the image can now be read (or, with ``write``, written: not read-only)
        from another thread: the stack allows it (Routes.thread) and the image offers
        ``read_blocking`` (``write_blocking``)."""
        ready = self._ready
        if ready is None:
            return False
        return (ready.write_blocking if write else ready.read_blocking) is not None

    def thread_io(self, write: bool = False) -> ThreadIO | None:
        """A :class:`ThreadIO` for one thread, or None when
        :meth:`thread_io_possible` says no (the loop then serves everything)."""
        if not self.thread_io_possible(write):
            return None
        io = ThreadIO(self)
        self._thread_ios.add(io)
        return io

    def release_thread_io(self, io: ThreadIO) -> None:
        """Forget ``io`` (its thread no longer uses it), keeping its counts."""
        self._thread_ios.discard(io)
        self._take_counts(io)

    def _take_counts(self, io: ThreadIO) -> None:
        # Only while its thread does no I/O (released, or the VBD not running).
        self.count(io.counts)
        io.counts = IOCounts()

    def _wake_waiters(self, exc: BaseException | None) -> None:
        fut, self._running = self._running, None
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: no waiter is not an error

    # ---------------------------------------------------------------------- I/O
    def _set_stack(self, stack: Stack | None) -> None:
        """Take ``stack`` (None: none open) and build the fast routes' Admission from its
        capabilities: the routes it allows, where the one image offers them."""
        self._stack = stack
        self._chain = chain = stack.chain if stack is not None else None
        if stack is None or chain is None:
            self._ready = None
            self.state = self._state  # (re)derives _admission
            return
        caps = stack.capabilities()
        # Frontends see no write route when writes have observers: a route of their own
        # past the VBD (FUSE passthrough) would skip them. The VBD's routes call them.
        self._caps = caps.narrow(writes=NO_ROUTES) if caps.observers else caps
        bitmap = _dirty_bitmap(stack)
        self._bitmap_name = bitmap.bitmap_name if bitmap is not None else None
        reads, writes = caps.reads, caps.writes
        if not caps.writable:
            writes = type(writes)()
        image = chain.leaf
        fast = chain.fast
        self._now_stats = stats = chain.stats[0]
        write_direct: Callable[[int, memoryview, bool], Awaitable[None]] | None = (
            image.write if writes.direct else None)
        write_now = fast.write_now if writes.sync else None
        write_blocking = fast.write_blocking if writes.thread else None
        observed = _Observed(caps.observers) if caps.observers and writes.any else None
        if observed is not None:
            if write_direct is not None:
                write_direct = observed.direct(write_direct)
            if write_now is not None:
                write_now = observed.sync(write_now)
            if write_blocking is not None:
                write_blocking = observed.thread(write_blocking)
        sync = None
        if reads.lent_fd and fast.sync_fd is not None:
            fd = fast.sync_fd()
            if fd is not None:
                sync = SyncFile(fd, self._size, writes.lent_fd)
                if observed is not None and writes.lent_fd:
                    sync = SyncFile(fd, self._size, True, observed.pwritev(), fua=False)
        self._ready = Admission(
            read_limit=self._size if reads.any else -1,
            write_limit=self._size if writes.any else -1,
            read_image=image if reads.direct else None,
            write_direct=write_direct,
            read_now=fast.read_now if reads.sync else None,
            write_now=write_now,
            read_blocking=fast.read_blocking if reads.thread else None,
            write_blocking=write_blocking,
            sync=sync,
            stats=stats,
        )
        self.state = self._state  # (re)derives _admission

    async def _admit(self) -> Stack:
        """Wait until the VBD runs; count the request in flight; return the chain."""
        while self.state is not _RUNNING:
            if self.state in (VBDState.PAUSING, VBDState.PAUSED) and self._running is not None:
                await asyncio.shield(self._running)
            else:
                raise Shutdown(f"minor {self.minor} is {self.state.value}")
        self._inflight += 1
        assert self._stack is not None
        return self._stack

    def _done(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _check_range(self, offset: int, length: int, write: bool) -> None:
        if write and self.options.read_only:
            raise ReadOnly(f"minor {self.minor} is read-only")
        if offset < 0 or length < 0:
            raise InvalidArgument(f"negative offset or length ({offset}, {length})")
        if offset + length > self._size:
            cls = NoSpace if write else InvalidArgument
            raise cls(f"request {offset}+{length} past the end ({self._size})")

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """Serve the read at once when it can complete without waiting: an aligned
        request on a running VBD whose one fully allocated image does synchronous I/O
        now (``read_now`` in blktap.block.driver). Returns False, having done nothing,
        when the caller must use :meth:`read`; raises as :meth:`read` does."""
        adm = self._admission
        length = len(buf)
        # Admission.admits, inline.
        if (adm is None or (now := adm.read_now) is None or (offset | length) & _SECTOR_MASK
                or offset < 0 or offset + length > adm.read_limit):
            return False
        try:
            if not now(offset, buf):
                return False
        except BaseException:
            self._failed_now(0, length >> 9)
            raise
        self._now_stats.hits[0] += length >> 9
        self.sectors[0] += length >> 9
        return True

    def write_now(self, offset: int, data: memoryview, fua: bool = False) -> bool:
        """:meth:`write` at once, under the same conditions as :meth:`read_now`, for
        writes smaller than SYNC_WRITE_MAX."""
        adm = self._admission
        length = len(data)
        # Admission.admits, inline.
        if (adm is None or (now := adm.write_now) is None or length >= SYNC_WRITE_MAX
                or (offset | length) & _SECTOR_MASK
                or offset < 0 or offset + length > adm.write_limit):
            return False
        try:
            if not now(offset, data, fua):
                return False
        except BaseException:
            self._failed_now(1, length >> 9)
            raise
        self._now_stats.hits[1] += length >> 9
        self.sectors[1] += length >> 9
        return True

    def sync_file(self) -> SyncFile | None:
        """The image's descriptor for requests its caller serves itself, or None (not
        running, or not one fully allocated image whose driver offers ``sync_fd``).

        Valid until the caller next yields to the event loop: a pause or close waits for
        the loop. The caller validates each request as the SyncFile says, sends any other
        request and any that fails through :meth:`read`/:meth:`write` (which answer and
        count the failure), and reports what it served with :meth:`count`.
        """
        adm = self._admission
        return adm.sync if adm is not None else None

    def count(self, counts: IOCounts) -> None:
        """Count requests a route served past the VBD's methods (through :meth:`sync_file`,
        or another thread's :class:`ThreadIO`) as :meth:`read_now` would: the one image's
        hits and the VBD's sectors. Once per batch."""
        hits = self._now_stats.hits
        hits[0] += counts.read_bytes >> 9
        hits[1] += counts.written_bytes >> 9
        sectors = self.sectors
        sectors[0] += counts.read_bytes >> 9
        sectors[1] += counts.written_bytes >> 9

    def _failed_now(self, rw: int, sectors: int) -> None:
        stats = self._now_stats
        stats.hits[rw] += sectors
        stats.fail[rw] += sectors
        self.errors[rw] += 1

    async def read(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        adm = self._admission
        # Admission.admits, inline.
        if (adm is not None and (image := adm.read_image) is not None
                and not (offset | length) & _SECTOR_MASK
                and offset >= 0 and offset + length <= adm.read_limit):
            # Fast path: one fully allocated image, aligned request (most raw-image I/O).
            stats = adm.stats
            self._inflight += 1
            stats.hits[0] += length >> 9
            try:
                await image.read(offset, buf)
            except BaseException:
                stats.fail[0] += length >> 9
                self.errors[0] += 1
                raise
            finally:
                self._done()
            self.sectors[0] += length >> 9
            return
        self._check_range(offset, length, False)
        stack = await self._admit()
        try:
            await stack.read(offset, buf)
        except BaseException as exc:
            self._done()
            try:
                await self._again(exc, lambda stack: stack.read(offset, buf))
            except BaseException:
                self.errors[0] += 1
                raise
        else:
            self._done()
        self.sectors[0] += length >> 9

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        length = len(data)
        adm = self._admission
        # Admission.admits, inline.
        if (adm is not None and (write := adm.write_direct) is not None
                and not (offset | length) & _SECTOR_MASK
                and offset >= 0 and offset + length <= adm.write_limit):
            stats = adm.stats
            self._inflight += 1
            stats.hits[1] += length >> 9
            try:
                await write(offset, data, fua)
            except BaseException:
                stats.fail[1] += length >> 9
                self.errors[1] += 1
                raise
            finally:
                self._done()
            self.sectors[1] += length >> 9
            return
        self._check_range(offset, length, True)
        stack = await self._admit()
        try:
            await stack.write(offset, data, fua)
        except BaseException as exc:
            self._done()
            try:
                await self._again(exc, lambda stack: stack.write(offset, data, fua))
            except BaseException:
                self.errors[1] += 1
                raise
        else:
            self._done()
        self.sectors[1] += length >> 9

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool, fua: bool) -> None:
        self._check_range(offset, length, True)
        stack = await self._admit()
        try:
            await stack.write_zeroes(offset, length, may_unmap, fua)
        except BaseException as exc:
            self._done()
            try:
                await self._again(
                    exc, lambda stack: stack.write_zeroes(offset, length, may_unmap, fua))
            except BaseException:
                self.errors[1] += 1
                raise
        else:
            self._done()
        self.sectors[1] += length >> 9

    async def trim(self, offset: int, length: int) -> None:
        self._check_range(offset, length, True)
        stack = await self._admit()
        try:
            await stack.discard(offset, length)
        except BaseException as exc:
            self._done()
            await self._again(exc, lambda stack: stack.discard(offset, length))
        else:
            self._done()

    async def flush(self) -> None:
        stack = await self._admit()
        try:
            await stack.flush()
        except BaseException as exc:
            self._done()
            await self._again(exc, lambda stack: stack.flush())
        else:
            self._done()

    async def _again(self, exc: BaseException, op: Callable[[Stack], Awaitable[None]]) -> None:
        """After ``op(stack)`` failed with ``exc`` (and is no longer in flight): retry it
        while the error is transient, up to the request timeout (blktap.block.retry);
        raises ``exc`` or the last error."""

        async def attempt() -> None:
            stack = await self._admit()
            try:
                await op(stack)
            finally:
                self._done()

        await retry_transient(exc, attempt, self.request_timeout_s)

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint: validated, then ignored (reads are served from the page cache)."""
        self._check_range(offset, length, False)

    async def block_status(self, offset: int, length: int) -> list[StatusExtent]:
        self._check_range(offset, length, False)
        stack = await self._admit()
        try:
            return stack.block_status(offset, length)
        finally:
            self._done()

    async def dirty_status(self, name: str, offset: int, length: int,
                           limit: int = 1 << 30) -> list[tuple[int, int]]:
        """The changed-block record ``name`` over ``length`` (> 0) bytes at ``offset``:
        runs of (bytes, 1 changed / 0 not), at most ``limit`` (see
        :meth:`DirtyBitmap.dirty_extents`). Waits while paused, as I/O does, then reads
        the record of the stack open now: every write acknowledged before the call is
        seen. Raises NotFound (ENOENT) when the stack keeps no record of that name (the
        log was switched to another name, or none was ever opened)."""
        self._check_range(offset, length, False)
        if not length:
            raise InvalidArgument("changed-block status of an empty range")
        stack = await self._admit()
        try:
            bitmap = _dirty_bitmap(stack)
            if bitmap is None or bitmap.bitmap_name != name:
                raise NotFound(f"minor {self.minor}: no changed-block log named {name!r}")
            return bitmap.dirty_extents(offset, length, limit)
        finally:
            self._done()

    # -------------------------------------------------------------- statistics
    def stats(self) -> dict[str, Any]:
        """The STATS JSON object of this VBD, with the C tapdisk's keys."""
        images: list[dict[str, Any]] = []
        # I/O by other threads counts for the image it went to (see _take_counts).
        pending = IOCounts()
        for io in self._thread_ios:
            pending.add(io.counts)
        if self._chain is not None:
            for image, st in zip(self._chain.images, self._chain.stats, strict=True):
                mine = st is self._now_stats
                images.append({
                    "name": image.path,
                    "hits": [st.hits[0] + (pending.read_bytes >> 9 if mine else 0),
                             st.hits[1] + (pending.written_bytes >> 9 if mine else 0)],
                    "fail": list(st.fail),
                    "driver": {"type": DISK_TYPE_IDS.get(image.type_name, -1),
                               "name": image.type_name, "status": 0},
                })
        return {
            "name": str(self.spec) if self.spec else "",
            "minor": self.minor,
            "state": self.state_bits,
            "read_only": self.options.read_only,
            "secs": [self.sectors[0] + (pending.read_bytes >> 9),
                     self.sectors[1] + (pending.written_bytes >> 9)],
            "errors": list(self.errors),
            "images": images,
            "reqs_outstanding": self._inflight,
            "read_caching": "false",
            "FIXME_enospc_redirect_count": 0,
            "nbd_mirror_failed": 0,
        }


class _Observed:
    """The fast write routes of a stack with write observers (a changed-block log):
    each calls every observer's ``mark`` before it issues a write, and makes the marks
    durable before a FUA write (its bits durable no later than its data). The event
    loop's synchronous routes (``write_now``, the lent descriptor: SyncFile.fua False)
    decline FUA writes, so that no sync blocks the loop: the direct route or the stack
    serves them."""

    __slots__ = ("_mark", "_observers")

    def __init__(self, observers: tuple[WriteObserver, ...]) -> None:
        self._observers = observers
        # Every write calls this: the one observer's own mark in the common case (a loop
        # and attribute lookups per write cost a tenth of a 4 KiB request).
        self._mark: Callable[[int, int], object] = observers[0].mark
        if len(observers) > 1:
            marks = tuple(observer.mark for observer in observers)

            def mark_all(offset: int, length: int) -> None:
                for mark in marks:
                    mark(offset, length)

            self._mark = mark_all

    def sync(self, now: Callable[[int, memoryview, bool], bool]
             ) -> Callable[[int, memoryview, bool], bool]:
        mark = self._mark

        def write_now(offset: int, data: memoryview, fua: bool) -> bool:
            if fua:
                return False  # (nothing done: VBD.write serves it)
            if len(data):
                mark(offset, len(data))
            return now(offset, data, fua)

        return write_now

    def pwritev(self) -> Callable[[int, Sequence[memoryview], int, int], int]:
        mark = self._mark
        pwritev_ = os.pwritev

        def pwritev(fd: int, buffers: Sequence[memoryview], offset: int, flags: int = 0
                    ) -> int:
            # (byte buffers; the inline route writes one)
            length = len(buffers[0]) if len(buffers) == 1 else sum(map(len, buffers))
            if length:
                mark(offset, length)
            return pwritev_(fd, buffers, offset, flags)

        return pwritev

    def thread(self, blocking: Callable[[int, memoryview, bool], bool]
               ) -> Callable[[int, memoryview, bool], bool]:
        mark = self._mark
        observers = self._observers

        def write_blocking(offset: int, data: memoryview, fua: bool) -> bool:
            if len(data):
                mark(offset, len(data))
                if fua:
                    for observer in observers:
                        observer.sync_now()
            return blocking(offset, data, fua)

        return write_blocking

    def direct(self, write: Callable[[int, memoryview, bool], Awaitable[None]]
               ) -> Callable[[int, memoryview, bool], Awaitable[None]]:
        mark = self._mark
        observers = self._observers

        async def write_direct(offset: int, data: memoryview, fua: bool) -> None:
            if len(data):
                mark(offset, len(data))
                if fua:
                    for observer in observers:
                        await observer.sync()
            await write(offset, data, fua)

        return write_direct


def _dirty_bitmap(stack: Stack) -> DirtyBitmap | None:
    """The changed-block record of ``stack`` (a layer's; the chain keeps none)."""
    return stack.dirty_bitmap() if isinstance(stack, Layer) else None


async def _open_stack(spec: ImageSpec, options: OpenOptions,
                      top: Sequence[LayerOpener]) -> Stack:
    """Open the chain of ``spec``, then its layers and ``top`` over it (closed again on
    failure)."""
    chain = await Chain.open(spec.type, spec.path, options)
    return await open_stack((*top, *spec.layers), chain, options)


# The C tapdisk's disk type numbers (its disk_types table order).
DISK_TYPE_IDS = {"aio": 0, "sync": 1, "vmdk": 2, "vhdsync": 3, "vhd": 4, "ram": 5, "qcow": 6,
                 "bc": 7, "vhdi": 8, "log": 9, "remus": 10, "lc": 11, "llpcache": 12,
                 "llecache": 13, "valve": 14, "nbd": 15}
