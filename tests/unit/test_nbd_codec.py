"""The sans-IO NBD server codec, driven by a client built by hand with struct.

Every input is fed whole, byte by byte and in uneven pieces, and with trailing data.
"""

from __future__ import annotations

import ast
import errno
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import blktap.proto.nbd as nbd
from blktap.errors import ProtocolError
from blktap.proto.nbd import (
    Aborted,
    Command,
    Event,
    ExportInfo,
    Negotiated,
    Request,
    ServerCodec,
    State,
)

# The wire, written out independently of the codec (doc/proto.md of NetworkBlockDevice/nbd).
MAGIC = 0x4E42444D41474943
OPTS = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
C_FIXED, C_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_SR, OPT_LIST_META, OPT_SET_META, OPT_EXT_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_TOO_BIG = 2**31 + 1, 2**31 + 3, 2**31 + 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_ZEROES, CMD_STATUS = range(8)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
SIZE = 1 << 30

Feeder = Callable[[ServerCodec, bytes], list[object]]


def feed_whole(codec: ServerCodec, data: bytes) -> list[object]:
    return list(codec.feed(data))


def feed_bytewise(codec: ServerCodec, data: bytes) -> list[object]:
    events: list[object] = []
    for i in range(len(data)):
        events.extend(codec.feed(data[i : i + 1]))
    return events


def feed_uneven(codec: ServerCodec, data: bytes) -> list[object]:
    events: list[object] = []
    pos, step = 0, 1
    while pos < len(data):
        events.extend(codec.feed(data[pos : pos + step]))
        pos += step
        step = step * 3 % 41 + 1
    return events


FEEDERS = [feed_whole, feed_bytewise, feed_uneven]
feeders = pytest.mark.parametrize("feed", FEEDERS, ids=["whole", "bytewise", "uneven"])


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", OPTS, option, len(data)) + data


def info_data(name: bytes = b"", requests: tuple[int, ...] = ()) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def meta_data(queries: list[bytes], name: bytes = b"") -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def req(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length)


def option_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Split the server's output into (option, reply type, data)."""
    replies = []
    pos = 0
    while pos < len(out):
        magic, option, rtype, length = struct.unpack_from(">QIII", out, pos)
        assert magic == REP_MAGIC
        pos += 20
        replies.append((option, rtype, bytes(out[pos : pos + length])))
        pos += length
    return replies


def take(codec: ServerCodec) -> bytes:
    out = bytes(codec.output)
    codec.output.clear()
    return out


def new(read_only: bool = False, description: str = "") -> ServerCodec:
    return ServerCodec(ExportInfo(SIZE, read_only=read_only, description=description))


def negotiate(structured: bool = True, meta: bool = True, read_only: bool = False) -> ServerCodec:
    codec = new(read_only)
    data = struct.pack(">I", C_FIXED | C_NO_ZEROES)
    if structured:
        data += opt(OPT_SR)
        if meta:
            data += opt(OPT_SET_META, meta_data([b"base:allocation"]))
    data += opt(OPT_GO, info_data())
    events = codec.feed(data)
    assert isinstance(events[-1], Negotiated)
    take(codec)
    return codec


# ------------------------------------------------------------------- handshake
def test_greeting() -> None:
    assert new().greeting() == struct.pack(">QQH", MAGIC, OPTS, 3)


@pytest.mark.parametrize("flags", [0, C_NO_ZEROES, 4, C_FIXED | 8, 0x80000000])
def test_bad_client_flags_are_refused(flags: int) -> None:
    codec = new()
    with pytest.raises(ProtocolError) as info:
        codec.feed(struct.pack(">I", flags))
    assert info.value.remote
    assert codec.state is State.FAILED
    with pytest.raises(ProtocolError):
        codec.feed(b"x")


