"""The control codec against messages built by hand from the reference byte table.

Every expected byte string here is assembled with ``struct`` from the offsets in
reference/tapdisk-control-protocol.md, never with the codec itself.
"""

from __future__ import annotations

import errno
import struct

import pytest

from blktap.errors import InvalidArgument, ProtocolError
from blktap.proto import control as ctl
from blktap.proto.control import MessageType as T

SIZE = 544


def header(type_: int, cookie: int) -> bytes:
    # offset 0 u16 type, offset 2 u16 cookie, offset 4 four bytes of padding
    return struct.pack("<HH", type_, cookie) + b"\0" * 4


def message(type_: int, cookie: int, union: bytes = b"") -> bytes:
    assert len(union) <= 536
    return header(type_, cookie) + union + b"\0" * (536 - len(union))


def cstr(text: bytes, size: int = 256) -> bytes:
    assert len(text) < size
    return text + b"\0" * (size - len(text))


def params_union(
    flags: int, devnum: int, domid: int, path: bytes, prt: int, timeout: int, secondary: bytes
) -> bytes:
    union = bytearray(536)
    struct.pack_into("<I", union, 0, flags)
    struct.pack_into("<I", union, 4, devnum)
    struct.pack_into("<I", union, 8, domid)
    union[12:268] = cstr(path)
    struct.pack_into("<I", union, 268, prt)
    struct.pack_into("<H", union, 272, timeout)
    union[274:530] = cstr(secondary)
    return bytes(union)


# ------------------------------------------------------------------- constants


def test_constants() -> None:
    assert ctl.MESSAGE_SIZE == 544
    assert ctl.NO_MINOR == 0xFFFF
    assert ctl.PATH_MAX == 256
    assert len(T) == 30
    expected = {"ERROR": 1, "EXIT": 30, "LIST": 19, "LIST_RSP": 20, "FORCE_SHUTDOWN": 23,
                "XENBLKIF_CONNECT": 24, "DISK_INFO": 28, "RUNTIME_ERROR": 2}
    assert {name: int(T[name]) for name in expected} == expected


def test_flag_and_state_values() -> None:
    F = ctl.OpenFlag
    assert [int(f) for f in F] == [1 << i for i in range(11)]
    assert (int(F.ADD_LOG), int(F.NO_O_DIRECT), int(F.OPEN_ENCRYPTED)) == (0x10, 0x200, 0x400)
    S = ctl.StateBit
    assert [int(s) for s in S] == [1 << i for i in range(10)]
    assert S.CLOSED | S.QUIESCED | S.PAUSED == 0x2A
    assert int(S.RESUME_FAILED) == 0x200


def test_reply_types() -> None:
    for req in (T.PID, T.ATTACH, T.OPEN, T.PAUSE, T.RESUME, T.CLOSE, T.DETACH, T.LIST,
                T.LIST_MINORS, T.STATS, T.DISK_INFO, T.XENBLKIF_CONNECT):
        assert ctl.reply_type_for(req) == req + 1
    assert ctl.reply_type_for(T.FORCE_SHUTDOWN) == T.CLOSE_RSP
    with pytest.raises(InvalidArgument):
        ctl.reply_type_for(T.OPEN_RSP)
    with pytest.raises(InvalidArgument):
        ctl.reply_type_for(T.EXIT)


# ------------------------------------------------------------------- decode


def test_decode_open_params() -> None:
    union = params_union(0x212, 7, 3, b"vhd:/srv/a.vhd", 0xFFFFFFFF, 30, b"aio:/srv/b.img")
    msg = ctl.decode(message(7, 7, union))
    assert msg == ctl.Message(
        T.OPEN,
        7,
        ctl.Params(
            flags=ctl.OpenFlag.RDONLY | ctl.OpenFlag.ADD_LOG | ctl.OpenFlag.NO_O_DIRECT,
            devnum=7,
            domid=3,
            path="vhd:/srv/a.vhd",
            prt_devnum=0xFFFFFFFF,
            req_timeout=30,
            secondary="aio:/srv/b.img",
        ),
    )


