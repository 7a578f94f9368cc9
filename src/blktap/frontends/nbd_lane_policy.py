"""When an NBD connection hands its socket to a lane, and how it takes it back.

A client that sends one READ at a time (queue depth 1) gets its socket handed to a read
lane after LANE_AFTER lone READs in a row; one that streams large WRITEs to a buffered
image, to a write lane after WRITE_LANE_AFTER of them (the threads are in
:mod:`blktap.frontends.nbd_lane`). A lane works on the socket's raw descriptor, so only
a connection whose listener gives one (not under TLS) ever counts: its LaneState stays
OFF otherwise.

The policy is the state :class:`LaneState`, moved only along ``LANE_TRANSITIONS`` by
:meth:`LanePolicy._lane_event`; the runs (``_lone``, ``_big``) and their thresholds
(``_lane_after``, ``_write_lane_after``) are counters. A lane that served fewer than
LANE_SHORT requests doubles the threshold of the next one (up to LANE_AFTER_MAX); a lane
that could not be made (no descriptor left) turns lanes OFF for the connection.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from blktap.frontends.nbd_base import ConnectionBase
from blktap.frontends.nbd_lane import (
    LANE_READ_MAX,
    WRITE_LANE_MAX,
    WRITE_LANE_THREADS,
    Lane,
    LaneResult,
    ReadLane,
    WriteLane,
)
from blktap.vbd import ThreadIO

LANE_AFTER = 8
"""Lone READs in a row (each alone, nothing else in flight) after which a connection
hands its socket to a read lane ..."""
WRITE_LANE_AFTER = 4
"""... and large WRITEs in a row after which it hands it to a write lane, once the
requests in flight are answered."""
LANE_SHORT = 64
"""A lane that served fewer requests than this doubles the run the next one waits for..."""
LANE_AFTER_MAX = 4096
"""... up to this many."""


class LaneState(enum.Enum):
    """Where a connection's socket is, as far as lanes go."""

    OFF = ("off", False)
    """No lane here: before negotiation, without a raw descriptor (TLS), or after one
    could not be made. Nothing is counted."""
    COUNTING = ("counting", False)
    """The event loop reads the socket and counts runs of lone READs and large WRITEs."""
    WANTED = ("wanted", True)
    """A write lane starts once the requests in flight are answered; reading stops."""
    RUNNING = ("running", True)
    """A lane has the socket."""
    ABORTING = ("aborting", True)
    """A lane has the socket and was told to stop: the connection aborts when it
    returns."""

    def __init__(self, label: str, holds_socket: bool) -> None:
        self.holds_socket = holds_socket
        """The event loop does not read the socket (flow control: Intake.HANDED_OVER)."""


class LaneEvent(enum.Enum):
    NEGOTIATED = "the client negotiated, and the listener gives a raw descriptor"
    WANT_WRITE = "a run of large WRITEs reached _write_lane_after"
    STARTED = "a lane took the socket"
    DECLINED = "no lane now (not the moment, the VBD paused, no thread): count again"
    FAILED = "no lane could be made (no descriptor left): never again here"
    STOP = "the connection aborts while a lane has the socket"
    RETURNED = "the lane gave the socket back"


_S, _E = LaneState, LaneEvent
LANE_TRANSITIONS: dict[tuple[LaneState, LaneEvent], LaneState] = {
    # (state, event)                   -> next state
    (_S.OFF, _E.NEGOTIATED): _S.COUNTING,
    (_S.COUNTING, _E.WANT_WRITE): _S.WANTED,
    (_S.COUNTING, _E.STARTED): _S.RUNNING,  # a read lane
    (_S.COUNTING, _E.DECLINED): _S.COUNTING,
    (_S.COUNTING, _E.FAILED): _S.OFF,
    (_S.WANTED, _E.STARTED): _S.RUNNING,  # a write lane
    (_S.WANTED, _E.DECLINED): _S.COUNTING,
    (_S.WANTED, _E.FAILED): _S.OFF,
    (_S.RUNNING, _E.STOP): _S.ABORTING,
    (_S.RUNNING, _E.RETURNED): _S.COUNTING,
    (_S.ABORTING, _E.STOP): _S.ABORTING,
    (_S.ABORTING, _E.RETURNED): _S.OFF,
}
"""Every move of the lane policy; any other (state, event) is a bug (RuntimeError)."""
del _S, _E