@feeders
@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(feed: Feeder, no_zeroes: bool) -> None:
    codec = new()
    flags = C_FIXED | (C_NO_ZEROES if no_zeroes else 0)
    trailing = req(CMD_FLUSH, cookie=7)
    events = feed(codec, struct.pack(">I", flags) + opt(OPT_EXPORT_NAME, b"anything") + trailing)
    assert len(events) == 2
    neg = events[0]
    assert isinstance(neg, Negotiated)
    assert neg.export_name == "anything" and not neg.structured and not neg.base_allocation
    assert events[1] == Request(Command.FLUSH, 0, 7, 0, 0)
    out = take(codec)
    size, tflags = struct.unpack_from(">QH", out)
    assert size == SIZE
    assert tflags == neg.transmission_flags
    assert tflags & 1 and not tflags & (1 << 7)  # HAS_FLAGS; no DF without structured
    assert out[10:] == (b"" if no_zeroes else bytes(124))


def test_transmission_flags_read_write_and_read_only() -> None:
    rw = negotiate(structured=True).transmission_flags
    expected = 1 | 4 | 8 | 32 | 64 | 128 | 256 | 1024 | 2048
    assert rw == expected
    ro = negotiate(structured=False, read_only=True).transmission_flags
    assert ro == 1 | 2 | 4 | 256 | 1024


def test_export_capabilities_gate_flags_commands_and_contexts() -> None:
    """What the stack cannot do (blktap.block.capabilities, via ExportInfo) is neither
    advertised nor served: the commands get EINVAL, the context is not offered."""
    export = ExportInfo(SIZE, flush=False, trim=False, zero=False, multi_conn=False,
                        block_status=False)
    codec = ServerCodec(export)
    data = (struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(OPT_SR)
            + opt(OPT_LIST_META, meta_data([]))
            + opt(OPT_SET_META, meta_data([b"base:allocation"])) + opt(OPT_GO, info_data()))
    events = codec.feed(data)
    assert isinstance(events[-1], Negotiated)
    replies = option_replies(take(codec))
    assert not [r for r in replies if r[1] == REP_META]  # neither listed nor selected
    assert codec.transmission_flags == 1 | 128 | 1024  # HAS_FLAGS, SEND_DF, SEND_CACHE
    bad = [req(CMD_FLUSH, 1), req(CMD_TRIM, 2, 0, 512), req(CMD_ZEROES, 3, 0, 512),
           req(CMD_STATUS, 4, 0, 512), req(CMD_WRITE, 5, 0, 4, F_FUA) + b"abcd"]
    assert codec.feed(b"".join(bad) + req(CMD_READ, 6, 0, 512)) == [
        Request(Command.READ, 0, 6, 0, 512)]
    errors = [(cookie, struct.unpack_from(">I", payload)[0])
              for _flags, _rtype, cookie, payload in chunks(take(codec))]
    assert errors == [(1, 22), (2, 22), (3, 22), (4, 22), (5, 22)]


@feeders
def test_abort(feed: Feeder) -> None:
    codec = new()
    events = feed(codec, struct.pack(">I", C_FIXED) + opt(OPT_ABORT))
    assert events == [Aborted()]
    assert option_replies(take(codec)) == [(OPT_ABORT, REP_ACK, b"")]
    assert codec.state is State.CLOSED
    assert codec.feed(opt(OPT_GO, info_data())) == []


@feeders
def test_list(feed: Feeder) -> None:
    codec = new()
    events = feed(codec, struct.pack(">I", C_FIXED) + opt(OPT_LIST) + opt(OPT_LIST, b"x"))
    assert events == []
    assert option_replies(take(codec)) == [
        (OPT_LIST, REP_SERVER, b"\0\0\0\0"),
        (OPT_LIST, REP_ACK, b""),
        (OPT_LIST, ERR_INVALID, b"NBD_OPT_LIST takes no data"),
    ]
    assert codec.state is State.OPTIONS