def test_decode_resume_params() -> None:
    msg = ctl.decode(message(11, 2, params_union(0, 2, 0, b"", 5, 0, b"")))
    assert msg.type == T.RESUME
    assert msg.payload == ctl.Params(devnum=2, path="", prt_devnum=5)


def test_decode_image_info() -> None:
    union = struct.pack("<QII", 2**33 + 5, 512, 9)
    for code, mtype in ((8, T.OPEN_RSP), (29, T.DISK_INFO_RSP)):
        msg = ctl.decode(message(code, 4, union))
        assert msg == ctl.Message(mtype, 4, ctl.ImageInfoPayload(2**33 + 5, 512, 9))


def test_decode_error() -> None:
    msg = ctl.decode(message(1, 9, struct.pack("<i", errno.ENOENT) + cstr(b"gone")))
    assert msg == ctl.Message(T.ERROR, 9, ctl.ErrorPayload(errno.ENOENT, "gone"))


def test_decode_error_message_is_lenient() -> None:
    # The C code leaves response.message unused; garbage there must not hide the errno.
    union = struct.pack("<i", errno.EBUSY) + b"\xff" * 256
    msg = ctl.decode(message(1, 0, union))
    assert isinstance(msg.payload, ctl.ErrorPayload)
    assert msg.payload.error == errno.EBUSY


def test_decode_list() -> None:
    union = struct.pack("<iii", 3, 12, 0x2A) + cstr(b"aio:/x y/z.img")
    msg = ctl.decode(message(20, 0xFFFF, union))
    assert msg == ctl.Message(T.LIST_RSP, 0xFFFF, ctl.ListPayload(3, 12, 0x2A, "aio:/x y/z.img"))


def test_decode_stats_head() -> None:
    union = struct.pack("<HH", 22, 5) + b"\0" * 4 + struct.pack("<Q", 1234)
    msg = ctl.decode(message(22, 5, union))
    assert msg == ctl.Message(T.STATS_RSP, 5, ctl.StatsPayload(22, 5, 1234))


def test_decode_pid() -> None:
    msg = ctl.decode(message(4, 0xFFFF, struct.pack("<i", 4242)))
    assert msg == ctl.Message(T.PID_RSP, 0xFFFF, ctl.PidPayload(4242))


def test_decode_minors() -> None:
    union = struct.pack("<i", 3) + struct.pack("<3i", 1, 5, 16383)
    msg = ctl.decode(message(18, 0, union))
    assert msg.payload == ctl.MinorsPayload((1, 5, 16383))


def test_decode_xenblkif_keeps_raw_union() -> None:
    union = bytes(range(256)) * 2 + bytes(24)
    msg = ctl.decode(message(24, 1, union))
    assert msg.payload == ctl.RawPayload(union)


@pytest.mark.parametrize("code", [3, 5, 9, 13, 15, 17, 19, 21, 23, 26, 28, 30, 6, 10, 14, 16])
def test_decode_types_without_payload_ignore_the_union(code: int) -> None:
    msg = ctl.decode(message(code, 77, b"\xaa" * 536))
    assert msg == ctl.Message(T(code), 77, None)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = message(3, 1)
    assert ctl.decode(bytearray(raw)) == ctl.decode(memoryview(raw)) == ctl.Message(T.PID, 1)


def test_decode_ignores_header_padding() -> None:
    raw = bytearray(message(3, 1))
    raw[4:8] = b"\x01\x02\x03\x04"
    assert ctl.decode(bytes(raw)) == ctl.Message(T.PID, 1)


