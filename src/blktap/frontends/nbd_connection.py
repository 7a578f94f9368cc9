"""One NBD client of an export: the asyncio protocol that runs the codec over a
transport, dispatches requests to the VBD and queues the replies.

Each connection runs the sans-IO codec (:mod:`blktap.proto.nbd`) under an
``asyncio.BufferedProtocol``: the event loop receives into our buffers, so a large WRITE
payload lands directly in the page-aligned buffer the driver writes from. Requests are
parsed many per read and each is run with :func:`blktap.util.eager.start` (no Task per
request); replies go out of order, as soon as their request completes, in batches
(:mod:`.nbd_output`). What is read and when is flow control (:mod:`.nbd_flow`); READs and
small WRITEs may be served inline (:mod:`.nbd_inline`), and the socket may go to a lane
for a while (:mod:`.nbd_lane_policy`). The attributes of all these parts are declared in
:mod:`.nbd_base`.

A client that breaks the protocol is disconnected (after the requests it already sent
complete); every other client keeps going. A client that does not finish the handshake
within the server's ``handshake_timeout`` seconds is disconnected. NBD_CMD_DISC gets no
reply: the requests in flight finish, then the connection closes.

The connection needs no socket: tests/unit/test_nbd_connection.py drives one with bytes
in and bytes out over a transport in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from blktap.block.chain import StatusExtent
from blktap.errors import BlktapError, InvalidArgument, ProtocolError, errno_of
from blktap.frontends.nbd_flow import FlowControl, Intake
from blktap.frontends.nbd_inline import CARRY_MAX, InlineServing
from blktap.frontends.nbd_lane import WRITE_LANE_MIN
from blktap.frontends.nbd_lane_policy import LaneEvent, LanePolicy, LaneState
from blktap.frontends.nbd_listen import Listener
from blktap.frontends.nbd_output import FLUSH_BYTES, OutputBatching
from blktap.proto.nbd import (
    DIRTY_BITMAP_ID,
    MAX_STATUS_EXTENTS,
    REQUEST,
    Aborted,
    Command,
    CommandFlag,
    Event,
    ExportInfo,
    Negotiated,
    Request,
    ServerCodec,
    StartTls,
    State,
)
from blktap.util.eager import start as eager_start
from blktap.vbd import VBD, IOCounts

if TYPE_CHECKING:
    from blktap.frontends.nbd_server import NbdServer

STATUS_QUERY_MAX = 256 * 1024 * 1024
"""A BLOCK_STATUS request asks the VBD about at most this many bytes (the reply may cover
less than the request: the spec allows it, the client asks again)."""
WRITE_BUFFER_HIGH = 8 * 1024 * 1024
"""Replies buffered in the transport beyond this pause reading new requests."""
SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_SNDBUF of each connection (the kernel may cap it at net.core.wmem_max)."""
RECV_BUFFER = 256 * 1024
"""Size of each connection's receive buffer (requests are parsed from it in place)."""
DIRECT_PAYLOAD_MIN = CARRY_MAX
"""A WRITE payload with at least this much still to come is received straight into its
own buffer, without going through the receive buffer (as large as the largest request
inline serving keeps whole: a request is either kept or received directly)."""

_EMPTY = memoryview(b"")
# Plain ints: IntFlag arithmetic runs Python code on every request.
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_READ = Command.READ
_WRITE = Command.WRITE
_READ_LOW = int(Command.READ)  # the command as unpacked
_reply_ok = ServerCodec.reply_ok
_REQ_SIZE = REQUEST.size
_unpack_request = REQUEST.unpack_from
_TRANSMISSION = State.TRANSMISSION
_OPEN, _DRAINING, _CLOSED = Intake.OPEN, Intake.DRAINING, Intake.CLOSED
_COUNTING = LaneState.COUNTING


