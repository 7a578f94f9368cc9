"""The NBD connection without a socket: bytes in, bytes out (as h11 tests its connection).

A :class:`Harness` puts an :class:`NbdConnection` over a transport in memory and delivers
the client's bytes the way the event loop does (``get_buffer`` then ``buffer_updated``,
only while the transport reads); the server's bytes are parsed by a client side written
out here from the spec (NetworkBlockDevice/nbd doc/proto.md), not by the codec under
test. The image is a real raw file opened by the aio driver: buffered (requests served
inline, route 1 of docs/architecture.md) or O_DIRECT (dispatched, completions from AIO).
The socket tests with real clients are tests/system/test_nbd_server.py and
tests/interop/test_nbd_*.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blktap.block.driver import OpenOptions
from blktap.block.layers.log import LogSlot
from blktap.frontends.nbd_connection import NbdConnection
from blktap.frontends.nbd_flow import INTAKE_TRANSITIONS, Intake
from blktap.frontends.nbd_lane_policy import LANE_TRANSITIONS, LaneEvent, LaneState
from blktap.frontends.nbd_listen import Listener
from blktap.frontends.nbd_server import NbdServer
from blktap.proto import cbt
from blktap.vbd import VBD, ImageSpec

T = TypeVar("T")
SIZE = 4 << 20
KIB = 1024

# The wire, from the spec.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
INFO_EXPORT = 0
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 1, 2, 4, 8
FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN = 32, 64, 256
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
CMD_FUA, CMD_NO_HOLE, CMD_REQ_ONE, CMD_FAST_ZERO = 1, 2, 8, 16
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_BLOCK_STATUS, CHUNK_ERROR = 0, 1, 5, (1 << 15) + 1
EPERM, EINVAL, ENOTSUP = 1, 22, 95


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go(opt: int = OPT_GO, name: bytes = b"") -> bytes:
    return option(opt, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))


def hello(*options: bytes) -> bytes:
    """Client flags FIXED_NEWSTYLE | NO_ZEROES, then ``options`` (default: GO)."""
    return struct.pack(">I", 3) + b"".join(options or (go(),))


def meta_context(query: bytes) -> bytes:
    return option(OPT_SET_META_CONTEXT, struct.pack(">I", 0) + struct.pack(">I", 1)
                  + struct.pack(">I", len(query)) + query)


def request(command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"", magic: int = REQ_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length) + payload


class Wire:
    """What the server sent, read as a client reads it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), f"{n} bytes wanted, {self.rest()} left"
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def rest(self) -> int:
        return len(self.data) - self.pos

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.take(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        return int(flags)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.take(20))
        assert magic == OPT_REPLY_MAGIC
        return opt, rep, self.take(length)

    def go_replies(self, opt: int = OPT_GO) -> tuple[int, int]:
        """The replies to INFO or GO, up to the ACK: (export size, transmission flags)."""
        size = flags = -1
        while True:
            got, rep, data = self.option_reply()
            assert got == opt
            if rep == REP_ACK:
                return size, flags
            assert rep == REP_INFO, rep
            if struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)

    def simple(self, length: int = 0) -> tuple[int, int, bytes]:
        """A simple reply: (error, cookie, data); ``length`` bytes of data unless error."""
        magic, error, cookie = struct.unpack(">IIQ", self.take(16))
        assert magic == SIMPLE_MAGIC
        return error, cookie, (self.take(length) if not error else b"")

    def chunk(self) -> tuple[int, int, int, bytes]:
        """A structured reply chunk: (flags, type, cookie, payload)."""
        magic, flags, kind, cookie, length = struct.unpack(">IHHQI", self.take(20))
        assert magic == STRUCTURED_MAGIC
        return flags, kind, cookie, self.take(length)


class MemoryTransport:
    """What the connection needs of an asyncio transport, in memory: what it is given
    is appended to ``sent``; ``buffered`` is what a real one would still hold (a client
    that does not read: the test sets it)."""

    def __init__(self, conn: NbdConnection, sock: socket.socket | None = None) -> None:
        self.conn = conn
        self.sock = sock
        self.sent = bytearray()
        self.reading = True
        self.closing = False
        self.aborted = False
        self.buffered = 0
        self.high: int | None = None

    def write(self, data: Any) -> None:
        assert not self.closing
        self.sent += data

    def writelines(self, items: Any) -> None:
        for item in items:
            self.write(item)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" and self.sock is not None else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def _lose(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


class MemoryListener(Listener):
    """Connections made by the test; ``raw`` says whether the raw descriptor may be used."""

    def __init__(self, raw: bool = False) -> None:
        self.raw = raw

    def raw_fd(self, transport: asyncio.BaseTransport) -> int | None:
        return super().raw_fd(transport) if self.raw else None