def test_decode_non_utf8_path_round_trips() -> None:
    path = b"aio:/srv/\xe9t\xe9.img"  # latin-1 bytes: not UTF-8
    raw = message(7, 0, params_union(0, 0, 0, path, 0xFFFFFFFF, 0, b""))
    msg = ctl.decode(raw)
    assert isinstance(msg.payload, ctl.Params)
    assert msg.payload.path.encode("utf-8", "surrogateescape") == path
    assert ctl.encode(msg) == raw


# ------------------------------------------------------------------- decode errors


@pytest.mark.parametrize("length", [0, 1, 8, 543, 545, 1088])
def test_decode_wrong_length(length: int) -> None:
    with pytest.raises(ProtocolError, match="544 bytes") as info:
        ctl.decode(b"\x03" + b"\0" * (length - 1) if length else b"")
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("code", [0, 31, 100, 0xFFFF])
def test_decode_bad_type(code: int) -> None:
    with pytest.raises(ctl.MessageError, match=f"type {code} ") as info:
        ctl.decode(message(code, 6))
    assert info.value.errno == errno.EINVAL
    assert info.value.cookie == 6 and info.value.type == code


def test_decode_path_not_terminated() -> None:
    union = bytearray(params_union(0, 0, 0, b"", 0, 0, b""))
    union[12:268] = b"a" * 256
    with pytest.raises(ctl.MessageError, match=r"params\.path is not NUL-terminated") as info:
        ctl.decode(message(7, 3, bytes(union)))
    assert info.value.errno == errno.EINVAL and info.value.cookie == 3


def test_decode_secondary_not_terminated() -> None:
    union = bytearray(params_union(0, 0, 0, b"aio:/a", 0, 0, b""))
    union[274:530] = b"b" * 256
    with pytest.raises(ctl.MessageError, match=r"params\.secondary"):
        ctl.decode(message(7, 3, bytes(union)))


def test_decode_list_path_not_terminated() -> None:
    with pytest.raises(ctl.MessageError, match=r"list\.path"):
        ctl.decode(message(20, 0, struct.pack("<iii", 1, 0, 0) + b"x" * 256))


@pytest.mark.parametrize("count", [-1, 64])
def test_decode_minors_bad_count(count: int) -> None:
    with pytest.raises(ctl.MessageError, match=r"minors\.count"):
        ctl.decode(message(18, 0, struct.pack("<i", count)))


# ------------------------------------------------------------------- encode


def test_encode_open_matches_hand_built() -> None:
    msg = ctl.Message(
        T.OPEN, 5,
        ctl.Params(flags=ctl.OpenFlag.RDONLY, devnum=5, path="aio:/srv/disk.img",
                   req_timeout=10),
    )
    expected = message(7, 5, params_union(2, 5, 0, b"aio:/srv/disk.img", 0xFFFFFFFF, 10, b""))
    assert ctl.encode(msg) == expected


def test_encode_replies_match_hand_built() -> None:
    cases = [
        (ctl.Message(T.ERROR, 3, ctl.ErrorPayload(errno.EBUSY)),
         message(1, 3, struct.pack("<i", errno.EBUSY))),
        (ctl.Message(T.PID_RSP, 0xFFFF, ctl.PidPayload(77)),
         message(4, 0xFFFF, struct.pack("<i", 77))),
        (ctl.Message(T.OPEN_RSP, 1, ctl.ImageInfoPayload(2048, 512, 0)),
         message(8, 1, struct.pack("<QII", 2048, 512, 0))),
        (ctl.Message(T.LIST_RSP, 0xFFFF, ctl.ListPayload(1, 4, 0x2, "aio:/a")),
         message(20, 0xFFFF, struct.pack("<iii", 1, 4, 2) + b"aio:/a")),
        (ctl.Message(T.STATS_RSP, 4, ctl.StatsPayload(22, 4, 99)),
         message(22, 4, struct.pack("<HH4xQ", 22, 4, 99))),
        (ctl.Message(T.LIST_MINORS_RSP, 0, ctl.MinorsPayload((2, 3))),
         message(18, 0, struct.pack("<3i", 2, 2, 3))),
        (ctl.Message(T.ATTACH_RSP, 9), message(6, 9)),
        (ctl.Message(T.PID), message(3, 0xFFFF)),
    ]
    for msg, expected in cases:
        assert ctl.encode(msg) == expected, msg
        assert ctl.decode(expected) == msg


