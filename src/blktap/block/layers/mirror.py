"""``mirror``: the secondary image of a VBD (``tap-ctl create -2 TYPE:PATH [-s]``, the OPEN
and RESUME flag SECONDARY with ``params.secondary``), as the C tapdisk's mirror and
standby modes, and what the C tapdisk lacks: it survives a failing secondary.

The secondary string
--------------------
``[SETTINGS:]TYPE:PATH``: a driver type and path as in the image string (usually
``nbd:...``, see :mod:`blktap.block.drivers.nbd`: a Unix socket, ``HOST:PORT``, or an NBD
URI, ``nbds://HOST:PORT/?tls-certificates=DIR`` for another host's TLS export; the whole
string must fit ``params.secondary``, 255 bytes), opened as a chain of its own with the
primary's open options. Its size must be the primary's (EINVAL otherwise, as the C
tapdisk). An optional first field of comma-separated ``key=value`` settings (it holds a
``=``, which no driver type does) chooses what the C tapdisk has no word for; it travels
in ``params.secondary``, so the C tap-ctl can send it too:

``copy``
    ``none`` (the default, as the C tapdisk: only writes made while mirroring reach the
    secondary; the storage manager copies the rest itself), ``allocated`` (a background
    copy of every block the primary's chain holds, read by block status: for an empty
    destination, which must read as zeros elsewhere), ``full`` (every block; zero
    ranges are written as zeroes).
``timeout``
    Seconds a write waits for the secondary before it is acknowledged with the
    secondary's part recorded as missed (default 2; the mirror degrades).

Mirror mode (SECONDARY)
-----------------------
Every write, write-zeroes and discard goes to the primary (``next``) and the secondary
at once and is acknowledged when both have it; flush goes to both; reads and block
status come from the primary. A discard is advisory and the two sides may apply it
differently, so its blocks are recorded as missed and the copier makes the secondary
read as the primary does there. The secondary is sent a copy of the write's bytes (the
frontend may reuse its buffer once the write is acknowledged, and a secondary request
may outlive the write, see below).

States (:class:`Phase`; ``tap-ctl stats`` shows them under ``mirror``)::

             copy=allocated/full                  the copier has nothing left
    open ──> COPYING ─────────────────────────────────────────────────> IN_SYNC
      │         │  ▲                                                  │   ▲
      │         │  └─ secondary error/timeout ─┐  ┌─ error/timeout ───┘   │
      │         ▼                              │  ▼                       │
      │     (any live state) ────────────> DEGRADED ──> RESYNCING ────────┘
      │                                       ▲   secondary answers,      copier done,
      └── secondary cannot be opened ─────────┘   its old requests over   secondary flushed

* COPYING / RESYNCING: writes are mirrored and a background copier copies the blocks in
  the record (the initial copy's allocated blocks, or those a failure missed) from the
  primary to the secondary: at most :data:`COPY_WORKERS` runs of up to :data:`COPY_RUN`
  blocks at a time, one while the guest has requests in this layer, so the guest's I/O
  is not starved. A guest write overlapping a run being copied (or in flight when the
  run started) marks the run's blocks again: the copy may have read the older bytes.
* IN_SYNC: nothing recorded, every acknowledged write is on both sides, and what the
  copier wrote was flushed on the secondary.
* DEGRADED: a secondary request failed or took longer than ``timeout`` (its blocks are
  recorded), or the secondary could not be opened. Writes go to the primary only, each
  recording its blocks before the primary has it (so the record covers every
  acknowledged write). Blocks written to the secondary since its last successful flush
  are recorded too (a restarted server may have lost them). STATS sets the C key
  ``nbd_mirror_failed`` to 1, and it stays 1 after the resync (below). A background
  task opens the secondary again if needed and reads from it until it answers; it
  waits until every secondary request that timed out has ended (answered, or failed by
  the driver), since such a request could land after a newer copy of its blocks; then
  RESYNCING.

The record is a bitmap of :data:`BLOCK` (64 KiB) blocks in memory, kept by the VBD's
:class:`MirrorSlot` across pause and resume (the layer is reopened at each resume): a
VBD paused while degraded resumes degraded with the same record.

``nbd_mirror_failed`` is sticky: 1 from the first degradation until another secondary
is named, as the C tapdisk keeps it (C clears it only when the secondary is removed).
The toolstack reads nothing else: xapi's storage migration polls ``tap-ctl stats``
every 5 s while it mirrors, and one 1 seen cancels the migration; it never asks
whether the mirror is in sync before it switches the VM to the destination. A flag
that went back to 0 after the resync would let a failure between two polls go unseen,
and xapi could then switch while the resync still runs. The ``mirror`` object shows
the recovery (``state``, ``dirty_blocks``, ``in_sync``, ``degraded_count``) to a
toolstack that reads it.

Not persisted, by choice: a record that outlives the tapdisk must be on disk before
every write it covers is acknowledged (a write-ahead dirty log, as the changed-block
log keeps), and in every live phase too, not only while degraded: the blocks written
to the secondary since its last flush, and the writes in flight on one side only when
the tapdisk dies, are as missing as the degraded ones. That is a synchronous write per
first write to a block, on the path this layer exists to keep fast. The toolstack has
no use for it either: xapi cancels a storage migration whose tapdisk went away and
starts over. A tapdisk that dies loses the record; the mirror starts over with
``copy=...`` (or the toolstack's own copy).

Standby mode (SECONDARY | STANDBY)
----------------------------------
Writes go to the primary only. When the primary fails a write or write-zeroes with
ENOSPC, the VBD fails over for good (as the C tapdisk, which puts the secondary in
front of the leaf): that write and every later one go to the secondary; reads come from
the secondary where its leaf holds the range (DATA or ZERO) and from the primary where
it does not (a raw secondary holds everything); a flush goes to both, a trim is dropped
(it could expose the primary's older bytes). ``FIXME_enospc_redirect_count`` counts
the sectors written after the fail-over, as in C. A standby layer sees every request
(reads too).

A primary's ENOSPC in mirror mode is returned to the guest, by choice. The C tapdisk
acknowledges that write as done, drops the primary and carries on with the secondary
alone, reads included. With ``copy=none`` (what xapi uses: it copies the older blocks
itself, through another path) the secondary does not yet hold the blocks written before
mirroring began, and a tapdisk cannot know when the toolstack's copy has finished:
reads from the secondary could return stale data, silently. The guest's ENOSPC is the
same as a VBD without a secondary gives; reads and overwrites of allocated blocks go on.
Only a standby secondary (``-s``), named for this, takes over on ENOSPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blktap.block.capabilities import Capabilities
from blktap.block.chain import STATE_ZERO, Chain
from blktap.block.driver import SECTOR_SIZE, Alloc, OpenOptions
from blktap.block.layer import Layer, LayerOpener, Stack
from blktap.errors import BlktapError, InvalidArgument, errno_of

log = logging.getLogger(__name__)

BLOCK = 64 << 10
"""Granularity of the record of missed blocks (the changed-block log's)."""
COPY_RUN = 16
"""Blocks copied by one request pair of the copier (1 MiB)."""
COPY_WORKERS = 4
"""Copier runs in flight while the guest is idle (one while it has requests here)."""
DEFAULT_TIMEOUT_S = 2.0
PROBE_FIRST_S = 0.1
PROBE_MAX_S = 2.0
COPY_MODES = ("none", "allocated", "full")

SecondaryOp = Callable[[Stack], Awaitable[None]]


class Phase(enum.Enum):
    COPYING = "copying"
    IN_SYNC = "in_sync"
    DEGRADED = "degraded"
    RESYNCING = "resyncing"
    STANDBY = "standby"
    FAILED_OVER = "failed_over"


_LIVE = (Phase.COPYING, Phase.IN_SYNC, Phase.RESYNCING)
"""Phases in which writes are mirrored."""


@dataclass(frozen=True, slots=True)
class SecondarySpec:
    """A parsed secondary string (see the module docstring)."""

    type: str
    path: str
    standby: bool = False
    copy: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def parse(cls, text: str, standby: bool = False) -> SecondarySpec:
        """Parse ``[SETTINGS:]TYPE:PATH``. Raises InvalidArgument (EINVAL)."""
        rest = text
        settings: dict[str, str] = {}
        head, sep, tail = text.partition(":")
        if sep and "=" in head:
            rest = tail
            for item in head.split(","):
                key, eq, value = item.partition("=")
                if not eq or key not in ("copy", "timeout") or key in settings:
                    raise InvalidArgument(f"secondary {text!r}: bad setting {item!r} "
                                          "(copy=none|allocated|full, timeout=SECONDS)")
                settings[key] = value
        type_name, sep, path = rest.partition(":")
        if not sep or not type_name or not path:
            raise InvalidArgument(f"secondary {text!r}: expected [SETTINGS:]TYPE:PATH")
        copy = settings.get("copy", "none")
        if copy not in COPY_MODES:
            raise InvalidArgument(f"secondary {text!r}: copy must be one of {COPY_MODES}")
        try:
            timeout = float(settings.get("timeout", DEFAULT_TIMEOUT_S))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 3600:
            raise InvalidArgument(f"secondary {text!r}: timeout must be 0 < SECONDS <= 3600")
        if standby and copy != "none":
            raise InvalidArgument(f"secondary {text!r}: a standby secondary takes no copy")
        return cls(type_name, path, standby, copy, timeout)

    def __str__(self) -> str:
        return f"{self.type}:{self.path}"


class BlockMap:
    """A bitmap of ``nblocks`` blocks with a count of the set ones."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.bits = bytearray((nblocks + 7) // 8)
        self.count = 0

    def set(self, block: int) -> None:
        byte, bit = divmod(block, 8)
        if not self.bits[byte] >> bit & 1:
            self.bits[byte] |= 1 << bit
            self.count += 1

    def set_range(self, first: int, n: int) -> None:
        end = first + n
        while first < end and first % 8:
            self.set(first)
            first += 1
        whole = end - end % 8
        if whole > first:  # whole bytes at C speed
            a, b = first // 8, whole // 8
            before = int.from_bytes(self.bits[a:b], "little").bit_count()
            self.bits[a:b] = b"\xff" * (b - a)
            self.count += (b - a) * 8 - before
            first = whole
        while first < end:
            self.set(first)
            first += 1

    def merge(self, other: BlockMap) -> None:
        """Set every block set in ``other`` (same size)."""
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits = bytearray(merged.to_bytes(len(self.bits), "little"))
        self.count = merged.bit_count()

    def test(self, block: int) -> bool:
        byte, bit = divmod(block, 8)
        return bool(self.bits[byte] >> bit & 1)

    def clear(self, block: int) -> None:
        byte, bit = divmod(block, 8)
        if self.bits[byte] >> bit & 1:
            self.bits[byte] &= ~(1 << bit)
            self.count -= 1

    def clear_all(self) -> None:
        if self.count:
            self.bits = bytearray(len(self.bits))
            self.count = 0

    def take_run(self, start: int, most: int) -> tuple[int, int] | None:
        """Clear and return the first run (``first``, ``n`` <= ``most``) of set blocks at
        or after ``start``, wrapping around; None when none is set."""
        if not self.count:
            return None
        first = self._next_set(start)
        if first is None:
            first = self._next_set(0)
            if first is None:  # pragma: no cover - count says one is set
                return None
        n = 0
        while n < most and first + n < self.nblocks and self.test(first + n):
            self.clear(first + n)
            n += 1
        return first, n

    def _next_set(self, start: int) -> int | None:
        bits = self.bits
        byte = start // 8
        if byte < len(bits) and bits[byte]:
            for block in range(start, min(byte * 8 + 8, self.nblocks)):
                if self.test(block):
                    return block
        byte += 1
        while byte < len(bits):
            # Skip zero stretches 4 KiB of bitmap (32768 blocks) at a time.
            if not bits[byte]:
                if byte + 4096 <= len(bits) and not any(bits[byte:byte + 4096]):
                    byte += 4096
                    continue
                byte += 1
                continue
            for block in range(byte * 8, min(byte * 8 + 8, self.nblocks)):
                if self.test(block):
                    return block
            byte += 1
        return None


def _blocks(offset: int, length: int) -> tuple[int, int]:
    """First block and block count of a byte range (at least one block)."""
    first = offset // BLOCK
    last = (offset + max(length, 1) - 1) // BLOCK
    return first, last - first + 1


class MirrorState:
    """What outlives one open of the layer: the secondary, the phase, the record of
    missed blocks and the counters STATS shows (owned by the VBD's :class:`MirrorSlot`)."""

    def __init__(self, spec: SecondarySpec) -> None:
        self.spec = spec
        self.phase = Phase.STANDBY if spec.standby else Phase.COPYING
        self.missed: BlockMap | None = None
        """The record (created at the first open, when the size is known)."""
        self.unflushed: BlockMap | None = None
        """Blocks written to the secondary since its last successful flush."""
        self.pass_copied = 0
        """Blocks the copier copied since the record last became non-empty."""
        self.copied_total = 0
        self.degraded_count = 0
        self.last_error = ""
        self.redirected_sectors = 0
        self.open = False

    def report(self) -> dict[str, Any]:
        missed = self.missed.count if self.missed is not None else 0
        todo = self.pass_copied + missed
        doc: dict[str, Any] = {
            "secondary": str(self.spec),
            "mode": "standby" if self.spec.standby else "mirror",
            "state": self.phase.value,
            "in_sync": self.phase == Phase.IN_SYNC,
            "open": self.open,
            "block_size": BLOCK,
            "dirty_blocks": missed,
            "copied_blocks": self.pass_copied,
            "copied_total_blocks": self.copied_total,
            "progress": round(self.pass_copied / todo, 4) if todo else 1.0,
            "degraded_count": self.degraded_count,
        }
        if self.last_error:
            doc["last_error"] = self.last_error
        return doc


class _Call:
    """One request to the secondary: the task running it, and the future its end
    resolves (for :meth:`MirrorLayer._settle`); its error, if it failed."""

    __slots__ = ("ended", "error", "task", "waiter")

    def __init__(self, waiter: asyncio.Future[None]) -> None:
        self.waiter = waiter
        self.task: asyncio.Task[None] | None = None
        self.ended = False
        self.error: BaseException | None = None

    async def run(self, request: Awaitable[None]) -> None:
        try:
            await request
        except asyncio.CancelledError as exc:
            self.error = exc
            raise
        except Exception as exc:
            self.error = exc
        finally:
            self.ended = True
            if not self.waiter.done():
                self.waiter.set_result(None)


class _Run:
    """A run of blocks the copier is copying; ``touched`` when a guest write overlapped."""

    __slots__ = ("first", "n", "touched")

    def __init__(self, first: int, n: int, touched: bool) -> None:
        self.first, self.n, self.touched = first, n, touched


class MirrorLayer(Layer):
    """Mirrors writes to ``secondary`` or keeps it as a standby (module docstring)."""

    name = "mirror"

    def __init__(self, next: Stack, options: OpenOptions, state: MirrorState,
                 secondary: Chain | None) -> None:
        self.state = state  # narrow() reads it
        self.secondary = secondary
        super().__init__(next, options)
        self._loop = asyncio.get_running_loop()
        """Kept: asking for the running loop costs a getpid() system call each time."""
        self._orphans: set[asyncio.Task[None]] = set()
        self._writes: dict[int, tuple[int, int]] = {}
        """Guest writes in flight here: token -> (first block, count)."""
        self._token = 0
        self._runs: set[_Run] = set()
        self._busy = 0
        self._stopping = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._waiting: dict[asyncio.Future[None], float] = {}
        """Waiters of secondary requests -> their deadline (see _settle)."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._write_gen = 0
        """Bumped when a secondary write starts and when it ends: a flush clears
        ``unflushed`` only if it did not change while the flush ran."""

    # ----------------------------------------------------------------- opening
    @classmethod
    async def open_with(cls, next: Stack, options: OpenOptions,
                        state: MirrorState) -> MirrorLayer:
        spec = state.spec
        nblocks = -(-next.size // BLOCK)
        if state.missed is None or state.missed.nblocks != nblocks:
            state.missed = BlockMap(nblocks)
            state.unflushed = BlockMap(nblocks)
            if spec.copy != "none":
                _seed(state.missed, next, spec.copy)
        secondary: Chain | None = None
        try:
            secondary = await _open_secondary(spec, next.size, options)
        except (BlktapError, OSError) as exc:
            if spec.type != "nbd" or errno_of(exc) == errno.EINVAL:
                raise
            log.error("secondary %s: %s; mirroring degraded until it answers", spec, exc)
            state.last_error = str(exc)
        if state.phase in (Phase.STANDBY, Phase.FAILED_OVER) and secondary is None:
            raise BlktapError(f"secondary {spec}: {state.last_error}", errno=errno.EIO)
        layer = cls(next, options, state, secondary)
        state.open = True
        if state.phase in (Phase.STANDBY, Phase.FAILED_OVER):
            pass
        elif state.phase == Phase.DEGRADED:
            layer._start(layer._recover())  # opens the secondary again if needed
        elif secondary is None:
            layer._degrade(state.last_error or "cannot open the secondary", mark_unflushed=False)
        elif state.missed.count:
            layer._start(layer._copy())
        else:
            state.phase = Phase.IN_SYNC
        return layer

    def narrow(self, caps: Capabilities) -> Capabilities:
        if self.state.spec.standby:
            return caps.must_see_everything()
        return caps.must_see_writes()

    # ---------------------------------------------------------------- requests
    async def read(self, offset: int, buf: memoryview) -> None:
        if self.state.phase == Phase.FAILED_OVER and self.secondary is not None:
            await self._read_failed_over(offset, buf)
        else:
            await self.next.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if self.state.spec.standby:
            await self._standby(offset, len(data), lambda s: s.write(offset, data, fua))
            return
        copy = bytes(data)
        await self._mirror(offset, len(data), lambda s: s.write(offset, data, fua),
                           lambda s: s.write(offset, memoryview(copy), fua))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        def op(s: Stack) -> Awaitable[None]:
            return s.write_zeroes(offset, length, may_unmap, fua)

        if self.state.spec.standby:
            await self._standby(offset, length, op)
        else:
            await self._mirror(offset, length, op, op)

    async def discard(self, offset: int, length: int) -> None:
        if self.state.spec.standby:
            # After a fail-over a trim is dropped (it is advisory): one on the secondary
            # could expose the primary's older bytes below it.
            if self.state.phase == Phase.STANDBY:
                await self.next.discard(offset, length)
            return
        # Advisory on each side, applied differently: the copier makes them agree.
        token = self._begin(offset, length, record=True)
        try:
            await self.next.discard(offset, length)
        finally:
            self._end(token)
        if self.state.phase in (Phase.IN_SYNC,):
            self.state.phase = Phase.RESYNCING
            self.state.pass_copied = 0
            self._start(self._copy())

    async def flush(self) -> None:
        phase = self.state.phase
        if self.secondary is None or phase in (Phase.DEGRADED, Phase.STANDBY):
            await self.next.flush()
            return
        if phase == Phase.FAILED_OVER:  # the primary holds the writes from before it
            await _both(self.next.flush(), self.secondary.flush())
            return
        gen = self._write_gen
        sec = self.secondary
        start = time.monotonic()
        task = self._send(lambda s: s.flush())
        try:
            await self.next.flush()
        finally:
            ok = await self._settle(task, start)
        if ok:
            if gen == self._write_gen and self.state.unflushed is not None:
                self.state.unflushed.clear_all()
        elif self.secondary is sec:
            self._degrade("secondary flush failed")

    # ------------------------------------------------------------ mirror mode
    def _begin(self, offset: int, length: int, record: bool) -> int:
        """Register a guest write; mark runs being copied that it overlaps; record its
        blocks as missed when ``record``. Returns its token."""
        first, n = _blocks(offset, length)
        self._token += 1
        self._writes[self._token] = (first, n)
        self._busy += 1
        for run in self._runs:
            if run.first < first + n and first < run.first + run.n:
                run.touched = True
        if record:
            assert self.state.missed is not None
            self.state.missed.set_range(first, n)
        return self._token

    def _end(self, token: int) -> None:
        del self._writes[token]
        self._busy -= 1

    async def _mirror(self, offset: int, length: int, primary: SecondaryOp,
                      secondary: SecondaryOp) -> None:
        start = time.monotonic()
        live = self.state.phase in _LIVE and self.secondary is not None
        token = self._begin(offset, length, record=not live)
        try:
            if not live:
                await primary(self.next)
                return
            self._write_gen += 1
            first, n = self._writes[token]
            assert self.state.unflushed is not None
            self.state.unflushed.set_range(first, n)
            sec = self.secondary
            task = self._send(secondary)
            try:
                await primary(self.next)
            except BaseException:
                # The secondary may now hold what the primary does not: copy it back.
                assert self.state.missed is not None
                self.state.missed.set_range(first, n)
                await self._settle(task, start)
                self._write_gen += 1
                self._kick()
                raise
            settled = await self._settle(task, start)
            # Started and ended: a flush sent meanwhile may not cover it (see flush).
            self._write_gen += 1
            if not settled:
                assert self.state.missed is not None
                self.state.missed.set_range(first, n)
                if self.secondary is sec:
                    self._degrade("secondary write failed or timed out")
        finally:
            self._end(token)

    def _send(self, op: SecondaryOp) -> _Call | None:
        """Start ``op`` on the secondary as a task of its own (None without one)."""
        if self.secondary is None:
            return None
        call = _Call(self._loop.create_future())
        call.task = self._loop.create_task(call.run(op(self.secondary)))
        return call

    async def _settle(self, call: _Call | None, start: float) -> bool:
        """Wait for ``call`` until ``start`` plus the timeout; True when it succeeded in
        time. A request still running then is kept as an orphan: it is never cancelled
        (the driver may still retry it), and the recovery waits for it to end."""
        if call is None:
            return False
        if not call.ended:
            # The call's own coroutine wakes this one when it ends (no done-callback
            # round through the loop); one shared watchdog timer releases it at the
            # deadline (not a timer per request, as asyncio.wait's timeout would cost).
            waiter = call.waiter
            self._waiting[waiter] = start + self.state.spec.timeout_s
            if self._watchdog is None:
                self._arm_watchdog()
            try:
                await waiter
            finally:
                self._waiting.pop(waiter, None)
        if call.ended:
            if call.error is None:
                return True
            self.state.last_error = f"{type(call.error).__name__}: {call.error}"
            return False
        self.state.last_error = f"no answer within {self.state.spec.timeout_s:g} s"
        task = call.task
        assert task is not None
        self._orphans.add(task)
        task.add_done_callback(lambda t: self._orphan_done(t, call))
        return False

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            period = min(self.state.spec.timeout_s / 4, 0.25)
            self._watchdog = asyncio.get_running_loop().call_later(period, self._watch)

    def _watch(self) -> None:
        """Release the waiters of secondary requests past their deadline."""
        self._watchdog = None
        now = time.monotonic()
        for waiter, deadline in list(self._waiting.items()):
            if deadline <= now and not waiter.done():
                waiter.set_result(None)
        if self._waiting:
            self._arm_watchdog()

    async def _on_secondary(self, op: SecondaryOp, start: float) -> bool:
        """:meth:`_send` then :meth:`_settle`."""
        return await self._settle(self._send(op), start)

    def _orphan_done(self, task: asyncio.Task[None], call: _Call) -> None:
        self._orphans.discard(task)
        if call.error is not None:
            log.debug("a timed-out secondary request failed: %s", call.error)

    def _degrade(self, reason: str, mark_unflushed: bool = True, recover: bool = True) -> None:
        state = self.state
        if state.phase not in _LIVE:
            return
        log.error("secondary %s: %s (%s); mirroring degraded, recording missed blocks",
                  state.spec, reason, state.last_error)
        state.phase = Phase.DEGRADED
        state.degraded_count += 1
        assert state.missed is not None and state.unflushed is not None
        if mark_unflushed and state.unflushed.count:
            state.missed.merge(state.unflushed)
        state.unflushed.clear_all()
        if recover:
            self._start(self._recover())

    def _kick(self) -> None:
        """Start the copier when the record is not empty and the mirror is live."""
        assert self.state.missed is not None
        if self.state.phase == Phase.IN_SYNC and self.state.missed.count:
            self.state.phase = Phase.RESYNCING
            self.state.pass_copied = 0
            self._start(self._copy())

    def _start(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as the layer's one background task (after the current one ends)."""
        previous = self._worker

        async def run() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait({previous})
            if not self._stopping.is_set():
                await coro
            else:
                _discard(coro)

        self._worker = asyncio.ensure_future(run())
        self._worker.add_done_callback(_log_failure)

    async def _recover(self) -> None:
        """DEGRADED until the secondary answers and its timed-out requests have ended."""
        delay = PROBE_FIRST_S
        state = self.state
        while not self._stopping.is_set() and state.phase == Phase.DEGRADED:
            if self._orphans:
                await asyncio.wait(set(self._orphans), timeout=PROBE_MAX_S)
                continue
            if self.secondary is None:
                try:
                    self.secondary = await _open_secondary(state.spec, self.next.size,
                                                           self.options)
                except (BlktapError, OSError) as exc:
                    state.last_error = str(exc)
            if self.secondary is not None:
                probe = memoryview(bytearray(SECTOR_SIZE))

                def read(s: Stack, probe: memoryview = probe) -> Awaitable[None]:
                    return s.read(0, probe)
                if await self._on_secondary(read, time.monotonic()):
                    if not self._orphans:
                        log.info("secondary %s answers again; copying %d missed blocks",
                                 state.spec, state.missed.count if state.missed else 0)
                        state.phase = Phase.RESYNCING
                        state.pass_copied = 0
                        await self._copy()
                        return
                    continue
            await _sleep_unless(self._stopping, delay)
            delay = min(delay * 2, PROBE_MAX_S)

    async def _copy(self) -> None:
        """Copy the recorded blocks to the secondary (COPYING/RESYNCING -> IN_SYNC)."""
        state = self.state
        missed = state.missed
        assert missed is not None
        cursor = 0
        pending: set[asyncio.Task[bool]] = set()
        try:
            while state.phase in (Phase.COPYING, Phase.RESYNCING):
                limit = 1 if self._busy else COPY_WORKERS
                while (len(pending) < limit and not self._stopping.is_set()):
                    run = missed.take_run(cursor, COPY_RUN)
                    if run is None:
                        break
                    cursor = run[0] + run[1]
                    pending.add(asyncio.ensure_future(self._copy_run(*run)))
                if not pending:
                    if self._stopping.is_set():
                        return
                    # Nothing left: make what the copier wrote durable, then IN_SYNC.
                    sec = self.secondary
                    gen = self._write_gen
                    if not await self._on_secondary(lambda s: s.flush(), time.monotonic()):
                        if self.secondary is sec:
                            self._degrade("secondary flush failed")
                        return
                    if missed.count == 0 and state.phase in (Phase.COPYING, Phase.RESYNCING):
                        state.phase = Phase.IN_SYNC
                        if gen == self._write_gen and state.unflushed is not None:
                            state.unflushed.clear_all()
                        log.info("secondary %s in sync", state.spec)
                        return
                    continue
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(not t.result() for t in done) and state.phase in _LIVE:
                    self._degrade("copy to the secondary failed")
        finally:
            if pending:
                await asyncio.wait(pending)

    async def _copy_run(self, first: int, n: int) -> bool:
        """Copy blocks ``first``..``first+n`` from the primary; on any failure, or when a
        guest write overlapped, record them again. True unless the secondary failed."""
        state = self.state
        assert state.missed is not None and state.unflushed is not None
        touched = any(f < first + n and first < f + m for f, m in self._writes.values())
        run = _Run(first, n, touched)
        self._runs.add(run)
        start, end = first * BLOCK, min((first + n) * BLOCK, self.next.size)
        ok = True
        copied = False
        try:
            state.unflushed.set_range(first, n)
            self._write_gen += 1
            for ext in self.next.block_status(start, end - start):
                t0 = time.monotonic()
                if ext.flags & STATE_ZERO:
                    off, ln = ext.offset, ext.length

                    def zero(s: Stack, off: int = off, ln: int = ln) -> Awaitable[None]:
                        return s.write_zeroes(off, ln, True, False)
                    ok = await self._on_secondary(zero, t0)
                else:
                    buf = bytearray(ext.length)
                    await self.next.read(ext.offset, memoryview(buf))
                    off = ext.offset

                    def put(s: Stack, off: int = off, buf: bytearray = buf) -> Awaitable[None]:
                        return s.write(off, memoryview(buf), False)
                    ok = await self._on_secondary(put, time.monotonic())
                if not ok:
                    break
            copied = ok
        except Exception as exc:  # a primary read error: try again later
            log.error("copying blocks %d+%d to the secondary: %s", first, n, exc)
            state.last_error = f"primary: {exc}"
        finally:
            self._write_gen += 1
            self._runs.discard(run)
            if not copied or run.touched:
                state.missed.set_range(first, n)
            else:
                state.pass_copied += n
                state.copied_total += n
        if not ok:
            return False
        if not copied:
            await _sleep_unless(self._stopping, PROBE_FIRST_S)
        return True

    # ------------------------------------------------------------ standby mode
    async def _standby(self, offset: int, length: int, op: SecondaryOp) -> None:
        state = self.state
        if state.phase == Phase.STANDBY:
            try:
                await op(self.next)
                return
            except Exception as exc:
                if errno_of(exc) != errno.ENOSPC or self.secondary is None:
                    raise
                log.error("primary out of space: failing over to the secondary %s",
                          state.spec)
                state.phase = Phase.FAILED_OVER
        if self.secondary is None:
            raise BlktapError(f"secondary {state.spec} is not open", errno=errno.EIO)
        await op(self.secondary)
        state.redirected_sectors += -(-length // SECTOR_SIZE)

    async def _read_failed_over(self, offset: int, buf: memoryview) -> None:
        assert self.secondary is not None
        leaf = self.secondary.leaf
        end = offset + len(buf)
        lo = offset - offset % SECTOR_SIZE
        hi = -(-end // SECTOR_SIZE) * SECTOR_SIZE
        for ext in leaf.allocation(lo, hi - lo):
            a, b = max(ext.offset, offset), min(ext.offset + ext.length, end)
            if a >= b:
                continue
            part = buf[a - offset:b - offset]
            if ext.alloc == Alloc.UNALLOCATED:
                await self.next.read(a, part)
            else:
                await self.secondary.read(a, part)

    # ------------------------------------------------------------------ closing
    async def close(self) -> None:
        """Stop the background work, flush and close the secondary (what it did not
        confirm is recorded), then close ``next``. The state stays with the slot."""
        self._stopping.set()
        state = self.state
        try:
            if self._worker is not None:
                await asyncio.wait({self._worker})
            if self.secondary is not None and state.phase in _LIVE:
                sec = self.secondary
                if not await self._on_secondary(lambda s: s.flush(), time.monotonic()):
                    if self.secondary is sec:
                        self._degrade("secondary flush at close failed", recover=False)
                elif state.unflushed is not None:
                    state.unflushed.clear_all()
            if self.secondary is not None:
                try:
                    await self.secondary.close()
                except Exception as exc:
                    log.error("closing the secondary %s: %s", state.spec, exc)
                self.secondary = None
            if self._orphans:
                await asyncio.wait(set(self._orphans), timeout=5.0)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            state.open = False
            await super().close()


class MirrorSlot:
    """The secondary of a VBD: what its opener opens at each open of the stack (the VBD
    reopens its top layers at every resume), and the :class:`MirrorState` that outlives
    them. Without a secondary the opener opens a pass-through layer that narrows
    nothing. :meth:`set` names the secondary (OPEN with SECONDARY, or a RESUME with
    SECONDARY); naming the one already set keeps its state (record, phase)."""

    def __init__(self) -> None:
        self.state: MirrorState | None = None

    def set(self, text: str, standby: bool = False) -> None:
        """Raises InvalidArgument for a bad secondary string."""
        if not text:
            raise InvalidArgument("SECONDARY with an empty secondary image")
        spec = SecondarySpec.parse(text, standby)
        if self.state is None or self.state.spec != spec:
            self.state = MirrorState(spec)

    def opener(self) -> LayerOpener:
        async def open_(next: Stack, options: OpenOptions) -> Layer:
            if self.state is None:
                return Layer(next, options)
            return await MirrorLayer.open_with(next, options, self.state)

        return open_

    def report(self) -> dict[str, Any] | None:
        """The ``mirror`` object of STATS, or None without a secondary."""
        return self.state.report() if self.state is not None else None

    @property
    def failed(self) -> bool:
        """STATS ``nbd_mirror_failed``: the mirror has degraded at least once since this
        secondary was named (sticky, as in C: see the module docstring)."""
        return self.state is not None and self.state.degraded_count > 0

    @property
    def redirected_sectors(self) -> int:
        return self.state.redirected_sectors if self.state is not None else 0


async def _open_secondary(spec: SecondarySpec, size: int, options: OpenOptions) -> Chain:
    """Open the secondary chain; EINVAL (closed again) when its size is not ``size``."""
    chain = await Chain.open(spec.type, spec.path, OpenOptions(read_only=False,
                                                               direct=options.direct))
    if chain.size != size:
        await chain.close()
        raise InvalidArgument(f"secondary {spec}: size {chain.size} is not the image's {size}")
    return chain


def _seed(missed: BlockMap, stack: Stack, copy: str) -> None:
    """Record the blocks the initial copy must copy: every one, or those holding data."""
    if copy == "full":
        missed.set_range(0, missed.nblocks)
        return
    step = 1 << 30
    for base in range(0, stack.size, step):
        for ext in stack.block_status(base, min(step, stack.size - base)):
            if not ext.flags & STATE_ZERO:
                first, n = _blocks(ext.offset, ext.length)
                missed.set_range(first, n)


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both to the end, then raise the first one's error, if any."""
    for result in await asyncio.gather(first, second, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


async def _sleep_unless(event: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), delay)


def _discard(coro: Awaitable[None]) -> None:
    close = getattr(coro, "close", None)
    if close is not None:
        close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("mirror background task failed", exc_info=task.exception())
