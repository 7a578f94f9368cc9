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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blktap.block.chain import Chain, ImageStats, StatusExtent
from blktap.block.driver import SECTOR_SIZE, SYNC_WRITE_MAX, Image, OpenOptions
from blktap.errors import BlktapError, Busy, InvalidArgument, NoSpace, ReadOnly, Shutdown

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
    for FUA, when ``writable``) of ``fd`` at ``offset``. See :meth:`VBD.sync_file`."""

    fd: int
    size: int
    writable: bool


class ThreadIO:
    """I/O of a VBD from one thread other than the event loop's (a thread of an NBD
    connection's lane): get it with :meth:`VBD.thread_io`, give it back with
    :meth:`VBD.release_thread_io` once that thread no longer uses it.

    :meth:`read` and :meth:`write` serve what ``VBD.read_now``/``write_now`` would (an
    aligned request of a running VBD whose one image holds every byte) when the image
    offers ``read_blocking``/``write_blocking``, and decline everything else, failures
    included: the caller then sends the request through the loop, which answers and
    counts it as usual. The VBD waits for I/O in progress here before it closes the image
    (pause, close); the counters are this thread's alone and the VBD adds them to its own.
    """

    __slots__ = ("_vbd", "busy", "reads", "sectors", "writes")

    def __init__(self, vbd: VBD) -> None:
        self._vbd = vbd
        self.busy = False
        self.reads = 0
        self.writes = 0
        self.sectors = [0, 0]  # read, written

    def read(self, offset: int, buf: memoryview) -> bool:
        """Fill ``buf`` from ``offset``, blocking this thread; False having done nothing
        when the loop must serve it (never raises for the request's failure)."""
        # Busy before the state is looked at; the loop changes the state before it
        # looks at busy: one of the two sees the other (the GIL orders them).
        self.busy = True
        try:
            vbd = self._vbd
            read = vbd._read_blocking
            length = len(buf)
            if (read is None or vbd.state is not _RUNNING or (offset | length) & _SECTOR_MASK
                    or offset < 0 or offset + length > vbd._size):
                return False
            try:
                if not read(offset, buf):
                    return False
            except Exception:
                return False  # the loop tries again and reports the failure
            self.reads += 1
            self.sectors[0] += length >> 9
            return True
        finally:
            self.busy = False

    def write(self, offset: int, data: memoryview, fua: bool = False) -> bool:
        """Write ``data`` at ``offset`` (durably with ``fua``), blocking this thread;
        False having written nothing the caller may rely on: the loop must serve it
        (never raises for the request's failure; a failed write is simply done again)."""
        self.busy = True
        try:
            vbd = self._vbd
            write = vbd._write_blocking
            length = len(data)
            if (write is None or vbd.state is not _RUNNING or vbd.options.read_only
                    or (offset | length) & _SECTOR_MASK
                    or offset < 0 or offset + length > vbd._size):
                return False
            try:
                if not write(offset, data, fua):
                    return False
            except Exception:
                return False  # the loop writes it again and reports the failure
            self.writes += 1
            self.sectors[1] += length >> 9
            return True
        finally:
            self.busy = False


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """``type:path`` as the control protocol carries it."""

    type: str
    path: str

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """Parse ``type:path``. Raises InvalidArgument when there is no type or no path."""
        kind, sep, path = text.partition(":")
        if not sep or not kind or not path:
            raise InvalidArgument(f"image must be type:/path, not {text!r}")
        return cls(kind, path)

    def __str__(self) -> str:
        return f"{self.type}:{self.path}"


class VBD:
    """A VBD bound to ``minor``. Created CLOSED; ``open`` makes it serve I/O."""

    RESUME_TRIES = 10
    RESUME_RETRY_DELAY = 1.0

    def __init__(self, minor: int) -> None:
        self.minor = minor
        self.state = VBDState.CLOSED
        self.spec: ImageSpec | None = None
        self.options = OpenOptions()
        self.secondary: str | None = None
        self._chain: Chain | None = None
        self._direct: tuple[Image, ImageStats] | None = None
        self._read_now: Callable[[int, memoryview], bool] | None = None
        self._write_now: Callable[[int, memoryview, bool], bool] | None = None
        self._now_stats = ImageStats()  # the one image's, while _read/_write_now are set
        self._read_blocking: Callable[[int, memoryview], bool] | None = None
        self._write_blocking: Callable[[int, memoryview, bool], bool] | None = None
        self._sync: SyncFile | None = None
        self._thread_ios: set[ThreadIO] = set()
        self._size = 0
        self._inflight = 0
        self._drained: asyncio.Future[None] | None = None
        self._running: asyncio.Future[None] | None = None
        self.sectors = [0, 0]  # sectors read, written
        self.errors = [0, 0]  # failed reads, writes
        self.log_context: dict[str, object] = {"minor": minor, "image": "-"}
        """Every log record about this VBD carries these (updated on open and resume)."""
        self.log = logging.LoggerAdapter(log, self.log_context)

    # ---------------------------------------------------------------- properties
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
    async def open(self, spec: ImageSpec, options: OpenOptions) -> None:
        """Open the chain for ``spec``. On failure the VBD stays CLOSED with nothing open."""
        if self.state != VBDState.CLOSED:
            raise Busy(f"minor {self.minor} is already open")
        chain = await Chain.open(spec.type, spec.path, options)
        self.spec, self.options = spec, options
        self._size = chain.size
        self._set_chain(chain)
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
        chain = self._chain
        self._set_chain(None)
        self.state = VBDState.PAUSED
        assert chain is not None
        await chain.close()
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
                chain = await Chain.open(new_spec.type, new_spec.path, self.options)
            except BlktapError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOENT):
                    last = exc
                    break
                last = exc
                continue
            except OSError as exc:
                last = exc
                continue
            if chain.size != self._size:
                await chain.close()
                last = BlktapError(
                    f"resume: size changed from {self._size} to {chain.size}",
                    errno=errno.EMEDIUMTYPE,
                )
                break
            self._set_chain(chain)
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
        chain = self._chain
        self._set_chain(None)
        try:
            if chain is not None:
                await chain.close()
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
        from another thread: it offers ``read_blocking`` (``write_blocking``)."""
        if write:
            return self._write_blocking is not None and not self.options.read_only
        return self._read_blocking is not None

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
        hits = self._now_stats.hits
        hits[0] += io.reads
        hits[1] += io.writes
        self.sectors[0] += io.sectors[0]
        self.sectors[1] += io.sectors[1]
        io.reads = io.writes = 0
        io.sectors = [0, 0]

    def _wake_waiters(self, exc: BaseException | None) -> None:
        fut, self._running = self._running, None
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: no waiter is not an error

    # ---------------------------------------------------------------------- I/O
    def _set_chain(self, chain: Chain | None) -> None:
        self._chain = chain
        # The I/O fast path applies when the chain is one image holding every byte.
        self._direct = (
            (chain.leaf, chain.stats[0])
            if chain is not None and len(chain.images) == 1 and chain.leaf.fully_allocated
            else None
        )
        # And without a coroutine when the driver's I/O need not wait (read_now/write_now).
        image = None
        if self._direct is not None:
            image, self._now_stats = self._direct
        self._read_now = getattr(image, "read_now", None)
        self._read_blocking = getattr(image, "read_blocking", None)
        self._write_blocking = getattr(image, "write_blocking", None)
        self._write_now = getattr(image, "write_now", None)
        sync_fd = getattr(image, "sync_fd", None)
        fd = sync_fd() if sync_fd is not None else None
        self._sync = (None if fd is None
                      else SyncFile(fd, self._size, not self.options.read_only))

    async def _admit(self) -> Chain:
        """Wait until the VBD runs; count the request in flight; return the chain."""
        while self.state is not _RUNNING:
            if self.state in (VBDState.PAUSING, VBDState.PAUSED) and self._running is not None:
                await asyncio.shield(self._running)
            else:
                raise Shutdown(f"minor {self.minor} is {self.state.value}")
        self._inflight += 1
        assert self._chain is not None
        return self._chain

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
        now = self._read_now
        length = len(buf)
        if (now is None or self.state is not _RUNNING or (offset | length) & _SECTOR_MASK
                or offset < 0 or offset + length > self._size):
            return False
        try:
            if not now(offset, buf):
                return False
        except BaseException:
            self._failed_now(0)
            raise
        self._now_stats.hits[0] += 1
        self.sectors[0] += length >> 9
        return True

    def write_now(self, offset: int, data: memoryview, fua: bool = False) -> bool:
        """:meth:`write` at once, under the same conditions as :meth:`read_now`, for
        writes smaller than SYNC_WRITE_MAX."""
        now = self._write_now
        length = len(data)
        if (now is None or length >= SYNC_WRITE_MAX or self.state is not _RUNNING
                or (offset | length) & _SECTOR_MASK
                or self.options.read_only or offset < 0 or offset + length > self._size):
            return False
        try:
            if not now(offset, data, fua):
                return False
        except BaseException:
            self._failed_now(1)
            raise
        self._now_stats.hits[1] += 1
        self.sectors[1] += length >> 9
        return True

    def sync_file(self) -> SyncFile | None:
        """The image's descriptor for requests its caller serves itself, or None (not
        running, or not one fully allocated image whose driver offers ``sync_fd``).

        Valid until the caller next yields to the event loop: a pause or close waits for
        the loop. The caller validates each request as the SyncFile says, sends any other
        request and any that fails through :meth:`read`/:meth:`write` (which answer and
        count the failure), and reports what it served with :meth:`count_sync`.
        """
        return self._sync if self.state is _RUNNING else None

    def count_sync(self, reads: int, read_bytes: int, writes: int, written_bytes: int) -> None:
        """Count requests served through :meth:`sync_file` (as :meth:`read_now` would)."""
        hits = self._now_stats.hits
        hits[0] += reads
        hits[1] += writes
        sectors = self.sectors
        sectors[0] += read_bytes >> 9
        sectors[1] += written_bytes >> 9

    def _failed_now(self, rw: int) -> None:
        stats = self._now_stats
        stats.hits[rw] += 1
        stats.fail[rw] += 1
        self.errors[rw] += 1

    async def read(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        direct = self._direct
        if (direct is not None and self.state is _RUNNING and not (offset | length) & _SECTOR_MASK
                and offset >= 0 and offset + length <= self._size):
            # Fast path: one fully allocated image, aligned request (most raw-image I/O).
            image, stats = direct
            self._inflight += 1
            stats.hits[0] += 1
            try:
                await image.read(offset, buf)
            except BaseException:
                stats.fail[0] += 1
                self.errors[0] += 1
                raise
            finally:
                self._done()
            self.sectors[0] += length >> 9
            return
        self._check_range(offset, length, False)
        chain = await self._admit()
        try:
            await chain.read(offset, buf)
        except BaseException:
            self.errors[0] += 1
            raise
        finally:
            self._done()
        self.sectors[0] += length >> 9

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        length = len(data)
        direct = self._direct
        if (direct is not None and self.state is _RUNNING and not (offset | length) & _SECTOR_MASK
                and not self.options.read_only and offset >= 0
                and offset + length <= self._size):
            image, stats = direct
            self._inflight += 1
            stats.hits[1] += 1
            try:
                await image.write(offset, data, fua)
            except BaseException:
                stats.fail[1] += 1
                self.errors[1] += 1
                raise
            finally:
                self._done()
            self.sectors[1] += length >> 9
            return
        self._check_range(offset, length, True)
        chain = await self._admit()
        try:
            await chain.write(offset, data, fua)
        except BaseException:
            self.errors[1] += 1
            raise
        finally:
            self._done()
        self.sectors[1] += length >> 9

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool, fua: bool) -> None:
        self._check_range(offset, length, True)
        chain = await self._admit()
        try:
            await chain.write_zeroes(offset, length, may_unmap, fua)
        except BaseException:
            self.errors[1] += 1
            raise
        finally:
            self._done()
        self.sectors[1] += length >> 9

    async def trim(self, offset: int, length: int) -> None:
        self._check_range(offset, length, True)
        chain = await self._admit()
        try:
            await chain.discard(offset, length)
        finally:
            self._done()

    async def flush(self) -> None:
        chain = await self._admit()
        try:
            await chain.flush()
        finally:
            self._done()

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint: validated, then ignored (reads are served from the page cache)."""
        self._check_range(offset, length, False)

    async def block_status(self, offset: int, length: int) -> list[StatusExtent]:
        self._check_range(offset, length, False)
        chain = await self._admit()
        try:
            return chain.block_status(offset, length)
        finally:
            self._done()

    # -------------------------------------------------------------- statistics
    def stats(self) -> dict[str, Any]:
        """The STATS JSON object of this VBD, with the C tapdisk's keys."""
        images: list[dict[str, Any]] = []
        ios = self._thread_ios
        if self._chain is not None:
            # I/O by other threads counts for the image it went to (see _take_counts).
            thread_hits = [sum(io.reads for io in ios), sum(io.writes for io in ios)]
            for image, st in zip(self._chain.images, self._chain.stats, strict=True):
                mine = st is self._now_stats
                images.append({
                    "name": image.path,
                    "hits": [st.hits[0] + (thread_hits[0] if mine else 0),
                             st.hits[1] + (thread_hits[1] if mine else 0)],
                    "fail": list(st.fail),
                    "driver": {"type": DISK_TYPE_IDS.get(image.type_name, -1),
                               "name": image.type_name, "status": 0},
                })
        return {
            "name": str(self.spec) if self.spec else "",
            "minor": self.minor,
            "state": self.state_bits,
            "read_only": self.options.read_only,
            "secs": [self.sectors[0] + sum(io.sectors[0] for io in ios),
                     self.sectors[1] + sum(io.sectors[1] for io in ios)],
            "errors": list(self.errors),
            "images": images,
            "reqs_outstanding": self._inflight,
            "read_caching": "false",
            "FIXME_enospc_redirect_count": 0,
            "nbd_mirror_failed": 0,
        }


# The C tapdisk's disk type numbers (its disk_types table order).
DISK_TYPE_IDS = {"aio": 0, "sync": 1, "vmdk": 2, "vhdsync": 3, "vhd": 4, "ram": 5, "qcow": 6,
                 "bc": 7, "vhdi": 8, "log": 9, "remus": 10, "lc": 11, "llpcache": 12,
                 "llecache": 13, "valve": 14, "nbd": 15}