class Harness:
    """One NbdConnection over a MemoryTransport (see the module docstring)."""

    def __init__(self, vbd: VBD, *, listener: Listener | None = None,
                 sock: socket.socket | None = None, **server_args: Any) -> None:
        self.server = NbdServer(vbd, "/nonexistent", **server_args)
        self.conn = NbdConnection(self.server, listener or MemoryListener())
        self.transport = MemoryTransport(self.conn, sock)
        self.pending = bytearray()
        self.taken = 0
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes, chunk: int | None = None) -> None:
        """Deliver ``data`` as the loop would, ``chunk`` bytes at most per read; what
        arrives while the transport does not read waits for ``settle``."""
        self.pending += data
        self.deliver(chunk)

    def deliver(self, chunk: int | None = None) -> None:
        conn, transport = self.conn, self.transport
        while self.pending and transport.reading and not transport.closing:
            view = conn.get_buffer(-1)
            n = min(len(view), len(self.pending), chunk or len(self.pending))
            view[:n] = self.pending[:n]
            del self.pending[:n]
            conn.buffer_updated(n)

    async def settle(self, timeout: float = 10.0) -> None:
        """Run the loop until every request is answered and what waited is delivered."""
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0)
            self.deliver()
            conn = self.conn
            if (not conn._inflight and not conn._backlog and not conn._out
                    and not conn._flush_scheduled
                    and (not self.pending or not self.transport.reading
                         or self.transport.closing)):
                await asyncio.sleep(0)  # what was deferred, and connection_lost
                return
            assert time.monotonic() < deadline, "the connection did not settle"
            await asyncio.sleep(0.001)

    def take(self) -> Wire:
        """What the server sent since the last take."""
        data = bytes(self.transport.sent[self.taken :])
        self.taken = len(self.transport.sent)
        return Wire(data)

    async def negotiate(self, *options: bytes) -> Wire:
        self.send(hello(*options))
        await self.settle()
        wire = self.take()
        assert wire.greeting() == 3  # FIXED_NEWSTYLE | NO_ZEROES
        return wire


def intake(conn: NbdConnection) -> Intake:
    """The connection's intake state (a call: mypy does not keep it narrowed)."""
    return conn._intake


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await body()

    return asyncio.run(main())


async def open_vbd(path: str, *, direct: bool = False, read_only: bool = False) -> VBD:
    vbd = VBD(0)
    await vbd.open(ImageSpec("aio", path), OpenOptions(direct=direct, read_only=read_only))
    return vbd


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return str(path)


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(length))


# --------------------------------------------------------------------- handshake
@pytest.mark.parametrize("read_only", [False, True])
def test_handshake_advertises_what_the_stack_can_do(image: str, read_only: bool) -> None:
    async def body() -> None:
        vbd = await open_vbd(image, read_only=read_only)
        h = Harness(vbd)
        try:
            wire = await h.negotiate()
            size, flags = wire.go_replies()
            caps = vbd.capabilities
            assert size == SIZE and wire.rest() == 0
            assert flags & FLAG_HAS_FLAGS
            assert bool(flags & FLAG_READ_ONLY) is read_only
            assert bool(flags & FLAG_SEND_FLUSH) is caps.flush
            writable = not read_only  # what modifies the image is offered only then
            assert bool(flags & FLAG_SEND_FUA) is (caps.flush and writable)
            assert bool(flags & FLAG_SEND_TRIM) is (caps.trim and writable)
            assert bool(flags & FLAG_SEND_WRITE_ZEROES) is (caps.zero and writable)
            assert bool(flags & FLAG_CAN_MULTI_CONN) is caps.multi_conn
            # In memory there is no socket: no raw descriptor, hence no lanes.
            assert h.conn._intake is Intake.OPEN and h.conn._lanes is LaneState.OFF
            assert h.conn._timer is None  # the handshake deadline is cancelled
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