@feeders
@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_info_and_go(feed: Feeder, option: int) -> None:
    codec = new(description="minor 3")
    data = struct.pack(">I", C_FIXED) + opt(option, info_data(b"disk", (3, 1, 2, 77)))
    if option == OPT_GO:
        data += req(CMD_READ, cookie=9, length=512)
    events = feed(codec, data)
    replies = option_replies(take(codec))
    assert [r[:2] for r in replies] == [(option, REP_INFO)] * 4 + [(option, REP_ACK)]
    infos = {struct.unpack_from(">H", r[2])[0]: r[2][2:] for r in replies[:-1]}
    flags = struct.unpack(">QH", infos[0])[1]
    assert struct.unpack(">QH", infos[0])[0] == SIZE
    assert struct.unpack(">III", infos[3]) == (1, 4096, 32 * 1024 * 1024)
    assert infos[1] == b"disk"
    assert infos[2] == b"minor 3"
    if option == OPT_GO:
        assert isinstance(events[0], Negotiated)
        assert events[0].export_name == "disk"
        assert events[0].transmission_flags == flags
        assert events[1] == Request(Command.READ, 0, 9, 0, 512)
    else:
        assert events == []
        assert codec.state is State.OPTIONS
        assert take(codec) == b""


def test_info_without_requests_sends_only_export() -> None:
    codec = new()
    codec.feed(struct.pack(">I", C_FIXED) + opt(OPT_INFO, info_data()))
    replies = option_replies(take(codec))
    assert [r[1] for r in replies] == [REP_INFO, REP_ACK]
    assert len(replies[0][2]) == 12


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0\0\0",
        struct.pack(">I", 10) + b"ab" + b"\0\0",  # name runs past the end
        info_data(b"x", (3,)) + b"\0",  # trailing byte
        info_data(b"x", (3,))[:-1],  # request count too big for the data
        struct.pack(">I", 5000) + bytes(5000) + b"\0\0",  # name too long
    ],
)
@pytest.mark.parametrize("option", [OPT_INFO, OPT_GO])
def test_info_bad_lengths(option: int, data: bytes) -> None:
    codec = new()
    assert codec.feed(struct.pack(">I", C_FIXED) + opt(option, data)) == []
    [(o, rtype, _msg)] = option_replies(take(codec))
    assert (o, rtype) == (option, ERR_INVALID)
    assert codec.state is State.OPTIONS


@feeders
def test_structured_reply_option(feed: Feeder) -> None:
    codec = new()
    feed(codec, struct.pack(">I", C_FIXED) + opt(OPT_SR, b"x") + opt(OPT_SR))
    replies = option_replies(take(codec))
    assert [r[:2] for r in replies] == [(OPT_SR, ERR_INVALID), (OPT_SR, REP_ACK)]
    assert codec.structured


@pytest.mark.parametrize("option", [OPT_LIST_META, OPT_SET_META])
def test_meta_context_needs_structured_replies(option: int) -> None:
    codec = new()
    codec.feed(struct.pack(">I", C_FIXED) + opt(option, meta_data([b"base:allocation"])))
    [(_o, rtype, _m)] = option_replies(take(codec))
    assert rtype == ERR_INVALID
    assert not codec.base_allocation


@feeders
def test_list_meta_context(feed: Feeder) -> None:
    codec = new()
    data = struct.pack(">I", C_FIXED) + opt(OPT_SR)
    data += opt(OPT_LIST_META, meta_data([]))
    data += opt(OPT_LIST_META, meta_data([b"base:"]))
    data += opt(OPT_LIST_META, meta_data([b"qemu:dirty-bitmap:x"]))
    feed(codec, data)
    replies = option_replies(take(codec))[1:]
    ctx = struct.pack(">I", 0) + b"base:allocation"
    assert replies == [
        (OPT_LIST_META, REP_META, ctx), (OPT_LIST_META, REP_ACK, b""),
        (OPT_LIST_META, REP_META, ctx), (OPT_LIST_META, REP_ACK, b""),
        (OPT_LIST_META, REP_ACK, b""),
    ]
    assert not codec.base_allocation


