"""Property tests of the NBD server codec: malformed input only ever raises ProtocolError,
and how the input is split never changes what the codec sees."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from blktap.errors import ProtocolError
from blktap.proto.nbd import Command, ExportInfo, Negotiated, Request, ServerCodec, State

OPTS = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", OPTS, option, len(data)) + data


def negotiated(structured: bool) -> ServerCodec:
    codec = ServerCodec(ExportInfo(1 << 20))
    data = struct.pack(">I", 3)
    if structured:
        meta = struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
        data += opt(8) + opt(10, meta)
    data += opt(7, struct.pack(">IH", 0, 0))
    assert isinstance(codec.feed(data)[-1], Negotiated)
    codec.output.clear()
    return codec


def feed_pieces(codec: ServerCodec, data: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    pos = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        events.extend(codec.feed(data[pos:cut]))
        pos = cut
    return events


@settings(max_examples=400)
@given(st.booleans(), st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_garbage_after_handshake_gives_events_or_protocol_error(
    structured: bool, garbage: bytes, cuts: list[int]
) -> None:
    codec = negotiated(structured)
    try:
        events = feed_pieces(codec, garbage, cuts)
    except ProtocolError as exc:
        assert exc.remote
        assert codec.state is State.FAILED
        return
    for ev in events:
        assert isinstance(ev, Request)
        assert ev.length >= 0 and ev.offset >= 0


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_garbage_handshake_gives_events_or_protocol_error(garbage: bytes, cuts: list[int]) -> None:
    codec = ServerCodec(ExportInfo(4096))
    try:
        feed_pieces(codec, struct.pack(">I", 1) + garbage, cuts)
    except ProtocolError as exc:
        assert exc.remote


@st.composite
def request_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int, int, int, bytes]]]:
    reqs = []
    data = b""
    for cookie in range(draw(st.integers(0, 20))):
        cmd = draw(st.sampled_from([0, 1, 3, 4, 5, 6, 7]))
        flags = {0: 0, 1: 1, 3: 0, 4: 1, 5: 0, 6: draw(st.sampled_from([0, 2, 16, 19])),
                 7: draw(st.sampled_from([0, 8]))}[cmd]
        offset = draw(st.integers(0, 2**63))
        payload = draw(st.binary(max_size=64)) if cmd == 1 else b""
        length = len(payload) if cmd == 1 else draw(st.integers(0, 1 << 25))
        reqs.append((cmd, flags, cookie, offset, payload))
        data += struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload
    return data, reqs


@settings(max_examples=300)
@given(request_streams(), st.lists(st.integers(0, 2000), max_size=10))
def test_valid_requests_survive_any_split(
    stream: tuple[bytes, list[tuple[int, int, int, int, bytes]]], cuts: list[int]
) -> None:
    data, reqs = stream
    codec = negotiated(structured=True)
    events = feed_pieces(codec, data, cuts)
    assert not codec.output
    assert len(events) == len(reqs)
    for ev, (cmd, flags, cookie, offset, payload) in zip(events, reqs, strict=True):
        assert isinstance(ev, Request)
        assert (ev.command, ev.flags, ev.cookie, ev.offset) == (Command(cmd), flags, cookie, offset)
        if cmd == 1:
            assert ev.data is not None and bytes(ev.data) == payload