def test_encode_is_544_bytes_zero_padded() -> None:
    raw = ctl.encode(ctl.Message(T.PID_RSP, 1, ctl.PidPayload(1)))
    assert len(raw) == 544 and raw[12:] == bytes(532)


def test_encode_path_limits() -> None:
    ok = "aio:/" + "a" * 250  # 255 bytes: fits with its NUL
    assert ctl.decode(ctl.encode(ctl.request(T.OPEN, 0, ctl.Params(path=ok)))).payload == \
        ctl.Params(path=ok)
    with pytest.raises(InvalidArgument, match="256 bytes") as info:
        ctl.encode(ctl.Message(T.OPEN, 0, ctl.Params(path=ok + "a")))
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(InvalidArgument, match="secondary"):
        ctl.encode(ctl.Message(T.OPEN, 0, ctl.Params(path="aio:/a", secondary="é" * 128)))
    with pytest.raises(InvalidArgument, match="NUL"):
        ctl.encode(ctl.Message(T.OPEN, 0, ctl.Params(path="aio:/a\0b")))


def test_encode_rejects_wrong_payload_and_ranges() -> None:
    with pytest.raises(InvalidArgument, match="carries Params"):
        ctl.encode(ctl.Message(T.OPEN, 0, None))
    with pytest.raises(InvalidArgument, match="carries no payload"):
        ctl.encode(ctl.Message(T.PID, 0, ctl.PidPayload(1)))
    with pytest.raises(InvalidArgument, match="cookie"):
        ctl.encode(ctl.Message(T.PID, 0x10000))
    with pytest.raises(InvalidArgument, match="req_timeout"):
        ctl.encode(ctl.Message(T.OPEN, 0, ctl.Params(req_timeout=70000)))
    with pytest.raises(InvalidArgument, match="63"):
        ctl.encode(ctl.Message(T.LIST_MINORS_RSP, 0, ctl.MinorsPayload(tuple(range(64)))))
    with pytest.raises(InvalidArgument, match="not a request"):
        ctl.request(T.PID_RSP)
    with pytest.raises(InvalidArgument, match="positive errno"):
        ctl.error_reply(0, 0)


def test_constructors() -> None:
    req = ctl.request(T.ATTACH, 4)
    assert ctl.reply(req) == ctl.Message(T.ATTACH_RSP, 4)
    assert ctl.error_reply(4, errno.ENOENT) == ctl.Message(T.ERROR, 4, ctl.ErrorPayload(2))
    assert ctl.is_request_type(T.LIST) and not ctl.is_request_type(T.LIST_RSP)
    assert ctl.payload_class_for(T.OPEN) is ctl.Params
    assert ctl.payload_class_for(T.CLOSE) is None


# ------------------------------------------------------------------- request framing


def feed_all(reader: ctl.RequestReader, data: bytes, mode: str) -> list[ctl.Request]:
    """Feed ``data`` whole or byte by byte, collecting requests as they complete."""
    got = []
    chunks = [data] if mode == "whole" else [data[i : i + 1] for i in range(len(data))]
    for chunk in chunks:
        reader.feed(chunk)
        while (req := reader.next_request()) is not None:
            got.append(req)
    return got


MODES = ["whole", "bytewise"]


@pytest.mark.parametrize("mode", MODES)
def test_request_reader_plain(mode: str) -> None:
    reader = ctl.RequestReader()
    got = feed_all(reader, message(19, 0xFFFF), mode)
    assert got == [ctl.Request(ctl.Message(T.LIST, 0xFFFF))]
    reader.eof()  # complete: closing now is fine
    assert reader.next_request() is None