@feeders
def test_set_meta_context(feed: Feeder) -> None:
    codec = new()
    data = struct.pack(">I", C_FIXED) + opt(OPT_SR)
    data += opt(OPT_SET_META, meta_data([b"other:thing", b"base:allocation"], b"exp"))
    feed(codec, data)
    replies = option_replies(take(codec))[1:]
    assert replies == [(OPT_SET_META, REP_META, struct.pack(">I", 1) + b"base:allocation"),
                       (OPT_SET_META, REP_ACK, b"")]
    assert codec.base_allocation
    # A later SET replaces the selection.
    codec.feed(opt(OPT_SET_META, meta_data([b"other:thing"])))
    assert option_replies(take(codec)) == [(OPT_SET_META, REP_ACK, b"")]
    assert not codec.base_allocation


@pytest.mark.parametrize(
    "data",
    [
        b"\0\0\0",
        struct.pack(">I", 3) + b"ab",
        meta_data([b"base:allocation"]) + b"\0",
        meta_data([b"base:allocation"])[:-1],
        struct.pack(">II", 0, 2) + struct.pack(">I", 1) + b"x",  # second query missing
        struct.pack(">II", 0, 1) + struct.pack(">I", 5000) + bytes(5000),
    ],
)
def test_meta_context_bad_lengths(data: bytes) -> None:
    codec = new()
    codec.feed(struct.pack(">I", C_FIXED) + opt(OPT_SR) + opt(OPT_SET_META, data))
    replies = option_replies(take(codec))
    assert replies[-1][:2] == (OPT_SET_META, ERR_INVALID)


@feeders
@pytest.mark.parametrize("option", [OPT_STARTTLS, OPT_EXT_HEADERS, 4, 12, 999, 2**32 - 1])
def test_unsupported_options_payload_is_discarded(feed: Feeder, option: int) -> None:
    codec = new()
    data = struct.pack(">I", C_FIXED) + opt(option, b"IHAVEOPT" * 9) + opt(OPT_LIST)
    assert feed(codec, data) == []
    replies = option_replies(take(codec))
    assert [r[:2] for r in replies] == [(option, ERR_UNSUP), (OPT_LIST, REP_SERVER),
                                        (OPT_LIST, REP_ACK)]


def test_option_too_long_is_refused_then_dropped() -> None:
    codec = new()
    with pytest.raises(ProtocolError):
        codec.feed(struct.pack(">I", C_FIXED) + struct.pack(">QII", OPTS, OPT_INFO, 1 << 20))
    assert option_replies(take(codec))[0][:2] == (OPT_INFO, ERR_TOO_BIG)


def test_export_name_too_long_is_dropped_without_reply() -> None:
    codec = new()
    with pytest.raises(ProtocolError):
        codec.feed(struct.pack(">I", C_FIXED) + opt(OPT_EXPORT_NAME, b"x" * 5000))
    assert take(codec) == b""


def test_bad_option_magic() -> None:
    codec = new()
    with pytest.raises(ProtocolError):
        codec.feed(struct.pack(">I", C_FIXED) + struct.pack(">QII", MAGIC, OPT_GO, 0))


def test_incomplete_option_waits() -> None:
    codec = new()
    data = struct.pack(">I", C_FIXED) + opt(OPT_GO, info_data(b"n"))
    assert codec.feed(data[:-1]) == []
    assert take(codec) == b""
    assert isinstance(codec.feed(data[-1:])[0], Negotiated)