def test_option_haggling(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image)
        h = Harness(vbd)
        try:
            wire = await h.negotiate(option(42, b"what?"), option(OPT_LIST),
                                     go(OPT_INFO), option(OPT_STRUCTURED_REPLY),
                                     meta_context(b"qemu:dirty-bitmap:none"),
                                     meta_context(b"base:allocation"))
            assert wire.option_reply()[:2] == (42, REP_ERR_UNSUP)
            opt, rep, _ = wire.option_reply()
            assert (opt, rep) == (OPT_LIST, REP_SERVER)
            assert wire.option_reply()[:2] == (OPT_LIST, REP_ACK)
            assert wire.go_replies(OPT_INFO)[0] == SIZE  # INFO: still haggling after it
            assert wire.option_reply()[:2] == (OPT_STRUCTURED_REPLY, REP_ACK)
            # No such context (this VBD has no changed-block log): just the ACK. Each
            # SET replaces what the one before chose.
            assert wire.option_reply()[:2] == (OPT_SET_META_CONTEXT, REP_ACK)
            opt, rep, data = wire.option_reply()
            assert (opt, rep, data[4:]) == (OPT_SET_META_CONTEXT, REP_META_CONTEXT,
                                            b"base:allocation")
            context = struct.unpack(">I", data[:4])[0]
            assert wire.option_reply()[:2] == (OPT_SET_META_CONTEXT, REP_ACK)
            assert wire.rest() == 0
            assert h.conn.codec is not None and h.conn._timer is not None  # not done yet
            h.send(go())
            await h.settle()
            h.take().go_replies()
            # Structured replies and base:allocation from now on.
            h.send(request(BLOCK_STATUS, 5, 0, 64 * KIB))
            await h.settle()
            wire = h.take()
            flags, kind, cookie, payload = wire.chunk()
            assert (flags & 1, kind, cookie) == (1, CHUNK_BLOCK_STATUS, 5)
            assert struct.unpack(">I", payload[:4])[0] == context
            extents = [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]
            assert extents and sum(length for length, _ in extents) <= 64 * KIB
            assert extents[0] == (64 * KIB, 0) or extents[0][1] == 0  # allocated data
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


def test_abort_during_haggling_closes(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image)
        h = Harness(vbd)
        try:
            wire = await h.negotiate(option(OPT_STRUCTURED_REPLY), option(OPT_ABORT))
            assert wire.option_reply()[:2] == (OPT_STRUCTURED_REPLY, REP_ACK)
            assert wire.option_reply()[:2] == (OPT_ABORT, REP_ACK)
            assert h.transport.closing and not h.transport.aborted
            assert h.conn._intake is Intake.CLOSED and h.conn.closed.done()
            assert h.conn.protocol_errors == 0
        finally:
            await vbd.close()

    run(body)


def test_handshake_deadline(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image)
        h = Harness(vbd, handshake_timeout=0.01)
        try:
            h.send(struct.pack(">I", 3))  # flags, and nothing more
            await asyncio.wait_for(h.conn.closed, 10)
            assert h.transport.aborted and h.conn.protocol_errors == 1
        finally:
            await vbd.close()

    run(body)


