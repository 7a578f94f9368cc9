"""The NBD export of one VBD: an asyncio server on a Unix socket (optionally TCP).

Each connection runs the sans-IO codec (:mod:`blktap.proto.nbd`) under an
``asyncio.BufferedProtocol``. Requests are parsed many per read and each is run with
:func:`blktap.util.eager.start` (no Task per request); replies go out of order, as soon as
their request completes, and the replies completed during one read (or one
loop turn, or one burst of AIO completions: :class:`blktap.util.eager.Batch`) leave in
one ``writev``: the connection's own while the transport holds nothing, else the
transport's ``writelines``. READ data is never copied: the reply is ``[header, buffer]``
with the buffer the VBD read into. While the VBD lends its image's descriptor (a raw
file opened buffered: :meth:`VBD.sync_file`), READs and small WRITEs are served inline,
one ``preadv``/``pwritev`` each, without a call per request through the layers.

A client that sends one READ at a time (queue depth 1) gets its socket handed to a read
lane, a thread of its own that serves such READs with a few system calls and hands
everything else back; one that streams large WRITEs to a buffered image, to a write lane,
two threads that take turns to receive them and write them (:mod:`blktap.frontends.nbd_lane`).

Buffers come from a :class:`BufferPool` (page-aligned, as O_DIRECT needs). A READ buffer
goes back to the pool only once the transport's write buffer is empty, since the event
loop may still hold a reference to it until then.

Flow control per connection: at most ``max_inflight`` requests and ``max_inflight_bytes``
of READ/WRITE payload are in flight; past that, parsed requests wait in a backlog and the
transport stops reading. Reading also stops while the transport's write buffer is full
(a client that does not read its replies cannot make the server buffer without bound).

A client that breaks the protocol is disconnected (after the requests it already sent
complete); every other client keeps going. A client that does not finish the handshake
within ``handshake_timeout`` seconds is disconnected. NBD_CMD_DISC gets no reply: the
requests in flight finish, then the connection closes.

Run standalone (for benchmarks, before the daemon)::

    python -m blktap.frontends.nbd_server --socket PATH --image TYPE:PATH [--no-direct]
        [--read-only] [--tcp HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

from blktap.block.chain import StatusExtent
from blktap.block.driver import SECTOR_SIZE, SYNC_WRITE_MAX
from blktap.errors import BlktapError, InvalidArgument, ProtocolError, errno_of
from blktap.frontends.nbd_lane import (
    LANE_READ_MAX,
    WRITE_LANE_MAX,
    WRITE_LANE_MIN,
    WRITE_LANE_THREADS,
    Lane,
    LaneResult,
    ReadLane,
    WriteLane,
)
from blktap.proto.nbd import (
    MAX_BLOCK,
    REQUEST,
    REQUEST_MAGIC,
    Aborted,
    Command,
    CommandFlag,
    Event,
    ExportInfo,
    Negotiated,
    Request,
    ServerCodec,
    State,
)
from blktap.util.buffers import BufferPool
from blktap.util.eager import defer as eager_defer
from blktap.util.eager import start as eager_start
from blktap.vbd import VBD, Admission, IOCounts, SyncFile, ThreadIO

log = logging.getLogger(__name__)

STATUS_QUERY_MAX = 256 * 1024 * 1024
"""A BLOCK_STATUS request asks the VBD about at most this many bytes (the reply may cover
less than the request: the spec allows it, the client asks again)."""

_EMPTY = memoryview(b"")
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # most buffers one writev takes
# Plain ints: IntFlag arithmetic runs Python code on every request.
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_READ = Command.READ
_reply_ok = ServerCodec.reply_ok
_WRITE = Command.WRITE
_REQ_SIZE = REQUEST.size
_SECTOR_MASK = SECTOR_SIZE - 1
_RWF_DSYNC = os.RWF_DSYNC
_preadv = os.preadv
_unpack_request = REQUEST.unpack_from
_READ_LOW = int(Command.READ)  # the command as unpacked
_WRITE_LOW = int(Command.WRITE)
_TRANSMISSION = State.TRANSMISSION
_pwritev = os.pwritev


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


class NbdServer:
    """Serve ``vbd`` over NBD on the Unix socket ``path`` (mode 0600).

    ``tcp=(host, port)`` adds a TCP listener (off by default: anyone who can reach it can
    read and write the disk). ``start`` binds and listens; ``stop`` stops accepting,
    lets in-flight requests finish, closes every connection and removes the socket file.
    """

    def __init__(
        self,
        vbd: VBD,
        path: str,
        *,
        buffers: BufferPool | None = None,
        tcp: tuple[str, int] | None = None,
        handshake_timeout: float = 10.0,
        max_inflight: int = 128,
        max_inflight_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.vbd = vbd
        self.path = path
        self.buffers = buffers if buffers is not None else BufferPool()
        self.tcp = tcp
        self.handshake_timeout = handshake_timeout
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.log = logging.LoggerAdapter(log, vbd.log_context)
        self.tcp_port: int | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[_Connection] = set()
        self._closed_totals = [0] * len(fields(Statistics))
        self._sock_ino: tuple[int, int] | None = None
        self._stopping = False
        self._serial = 0  # connections accepted so far

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Bind and listen. Raises OSError when the path is taken by something that is not
        a socket, or cannot be bound; nothing is left behind then."""
        loop = asyncio.get_running_loop()
        sock = self._bind_unix()
        try:
            server = await loop.create_unix_server(self._make_connection, sock=sock)
        except BaseException:
            sock.close()
            self._unlink_socket()
            raise
        self._servers.append(server)
        if self.tcp is not None:
            try:
                host, port = self.tcp
                tcp_server = await loop.create_server(self._make_connection, host, port)
            except BaseException:
                await self.stop()
                raise
            self._servers.append(tcp_server)
            self.tcp_port = tcp_server.sockets[0].getsockname()[1]
            self.log.warning("minor %d: NBD export also on TCP %s:%d (no authentication)",
                             self.vbd.minor, host, self.tcp_port)
        self.log.info("minor %d: NBD export on %s", self.vbd.minor, self.path)

    def _bind_unix(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
            os.unlink(self.path)  # a stale socket of a dead process
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # Not listening yet, so nobody can connect before the mode is 0600.
            os.chmod(self.path, 0o600)
            st = os.lstat(self.path)
            self._sock_ino = (st.st_dev, st.st_ino)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._unlink_socket()
            raise
        return sock

    def _unlink_socket(self) -> None:
        # Only remove the file we created (a new server may already own the path).
        if self._sock_ino is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._sock_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock_ino = None

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; finish in-flight requests; close every connection; remove the
        socket. With ``timeout``, connections still busy after that many seconds are
        aborted (their requests finish later, unanswered). Idempotent."""
        self._stopping = True
        for server in self._servers:
            server.close()
        self._servers.clear()
        self._unlink_socket()
        conns = list(self._conns)
        for conn in conns:
            conn.shutdown("server stopping")
        waits = [conn.closed for conn in conns if not conn.closed.done()]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                self.log.warning("minor %d: aborting %d busy NBD connections",
                                 self.vbd.minor, len(pending))
                for conn in conns:
                    conn.abort()
                await asyncio.wait(pending)
        self.log.info("minor %d: NBD export on %s stopped", self.vbd.minor, self.path)

    def _make_connection(self) -> _Connection:
        return _Connection(self)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            totals = self._closed_totals
            for i, value in enumerate(conn.counters()):
                totals[i] += value

    # --------------------------------------------------------------- statistics
    @property
    def connections(self) -> int:
        return len(self._conns)

    def connection_statistics(self) -> dict[str, Statistics]:
        """The counters of each open connection, by peer ("unix#N" for Unix clients)."""
        return {conn.peer: conn.statistics() for conn in self._conns}

    def statistics(self) -> Statistics:
        """Totals over every connection this server has had (``connections`` counts them)."""
        totals = list(self._closed_totals)
        for conn in self._conns:
            for i, value in enumerate(conn.counters()):
                totals[i] += value
        return Statistics(*totals)


WRITE_BUFFER_HIGH = 8 * 1024 * 1024
"""Replies buffered in the transport beyond this pause reading new requests."""
SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_SNDBUF of each connection (the kernel may cap it at net.core.wmem_max)."""
FLUSH_BYTES = 1024 * 1024
"""Replies of READ data piled up while serving one batch are handed to the transport
past this many bytes (so that the transport's flow control applies within a batch)."""
FREE_BUFFER_BYTES = 256 * 1024
"""Each connection keeps up to this many bytes of idle buffers for reuse (larger ones go
back to the shared pool, which bounds what all connections keep together)."""
LANE_AFTER = 8
"""Lone READs in a row (each alone, nothing else in flight) after which a connection
hands its socket to a read lane (blktap.frontends.nbd_lane)..."""
WRITE_LANE_AFTER = 4
"""... and large WRITEs in a row after which it hands it to a write lane, once the
requests in flight are answered."""
LANE_SHORT = 64
"""A lane that served fewer requests than this doubles the run the next one waits for..."""
LANE_AFTER_MAX = 4096
"""... up to this many."""
RECV_BUFFER = 256 * 1024
"""Size of each connection's receive buffer (requests are parsed from it in place)."""
DIRECT_PAYLOAD_MIN = 64 * 1024
"""A WRITE payload with at least this much still to come is received straight into its
own buffer, without going through the receive buffer."""
CARRY_MAX = DIRECT_PAYLOAD_MIN
"""A request served inline (_Connection._inline) whose header and payload together are at
most this many bytes is kept whole in the receive buffer when a read ends inside it; a
larger one goes to the codec, which receives its payload."""


class _Connection(asyncio.BufferedProtocol):
    """One client. All callbacks run in the event loop; none lets an exception escape.

    A BufferedProtocol: the event loop receives into our buffers, so a large WRITE payload
    lands directly in the page-aligned buffer the driver writes from.
    """

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.vbd = server.vbd
        self.pool = server.buffers
        self.log = server.log
        self.codec: ServerCodec | None = None
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.peer = "?"
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes | memoryview] = []
        # READ buffers handed to the transport: (stream position of the end of their
        # batch, buffers). The transport may still read them until that many bytes of the
        # stream have left (get_write_buffer_size() counts the bytes not yet sent).
        self._sending: list[memoryview] = []  # in self._out, not yet handed over
        self._held: deque[tuple[int, list[memoryview]]] = deque()
        self._queued = 0  # bytes handed to the transport (or written) so far
        self._fd = -1  # the socket, written directly while the transport holds nothing
        self._free: dict[int, list[memoryview]] = {}  # pool buffers kept by exact length
        self._free_bytes = 0
        self._batching = False
        self._flush_scheduled = False
        self._inflight = 0
        self._inflight_bytes = 0
        self._backlog: deque[Request] = deque()
        self._reading = True
        self._writing_paused = False
        self._draining = False  # DISC, protocol error or stop: close when in-flight done
        self._lost = False
        self._max_inflight = server.max_inflight
        self._max_bytes = server.max_inflight_bytes
        self._fast_zero = False
        self._rbuf_bytes = bytearray(RECV_BUFFER)
        self._rbuf = memoryview(self._rbuf_bytes)
        self._into_payload = False
        self._header_next = False  # see get_buffer
        self._carry = 0  # bytes of a request kept at the start of _rbuf (see _inline)
        self._inline_counts = IOCounts()  # what one _inline call served
        self._pumping = False
        self._out_bytes = 0  # READ data in self._out
        # The lanes (nbd_lane): lone READs and large WRITEs in a row so far (-1: no lane
        # here, as before negotiation, without a socket descriptor, or when none could
        # be made), how many start one, a write lane waiting for the requests in flight,
        # and the running lane.
        self._lone = -1
        self._lane_after = LANE_AFTER
        self._big = -1
        self._write_lane_after = WRITE_LANE_AFTER
        self._lane_wanted = False
        self._lane: Lane | None = None
        self._abort_after_lane = False
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
                            block_status=caps.block_status)
        # WRITE payloads are lent from the receive buffer: a write done synchronously
        # needs no copy; any other is copied out (_own) before the buffer is reused.
        self.codec = ServerCodec(export, self._get_buf, borrow_payloads=True)
        # Room for a few large READ replies before the transport asks us to pause.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Fewer wakeups and writes per large READ reply.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            with contextlib.suppress(OSError, AttributeError):
                self._fd = sock.fileno()
        greeting = self.codec.greeting()
        transport.write(greeting)
        self._queued = len(greeting)
        self._timer = self._loop.call_later(server.handshake_timeout, self._handshake_expired)
        self.log.debug("minor %d: NBD client %s connected", vbd.minor, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._lane is not None:
            self._lane.stop()  # it returns its buffer to the pool when it is done
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out.clear()
        self._backlog.clear()
        # Nothing more will be sent: every buffer goes back to the shared pool.
        put = self.pool.put
        for _mark, bufs in self._held:
            for buf in bufs:
                put(buf)
        self._held.clear()
        for buf in self._sending:
            put(buf)
        self._sending.clear()
        for bufs in self._free.values():
            for buf in bufs:
                put(buf)
        self._free.clear()
        self._free_bytes = 0
        self.server._forget(self)
        if not self.closed.done():
            self.closed.set_result(None)
        self.log.debug("minor %d: NBD client %s gone (%d requests)", self.vbd.minor,
                       self.peer, self.requests)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._flush()  # releases the READ buffers that have been sent
        if self._backlog and not self._lost:
            self._batching = True
            try:
                self._pump()
            finally:
                self._batching = False
            self._flush()
            self._maybe_close()
        self._update_reading()

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
        if codec is None or self._draining or self._lost:
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
                if self._lone >= 0:
                    # A lone READ: one header alone in what arrived, nothing else in
                    # flight or waiting.
                    if (pos == 0 and end == _REQ_SIZE and data is not None
                            and not self._inflight and not backlog
                            and _lone_read(codec, data)):
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
            if self._draining:
                if self._maybe_close():
                    return
            elif self._reading and not self._must_wait() and not self._lane_wanted:
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
            if self._draining or codec.state is not _TRANSMISSION:
                return  # (DISC or ABORT: nothing that follows counts)

    def _inline(self, codec: ServerCodec, adm: Admission, sync: SyncFile, data: memoryview,
                pos: int, end: int) -> int:
        """Serve, from ``data[pos]`` on, the READs and small WRITEs the VBD's SyncFile
        covers, each with one preadv/pwritev, without a call per request through the
        codec, _dispatch, the VBD and the driver (with 4 KiB requests, many per read,
        those calls cost more than the system call: docs/performance.md); count them
        once. Returns where it stopped: a request it does not take (or whose system call
        failed or fell short: the general path serves it again and reports), which the
        codec parses next; or ``end``, having kept the start of a small request that is
        not all here at the start of the receive buffer, for the next read to complete.

        Which requests it takes is HeaderCheck.accepts (the codec's rule) and
        Admission.admits (the VBD's), copied inline: a call per request costs more than
        the system call's share (tests/unit/test_fast_route_rules.py pins the copies).
        """
        fd = sync.fd
        read_limit = adm.read_limit
        write_limit = adm.write_limit if sync.writable else -1
        check = codec.header_check
        allowed = check.allowed  # (HeaderCheck.flags without a call per batch)
        read_flags = allowed.get(_READ_LOW, 0)
        write_flags = allowed.get(_WRITE_LOW, 0)
        free = self._free
        out = self._out  # both replaced by each flush
        sending = self._sending
        header = codec.read_reply_header
        reads = read_bytes = writes = written = 0
        try:
            while end - pos >= _REQ_SIZE:
                magic, flags, command, cookie, offset, length = _unpack_request(data, pos)
                # HeaderCheck.accepts and Admission.admits, inline (see the docstring).
                if magic != REQUEST_MAGIC or not length or (offset | length) & _SECTOR_MASK:
                    return pos
                if command == _READ_LOW:
                    if flags & ~read_flags or length > MAX_BLOCK or offset + length > read_limit:
                        return pos
                    bufs = free.get(length)
                    if bufs:
                        buf = bufs.pop()
                        self._free_bytes -= length
                    else:
                        buf = self.pool.get(length)
                    try:
                        done = _preadv(fd, (buf,), offset) == length
                    except OSError:
                        done = False
                    if not done:
                        self._put_buf(buf)
                        return pos
                    out.append(header(cookie, offset, length))
                    out.append(buf)
                    sending.append(buf)
                    reads += 1
                    read_bytes += length
                    pos += _REQ_SIZE
                    self._out_bytes += length
                    if self._out_bytes >= FLUSH_BYTES:
                        self._flush()
                        out = self._out
                        sending = self._sending
                        if self._writing_paused:
                            return pos  # the codec parses the rest, into the backlog
                elif command == _WRITE_LOW:
                    if (flags & ~write_flags or length >= SYNC_WRITE_MAX
                            or offset + length > write_limit):
                        return pos
                    start = pos + _REQ_SIZE
                    if end - start < length:
                        if _REQ_SIZE + length > CARRY_MAX:
                            return pos  # the codec takes it, its payload to come
                        break
                    try:
                        done = _pwritev(fd, (data[start : start + length],), offset,
                                        _RWF_DSYNC if flags else 0) == length
                    except OSError:
                        done = False
                    if not done:
                        return pos
                    out.append(_reply_ok(cookie))
                    writes += 1
                    written += length
                    pos = start + length
                else:
                    return pos
            # What is here of the next request: to the start of the buffer, completed by
            # the next read (nothing else refers to the receive buffer now: no request
            # waits in the backlog, and a payload the loop did not write at once was
            # copied out of it).
            rest = end - pos
            if rest and pos:
                data[:rest] = data[pos:end]
            self._carry = rest
            return end
        finally:
            if reads or writes:
                counts = self._inline_counts  # reused: no object built per batch
                counts.reads, counts.read_bytes = reads, read_bytes
                counts.writes, counts.written_bytes = writes, written
                self._served(counts, False)
                self.vbd.count(counts)
                if self._big > 0:
                    self._big = 0

    def _serve(self, events: list[Event]) -> None:
        """Dispatch parsed events, in order; requests wait in the backlog while they must."""
        backlog = self._backlog
        for ev in events:
            if type(ev) is Request:
                # _must_wait, inline: a call per request costs ~1.5 % on the O_DIRECT path.
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

    def _must_wait(self) -> bool:
        """Whether a new request must wait in the backlog (see _pump)."""
        return bool(self._backlog or self._writing_paused
                    or self._inflight >= self._max_inflight
                    or self._inflight_bytes >= self._max_bytes)

    # --------------------------------------------------------------- handshake
    def _negotiated(self, ev: Negotiated) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fast_zero = self.vbd.capabilities.fast_zero
        if self._fd >= 0:
            self._lone = 0
            self._big = 0
        self.log.debug("minor %d: NBD client %s: export %r, structured=%s, flags=%#x",
                       self.vbd.minor, self.peer, ev.export_name, ev.structured,
                       ev.transmission_flags)

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
                    if self._big >= 0:
                        self._count_big(req)
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
            if self._lost or codec is None:
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
            if len(data) and data.obj is not self._rbuf_bytes:  # else lent, not ours
                if self._lost:
                    self.pool.put(data)
                else:
                    self._put_buf(data)
            if self._lost or codec is None:
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
            if self._lost or codec is None:
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
            if self._lost or codec is None:
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

    def _pump(self) -> None:
        """Dispatch waiting requests while the limits allow (never re-entered).

        Replies of requests that complete at once pile up in ``_out``; past FLUSH_BYTES
        they are handed to the transport, and once its buffer is full (pause_writing)
        the remaining requests wait for resume_writing.
        """
        if self._pumping:
            return  # a request dispatched by the loop below completed at once
        backlog = self._backlog
        self._pumping = True
        try:
            while (backlog and not self._writing_paused
                   and self._inflight < self._max_inflight
                   and (self._inflight_bytes < self._max_bytes or not self._inflight)):
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
            if self._draining and self._maybe_close():
                return
            if not self._flush_scheduled:
                # With the other replies of this burst of completions, or next loop turn.
                self._flush_scheduled = True
                eager_defer(self._loop, self._flush)
            if not self._reading:  # a completion can only end a reason to stop reading
                self._update_reading()

    # ------------------------------------------------------------------ output
    def _take_codec_output(self) -> None:
        codec = self.codec
        if codec is not None and codec.output:
            self._out.append(bytes(codec.output))
            codec.output.clear()
        if not self._batching:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if ((self._lone >= self._lane_after or self._lane_wanted)
                and not self._batching and not self._pumping):
            eager_defer(self._loop, self._maybe_start_lane)  # once this flush is done
        transport = self.transport
        if transport is None or self._lost:
            return
        out = self._out
        if out:
            self._out = []
            self._out_bytes = 0
            total = sum(map(len, out))
            self._queued += total
            if (self._fd >= 0 and len(out) <= _IOV_MAX and not transport.get_write_buffer_size()
                    and not transport.is_closing()):  # a closing transport's fd may be gone
                # Nothing waits in the transport: write the socket ourselves, as it would
                # (one writev), without its per-write bookkeeping; it takes what is left.
                try:
                    sent = os.writev(self._fd, out)
                except OSError:
                    sent = 0  # EAGAIN, or an error the transport will meet and report
                if sent < total:
                    transport.writelines(_unsent(out, sent))
            else:
                transport.writelines(out)
            if self._sending:
                self._held.append((self._queued, self._sending))
                self._sending = []
        held = self._held
        if held:
            sent = self._queued - transport.get_write_buffer_size()
            while held and held[0][0] <= sent:
                self._put_bufs(held.popleft()[1])

    # ----------------------------------------------------------------- buffers
    def _get_buf(self, length: int) -> memoryview:
        """A page-aligned buffer of ``length`` bytes: a recycled one or one from the pool."""
        bufs = self._free.get(length)
        if bufs:
            self._free_bytes -= length
            return bufs.pop()
        return self.pool.get(length)

    def _own(self, lent: memoryview) -> memoryview:
        """A copy of a payload lent from the receive buffer, in a buffer of our own."""
        buf = self._get_buf(len(lent))
        buf[:] = lent
        return buf

    def _put_bufs(self, bufs: list[memoryview]) -> None:
        """_put_buf for each of ``bufs`` (one call for a batch of READ buffers)."""
        free = self._free
        kept = self._free_bytes
        for buf in bufs:
            length = len(buf)
            if kept + length > FREE_BUFFER_BYTES:
                self.pool.put(buf)
                continue
            kept += length
            same = free.get(length)
            if same is None:
                free[length] = [buf]
            else:
                same.append(buf)
        self._free_bytes = kept

    def _put_buf(self, buf: memoryview) -> None:
        # Kept per connection by exact length (cheaper than the pool's size classes), up
        # to FREE_BUFFER_BYTES; the rest goes back to the shared pool.
        length = len(buf)
        if self._free_bytes + length > FREE_BUFFER_BYTES:
            self.pool.put(buf)
            return
        self._free_bytes += length
        bufs = self._free.get(length)
        if bufs is None:
            self._free[length] = [buf]
        else:
            bufs.append(buf)

    # ------------------------------------------------------------- flow control
    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        stop = (self._draining or self._lane is not None or self._lane_wanted
                or self._must_wait())
        if stop and self._reading:
            self._reading = False
            transport.pause_reading()
        elif not stop and not self._reading:
            self._reading = True
            transport.resume_reading()

    # ---------------------------------------------------------------- closing
    def shutdown(self, reason: str | None) -> None:
        """Stop reading; close once the requests in flight are answered."""
        if self._lost:
            return
        if reason and not self._draining:
            self.log.debug("minor %d: closing NBD client %s: %s", self.vbd.minor,
                           self.peer, reason)
        self._draining = True
        if self._lane is not None:
            self._lane.stop()  # _lane_returned closes
            return
        self._update_reading()
        self._maybe_close()

    def _maybe_close(self) -> bool:
        """Close when draining and every request is answered; True if it did."""
        if (self._draining and not self._inflight and not self._backlog and not self._lost
                and self._lane is None):
            self._flush()
            self._close_now()
            return True
        return False

    def _close_now(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.close()  # sends what is buffered first

    def abort(self) -> None:
        """Drop the connection now, without sending what is buffered."""
        if self._lane is not None:
            self._abort_after_lane = True
            self._lane.stop()  # _lane_returned aborts
            return
        if self.transport is not None and not self._lost:
            self.transport.abort()

    # ------------------------------------------------------------------ lanes
    def _count_big(self, req: Request) -> None:
        """A large WRITE: one more in a row, or (too large for a lane) the end of a run.
        Other requests end a run too: see _dispatch and buffer_updated."""
        if req.length > WRITE_LANE_MAX:
            self._big = 0
            return
        self._big += 1
        if self._big >= self._write_lane_after and not self._lane_wanted:
            if self.vbd.thread_io_possible(write=True):
                self._lane_wanted = True  # reading stops until the lane starts
            else:  # not this image, or not now: ask again much later
                self._big = 0
                self._write_lane_after = LANE_AFTER_MAX

    def _maybe_start_lane(self) -> None:
        """Hand the socket to a lane (nbd_lane) if the client still sends lone READs, or
        large WRITEs were seen, and nothing of ours is in flight, waiting or unsent."""
        if self._lane_wanted:
            self._maybe_start_write_lane()
            return
        transport = self.transport
        codec = self.codec
        if (self._lone < self._lane_after or self._lane is not None or transport is None
                or codec is None or self._carry or self._lost or self._draining
                or self._writing_paused
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
        if (self._lane is not None or transport is None or codec is None or self._lost
                or self._inflight or self._backlog or self._out
                or self._batching or self._pumping):
            return  # the flush after the last completion asks again
        if (self._draining or self._writing_paused or self._held
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
        self._lane_wanted = False
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
            self._lane_wanted = False
            self._big = 0
            self._write_lane_after = LANE_AFTER_MAX
        else:
            self._lone = 0
            self._lane_after = LANE_AFTER_MAX
        if exc is not None:
            self._lone = self._big = -1
            self.log.warning("minor %d: NBD client %s: no lane: %s", self.vbd.minor,
                             self.peer, exc)
        self._update_reading()

    def _lane_returned(self, result: LaneResult) -> None:
        lane = self._lane
        assert lane is not None
        self._lane = None
        lane.close()
        try:
            self._take_lane(lane, result)
        except Exception:
            self.log.exception("minor %d: NBD connection %s failed", self.vbd.minor, self.peer)
            self.abort()
        finally:
            # Only now: the requests handed back were in the lane's buffers.
            for buf in lane.bufs:
                self.pool.put(buf)

    def _take_lane(self, lane: Lane, result: LaneResult) -> None:
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
        if self._lost:
            return
        if result.unsent:
            self._out.extend(result.unsent)
            self._flush()
        if result.error is not None:
            self.log.debug("minor %d: NBD client %s: %s", self.vbd.minor, self.peer,
                           result.error)
            self._abort_after_lane = True
        if self._abort_after_lane:
            self.abort()
            return
        if self._draining:
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
        while pos < len(data) and not (self._lost or self._draining):
            view = self.get_buffer(-1)
            n = min(len(view), len(data) - pos)
            view[:n] = data[pos : pos + n]
            pos += n
            self.buffer_updated(n)


def _lone_read(codec: ServerCodec, data: memoryview) -> bool:
    """Whether the one request header in ``data`` is a READ the codec accepts as is."""
    magic, flags, command, _cookie, _offset, length = _unpack_request(data)
    return command == _READ_LOW and codec.header_check.accepts(magic, flags, command, length)


def _unsent(out: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What of ``out`` remains after its first ``sent`` bytes."""
    for i, item in enumerate(out):
        size = len(item)
        if sent < size:
            return [memoryview(item)[sent:], *out[i + 1 :]] if sent else out[i:]
        sent -= size
    return []


async def _trim(vbd: VBD, offset: int, length: int, fua: bool) -> None:
    await vbd.trim(offset, length)
    if fua:
        await vbd.flush()


async def _check_writable(vbd: VBD) -> None:
    if vbd.read_only:
        await vbd.write(0, _EMPTY)  # raises ReadOnly (EPERM)


async def _fail(exc: BaseException) -> None:
    raise exc


# ------------------------------------------------------------------ standalone use
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m blktap.frontends.nbd_server",
        description="Serve one image over NBD in the foreground until SIGINT/SIGTERM.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--image", required=True, help="TYPE:PATH, e.g. aio:/srv/disk.raw")
    parser.add_argument("--no-direct", action="store_true", help="open without O_DIRECT")
    parser.add_argument("--read-only", action="store_true", help="export read-only")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (no auth!)")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own loop")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    from blktap.block.driver import OpenOptions
    from blktap.vbd import ImageSpec

    loop = asyncio.get_running_loop()
    vbd = VBD(0)
    await vbd.open(ImageSpec.parse(args.image),
                   OpenOptions(read_only=args.read_only, direct=not args.no_direct))
    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        tcp = (host or "127.0.0.1", int(port))
    server = NbdServer(vbd, args.socket, tcp=tcp)
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await server.start()
        await done.wait()
    finally:
        await server.stop(timeout=10.0)
        await vbd.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            log.warning("uvloop is not available; using asyncio's event loop")
    try:
        asyncio.run(_serve(args))
    except (BlktapError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