# ---------------------------------------------------------------- transmission
@feeders
@pytest.mark.parametrize("structured", [False, True])
def test_every_command(feed: Feeder, structured: bool) -> None:
    codec = negotiate(structured=structured)
    payload = bytes(range(256)) * 16
    data = (
        req(CMD_READ, 1, 4096, 512, F_FUA)
        + req(CMD_WRITE, 2, 8192, len(payload), F_FUA) + payload
        + req(CMD_FLUSH, 3)
        + req(CMD_TRIM, 4, 0, 1 << 31, F_FUA)
        + req(CMD_CACHE, 5, 0, 65536)
        + req(CMD_ZEROES, 6, 512, 1024, F_NO_HOLE | F_FAST_ZERO | F_FUA)
        + req(CMD_WRITE, 7, 0, 0)
        + req(CMD_READ, 8, 0, 0)
    )
    if structured:
        data += req(CMD_STATUS, 9, 0, 1 << 31, F_REQ_ONE) + req(CMD_READ, 10, 0, 4096, F_DF)
    data += req(CMD_DISC, 11) + b"ignored after DISC"
    events = feed(codec, data)
    assert take(codec) == b""
    write = events[1]
    assert isinstance(write, Request) and write.data is not None
    assert bytes(write.data) == payload
    expected = [
        Request(Command.READ, F_FUA, 1, 4096, 512),
        Request(Command.WRITE, F_FUA, 2, 8192, len(payload), write.data),
        Request(Command.FLUSH, 0, 3, 0, 0),
        Request(Command.TRIM, F_FUA, 4, 0, 1 << 31),
        Request(Command.CACHE, 0, 5, 0, 65536),
        Request(Command.WRITE_ZEROES, F_NO_HOLE | F_FAST_ZERO | F_FUA, 6, 512, 1024),
        Request(Command.WRITE, 0, 7, 0, 0, getattr(events[6], "data", None)),
        Request(Command.READ, 0, 8, 0, 0),
    ]
    if structured:
        expected += [Request(Command.BLOCK_STATUS, F_REQ_ONE, 9, 0, 1 << 31),
                     Request(Command.READ, F_DF, 10, 0, 4096)]
    expected.append(Request(Command.DISC, 0, 11, 0, 0))
    assert events == expected
    assert codec.state is State.CLOSED
    assert codec.feed(req(CMD_READ)) == []


def recording_alloc() -> tuple[list[memoryview], Callable[[int], memoryview]]:
    """A payload allocator for the codec that records every buffer it hands out."""
    given: list[memoryview] = []

    def alloc(n: int) -> memoryview:
        buf = memoryview(bytearray(n))
        given.append(buf)
        return buf

    return given, alloc


def test_write_payload_goes_into_alloc_buffers() -> None:
    given, alloc = recording_alloc()
    codec = ServerCodec(ExportInfo(SIZE), alloc)
    codec.feed(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(OPT_EXPORT_NAME))
    [ev] = codec.feed(req(CMD_WRITE, 1, 0, 3) + b"abc")
    assert isinstance(ev, Request)
    assert ev.data is given[0]
    assert codec.payload_pending == 0
    assert codec.feed(req(CMD_WRITE, 2, 0, 4) + b"ab") == []
    assert codec.payload_pending == 2


def test_between_requests_only_with_nothing_of_a_request_buffered() -> None:
    _given, alloc = recording_alloc()
    codec = ServerCodec(ExportInfo(SIZE), alloc)
    assert not codec.between_requests  # still negotiating
    codec.feed(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(OPT_EXPORT_NAME))
    assert codec.between_requests
    head = req(CMD_WRITE, 1, 0, 4)
    assert codec.feed(head[:10]) == [] and not codec.between_requests  # part of a header
    assert codec.feed(head[10:] + b"ab") == [] and not codec.between_requests  # payload
    [ev] = codec.feed(b"cd")
    assert isinstance(ev, Request) and codec.between_requests
    # The payload of a WRITE refused for its flags is skipped: not between requests
    # until all of it is.
    codec.feed(req(CMD_WRITE, 2, 0, 8, flags=0x8000) + b"abc")
    assert not codec.between_requests and codec.output
    codec.feed(b"defgh")
    assert codec.between_requests