# ------------------------------------------------------------------ transmission
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "O_DIRECT"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_requests_round_trip(image: str, direct: bool, structured: bool) -> None:
    async def body() -> None:
        vbd = await open_vbd(image, direct=direct)
        h = Harness(vbd)
        expect = bytearray(bytes(range(256)) * (SIZE // 256))
        try:
            opts = (option(OPT_STRUCTURED_REPLY), go()) if structured else (go(),)
            wire = await h.negotiate(*opts)
            if structured:
                wire.option_reply()
            wire.go_replies()

            def read_data(wire: Wire, length: int) -> tuple[int, int, bytes]:
                if not structured:
                    return wire.simple(length)
                flags, kind, cookie, payload = wire.chunk()
                assert flags & 1
                if kind == CHUNK_ERROR:
                    return struct.unpack(">I", payload[:4])[0], cookie, b""
                assert kind == CHUNK_OFFSET_DATA
                return 0, cookie, payload[8:]

            def ack(wire: Wire) -> tuple[int, int]:
                # Replies without data may be simple even when structured ones were
                # negotiated (the spec allows either): the magic says.
                if struct.unpack(">I", wire.data[wire.pos : wire.pos + 4])[0] == SIMPLE_MAGIC:
                    error, cookie, _ = wire.simple()
                    return error, cookie
                flags, kind, cookie, payload = wire.chunk()
                assert flags & 1
                if kind == CHUNK_ERROR:
                    return struct.unpack(">I", payload[:4])[0], cookie
                assert kind == CHUNK_NONE
                return 0, cookie

            # Writes small and large (one of each route), one with FUA; then reads.
            small, large = pattern(1, 4 * KIB), pattern(2, 256 * KIB)
            h.send(request(WRITE, 1, 8 * KIB, len(small), 0, small)
                   + request(WRITE, 2, 1 << 20, len(large), CMD_FUA, large))
            await h.settle()
            expect[8 * KIB : 12 * KIB] = small
            expect[1 << 20 : (1 << 20) + len(large)] = large
            wire = h.take()
            assert sorted(ack(wire) for _ in range(2)) == [(0, 1), (0, 2)]
            assert wire.rest() == 0
            h.send(request(READ, 3, 0, 16 * KIB) + request(READ, 4, 1 << 20, len(large)))
            await h.settle()
            wire = h.take()
            got = {}
            for _ in range(2):
                # Replies come in any order: peek at the cookie (bytes 8-15 of either
                # reply header) to know the length.
                cookie = struct.unpack(">Q", wire.data[wire.pos + 8 : wire.pos + 16])[0]
                length = 16 * KIB if cookie == 3 else len(large)
                error, cookie, data = read_data(wire, length)
                got[cookie] = (error, data)
            assert got == {3: (0, bytes(expect[: 16 * KIB])),
                           4: (0, bytes(expect[1 << 20 : (1 << 20) + len(large)]))}
            # Flush, trim, write-zeroes, cache: answered; zeroes read back.
            h.send(request(FLUSH, 5) + request(TRIM, 6, 64 * KIB, 64 * KIB)
                   + request(WRITE_ZEROES, 7, 8 * KIB, 4 * KIB)
                   + request(WRITE_ZEROES, 8, 128 * KIB, 8 * KIB, CMD_NO_HOLE)
                   + request(CACHE, 9, 0, 64 * KIB))
            await h.settle()
            wire = h.take()
            assert sorted(ack(wire) for _ in range(5)) == [(0, n) for n in range(5, 10)]
            expect[8 * KIB : 12 * KIB] = bytes(4 * KIB)
            expect[128 * KIB : 136 * KIB] = bytes(8 * KIB)
            h.send(request(READ, 10, 0, 256 * KIB))
            await h.settle()
            error, _, data = read_data(h.take(), 256 * KIB)
            assert error == 0
            # (A trimmed range reads back as zeros or as it was: either is allowed.)
            assert data[:64 * KIB] == expect[:64 * KIB]
            assert data[128 * KIB : 256 * KIB] == expect[128 * KIB : 256 * KIB]
            stats = h.conn.statistics()
            assert (stats.reads, stats.writes, stats.errors) == (3, 2, 0)
            assert stats.bytes_written == len(small) + len(large)
            assert stats.bytes_read == 16 * KIB + len(large) + 256 * KIB
            assert stats.requests == 10
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


def test_whole_session_byte_by_byte_equals_at_once(image: str) -> None:
    """The client's bytes one at a time give the same replies as all at once."""
    data = pattern(3, 4 * KIB)
    session = (hello(go()) + request(WRITE, 1, 4 * KIB, len(data), 0, data)
               + request(READ, 2, 0, 12 * KIB) + request(FLUSH, 3)
               + request(READ, 4, 4 * KIB, 512) + request(WRITE, 5, 0, 512, CMD_FUA, data[:512])
               + request(READ, 6, 0, 1024))

    async def serve(chunk: int | None) -> bytes:
        with open(image, "r+b") as f:  # the same image each time
            f.write(bytes(range(256)) * (SIZE // 256))
        vbd = await open_vbd(image)
        h = Harness(vbd)
        try:
            h.send(session, chunk)
            await h.settle()
            return bytes(h.transport.sent)
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    at_once = run(lambda: serve(None))
    assert run(lambda: serve(1)) == at_once
    assert run(lambda: serve(7)) == at_once
    wire = Wire(at_once)
    wire.greeting()
    wire.go_replies()
    lengths = {1: 0, 2: 12 * KIB, 3: 0, 4: 512, 5: 0, 6: 1024}
    replies = {}
    for _ in lengths:  # (a FLUSH may be answered after the READ behind it)
        cookie = struct.unpack(">Q", wire.data[wire.pos + 8 : wire.pos + 16])[0]
        error, cookie, got = wire.simple(lengths[cookie])
        replies[cookie] = (error, got)
    assert wire.rest() == 0
    original = bytes(range(256)) * 64
    read_back = original[: 4 * KIB] + data + original[8 * KIB : 12 * KIB]
    assert replies == {1: (0, b""), 2: (0, read_back), 3: (0, b""), 4: (0, data[:512]), 5: (0, b""),
                       6: (0, data[:512] + original[512:1024])}


# ------------------------------------------------------------------------ errors
def test_request_errors_are_answered_and_the_client_stays(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image, read_only=True)
        h = Harness(vbd)
        try:
            (await h.negotiate()).go_replies()
            fast_zero = vbd.capabilities.fast_zero
            h.send(request(READ, 1, SIZE - 512, 4 * KIB)  # past the end
                   + request(WRITE, 2, 0, 512, 0, bytes(512))  # read-only
                   + request(42, 3)  # no such command
                   + request(READ, 4, 0, 512, 1 << 12)  # a flag READ does not take
                   + request(WRITE_ZEROES, 5, 0, 4 * KIB, CMD_FAST_ZERO)
                   + request(BLOCK_STATUS, 6, 0, 512)  # not negotiated
                   + request(READ, 7, 512, 512))  # and still served
            await h.settle()
            wire = h.take()
            replies = {}
            for _ in range(7):
                magic, error, cookie = struct.unpack(">IIQ", wire.take(16))
                assert magic == SIMPLE_MAGIC
                replies[cookie] = (error, wire.take(512) if cookie == 7 else b"")
            assert wire.rest() == 0
            assert replies[1][0] == EINVAL and replies[2][0] == EPERM
            assert replies[3][0] == EINVAL and replies[4][0] == EINVAL
            # Zeroing that would not be fast fails at once, before anything else.
            assert replies[5][0] == (EPERM if fast_zero else ENOTSUP)
            assert replies[6][0] == EINVAL
            assert replies[7][1] == (bytes(range(256)) * 4)[512:1024]
            assert h.conn.protocol_errors == 0 and not h.transport.closing
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


def test_fast_zero_where_zeroing_is_not_fast(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image)
        h = Harness(vbd)
        try:
            (await h.negotiate()).go_replies()
            h.send(request(WRITE_ZEROES, 1, 0, 4 * KIB, CMD_FAST_ZERO))
            await h.settle()
            error, cookie, _ = h.take().simple()
            assert cookie == 1
            assert error == (0 if vbd.capabilities.fast_zero else ENOTSUP)
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


def test_a_broken_request_ends_the_connection_after_what_came_before(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image, direct=True)
        h = Harness(vbd)
        try:
            (await h.negotiate()).go_replies()
            data = pattern(4, 4 * KIB)
            h.send(request(WRITE, 1, 0, len(data), 0, data))  # in flight (AIO) ...
            assert h.conn._inflight == 1
            # ... when a request breaks the protocol (what came in the same read as the
            # broken request is dropped with it: the codec's events of that read are lost).
            h.send(request(READ, 2, 0, 512, magic=0x12345678) + request(READ, 3, 0, 512))
            assert h.conn._intake is Intake.DRAINING and not h.transport.closing
            await h.settle()
            wire = h.take()
            assert wire.simple() == (0, 1, b"")  # answered before the close
            assert wire.rest() == 0  # nothing after the bad magic
            assert h.transport.closing and not h.transport.aborted
            assert h.conn.protocol_errors == 1 and h.conn._intake is Intake.CLOSED
            with open(image, "rb") as f:
                assert f.read(len(data)) == data
        finally:
            await vbd.close()

    run(body)


# -------------------------------------------------------------------- disconnect
@pytest.mark.parametrize("how", ["disc", "eof"])
def test_disconnect_answers_what_is_in_flight_then_closes(image: str, how: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image, direct=True)
        h = Harness(vbd)
        try:
            (await h.negotiate()).go_replies()
            data = pattern(5, 64 * KIB)
            h.send(request(WRITE, 1, 0, len(data), 0, data) + request(READ, 2, 0, 512))
            if how == "disc":
                h.send(request(DISC, 3) + request(READ, 4, 0, 512))  # nothing after DISC
            else:
                h.conn.eof_received()
            assert h.conn._intake in (Intake.DRAINING, Intake.CLOSED)
            await h.settle()
            wire = h.take()
            replies = {}
            for _ in range(2):
                cookie = struct.unpack(">Q", wire.data[wire.pos + 8 : wire.pos + 16])[0]
                error, cookie, got = wire.simple(512 if cookie == 2 else 0)
                replies[cookie] = (error, got)
            assert replies == {1: (0, b""), 2: (0, data[:512])}
            assert wire.rest() == 0
            assert h.transport.closing and not h.transport.aborted
            assert h.conn.closed.done() and h.server.connections == 0
            assert h.server.statistics().requests == (3 if how == "disc" else 2)
        finally:
            await vbd.close()

    run(body)


# ------------------------------------------------------------------ backpressure
def test_in_flight_limit_holds_requests_and_stops_reading(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image, direct=True)  # O_DIRECT writes complete later (AIO)
        h = Harness(vbd, max_inflight=2)
        try:
            (await h.negotiate()).go_replies()
            data = pattern(6, 4 * KIB)
            h.send(b"".join(request(WRITE, n, n * 8 * KIB, len(data), 0, data)
                            for n in range(1, 7)))
            conn = h.conn
            assert conn._inflight == 2 and len(conn._backlog) == 4
            assert conn._intake is Intake.WAITING and not h.transport.reading
            h.send(request(READ, 7, 8 * KIB, 512))  # arrives while not reading: waits
            assert h.pending
            await h.settle()
            wire = h.take()
            # Replies come in completion order: the READ may overtake the last WRITEs
            # (it is admitted as soon as one of them completes).
            cookies = set()
            for _ in range(7):
                magic, error, cookie = struct.unpack(">IIQ", wire.take(16))
                assert magic == SIMPLE_MAGIC and error == 0
                if cookie == 7:
                    got = wire.take(512)
                    if 1 in cookies:  # WRITE 1 was answered before the READ started
                        assert got == data[:512]
                cookies.add(cookie)
            assert cookies == set(range(1, 8)) and wire.rest() == 0
            assert intake(conn) is Intake.OPEN and h.transport.reading
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "O_DIRECT"])
def test_a_full_write_buffer_holds_requests_until_it_drains(image: str, direct: bool) -> None:
    """A client that does not read its replies: once the transport says its buffer is
    full, requests wait and reading stops; when it drains, they are served in order."""
    async def body() -> None:
        vbd = await open_vbd(image, direct=direct)
        h = Harness(vbd)
        try:
            (await h.negotiate()).go_replies()
            conn = h.conn
            h.transport.buffered = 1 << 30
            conn.pause_writing()
            assert conn._intake is Intake.WAITING and not h.transport.reading
            h.send(b"".join(request(READ, n, n * 4 * KIB, 4 * KIB) for n in range(5)))
            assert h.pending and not h.take().rest()  # nothing read, nothing answered
            # What a connection was given before it stopped reading still waits.
            h.transport.reading = True
            h.deliver()
            assert len(conn._backlog) == 5 and not conn._inflight
            h.transport.reading = False
            h.transport.buffered = 0
            conn.resume_writing()
            assert intake(conn) is Intake.OPEN and h.transport.reading
            await h.settle()
            wire = h.take()
            original = bytes(range(256)) * (SIZE // 256)
            for n in range(5):
                assert wire.simple(4 * KIB) == (0, n, original[n * 4 * KIB : (n + 1) * 4 * KIB])
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


# ----------------------------------------------------------------- the listener
@pytest.mark.parametrize("raw", [False, True], ids=["tls-like", "plain"])
def test_the_listener_decides_the_raw_descriptor(image: str, raw: bool) -> None:
    """A listener without a raw descriptor (as TLS will be) leaves the connection none,
    even over a transport that has a socket: no writev of its own, no lanes."""
    async def body() -> None:
        vbd = await open_vbd(image)
        a, b = socket.socketpair()
        h = Harness(vbd, listener=MemoryListener(raw=raw), sock=a)
        try:
            conn = h.conn
            assert conn._fd == (a.fileno() if raw else -1)
            if not raw:
                (await h.negotiate()).go_replies()
                assert conn._lanes is LaneState.OFF
                # Lone READs, many in a row: no lane is ever due.
                for n in range(40):
                    h.send(request(READ, n, 0, 512))
                    await h.settle()
                    assert h.take().simple(512)[:2] == (0, n)
                assert conn._lanes is LaneState.OFF and conn._lane is None
                assert not conn._lane_due()
                with pytest.raises(BlockingIOError):
                    b.recv(1, socket.MSG_DONTWAIT)  # nothing went to the socket itself
        finally:
            h.conn.abort()
            await h.settle()
            a.close()
            b.close()
            await vbd.close()

    run(body)


# --------------------------------------------------------------- the state tables
def test_intake_table() -> None:
    assert set(INTAKE_TRANSITIONS) == set(Intake)
    for state, targets in INTAKE_TRANSITIONS.items():
        assert state not in targets
        if state.ended:  # DRAINING and CLOSED never read again
            assert all(t.ended for t in targets)
    assert [s for s in Intake if s.reads] == [Intake.OPEN]
    assert all(Intake.CLOSED in INTAKE_TRANSITIONS[s] for s in Intake if s is not Intake.CLOSED)


def test_lane_table() -> None:
    assert {s for s, _ in LANE_TRANSITIONS} | set(LANE_TRANSITIONS.values()) == set(LaneState)
    assert {e for _, e in LANE_TRANSITIONS} == set(LaneEvent)
    # Only a running lane can be stopped or return; only a lane that was told to stop
    # leaves lanes off when it returns.
    for (state, event), new in LANE_TRANSITIONS.items():
        if event in (LaneEvent.STOP, LaneEvent.RETURNED):
            assert state in (LaneState.RUNNING, LaneState.ABORTING)
        if event is LaneEvent.RETURNED:
            assert new is (LaneState.OFF if state is LaneState.ABORTING else LaneState.COUNTING)
    assert not LaneState.OFF.holds_socket and not LaneState.COUNTING.holds_socket
    assert all(s.holds_socket for s in (LaneState.WANTED, LaneState.RUNNING,
                                        LaneState.ABORTING))


def test_a_move_the_table_lacks_is_refused(image: str) -> None:
    async def body() -> None:
        vbd = await open_vbd(image)
        h = Harness(vbd)
        try:
            with pytest.raises(RuntimeError, match="OFF on RETURNED"):
                h.conn._lane_event(LaneEvent.RETURNED)
            assert h.conn._lanes is LaneState.OFF
            h.conn.shutdown("test")
            with pytest.raises(RuntimeError, match="DRAINING -> OPEN"):
                h.conn._enter(Intake.OPEN)
            assert h.conn._intake in (Intake.DRAINING, Intake.CLOSED)
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


# ------------------------------------------------------- the changed-block context
OPT_LIST_META_CONTEXT = 9
BITMAP = b"qemu:dirty-bitmap:vm1"  # the log vm1.cbtlog
BLOCK64 = 64 * KIB


def meta_queries(opt: int, *queries: bytes) -> bytes:
    data = struct.pack(">II", 0, len(queries))
    for q in queries:
        data += struct.pack(">I", len(q)) + q
    return option(opt, data)


def contexts(wire: Wire, opt: int) -> list[tuple[int, bytes]]:
    """The META_CONTEXT replies to one LIST or SET, up to its ACK: (id, name)."""
    out: list[tuple[int, bytes]] = []
    while True:
        got, rep, data = wire.option_reply()
        assert got == opt
        if rep == REP_ACK:
            return out
        assert rep == REP_META_CONTEXT
        out.append((struct.unpack(">I", data[:4])[0], data[4:]))


def status_chunks(wire: Wire, cookie: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """The chunks of one BLOCK_STATUS reply, up to DONE: (DONE flag, context, extents)."""
    out = []
    while True:
        flags, kind, got, payload = wire.chunk()
        assert (kind, got) == (CHUNK_BLOCK_STATUS, cookie), (kind, payload)
        extents = [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]
        out.append((flags & 1, struct.unpack(">I", payload[:4])[0], extents))
        if flags & 1:
            return out


async def open_logged_vbd(image: str, log: Path) -> VBD:
    log.write_bytes(cbt.CbtLog.new(SIZE).encode())
    vbd = VBD(0)
    await vbd.open(ImageSpec("aio", image), OpenOptions(), [LogSlot(str(log)).opener()])
    return vbd


def test_dirty_bitmap_context_listed_selected_and_reported(image: str, tmp_path: Path) -> None:
    async def body() -> None:
        vbd = await open_logged_vbd(image, tmp_path / "vm1.cbtlog")
        h = Harness(vbd)
        try:
            list_ = OPT_LIST_META_CONTEXT
            wire = await h.negotiate(
                option(OPT_STRUCTURED_REPLY), meta_queries(list_),
                meta_queries(list_, b"qemu:"), meta_queries(list_, b"qemu:dirty-bitmap:"),
                meta_queries(list_, b"base:"), meta_queries(list_, b"qemu:dirty-bitmap:vm2"),
                meta_queries(OPT_SET_META_CONTEXT, b"qemu:dirty-bitmap:other"),
                meta_queries(OPT_SET_META_CONTEXT, BITMAP, b"base:allocation"))
            assert wire.option_reply()[:2] == (OPT_STRUCTURED_REPLY, REP_ACK)
            assert contexts(wire, list_) == [(0, b"base:allocation"), (0, BITMAP)]
            assert contexts(wire, list_) == [(0, BITMAP)]
            assert contexts(wire, list_) == [(0, BITMAP)]
            assert contexts(wire, list_) == [(0, b"base:allocation")]
            assert contexts(wire, list_) == []
            assert contexts(wire, OPT_SET_META_CONTEXT) == []
            chosen = {name: cid for cid, name in contexts(wire, OPT_SET_META_CONTEXT)}
            assert set(chosen) == {b"base:allocation", BITMAP}
            assert len(set(chosen.values())) == 2 and wire.rest() == 0
            h.send(go())
            await h.settle()
            h.take().go_replies()

            # Writes: block 1 whole, a byte in block 3, blocks 5-6 (unaligned), the last.
            writes = [(BLOCK64, BLOCK64), (3 * BLOCK64 + 100, 1),
                      (5 * BLOCK64 + 10, BLOCK64), (SIZE - 512, 512)]
            for cookie, (offset, length) in enumerate(writes, 10):
                h.send(request(WRITE, cookie, offset, length, payload=pattern(cookie, length)))
            await h.settle()
            wire = h.take()
            done = sorted(wire.simple()[:2] for _ in writes)  # in any order
            assert done == [(0, c) for c in range(10, 10 + len(writes))]
            dirty = {1, 3, 5, 6, SIZE // BLOCK64 - 1}

            h.send(request(BLOCK_STATUS, 20, 0, SIZE))
            await h.settle()
            (d1, c1, alloc), (d2, c2, bits) = status_chunks(h.take(), 20)
            assert (d1, c1, d2, c2) == (0, chosen[b"base:allocation"], 1, chosen[BITMAP])
            assert sum(n for n, _ in alloc) <= SIZE
            assert bits == [(BLOCK64, 0), (BLOCK64, 1), (BLOCK64, 0), (BLOCK64, 1),
                            (BLOCK64, 0), (2 * BLOCK64, 1), (SIZE - 8 * BLOCK64, 0),
                            (BLOCK64, 1)]
            pos = 0
            for n, flag in bits:
                assert bool(flag) == all(b in dirty for b in range(pos // BLOCK64,
                                                                   (pos + n) // BLOCK64))
                pos += n

            # Clipped to the request at both ends, block boundaries in between.
            h.send(request(BLOCK_STATUS, 21, BLOCK64 + 7, 2 * BLOCK64 + 9))
            await h.settle()
            bits = status_chunks(h.take(), 21)[1][2]
            assert bits == [(BLOCK64 - 7, 1), (BLOCK64, 0), (16, 1)]

            # REQ_ONE: one extent per context, within the request.
            h.send(request(BLOCK_STATUS, 22, 5 * BLOCK64 + 1, 1000, flags=CMD_REQ_ONE)
                   + request(BLOCK_STATUS, 23, 7 * BLOCK64, 3 * BLOCK64, flags=CMD_REQ_ONE)
                   + request(BLOCK_STATUS, 24, 0, 4 * BLOCK64, flags=CMD_REQ_ONE))
            await h.settle()
            wire = h.take()
            replies: dict[int, list[tuple[int, tuple[int, int]]]] = {}
            for _ in range(3):
                flags, kind, cookie, payload = wire.chunk()
                assert kind == CHUNK_BLOCK_STATUS and len(payload) == 4 + 8
                replies.setdefault(cookie, []).append(
                    (struct.unpack(">I", payload[:4])[0], struct.unpack(">II", payload[4:])))
                if not flags & 1:
                    flags, kind, got, payload = wire.chunk()
                    assert got == cookie and flags & 1 and len(payload) == 4 + 8
                    replies[cookie].append((struct.unpack(">I", payload[:4])[0],
                                            struct.unpack(">II", payload[4:])))
            mine = {c: dict(r)[chosen[BITMAP]] for c, r in replies.items()}
            assert mine == {22: (1000, 1), 23: (3 * BLOCK64, 0), 24: (BLOCK64, 0)}
            assert wire.rest() == 0
        finally:
            h.conn.abort()
            await h.settle()
            await vbd.close()

    run(body)


def test_dirty_bitmap_context_alone_and_without_a_log(image: str, tmp_path: Path) -> None:
    async def body() -> None:
        vbd = await open_logged_vbd(image, tmp_path / "vm1.cbtlog")
        plain = await open_vbd(image)
        h = Harness(vbd)
        h2 = Harness(plain)
        try:
            await h.negotiate(option(OPT_STRUCTURED_REPLY),
                              meta_queries(OPT_SET_META_CONTEXT, BITMAP), go())
            h.send(request(WRITE, 1, 2 * BLOCK64, 512, payload=bytes(512)))
            await h.settle()
            assert h.take().simple() == (0, 1, b"")  # acknowledged: its bit is seen
            h.send(request(BLOCK_STATUS, 2, 0, 4 * BLOCK64))
            await h.settle()
            wire = h.take()
            ((done, cid, bits),) = status_chunks(wire, 2)  # one chunk: the bitmap's
            assert done == 1 and cid != 0
            assert bits == [(2 * BLOCK64, 0), (BLOCK64, 1), (BLOCK64, 0)]

            # A VBD without a log offers no bitmap: none listed, none selected.
            wire = await h2.negotiate(option(OPT_STRUCTURED_REPLY),
                                      meta_queries(OPT_LIST_META_CONTEXT),
                                      meta_queries(OPT_SET_META_CONTEXT, BITMAP), go())
            assert wire.option_reply()[:2] == (OPT_STRUCTURED_REPLY, REP_ACK)
            assert contexts(wire, OPT_LIST_META_CONTEXT) == [(0, b"base:allocation")]
            assert contexts(wire, OPT_SET_META_CONTEXT) == []
            wire.go_replies()
            h2.send(request(BLOCK_STATUS, 3, 0, BLOCK64))
            await h2.settle()
            _, kind, cookie, payload = h2.take().chunk()
            assert (kind, cookie) == (CHUNK_ERROR, 3)
            assert struct.unpack(">I", payload[:4])[0] == EINVAL
        finally:
            for x in (h, h2):
                x.conn.abort()
                await x.settle()
            await vbd.close()
            await plain.close()

    run(body)