@pytest.mark.parametrize("mode", MODES)
def test_request_reader_add_log(mode: str) -> None:
    raw = message(7, 1, params_union(0x10, 1, 0, b"aio:/a", 0xFFFFFFFF, 0, b""))
    raw += cstr(b"/var/tmp/cbt.log")
    got = feed_all(ctl.RequestReader(), raw, mode)
    assert len(got) == 1
    assert got[0].log_path == "/var/tmp/cbt.log" and got[0].key is None


@pytest.mark.parametrize("mode", MODES)
def test_request_reader_resume_add_log(mode: str) -> None:
    raw = message(11, 1, params_union(0x10, 1, 0, b"", 0, 0, b"")) + cstr(b"/tmp/l")
    (req,) = feed_all(ctl.RequestReader(), raw, mode)
    assert req.message.type == T.RESUME and req.log_path == "/tmp/l"


@pytest.mark.parametrize("mode", MODES)
def test_request_reader_log_then_key(mode: str) -> None:
    key = bytes(range(1, 65))
    raw = message(7, 2, params_union(0x410, 2, 0, b"vhd:/e.vhd", 0xFFFFFFFF, 0, b""))
    raw += cstr(b"/tmp/log") + bytes([len(key)]) + key
    (req,) = feed_all(ctl.RequestReader(), raw, mode)
    assert req.log_path == "/tmp/log" and req.key == key


@pytest.mark.parametrize("mode", MODES)
def test_request_reader_key_only(mode: str) -> None:
    raw = message(7, 2, params_union(0x400, 2, 0, b"vhd:/e.vhd", 0xFFFFFFFF, 0, b""))
    raw += b"\x01\x99"
    (req,) = feed_all(ctl.RequestReader(), raw, mode)
    assert req.key == b"\x99" and req.log_path is None


def test_request_reader_waits_for_extras() -> None:
    reader = ctl.RequestReader()
    reader.feed(message(7, 1, params_union(0x10, 1, 0, b"aio:/a", 0, 0, b"")))
    assert reader.next_request() is None  # the log path is still missing
    with pytest.raises(ctl.MessageError, match="closed in the middle"):
        reader.eof()


@pytest.mark.parametrize("size", [0, 129, 255])
def test_request_reader_bad_key_size(size: int) -> None:
    reader = ctl.RequestReader()
    reader.feed(message(7, 8, params_union(0x400, 8, 0, b"aio:/a", 0, 0, b"")) + bytes([size]))
    with pytest.raises(ctl.MessageError, match="key size") as info:
        reader.next_request()
    assert info.value.cookie == 8
    with pytest.raises(ctl.MessageError):  # the reader stays failed
        reader.next_request()


def test_request_reader_log_not_terminated() -> None:
    reader = ctl.RequestReader()
    reader.feed(message(7, 1, params_union(0x10, 1, 0, b"aio:/a", 0, 0, b"")) + b"L" * 256)
    with pytest.raises(ctl.MessageError, match="log path"):
        reader.next_request()


@pytest.mark.parametrize("mode", MODES)
def test_request_reader_trailing_data_is_ebusy(mode: str) -> None:
    reader = ctl.RequestReader()
    data = message(3, 0xFFFF) + message(3, 0xFFFF)[:10]
    with pytest.raises(ctl.MessageError, match="after the request") as info:
        feed_all(reader, data, mode)
    assert info.value.errno == errno.EBUSY


def test_request_reader_trailing_data_returns_request_first() -> None:
    reader = ctl.RequestReader()
    reader.feed(message(5, 3) + b"x")
    assert reader.next_request() == ctl.Request(ctl.Message(T.ATTACH, 3))
    with pytest.raises(ctl.MessageError) as info:
        reader.next_request()
    assert info.value.errno == errno.EBUSY and info.value.cookie == 3