def test_feed_partial_and_feed_request_read_a_stream_as_feed_does() -> None:
    """The way a server reads requests itself between the codec's (feed_partial for a
    request an earlier read left incomplete, feed_request for one request whose header is
    whole): split at every byte, the same events and replies as one feed."""
    def session() -> ServerCodec:
        codec = ServerCodec(ExportInfo(SIZE), lambda n: memoryview(bytearray(n)))
        codec.feed(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(OPT_EXPORT_NAME))
        codec.output.clear()
        return codec

    def shape(events: list[Event]) -> list[tuple[object, ...]]:
        return [(e.command, e.flags, e.cookie, e.offset, e.length,
                 None if e.data is None else bytes(e.data)) for e in events
                if isinstance(e, Request)]

    stream = (req(CMD_READ, 1, 0, 4096) + req(CMD_WRITE, 2, 512, 5) + b"hello"
              + req(CMD_WRITE, 3, 0, 4, flags=0x8000) + b"skip"  # refused, payload skipped
              + req(CMD_FLUSH, 4) + req(99, 5) + req(CMD_WRITE, 6, 1024, 3) + b"end")
    whole = session()
    expected = shape(whole.feed(stream))
    expected_output = bytes(whole.output)
    for cut in range(1, len(stream)):
        codec = session()
        events: list[Event] = []
        for part in (stream[:cut], stream[cut:]):
            got, pos = codec.feed_partial(part)
            events += got
            while pos < len(part):
                if len(part) - pos < 28:  # the start of a header: the codec keeps it
                    events += codec.feed(part[pos:])
                    break
                got, pos = codec.feed_request(part, pos)
                events += got
        assert shape(events) == expected, cut
        assert bytes(codec.output) == expected_output, cut
        assert codec.between_requests


def test_borrowed_payloads_are_views_of_the_fed_bytes_unless_split() -> None:
    given, alloc = recording_alloc()
    codec = ServerCodec(ExportInfo(SIZE), alloc, borrow_payloads=True)
    codec.feed(struct.pack(">I", C_FIXED | C_NO_ZEROES) + opt(OPT_EXPORT_NAME))
    received = bytearray(req(CMD_WRITE, 1, 0, 3) + b"abc" + req(CMD_WRITE, 2, 512, 2) + b"xy")
    first, second = codec.feed(memoryview(received))
    assert isinstance(first, Request) and isinstance(second, Request)
    assert first.data is not None and second.data is not None
    assert bytes(first.data) == b"abc" and bytes(second.data) == b"xy"
    assert first.data.obj is received and second.data.obj is received  # lent, no copy
    assert not given
    # A payload that is not whole in one feed is gathered in a buffer of the codec's.
    assert codec.feed(req(CMD_WRITE, 3, 0, 4) + b"ab") == []
    [third] = codec.feed(b"cd")
    assert isinstance(third, Request) and third.data is given[0]
    assert bytes(third.data) == b"abcd"


def simple_replies(out: bytes) -> list[tuple[int, int]]:
    """(error, cookie) of each simple reply in ``out``."""
    res = []
    for pos in range(0, len(out), 16):
        magic, error, cookie = struct.unpack_from(">IIQ", out, pos)
        assert magic == SIMPLE_MAGIC
        res.append((error, cookie))
    return res


