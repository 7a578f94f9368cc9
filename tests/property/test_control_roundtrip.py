"""Property tests of the control codec: round trips, and only ProtocolError on bad input."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from blktap.errors import ProtocolError
from blktap.proto import control as ctl
from blktap.proto.control import MessageType as T

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)


def _fits(text: str) -> bool:
    raw = text.encode("utf-8", "surrogateescape")
    return len(raw) < 256 and b"\0" not in raw


# Any byte string without NUL, as the surrogateescape text a decoded path would be.
wire_text = st.binary(max_size=255).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape")
)
text = st.one_of(wire_text, st.text(max_size=80).filter(_fits))

params = st.builds(
    ctl.Params,
    flags=st.integers(0, 0x7FF).map(ctl.OpenFlag),
    devnum=u32,
    domid=u32,
    path=text,
    prt_devnum=u32,
    req_timeout=u16,
    secondary=text,
)

payload_for: dict[T, st.SearchStrategy[ctl.Payload]] = {
    T.OPEN: params,
    T.RESUME: params,
    T.OPEN_RSP: st.builds(ctl.ImageInfoPayload, u64, u32, u32),
    T.DISK_INFO_RSP: st.builds(ctl.ImageInfoPayload, u64, u32, u32),
    T.ERROR: st.builds(ctl.ErrorPayload, i32, st.text(max_size=60).filter(_fits)),
    T.RUNTIME_ERROR: st.builds(ctl.ErrorPayload, i32, st.just("")),
    T.LIST_RSP: st.builds(ctl.ListPayload, i32, i32, i32, text),
    T.STATS_RSP: st.builds(ctl.StatsPayload, u16, u16, u64),
    T.PID_RSP: st.builds(ctl.PidPayload, i32),
    T.LIST_MINORS_RSP: st.builds(
        ctl.MinorsPayload, st.lists(i32, max_size=63).map(tuple)
    ),
    T.XENBLKIF_CONNECT: st.builds(ctl.RawPayload, st.binary(min_size=536, max_size=536)),
}


@st.composite
def messages(draw: st.DrawFn) -> ctl.Message:
    mtype = draw(st.sampled_from(list(T)))
    strategy = payload_for.get(mtype)
    payload = None if strategy is None else draw(strategy)
    return ctl.Message(mtype, draw(u16), payload)


@given(messages())
@settings(deadline=None)
def test_message_round_trip(msg: ctl.Message) -> None:
    raw = ctl.encode(msg)
    assert len(raw) == ctl.MESSAGE_SIZE
    assert ctl.decode(raw) == msg
    assert ctl.encode(ctl.decode(raw)) == raw


@given(messages())
@settings(deadline=None)
def test_header_layout(msg: ctl.Message) -> None:
    raw = ctl.encode(msg)
    assert struct.unpack_from("<HH", raw) == (int(msg.type), msg.cookie)
    assert raw[4:8] == bytes(4)


@given(st.binary(min_size=544, max_size=544))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = ctl.decode(data)
    except ProtocolError as exc:
        assert exc.errno > 0
        return
    assert isinstance(msg.type, T)


@given(st.integers(1, 30), u16, st.binary(min_size=536, max_size=536))
@settings(max_examples=500, deadline=None)
def test_valid_types_with_random_union(code: int, cookie: int, union: bytes) -> None:
    data = struct.pack("<HH4x", code, cookie) + union
    try:
        msg = ctl.decode(data)
    except ProtocolError:
        return
    assert msg.cookie == cookie and int(msg.type) == code
    # What decodes re-encodes to a message that decodes the same.
    assert ctl.decode(ctl.encode(msg)) == msg


@given(st.binary(max_size=2000))
@settings(deadline=None)
def test_readers_raise_only_protocol_error(data: bytes) -> None:
    reader = ctl.RequestReader()
    try:
        reader.feed(data)
        while reader.next_request() is not None:
            pass
        reader.eof()
    except ProtocolError:
        pass
    for kind in (T.LIST, T.STATS, T.OPEN):
        replies = ctl.ReplyReader(kind)
        try:
            replies.feed(data)
            replies.eof()
        except ProtocolError:
            pass


@given(
    params.map(lambda p: ctl.Params(
        flags=p.flags & ~(ctl.OpenFlag.ADD_LOG | ctl.OpenFlag.OPEN_ENCRYPTED), path=p.path
    )),
    st.one_of(st.none(), wire_text),
    st.one_of(st.none(), st.binary(min_size=1, max_size=128)),
    st.integers(1, 50),
)
@settings(deadline=None)
def test_request_framing_round_trip(
    base: ctl.Params, log_path: str | None, key: bytes | None, chunk: int
) -> None:
    flags = base.flags
    if log_path is not None:
        flags |= ctl.OpenFlag.ADD_LOG
    if key is not None:
        flags |= ctl.OpenFlag.OPEN_ENCRYPTED
    req = ctl.Request(
        ctl.Message(T.OPEN, 3, ctl.Params(flags=flags, path=base.path)), log_path, key
    )
    raw = ctl.encode_request(req)
    reader = ctl.RequestReader()
    got = []
    for i in range(0, len(raw), chunk):
        reader.feed(raw[i : i + chunk])
        if (one := reader.next_request()) is not None:
            got.append(one)
    assert got == [req]
    reader.eof()


@given(
    st.lists(st.tuples(st.integers(0, 16383), st.integers(0, 0x3FF), wire_text), max_size=20),
    st.integers(1, 700),
)
@settings(deadline=None)
def test_list_stream_round_trip(entries: list[tuple[int, int, str]], chunk: int) -> None:
    raw = ctl.encode_list_replies(0xFFFF, entries)
    reader = ctl.ReplyReader(T.LIST)
    result = None
    for i in range(0, len(raw), chunk):
        assert result is None
        result = reader.feed(raw[i : i + chunk])
    assert result is not None
    assert [(e.minor, e.state, e.path) for e in result.entries] == entries


@given(st.binary(max_size=5000), st.integers(1, 900))
@settings(deadline=None)
def test_stats_round_trip(body: bytes, chunk: int) -> None:
    raw = ctl.encode_stats_reply(7, body)
    reader = ctl.ReplyReader(T.STATS)
    result = None
    for i in range(0, len(raw), chunk):
        assert result is None
        result = reader.feed(raw[i : i + chunk])
    assert result is not None and result.data == body