def test_request_reader_rejects_bad_type_from_the_header() -> None:
    reader = ctl.RequestReader()
    reader.feed(header(31, 4))
    with pytest.raises(ctl.MessageError, match="type 31") as info:
        reader.next_request()
    assert info.value.cookie == 4


def test_request_reader_eof_before_anything_is_fine() -> None:
    ctl.RequestReader().eof()
    reader = ctl.RequestReader()
    reader.feed(b"\x03")
    with pytest.raises(ctl.MessageError):
        reader.eof()


def test_encode_request_matches_hand_built() -> None:
    params = ctl.Params(flags=ctl.OpenFlag.ADD_LOG | ctl.OpenFlag.OPEN_ENCRYPTED, devnum=1,
                        path="aio:/a")
    req = ctl.Request(ctl.Message(T.OPEN, 1, params), log_path="/tmp/l", key=b"k" * 32)
    expected = message(7, 1, params_union(0x410, 1, 0, b"aio:/a", 0xFFFFFFFF, 0, b""))
    expected += cstr(b"/tmp/l") + b"\x20" + b"k" * 32
    assert ctl.encode_request(req) == expected


def test_encode_request_checks_extras() -> None:
    plain = ctl.Message(T.OPEN, 1, ctl.Params(path="aio:/a"))
    logged = ctl.Message(T.OPEN, 1, ctl.Params(flags=ctl.OpenFlag.ADD_LOG, path="aio:/a"))
    keyed = ctl.Message(T.OPEN, 1, ctl.Params(flags=ctl.OpenFlag.OPEN_ENCRYPTED, path="aio:/a"))
    with pytest.raises(InvalidArgument):
        ctl.encode_request(ctl.Request(plain, log_path="/tmp/l"))
    with pytest.raises(InvalidArgument):
        ctl.encode_request(ctl.Request(logged))
    with pytest.raises(InvalidArgument):
        ctl.encode_request(ctl.Request(plain, key=b"k"))
    for bad in (None, b"", b"k" * 129):
        with pytest.raises(InvalidArgument):
            ctl.encode_request(ctl.Request(keyed, key=bad))


# ------------------------------------------------------------------- reply framing


def collect(reader: ctl.ReplyReader, data: bytes, mode: str) -> ctl.Reply | None:
    chunks = [data] if mode == "whole" else [data[i : i + 1] for i in range(len(data))]
    result = None
    for chunk in chunks:
        assert result is None, "reply complete before the input ended"
        result = reader.feed(chunk)
    return result


@pytest.mark.parametrize("mode", MODES)
def test_reply_reader_single(mode: str) -> None:
    reply = collect(ctl.ReplyReader(T.PID), message(4, 0xFFFF, struct.pack("<i", 5)), mode)
    assert reply == ctl.Reply(ctl.Message(T.PID_RSP, 0xFFFF, ctl.PidPayload(5)))
    assert not reply.is_error and reply.errno == 0


@pytest.mark.parametrize("mode", MODES)
def test_reply_reader_error(mode: str) -> None:
    reply = collect(ctl.ReplyReader(T.OPEN), message(1, 3, struct.pack("<i", 2)), mode)
    assert reply is not None and reply.is_error and reply.errno == errno.ENOENT


@pytest.mark.parametrize("mode", MODES)
def test_reply_reader_list_stream(mode: str) -> None:
    stream = (
        message(20, 0xFFFF, struct.pack("<iii", 2, 0, 0) + cstr(b"aio:/a"))
        + message(20, 0xFFFF, struct.pack("<iii", 1, 3, 2) + cstr(b""))
        + message(20, 0xFFFF, struct.pack("<iii", 0, -1, 2) + cstr(b""))
    )
    reply = collect(ctl.ReplyReader(T.LIST), stream, mode)
    assert reply is not None
    assert reply.entries == (ctl.ListPayload(2, 0, 0, "aio:/a"), ctl.ListPayload(1, 3, 2, ""))
    assert isinstance(reply.message.payload, ctl.ListPayload)
    assert reply.message.payload.count == 0