@dataclass(frozen=True, slots=True)
class Statistics:
    """Counters of one connection, or of a whole server (closed connections included)."""

    connections: int = 0
    requests: int = 0
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    protocol_errors: int = 0
    lane_reads: int = 0
    """Of ``reads``, those a lane served (blktap.frontends.nbd_lane)."""
    lane_writes: int = 0
    """Of ``writes``, those a lane served."""


class NbdConnection(FlowControl, OutputBatching, InlineServing, LanePolicy):
    """One client of ``server`` accepted by ``listener`` (default: a plain stream, whose
    raw descriptor may be used if the transport has a socket). All callbacks run in the
    event loop; none lets an exception escape.
    """

    def __init__(self, server: NbdServer, listener: Listener | None = None) -> None:
        self.server = server
        self.listener = listener if listener is not None else Listener()
        self.vbd = server.vbd
        self.pool = server.buffers
        self.log = server.log
        self.codec = None
        self.transport = None
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        self.peer = "?"
        self._timer = None
        self._fast_zero = False
        self._rbuf_bytes = bytearray(RECV_BUFFER)
        self._rbuf = memoryview(self._rbuf_bytes)
        self._into_payload = False
        self._header_next = False
        self._carry = 0
        self._inline_counts = IOCounts()  # what one _inline call served
        self._tls_early: bytearray | None = None  # set while start_tls runs (_start_tls)
        self._init_flow(server.max_inflight, server.max_inflight_bytes)
        self._init_output()
        self._init_lanes()
        # Counters (same order as Statistics' fields).
        self.requests = 0
        self.reads = 0
        self.writes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.protocol_errors = 0
        self.lane_reads = 0
        self.lane_writes = 0

    # --------------------------------------------------------------- statistics
    def counters(self) -> tuple[int, ...]:
        lane = self._lane
        c = lane.counts if lane is not None else IOCounts()  # a running lane's so far
        return (1, self.requests + c.reads + c.writes, self.reads + c.reads,
                self.writes + c.writes, self.bytes_read + c.read_bytes,
                self.bytes_written + c.written_bytes, self.errors, self.protocol_errors,
                self.lane_reads + c.reads, self.lane_writes + c.writes)

    def _served(self, counts: IOCounts, lane: bool) -> None:
        """Count requests served past _dispatch (inline, or by a lane), once per batch."""
        self.requests += counts.reads + counts.writes
        self.reads += counts.reads
        self.bytes_read += counts.read_bytes
        self.writes += counts.writes
        self.bytes_written += counts.written_bytes
        if lane:
            self.lane_reads += counts.reads
            self.lane_writes += counts.writes

    def statistics(self) -> Statistics:
        return Statistics(*self.counters())

    # ----------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        server._serial += 1
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix#{server._serial}"
        if server._stopping:
            transport.abort()
            return
        server._conns.add(self)
        vbd = self.vbd
        caps = vbd.capabilities  # what the stack can do, as of its last open or resume
        export = ExportInfo(size=vbd.size, read_only=vbd.read_only or not caps.writable,
                            description=f"blktap VBD minor {vbd.minor}", flush=caps.flush,
                            trim=caps.trim, zero=caps.zero, multi_conn=caps.multi_conn,
                            block_status=caps.block_status,
                            dirty_bitmap=vbd.dirty_bitmap_name or "")
        # WRITE payloads are lent from the receive buffer: a write done synchronously
        # needs no copy; any other is copied out (_own) before the buffer is reused.
        self.codec = ServerCodec(export, self._get_buf, borrow_payloads=True,
                                 tls_required=self.listener.tls_context is not None)
        # Room for a few large READ replies before the transport asks us to pause.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Fewer wakeups and writes per large READ reply.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        fd = self.listener.raw_fd(transport)  # None under TLS: no writev, no lanes
        self._fd = -1 if fd is None else fd
        greeting = self.codec.greeting()
        transport.write(greeting)
        self._queued = len(greeting)
        self._timer = self._loop.call_later(server.handshake_timeout, self._handshake_expired)
        self.log.debug("minor %d: NBD client %s connected", vbd.minor, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(_CLOSED)
        self.transport = None  # nothing is sent any more
        if self._lane is not None:
            self._lane.stop()  # it returns its buffer to the pool when it is done
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._backlog.clear()
        self._release_output()
        self.server._forget(self)
        if not self.closed.done():
            self.closed.set_result(None)
        self.log.debug("minor %d: NBD client %s gone (%d requests)", self.vbd.minor,
                       self.peer, self.requests)

    def eof_received(self) -> bool | None:
        # The client half-closed: finish what it sent, then close.
        self.shutdown(None)
        return True

    def get_buffer(self, sizehint: int) -> memoryview:
        codec = self.codec
        if codec is not None:
            rest = codec.payload_buffer()
            # In a run of large WRITEs even a small rest: the read ends with the payload.
            if rest is not None and (len(rest) >= DIRECT_PAYLOAD_MIN or self._big > 0):
                self._into_payload = True
                return rest
            if self._header_next:
                # After a large WRITE, its successor's header alone: a large payload then
                # goes straight to its buffer (no copy out of the receive buffer) and
                # ends where a read ends, where a write lane may take the stream over.
                self._header_next = False
                self._into_payload = False
                return self._rbuf[:_REQ_SIZE]
        self._into_payload = False
        # After the start of a request kept from the last read (see _inline).
        return self._rbuf[self._carry:] if self._carry else self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        codec = self.codec
        if codec is None or self._intake.ended:
            return
        data = None
        pos = end = 0
        try:
            if self._into_payload:
                events = codec.payload_received(nbytes)
                if not events:
                    return  # more of a WRITE payload, not all of it: nothing to do yet
                self._header_next = True
            else:
                end = self._carry + nbytes
                self._carry = 0
                if codec.state is _TRANSMISSION:
                    # The rest of a request begun in an earlier read, if any; what
                    # follows is read below, request by request (_receive).
                    data = self._rbuf[:end]
                    events, pos = codec.feed_partial(data)
                else:
                    if self._tls_early is not None:
                        # Decrypted before start_tls returned: held until TLS is up.
                        self._tls_early += self._rbuf[:end]
                        return
                    events = codec.feed(self._rbuf[:end])  # negotiation
                if self._big > 0 and events:
                    # A run of large WRITEs reads each header alone and its payload
                    # straight into its buffer: requests here end the run.
                    self._big = 0
        except ProtocolError as exc:
            self._broke_protocol(exc)
            return
        try:
            self._batching = True
            try:
                if codec.output:
                    self._take_codec_output()
                backlog = self._backlog
                if self._lanes is _COUNTING:
                    # A lone READ: one header alone in what arrived, nothing else in
                    # flight or waiting.
                    if (pos == 0 and end == _REQ_SIZE and data is not None
                            and not self._inflight and not backlog
                            and lone_read(codec, data)):
                        self._lone += 1
                    else:
                        self._lone = 0
                # Requests that complete at once must not pump the backlog from inside
                # this loop (it would reorder and recurse): see _pump.
                self._pumping = True
                try:
                    if events:
                        self._serve(events)
                    if data is not None and pos < end:
                        self._receive(codec, data, pos, end)
                finally:
                    self._pumping = False
                if backlog:
                    self._pump()
            finally:
                self._batching = False
            if self._out or self._held:
                self._flush()
            intake = self._intake
            if intake is _DRAINING:
                if self._maybe_close():
                    return
            elif intake is _OPEN and not self._must_wait() and not self._lanes.holds_socket:
                return  # still reading, nothing to stop it: _update_reading would do nothing
            self._update_reading()
        except Exception:
            self.log.exception("minor %d: NBD connection %s failed", self.vbd.minor, self.peer)
            self.abort()

    def _broke_protocol(self, exc: ProtocolError) -> None:
        self.protocol_errors += 1
        self.log.warning("minor %d: NBD client %s broke the protocol: %s",
                         self.vbd.minor, self.peer, exc)
        self._take_codec_output()
        self.shutdown(None)

    def _receive(self, codec: ServerCodec, data: memoryview, pos: int, end: int) -> None:
        """Serve the requests in ``data[pos:end]`` (the codec is between requests at
        ``pos``): those _inline takes, inline; each other one parsed by the codec alone
        and dispatched, then inline again. Without a SyncFile, or once requests wait in
        the backlog (their payloads may be lent from the receive buffer, which _inline
        would move), the codec parses all the rest. Stops early when the connection
        drains."""
        while pos < end:
            # The VBD's admission rule and routes, once per batch (valid until we yield).
            adm = None if self._backlog or self._writing_paused else self.vbd.admission
            try:
                if adm is not None and adm.sync is not None:
                    pos = self._inline(codec, adm, adm.sync, data, pos, end)
                    if pos >= end:
                        return
                    events, pos = codec.feed_request(data, pos)
                else:  # (nothing inline: the codec parses all that is here at once)
                    events, pos = codec.feed(data[pos:end]), end
            except ProtocolError as exc:
                self._broke_protocol(exc)
                return
            if codec.output:  # replies of requests the codec refused itself
                self._take_codec_output()
            if events:
                if self._big > 0:
                    self._big = 0  # requests here end a run of large WRITEs
                self._serve(events)
            if self._intake.ended or codec.state is not _TRANSMISSION:
                return  # (DISC or ABORT: nothing that follows counts)

    def _serve(self, events: list[Event]) -> None:
        """Dispatch parsed events, in order; requests wait in the backlog while they must."""
        backlog = self._backlog
        for ev in events:
            if type(ev) is Request:
                # FlowControl._must_wait, inline: a call per request costs ~1.5 % on the
                # O_DIRECT path (tests/unit/test_fast_route_rules.py pins the copy).
                if (backlog or self._writing_paused or self._inflight >= self._max_inflight
                        or self._inflight_bytes >= self._max_bytes):
                    # A payload lent from the receive buffer stays valid here: reading
                    # stops until the backlog is empty.
                    backlog.append(ev)
                else:
                    self._dispatch(ev)
                    if self._out_bytes >= FLUSH_BYTES:
                        self._flush()
            elif type(ev) is Negotiated:
                self._negotiated(ev)
            elif type(ev) is Aborted:
                self.shutdown(None)
            elif type(ev) is StartTls:
                # After this batch has sent the ACK (_flush): the handshake follows it.
                self._loop.create_task(self._start_tls())

    # --------------------------------------------------------------- handshake
    def _negotiated(self, ev: Negotiated) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fast_zero = self.vbd.capabilities.fast_zero
        if self._fd >= 0:  # lanes work on the raw descriptor
            self._lane_event(LaneEvent.NEGOTIATED)
        self.log.debug("minor %d: NBD client %s: export %r, structured=%s, flags=%#x",
                       self.vbd.minor, self.peer, ev.export_name, ev.structured,
                       ev.transmission_flags)

    async def _start_tls(self) -> None:
        """NBD_OPT_STARTTLS: upgrade the transport (the handshake timer still runs), then
        let the codec haggle again. A failed handshake drops the client. The listener
        gave no raw descriptor (``_fd`` is -1): nothing writes around the TLS layer."""
        transport, codec, ctx = self.transport, self.codec, self.listener.tls_context
        assert transport is not None and codec is not None and ctx is not None
        assert self._fd < 0
        if self._out or self._held:
            self._flush()
        # The TLS layer may pass on what follows the handshake before start_tls returns
        # (asyncio's does): buffer_updated keeps it here until the codec knows TLS is up.
        self._tls_early = bytearray()
        try:
            tls = await self._loop.start_tls(
                transport, self, ctx, server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout)
        except Exception as exc:  # SSLError, a timeout, a reset: this client only
            self._tls_early = None
            self.protocol_errors += 1
            self.log.warning("minor %d: NBD client %s: TLS handshake failed: %s",
                             self.vbd.minor, self.peer, exc)
            transport.abort()
            # The TLS layer tells the application of a loss only after a handshake, so
            # this connection ends here (else the server's stop would wait for it).
            if not self.closed.done():
                self.connection_lost(exc)
            return
        early, self._tls_early = self._tls_early, None
        if tls is None or self.transport is None:  # gone during the handshake
            return
        self.transport = tls
        tls.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        codec.tls_started()
        if early:
            if len(early) > len(self._rbuf):  # a client does not haggle that much at once
                self._broke_protocol(ProtocolError("too much data right after STARTTLS"))
                return
            self._rbuf[:len(early)] = early
            self.buffer_updated(len(early))
        self.log.debug("minor %d: NBD client %s: TLS %s", self.vbd.minor, self.peer,
                       tls.get_extra_info("ssl_object").version())

    def _handshake_expired(self) -> None:
        self._timer = None
        self.protocol_errors += 1
        self.log.warning("minor %d: NBD client %s did not finish the handshake in %gs",
                         self.vbd.minor, self.peer, self.server.handshake_timeout)
        self.abort()

    # ---------------------------------------------------------------- requests
    def _dispatch(self, req: Request) -> None:
        """Start serving ``req`` (never raises for a request's failure)."""
        self.requests += 1
        command = req.command
        vbd = self.vbd
        if command is _READ:
            length = req.length
            codec = self.codec
            assert codec is not None
            if not length:
                self.reads += 1
                self._out.append(codec.read_reply_header(req.cookie, req.offset, 0))
                self._replied()
                return
            buf = self._get_buf(length)
            self._inflight += 1
            self._inflight_bytes += length
            try:
                done = vbd.read_now(req.offset, buf)
            except Exception as exc:
                self._finish_read(req, buf, exc)
                return
            if done:
                # The caller (a batch or _pump) sends the reply: no _replied needed.
                self._inflight -= 1
                self._inflight_bytes -= length
                self._queue_read_reply(codec, req, buf)
            else:
                eager_start(vbd.read(req.offset, buf),
                            lambda _r, exc: self._finish_read(req, buf, exc))
        elif command is _WRITE:
            data = req.data
            assert data is not None
            self._inflight += 1
            self._inflight_bytes += req.length
            if req.length:
                fua = bool(req.flags & _FUA)
                try:
                    done = vbd.write_now(req.offset, data, fua)
                except Exception as exc:
                    self._finish_write(req, data, exc)
                    return
                if done:
                    # _finish_write's success path, inline (as for READ above).
                    self._inflight -= 1
                    self._inflight_bytes -= req.length
                    if data.obj is not self._rbuf_bytes:
                        self._put_buf(data)
                    self.writes += 1
                    self.bytes_written += req.length
                    self._out.append(_reply_ok(req.cookie))
                    return
                if req.length >= WRITE_LANE_MIN:
                    if self._lanes is _COUNTING:
                        self._count_big(req.length)
                elif self._big > 0:
                    self._big = 0  # a small WRITE ends a run of large ones
                if data.obj is self._rbuf_bytes:
                    data = self._own(data)  # the write waits: the receive buffer moves on
                coro: Coroutine[Any, Any, Any] = vbd.write(req.offset, data, fua)
            else:
                coro = _check_writable(vbd)
            eager_start(coro, lambda _r, exc: self._finish_write(req, data, exc))
        elif command is Command.DISC:
            self.log.debug("minor %d: NBD client %s disconnects", vbd.minor, self.peer)
            self.shutdown(None)
        else:
            self._inflight += 1
            if self._big > 0:
                self._big = 0  # the end of a run of large WRITEs
            if command is Command.BLOCK_STATUS:
                if not req.length:
                    bad = InvalidArgument("block status of an empty range")
                    eager_start(_fail(bad), lambda _r, exc: self._finish_simple(req, exc))
                    return
                query = min(req.length, STATUS_QUERY_MAX)
                codec = self.codec
                assert codec is not None
                if codec.dirty_bitmap:
                    eager_start(_status_chunks(vbd, codec, req, query),
                                lambda reply, exc: self._finish_chunks(req, reply, exc))
                    return
                eager_start(vbd.block_status(req.offset, query),
                            lambda result, exc: self._finish_status(req, result, exc))
                return
            fua = bool(req.flags & _FUA)
            if command is Command.FLUSH:
                coro = vbd.flush()
            elif command is Command.TRIM:
                coro = _trim(vbd, req.offset, req.length, fua)
            elif command is Command.WRITE_ZEROES:
                if req.flags & _FAST_ZERO and not self._fast_zero:
                    # The spec: fail fast with ENOTSUP when zeroing would not be fast.
                    coro = _fail(BlktapError("zeroing is not fast here", errno=errno.ENOTSUP))
                else:
                    coro = vbd.write_zeroes(req.offset, req.length,
                                            may_unmap=not req.flags & _NO_HOLE,
                                            fua=fua)
            else:
                assert command is Command.CACHE, command
                coro = vbd.cache(req.offset, req.length)
            eager_start(coro, lambda _r, exc: self._finish_simple(req, exc))

    def _finish_read(self, req: Request, buf: memoryview, exc: BaseException | None) -> None:
        try:
            length = req.length
            self._inflight -= 1
            self._inflight_bytes -= length
            codec = self.codec
            if self._intake is _CLOSED or codec is None:
                self.pool.put(buf)
                return
            if exc is None:
                self._queue_read_reply(codec, req, buf)
            else:
                self.reads += 1
                self._out.append(self._error_reply(req, exc, read=True))
                self._put_buf(buf)
            self._replied()
        except Exception:
            self._callback_failed()

    def _queue_read_reply(self, codec: ServerCodec, req: Request, buf: memoryview) -> None:
        """Queue a successful READ's reply: its header, then ``buf`` itself (no copy)."""
        length = req.length
        self.reads += 1
        self.bytes_read += length
        out = self._out
        out.append(codec.read_reply_header(req.cookie, req.offset, length))
        out.append(buf)
        self._out_bytes += length
        self._sending.append(buf)

    def _finish_write(self, req: Request, data: memoryview, exc: BaseException | None) -> None:
        try:
            self._inflight -= 1
            self._inflight_bytes -= req.length
            codec = self.codec
            lost = self._intake is _CLOSED
            if len(data) and data.obj is not self._rbuf_bytes:  # else lent, not ours
                if lost:
                    self.pool.put(data)
                else:
                    self._put_buf(data)
            if lost or codec is None:
                return
            self.writes += 1
            if exc is None:
                self.bytes_written += req.length
                self._out.append(codec.reply_ok(req.cookie))
            else:
                self._out.append(self._error_reply(req, exc))
            self._replied()
        except Exception:
            self._callback_failed()

    def _finish_simple(self, req: Request, exc: BaseException | None) -> None:
        try:
            self._inflight -= 1
            codec = self.codec
            if self._intake is _CLOSED or codec is None:
                return
            if exc is None:
                self._out.append(codec.reply_ok(req.cookie))
            else:
                self._out.append(self._error_reply(req, exc))
            self._replied()
        except Exception:
            self._callback_failed()

    def _finish_status(self, req: Request, result: list[StatusExtent] | None,
                       exc: BaseException | None) -> None:
        try:
            self._inflight -= 1
            codec = self.codec
            if self._intake is _CLOSED or codec is None:
                return
            if exc is None and result:
                pairs = [(e.length, e.flags) for e in result]
                req_one = bool(req.flags & _REQ_ONE)
                self._out.append(codec.reply_block_status(req.cookie, req.length, pairs,
                                                          req_one))
            else:
                if exc is None:
                    exc = BlktapError("no block status for the range", errno=errno.EIO)
                self._out.append(self._error_reply(req, exc))
            self._replied()
        except Exception:
            self._callback_failed()

    def _finish_chunks(self, req: Request, reply: bytes | None,
                       exc: BaseException | None) -> None:
        try:
            self._inflight -= 1
            codec = self.codec
            if self._intake is _CLOSED or codec is None:
                return
            if exc is None and reply:
                self._out.append(reply)
            else:
                if exc is None:
                    exc = BlktapError("no block status for the range", errno=errno.EIO)
                self._out.append(self._error_reply(req, exc))
            self._replied()
        except Exception:
            self._callback_failed()

    def _error_reply(self, req: Request, exc: BaseException, read: bool = False) -> bytes:
        self.errors += 1
        err = errno_of(exc)
        if isinstance(exc, (BlktapError, OSError)):
            self.log.debug("minor %d: NBD %s %d+%d failed: %s", self.vbd.minor,
                           req.command.name, req.offset, req.length, exc)
        else:
            # Not an error a request can cause: a bug below. Keep serving.
            self.log.error("minor %d: NBD %s %d+%d raised %r", self.vbd.minor,
                           req.command.name, req.offset, req.length, exc, exc_info=exc)
        assert self.codec is not None
        return self.codec.reply_error(req.cookie, err, str(exc), read=read)

    def _callback_failed(self) -> None:
        self.log.exception("minor %d: NBD reply to %s failed", self.vbd.minor, self.peer)
        self.abort()

    # ---------------------------------------------------------------- closing
    def shutdown(self, reason: str | None) -> None:
        """Stop reading; close once the requests in flight are answered."""
        if self._intake is _CLOSED:
            return
        if reason and self._intake is not _DRAINING:
            self.log.debug("minor %d: closing NBD client %s: %s", self.vbd.minor,
                           self.peer, reason)
        self._enter(_DRAINING)
        if self._lane is not None:
            self._lane.stop()  # _lane_returned closes
            return
        self._maybe_close()

    def _maybe_close(self) -> bool:
        """Close when draining and every request is answered; True if it did."""
        if (self._intake is _DRAINING and not self._inflight and not self._backlog
                and self._lane is None):
            self._flush()
            if self.transport is not None:
                self.transport.close()  # sends what is buffered first
            return True
        return False

    def abort(self) -> None:
        """Drop the connection now, without sending what is buffered."""
        if self._lane is not None:
            self._stop_lane()  # _lane_returned aborts
            return
        if self.transport is not None:
            self.transport.abort()


def lone_read(codec: ServerCodec, data: memoryview) -> bool:
    """Whether the one request header in ``data`` is a READ the codec accepts as is."""
    magic, flags, command, _cookie, _offset, length = _unpack_request(data)
    return command == _READ_LOW and codec.header_check.accepts(magic, flags, command, length)


async def _trim(vbd: VBD, offset: int, length: int, fua: bool) -> None:
    await vbd.trim(offset, length)
    if fua:
        await vbd.flush()


async def _status_chunks(vbd: VBD, codec: ServerCodec, req: Request, query: int) -> bytes:
    """The BLOCK_STATUS reply when a ``qemu:dirty-bitmap:`` context was selected: a
    base:allocation chunk (if selected too), then the bitmap's chunk (DONE). The bitmap
    is the VBD's log as open now (it follows ``tap-ctl unpause -c`` to a new log of the
    same name; another name or no log fails the request with ENOENT, sent as EIO)."""
    req_one = bool(req.flags & _REQ_ONE)
    reply = b""
    if codec.base_allocation:
        extents = await vbd.block_status(req.offset, query)
        if not extents:
            raise BlktapError("no block status for the range", errno=errno.EIO)
        reply = codec.reply_block_status(req.cookie, req.length,
                                         [(e.length, e.flags) for e in extents], req_one,
                                         done=False)
    runs = await vbd.dirty_status(codec.dirty_bitmap, req.offset, query,
                                  1 if req_one else MAX_STATUS_EXTENTS)
    return reply + codec.reply_block_status(req.cookie, req.length, runs, req_one,
                                            DIRTY_BITMAP_ID)


async def _check_writable(vbd: VBD) -> None:
    if vbd.read_only:
        await vbd.write(0, _EMPTY)  # raises ReadOnly (EPERM)


async def _fail(exc: BaseException) -> None:
    raise exc
