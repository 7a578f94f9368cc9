"""Flow control of one NBD connection: when it reads new requests, and when parsed
requests wait.

Two limits bound what one client can make the server hold: at most ``max_inflight``
requests and ``max_inflight_bytes`` of READ/WRITE payload in flight, and replies no more
than the transport's write buffer takes (a client that does not read its replies cannot
make the server buffer without bound). Past either, parsed requests wait in the backlog,
in order, and the transport stops reading; completions dispatch them again (``_pump``).

**The backpressure rule** is :meth:`FlowControl._must_wait` (a new request waits when
the backlog is not empty or :meth:`FlowControl._full`); ``_pump`` dispatches while
``_full`` is false; ``NbdConnection._serve`` copies ``_must_wait`` inline (a call per
request costs ~1.5 % on the O_DIRECT path; tests/unit/test_fast_route_rules.py pins it).

**Whether the transport reads** is the state :class:`Intake`, set by one rule
(:meth:`FlowControl._update_reading`) along the transitions of ``INTAKE_TRANSITIONS``;
the transport is paused or resumed exactly when the state's ``reads`` changes.
"""

from __future__ import annotations

import enum
from collections import deque

from blktap.frontends.nbd_base import ConnectionBase
from blktap.frontends.nbd_output import FLUSH_BYTES
from blktap.util.eager import defer as eager_defer


class Intake(enum.Enum):
    """Whether a connection reads new requests from its transport, and why not."""

    OPEN = ("open", True, False)
    """Reading requests (the handshake included)."""
    WAITING = ("waiting", False, False)
    """Requests wait: the backlog is not empty, the in-flight limits are reached, or the
    transport's write buffer is full."""
    HANDED_OVER = ("handed over", False, False)
    """A lane has the socket, or takes it once the requests in flight are answered
    (LaneState RUNNING, ABORTING or WANTED)."""
    DRAINING = ("draining", False, True)
    """No more requests (NBD_CMD_DISC, a protocol error, end of file, the server
    stopping): close once those in flight are answered."""
    CLOSED = ("closed", False, True)
    """The transport is gone."""

    def __init__(self, label: str, reads: bool, ended: bool) -> None:
        self.reads = reads
        """The transport reads in this state."""
        self.ended = ended
        """No request is read any more (DRAINING and CLOSED are final)."""


_OPEN, _WAITING, _HANDED_OVER = Intake.OPEN, Intake.WAITING, Intake.HANDED_OVER
_DRAINING, _CLOSED = Intake.DRAINING, Intake.CLOSED

INTAKE_TRANSITIONS: dict[Intake, frozenset[Intake]] = {
    # from           to
    Intake.OPEN: frozenset({_WAITING, _HANDED_OVER, _DRAINING, _CLOSED}),
    Intake.WAITING: frozenset({_OPEN, _HANDED_OVER, _DRAINING, _CLOSED}),
    Intake.HANDED_OVER: frozenset({_OPEN, _WAITING, _DRAINING, _CLOSED}),
    Intake.DRAINING: frozenset({_CLOSED}),
    Intake.CLOSED: frozenset(),
}
"""The moves between intake states. OPEN, WAITING and HANDED_OVER follow the rule of
``_update_reading`` (lane, else backpressure, else open); DRAINING is entered by
``shutdown``, CLOSED by ``connection_lost``; neither is ever left but for CLOSED."""


class FlowControl(ConnectionBase):
    """The flow control part of a connection (see the module docstring)."""

    def _init_flow(self, max_inflight: int, max_inflight_bytes: int) -> None:
        self._intake = _OPEN
        self._inflight = 0
        self._inflight_bytes = 0
        self._backlog = deque()
        self._writing_paused = False
        self._max_inflight = max_inflight
        self._max_bytes = max_inflight_bytes
        self._batching = False
        self._pumping = False

    # ----------------------------------------------------------- the rule
    def _full(self) -> bool:
        """No room for another request: the transport's write buffer is full, or the
        in-flight limits are reached."""
        return (self._writing_paused or self._inflight >= self._max_inflight
                or self._inflight_bytes >= self._max_bytes)

    def _must_wait(self) -> bool:
        """Whether a new request must wait in the backlog (behind those already there)."""
        return bool(self._backlog) or self._full()

    # ----------------------------------------------------------- the state
    def _enter(self, new: Intake) -> None:
        """Move to ``new`` along INTAKE_TRANSITIONS; pause or resume the transport's
        reading when the state's ``reads`` changes. Raises RuntimeError for a move the
        table does not have (a bug), leaving the state as it was."""
        old = self._intake
        if new is old:
            return
        if new not in INTAKE_TRANSITIONS[old]:
            raise RuntimeError(f"NBD connection: no intake transition {old.name} -> {new.name}")
        self._intake = new
        transport = self.transport
        if transport is not None and new is not _CLOSED and old.reads is not new.reads:
            if new.reads:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _update_reading(self) -> None:
        """Set the intake by the rule: a lane has (or is about to take) the socket, else
        requests must wait, else read. DRAINING and CLOSED stay."""
        if self.transport is None or self._intake.ended:
            return
        if self._lanes.holds_socket:
            self._enter(_HANDED_OVER)
        elif self._must_wait():
            self._enter(_WAITING)
        else:
            self._enter(_OPEN)

    # -------------------------------------------------------- the backlog
    def _pump(self) -> None:
        """Dispatch waiting requests while there is room (never re-entered).

        Replies of requests that complete at once pile up in ``_out``; past FLUSH_BYTES
        they are handed to the transport, and once its buffer is full (pause_writing)
        the remaining requests wait for resume_writing.
        """
        if self._pumping:
            return  # a request dispatched by the loop below completed at once
        backlog = self._backlog
        self._pumping = True
        try:
            while backlog and not self._full():
                self._dispatch(backlog.popleft())
                if self._out_bytes >= FLUSH_BYTES:
                    self._flush()
        finally:
            self._pumping = False

    def _replied(self) -> None:
        """After a request completed: dispatch waiting requests, flush, maybe close."""
        backlog = self._backlog
        if backlog and not self._pumping:
            self._pump()
        if not self._batching and not self._pumping:
            if self._intake is _DRAINING and self._maybe_close():
                return
            if not self._flush_scheduled:
                # With the other replies of this burst of completions, or next loop turn.
                self._flush_scheduled = True
                eager_defer(self._loop, self._flush)
            if not self._intake.reads:  # a completion can only end a reason to wait
                self._update_reading()

    # ------------------------------------------------- transport callbacks
    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._flush()  # releases the READ buffers that have been sent
        if self._backlog and self._intake is not _CLOSED:
            self._batching = True
            try:
                self._pump()
            finally:
                self._batching = False
            self._flush()
            self._maybe_close()
        self._update_reading()