_COUNTING = LaneState.COUNTING
_WANTED = LaneState.WANTED


class LanePolicy(ConnectionBase):
    """The lane part of a connection (see the module docstring)."""

    def _init_lanes(self) -> None:
        self._lanes = LaneState.OFF
        self._lane = None
        self._lone = 0
        self._lane_after = LANE_AFTER
        self._big = 0
        self._write_lane_after = WRITE_LANE_AFTER

    def _lane_event(self, event: LaneEvent) -> LaneState:
        """Move along LANE_TRANSITIONS; return the state left. Raises RuntimeError for a
        move the table does not have, leaving the state as it was."""
        old = self._lanes
        new = LANE_TRANSITIONS.get((old, event))
        if new is None:
            raise RuntimeError(f"NBD connection: no lane transition {old.name} on {event.name}")
        self._lanes = new
        return old

    def _lane_due(self) -> bool:
        """A lane should be tried once the current flush is done."""
        return self._lanes is _WANTED or (self._lanes is _COUNTING
                                          and self._lone >= self._lane_after)

    def _count_big(self, length: int) -> None:
        """A large WRITE of ``length`` bytes while COUNTING: one more in a row, or (too
        large for a lane) the end of a run. Other requests end a run too (the connection
        sets ``_big`` to 0)."""
        if length > WRITE_LANE_MAX:
            self._big = 0
            return
        self._big += 1
        if self._big >= self._write_lane_after:
            if self.vbd.thread_io_possible(write=True):
                self._lane_event(LaneEvent.WANT_WRITE)  # reading stops until it starts
            else:  # not this image, or not now: ask again much later
                self._big = 0
                self._write_lane_after = LANE_AFTER_MAX

    def _maybe_start_lane(self) -> None:
        """Hand the socket to a lane (nbd_lane) if the client still sends lone READs, or
        large WRITEs were seen, and nothing of ours is in flight, waiting or unsent."""
        if self._lanes is _WANTED:
            self._maybe_start_write_lane()
            return
        transport = self.transport
        codec = self.codec
        if (self._lanes is not _COUNTING or self._lone < self._lane_after
                or transport is None or codec is None or self._carry
                or self._intake.ended or self._writing_paused
                or self._inflight or self._backlog or self._out or self._held
                or self._batching or self._pumping or transport.get_write_buffer_size()
                or transport.is_closing()):
            return
        io = self.vbd.thread_io()
        if io is None:  # not now (paused), or not this image
            self._no_lane(write=False)
            return
        buf = self.pool.get(LANE_READ_MAX)
        try:
            lane: Lane = ReadLane(self._loop, self._fd, io, buf, codec.read_reply_header,
                                  codec.header_check, self._lane_returned)
        except OSError as exc:  # out of descriptors: serve from the loop
            self._no_lane(False, [io], [buf], exc)
            return
        self._start(lane)

    def _maybe_start_write_lane(self) -> None:
        transport = self.transport
        codec = self.codec
        if (transport is None or codec is None
                or self._inflight or self._backlog or self._out
                or self._batching or self._pumping):
            return  # the flush after the last completion asks again
        if (self._intake.ended or self._writing_paused or self._held
                or transport.get_write_buffer_size() or transport.is_closing()
                or not codec.between_requests or self._carry
                or not self.vbd.thread_io_possible(write=True)):
            self._no_lane(write=True)  # not a moment for it (or paused meanwhile): read on
            return
        ios: list[ThreadIO] = []
        for _ in range(WRITE_LANE_THREADS):
            io = self.vbd.thread_io(write=True)
            assert io is not None  # thread_io_possible said so just above
            ios.append(io)
        bufs = [self.pool.get(WRITE_LANE_MAX) for _ in ios]
        try:
            lane: Lane = WriteLane(self._loop, self._fd, ios, bufs, codec.header_check,
                                   self._lane_returned)
        except OSError as exc:  # out of descriptors: the loop serves
            self._no_lane(True, ios, bufs, exc)
            return
        self._start(lane)

    def _start(self, lane: Lane) -> None:
        try:
            lane.start()  # the transport cannot read before this callback returns
        except RuntimeError:  # no thread now: serve from the loop, ask again much later
            self._no_lane(isinstance(lane, WriteLane), lane.ios, lane.bufs)
            return
        self._lane_event(LaneEvent.STARTED)
        self._lane = lane
        self._update_reading()  # the transport stops reading: the lane reads now

    def _no_lane(self, write: bool, ios: Sequence[ThreadIO] = (),
                 bufs: Sequence[memoryview] = (), exc: OSError | None = None) -> None:
        """A (write) lane does not run: give back what it was given and read on; ask again
        much later, or (``exc``, such as no descriptor left) never on this connection."""
        for io in ios:
            self.vbd.release_thread_io(io)
        for buf in bufs:
            self.pool.put(buf)
        if write:
            self._big = 0
            self._write_lane_after = LANE_AFTER_MAX
        else:
            self._lone = 0
            self._lane_after = LANE_AFTER_MAX
        if exc is not None:
            self._lane_event(LaneEvent.FAILED)
            self.log.warning("minor %d: NBD client %s: no lane: %s", self.vbd.minor,
                             self.peer, exc)
        else:
            self._lane_event(LaneEvent.DECLINED)
        self._update_reading()

    def _stop_lane(self) -> None:
        """The connection aborts: make the running lane return (_lane_returned aborts)."""
        assert self._lane is not None
        self._lane_event(LaneEvent.STOP)
        self._lane.stop()

    def _lane_returned(self, result: LaneResult) -> None:
        lane = self._lane
        assert lane is not None
        self._lane = None
        aborting = self._lane_event(LaneEvent.RETURNED) is LaneState.ABORTING
        lane.close()
        try:
            self._take_lane(lane, result, aborting)
        except Exception:
            self.log.exception("minor %d: NBD connection %s failed", self.vbd.minor, self.peer)
            self.abort()
        finally:
            # Only now: the requests handed back were in the lane's buffers.
            for buf in lane.bufs:
                self.pool.put(buf)

    def _take_lane(self, lane: Lane, result: LaneResult, aborting: bool) -> None:
        for io in lane.ios:
            self.vbd.release_thread_io(io)
        counts = lane.counts
        self._served(counts, True)
        served = counts.reads + counts.writes
        # A lane that served few requests cost threads for little: wait longer next time.
        if isinstance(lane, WriteLane):
            self._write_lane_after = (WRITE_LANE_AFTER if served >= LANE_SHORT
                                      else min(self._write_lane_after * 2, LANE_AFTER_MAX))
            self._big = 0
        else:
            self._lane_after = (LANE_AFTER if served >= LANE_SHORT
                                else min(self._lane_after * 2, LANE_AFTER_MAX))
            self._lone = 0
        if self.transport is None:  # lost meanwhile
            return
        if result.unsent:
            self._out.extend(result.unsent)
            self._flush()
        if result.error is not None:
            self.log.debug("minor %d: NBD client %s: %s", self.vbd.minor, self.peer,
                           result.error)
            aborting = True
        if aborting:
            self.abort()
            return
        if self._intake.ended:
            self._update_reading()
            self._maybe_close()
            return
        for header, payload in result.requests:
            self._feed(header)
            self._feed(payload)
        if result.received:
            self._feed(result.received)
        if result.eof:
            self.shutdown(None)
            return
        self._update_reading()

    def _feed(self, data: bytes | memoryview) -> None:
        """Take ``data`` as if the transport had just received it."""
        pos = 0
        while pos < len(data) and not self._intake.ended:
            view = self.get_buffer(-1)
            n = min(len(view), len(data) - pos)
            view[:n] = data[pos : pos + n]
            pos += n
            self.buffer_updated(n)
