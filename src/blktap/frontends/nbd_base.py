"""What the parts of one NBD connection share: every attribute, by the part that owns it,
and the methods one part calls on another.

An NBD connection (:class:`blktap.frontends.nbd_connection.NbdConnection`) is one object
put together from parts, one module each, so that each concern reads on its own:

========================  ================================================================
``nbd_connection``        the asyncio callbacks, the codec, dispatch and replies, closing
``nbd_flow``              flow control: whether the transport reads (:class:`Intake`),
                          the backlog, the in-flight limits (the backpressure rule)
``nbd_output``            output batching: replies leave in one ``writev`` per batch; the
                          connection's buffers
``nbd_inline``            inline serving: READs and small WRITEs on the lent descriptor
``nbd_lane_policy``       when the socket goes to a lane (:class:`LaneState`), and back
========================  ================================================================

The parts are mixins of one class, not objects of their own: the request path reads and
writes these attributes many times per request, and an attribute of ``self`` is the
cheapest place for them (docs/performance.md counts the instructions). A part writes only
the attributes listed under its name below (and sets them up in its ``_init_*``); it may
read the others. The lane threads themselves are in :mod:`blktap.frontends.nbd_lane`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from blktap.proto.nbd import Request, ServerCodec
from blktap.util.buffers import BufferPool
from blktap.vbd import VBD, IOCounts

if TYPE_CHECKING:
    import logging

    from blktap.frontends.nbd_flow import Intake
    from blktap.frontends.nbd_lane import Lane
    from blktap.frontends.nbd_lane_policy import LaneState
    from blktap.frontends.nbd_listen import Listener
    from blktap.frontends.nbd_server import NbdServer


class ConnectionBase(asyncio.BufferedProtocol):
    """The attributes of one connection, declared once (see the module docstring)."""

    # ---- nbd_connection: the connection itself
    server: NbdServer
    listener: Listener
    vbd: VBD
    pool: BufferPool
    log: logging.LoggerAdapter[logging.Logger]
    codec: ServerCodec | None
    """None until connection_made."""
    transport: asyncio.Transport | None
    closed: asyncio.Future[None]
    """Done once the connection is lost."""
    peer: str
    _loop: asyncio.AbstractEventLoop
    _timer: asyncio.TimerHandle | None
    """The handshake's deadline, until the client negotiated."""
    _fast_zero: bool
    _rbuf_bytes: bytearray
    """The receive buffer: requests are parsed from it in place."""
    _rbuf: memoryview
    _into_payload: bool
    """The last get_buffer returned a WRITE payload's own buffer."""
    _header_next: bool
    """The next get_buffer returns room for one request header alone (see get_buffer)."""
    _inline_counts: IOCounts
    # Counters (in the order of Statistics' fields, after ``connections``).
    requests: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    errors: int
    protocol_errors: int
    lane_reads: int
    lane_writes: int

    # ---- nbd_flow: flow control
    _intake: Intake
    _inflight: int
    """Requests dispatched and not answered."""
    _inflight_bytes: int
    """Their READ/WRITE payload bytes."""
    _backlog: deque[Request]
    """Requests parsed that wait for room (the backpressure rule: FlowControl._must_wait)."""
    _writing_paused: bool
    """The transport's write buffer is full (between pause_writing and resume_writing)."""
    _max_inflight: int
    _max_bytes: int
    _batching: bool
    """A batch is being served: replies wait for its end to leave together."""
    _pumping: bool
    """Requests are being dispatched (a batch or the backlog): a completion must not
    dispatch the backlog from inside (it would reorder and recurse)."""

    # ---- nbd_output: output batching and buffers
    _out: list[bytes | memoryview]
    """Replies of this batch, not yet handed over."""
    _out_bytes: int
    """READ data in ``_out``."""
    _sending: list[memoryview]
    """READ buffers in ``_out``."""
    _held: deque[tuple[int, list[memoryview]]]
    """READ buffers handed over: (stream position of their batch's end, buffers). The
    transport may read them until that many bytes of the stream have left."""
    _queued: int
    """Bytes handed to the transport (or written) so far."""
    _fd: int
    """The socket's raw descriptor (-1: none, as under TLS): the listener says."""
    _free: dict[int, list[memoryview]]
    """Idle buffers kept by exact length."""
    _free_bytes: int
    _flush_scheduled: bool

    # ---- nbd_inline: inline serving
    _carry: int
    """Bytes of a request kept at the start of the receive buffer for the next read."""

    # ---- nbd_lane_policy: lanes
    _lanes: LaneState
    _lane: Lane | None
    """The running lane (LaneState RUNNING or ABORTING)."""
    _lone: int
    """Lone READs in a row so far."""
    _lane_after: int
    """... how many start a read lane."""
    _big: int
    """Large WRITEs in a row so far."""
    _write_lane_after: int
    """... how many start a write lane."""

    # ---- methods one part calls on another (defined by the part named)
    def get_buffer(self, sizehint: int) -> memoryview:  # nbd_connection
        raise NotImplementedError

    def _flush(self) -> None:  # nbd_output
        raise NotImplementedError

    def _take_codec_output(self) -> None:  # nbd_output
        raise NotImplementedError

    def _get_buf(self, length: int) -> memoryview:  # nbd_output
        raise NotImplementedError

    def _put_buf(self, buf: memoryview) -> None:  # nbd_output
        raise NotImplementedError

    def _update_reading(self) -> None:  # nbd_flow
        raise NotImplementedError

    def _must_wait(self) -> bool:  # nbd_flow
        raise NotImplementedError

    def _pump(self) -> None:  # nbd_flow
        raise NotImplementedError

    def _lane_due(self) -> bool:  # nbd_lane_policy
        raise NotImplementedError

    def _maybe_start_lane(self) -> None:  # nbd_lane_policy
        raise NotImplementedError

    def _dispatch(self, req: Request) -> None:  # nbd_connection
        raise NotImplementedError

    def _served(self, counts: IOCounts, lane: bool) -> None:  # nbd_connection
        raise NotImplementedError

    def _maybe_close(self) -> bool:  # nbd_connection
        raise NotImplementedError

    def shutdown(self, reason: str | None) -> None:  # nbd_connection
        raise NotImplementedError

    def abort(self) -> None:  # nbd_connection
        raise NotImplementedError