def test_reply_reader_empty_list() -> None:
    reply = ctl.ReplyReader(T.LIST).feed(message(20, 0xFFFF, struct.pack("<iii", 0, -1, 0)))
    assert reply is not None and reply.entries == ()


def test_list_replies_count_down_like_c() -> None:
    raw = ctl.encode_list_replies(0xFFFF, [(0, 0, "aio:/a"), (5, 0x2A, "")])
    assert raw == (
        message(20, 0xFFFF, struct.pack("<iii", 2, 0, 0) + b"aio:/a")
        + message(20, 0xFFFF, struct.pack("<iii", 1, 5, 0x2A))
        + message(20, 0xFFFF, struct.pack("<iii", 0, -1, 0))
    )


@pytest.mark.parametrize("mode", MODES)
def test_reply_reader_stats(mode: str) -> None:
    body = b'{"name": "aio:/a", "secs": [0, 0]}'
    raw = message(22, 1, struct.pack("<HH4xQ", 22, 1, len(body))) + body
    assert raw == ctl.encode_stats_reply(1, body)
    reply = collect(ctl.ReplyReader(T.STATS), raw, mode)
    assert reply is not None and reply.data == body


def test_reply_reader_stats_empty_body() -> None:
    reply = ctl.ReplyReader(T.STATS).feed(message(22, 1, struct.pack("<HH4xQ", 22, 1, 0)))
    assert reply is not None and reply.data == b""


def test_reply_reader_stats_too_long() -> None:
    raw = message(22, 1, struct.pack("<HH4xQ", 22, 1, ctl.MAX_STATS_LENGTH + 1))
    with pytest.raises(ctl.MessageError, match="exceeds"):
        ctl.ReplyReader(T.STATS).feed(raw)


def test_reply_reader_force_shutdown_gets_close_rsp() -> None:
    assert ctl.ReplyReader(T.FORCE_SHUTDOWN).feed(message(14, 2)) == ctl.Reply(
        ctl.Message(T.CLOSE_RSP, 2)
    )


@pytest.mark.parametrize("mode", MODES)
def test_reply_reader_trailing_data(mode: str) -> None:
    reader = ctl.ReplyReader(T.ATTACH)
    data = message(6, 1) + b"\0"
    chunks = [data] if mode == "whole" else [data[i : i + 1] for i in range(len(data))]
    with pytest.raises(ctl.MessageError, match="after the reply") as info:
        for chunk in chunks:
            reader.feed(chunk)
    assert info.value.errno == errno.EPROTO


def test_reply_reader_unexpected_type() -> None:
    with pytest.raises(ctl.MessageError, match="unexpected OPEN_RSP") as info:
        ctl.ReplyReader(T.ATTACH).feed(message(8, 1))
    assert info.value.errno == errno.EPROTO


def test_reply_reader_undecodable() -> None:
    with pytest.raises(ctl.MessageError, match="type 0") as info:
        ctl.ReplyReader(T.ATTACH).feed(message(0, 1))
    assert info.value.errno == errno.EPROTO


def test_reply_reader_eof() -> None:
    reader = ctl.ReplyReader(T.LIST)
    reader.feed(message(20, 0xFFFF, struct.pack("<iii", 1, 0, 0)))
    with pytest.raises(ctl.MessageError, match="closed before") as info:
        reader.eof()
    assert info.value.errno == errno.EPROTO
    done = ctl.ReplyReader(T.ATTACH)
    done.feed(message(6, 1))
    assert done.eof() == ctl.Reply(ctl.Message(T.ATTACH_RSP, 1))


def test_proto_imports_no_io_module() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ctl))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"socket", "os", "asyncio", "select", "selectors", "io", "subprocess"}