def chunks(out: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, cookie, payload) of each structured chunk in ``out``."""
    res = []
    pos = 0
    while pos < len(out):
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", out, pos)
        assert magic == CHUNK_MAGIC
        pos += 20
        res.append((flags, rtype, cookie, bytes(out[pos : pos + length])))
        pos += length
    return res


BAD_REQUESTS = [
    pytest.param(req(9, 1), id="resize"),
    pytest.param(req(42, 1), id="unknown"),
    pytest.param(req(CMD_READ, 1, 0, 512, F_NO_HOLE), id="read-no-hole"),
    pytest.param(req(CMD_READ, 1, 0, 512, F_DF), id="df-without-structured"),
    pytest.param(req(CMD_READ, 1, 0, (32 << 20) + 1), id="read-too-long"),
    pytest.param(req(CMD_FLUSH, 1, 0, 0, F_REQ_ONE), id="flush-req-one"),
    pytest.param(req(CMD_TRIM, 1, 0, 512, F_FAST_ZERO), id="trim-fast-zero"),
    pytest.param(req(CMD_ZEROES, 1, 0, 512, F_REQ_ONE), id="zeroes-req-one"),
    pytest.param(req(CMD_STATUS, 1, 0, 512), id="status-without-context"),
    pytest.param(req(CMD_CACHE, 1, 0, 512, 1 << 15), id="unknown-flag"),
    pytest.param(req(CMD_WRITE, 1, 0, 5, F_DF) + b"12345", id="write-df"),
    pytest.param(req(CMD_READ, 1, 0, 512, 32), id="payload-len"),
]


@feeders
@pytest.mark.parametrize("bad", BAD_REQUESTS)
def test_bad_requests_get_einval_and_the_connection_goes_on(feed: Feeder, bad: bytes) -> None:
    codec = negotiate(structured=False)
    events = feed(codec, bad + req(CMD_FLUSH, 2) + req(CMD_READ, 3, 0, 10)[:20])
    assert events == [Request(Command.FLUSH, 0, 2, 0, 0)]
    assert simple_replies(take(codec)) == [(22, 1)]
    assert codec.feed(req(CMD_READ, 3, 0, 10)[20:]) == [Request(Command.READ, 0, 3, 0, 10)]


@pytest.mark.parametrize("bad", BAD_REQUESTS[:3] + BAD_REQUESTS[4:5])
def test_bad_requests_structured_error_chunk(bad: bytes) -> None:
    codec = negotiate(structured=True, meta=False)
    events = codec.feed(bad)
    assert events == []
    [(flags, rtype, cookie, payload)] = chunks(take(codec))
    assert (flags, rtype, cookie) == (1, 2**15 + 1, 1)
    err, msglen = struct.unpack_from(">IH", payload)
    assert err == 22 and msglen == len(payload) - 6 and msglen > 0


def test_write_too_long_gets_error_then_protocol_error() -> None:
    codec = negotiate(structured=False)
    with pytest.raises(ProtocolError):
        codec.feed(req(CMD_WRITE, 5, 0, (32 << 20) + 1) + b"x" * 100)
    assert simple_replies(take(codec)) == [(22, 5)]
    assert codec.state is State.FAILED


@feeders
def test_bad_request_magic(feed: Feeder) -> None:
    codec = negotiate()
    bad = struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512)
    with pytest.raises(ProtocolError) as info:
        feed(codec, req(CMD_FLUSH) + bad)
    assert info.value.remote
    with pytest.raises(ProtocolError):
        codec.feed(req(CMD_FLUSH))


def test_many_requests_per_feed_and_split_headers() -> None:
    codec = negotiate()
    data = b"".join(req(CMD_READ, i, i * 4096, 4096) for i in range(1000))
    events = codec.feed(data[:10000]) + codec.feed(data[10000:])
    assert [e.cookie for e in events if isinstance(e, Request)] == list(range(1000))


# --------------------------------------------------------------------- replies
def test_reply_read_simple_does_not_copy() -> None:
    codec = negotiate(structured=False)
    buf = memoryview(bytearray(b"data"))
    head, body = codec.reply_read(77, 4096, buf)
    assert body is buf
    assert struct.unpack(">IIQ", head) == (SIMPLE_MAGIC, 0, 77)


def test_reply_read_structured() -> None:
    codec = negotiate(structured=True)
    buf = memoryview(bytearray(b"data"))
    head, body = codec.reply_read(77, 4096, buf)
    assert body is buf
    assert struct.unpack(">IHHQIQ", head) == (CHUNK_MAGIC, 1, 1, 77, 12, 4096)
    [none] = codec.reply_read(78, 0, memoryview(b""))
    assert chunks(bytes(none)) == [(1, 0, 78, b"")]


def test_reply_ok_and_errors() -> None:
    simple = negotiate(structured=False)
    assert simple_replies(simple.reply_ok(5)) == [(0, 5)]
    assert simple_replies(simple.reply_error(5, errno.ENOSPC, "full")) == [(28, 5)]
    assert simple_replies(simple.reply_error(5, errno.EROFS, read=True)) == [(1, 5)]
    structured = negotiate(structured=True)
    assert simple_replies(structured.reply_ok(6)) == [(0, 6)]
    [(flags, rtype, cookie, payload)] = chunks(structured.reply_error(6, errno.EIO, "bad é"))
    assert (flags, rtype, cookie) == (1, 2**15 + 1, 6)
    assert payload == struct.pack(">IH", 5, 6) + "bad é".encode()
    long = chunks(structured.reply_error(6, errno.EIO, "x" * 10000))[0][3]
    assert struct.unpack_from(">IH", long) == (5, 4096)


@pytest.mark.parametrize(
    ("err", "wire"),
    [(errno.EPERM, 1), (errno.EIO, 5), (errno.ENOMEM, 12), (errno.EINVAL, 22),
     (errno.ENOSPC, 28), (errno.EOVERFLOW, 75), (errno.ENOTSUP, 95), (errno.ESHUTDOWN, 108),
     (errno.EROFS, 1), (errno.EDQUOT, 28), (errno.ENOENT, 5), (errno.EBUSY, 5), (0, 5),
     (12345, 5)],
)
def test_errno_mapping(err: int, wire: int) -> None:
    assert nbd.nbd_error(err) == wire


def status_extents(out: bytes) -> tuple[int, list[tuple[int, int]]]:
    [(flags, rtype, _cookie, payload)] = chunks(out)
    assert (flags, rtype) == (1, 5)
    ctx = struct.unpack_from(">I", payload)[0]
    body = payload[4:]
    return ctx, [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]


def test_reply_block_status() -> None:
    codec = negotiate()
    ctx, exts = status_extents(codec.reply_block_status(3, 100, [(10, 0), (0, 3), (90, 3)],
                                                       False))
    assert ctx == 1 and exts == [(10, 0), (90, 3)]
    # With REQ_ONE: one extent, no longer than the request.
    assert status_extents(codec.reply_block_status(3, 50, [(100, 0)], True))[1] == [(50, 0)]
    assert status_extents(codec.reply_block_status(3, 50, [(10, 0), (40, 3)], True))[1] == [
        (10, 0)]
    # Never past the request; capped at MAX_STATUS_EXTENTS.
    assert status_extents(codec.reply_block_status(3, 15, [(10, 0), (10, 3), (10, 0)],
                                                   False))[1] == [(10, 0), (5, 3)]
    many = [(1, i % 2) for i in range(10000)]
    assert len(status_extents(codec.reply_block_status(3, 10000, many, False))[1]) == (
        nbd.MAX_STATUS_EXTENTS)
    with pytest.raises(ValueError):
        codec.reply_block_status(3, 10, [(0, 0)], False)


def test_proto_module_imports_no_io() -> None:
    tree = ast.parse(Path(nbd.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"socket", "os", "asyncio", "select", "selectors", "io", "subprocess",
                        "threading", "mmap"}


def test_payload_can_be_received_in_place() -> None:
    codec = negotiate(structured=False)
    assert codec.payload_buffer() is None
    assert codec.feed(req(CMD_WRITE, 4, 512, 10) + b"abc") == []
    rest = codec.payload_buffer()
    assert rest is not None and len(rest) == 7
    rest[:4] = b"defg"
    assert codec.payload_received(4) == []
    rest = codec.payload_buffer()
    assert rest is not None and len(rest) == 3
    rest[:] = b"hij"
    [ev] = codec.payload_received(3)
    assert isinstance(ev, Request) and ev.data is not None
    assert (ev.command, ev.cookie, ev.offset, bytes(ev.data)) == (
        Command.WRITE, 4, 512, b"abcdefghij")
    assert codec.payload_buffer() is None
    assert codec.feed(req(CMD_FLUSH, 5)) == [Request(Command.FLUSH, 0, 5, 0, 0)]


def test_feed_does_not_keep_views_of_the_input() -> None:
    codec = negotiate(structured=False)
    buf = bytearray(req(CMD_READ, 1, 0, 512) + req(CMD_FLUSH, 2)[:10])
    assert codec.feed(memoryview(buf)) == [Request(Command.READ, 0, 1, 0, 512)]
    tail = req(CMD_FLUSH, 2)
    buf[:] = bytes(len(buf))  # the caller reuses its buffer
    assert codec.feed(memoryview(bytearray(tail[10:]))) == [Request(Command.FLUSH, 0, 2, 0, 0)]
