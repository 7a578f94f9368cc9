"""Sans-IO codec of the tapdisk control protocol (``tapdisk_message_t``).

Wire format (reference/tapdisk-control-protocol.md): every message is exactly 544 bytes,
little-endian (the C structure in host byte order on x86_64)::

    offset 0  u16 type      offset 2  u16 cookie (the minor; 0xFFFF = none/all)
    offset 4  4 bytes padding
    offset 8  536 bytes union, interpreted according to ``type``

This module only turns bytes into typed values and back. It never touches a socket or a
file: the control server (tapdisk) and the control client (``blktap.control``) own the I/O
and feed bytes into :class:`RequestReader` / :class:`ReplyReader`.

Strings.  The C code stores ``char[256]`` fields NUL-terminated. Decoding takes the bytes
up to the first NUL and rejects a field with no NUL at all (the C tapdisk answers EINVAL to
such a path); only the unused ``response.message`` of ERROR is read leniently. Bytes are
decoded as UTF-8 with ``surrogateescape``, the way Python decodes file names
(``os.fsdecode``): every byte string decodes, and encoding the result gives the same bytes
back, so a path that is not valid UTF-8 still names the same file. Encoding rejects a
string whose encoded form does not leave room for the NUL (256 bytes or more) or that
contains a NUL.

Errors.  Malformed input raises :class:`MessageError` (a
:class:`~blktap.errors.ProtocolError`, errno EINVAL unless stated); a caller passing
values that do not fit the wire raises :class:`~blktap.errors.InvalidArgument`.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Final, TypeAlias

from blktap.errors import InvalidArgument, ProtocolError

__all__ = [
    "MAX_KEY_SIZE",
    "MAX_MINOR_COUNT",
    "MAX_STATS_LENGTH",
    "MESSAGE_SIZE",
    "NO_MINOR",
    "NO_PARENT",
    "PATH_MAX",
    "ErrorPayload",
    "ImageInfoPayload",
    "ListPayload",
    "Message",
    "MessageError",
    "MessageType",
    "MinorsPayload",
    "OpenFlag",
    "Params",
    "Payload",
    "PidPayload",
    "RawPayload",
    "Reply",
    "ReplyReader",
    "Request",
    "RequestReader",
    "StateBit",
    "StatsPayload",
    "StringPayload",
    "decode",
    "encode",
    "encode_list_replies",
    "encode_request",
    "encode_stats_reply",
    "error_reply",
    "is_request_type",
    "list_replies",
    "payload_class_for",
    "reply",
    "reply_type_for",
    "request",
]

MESSAGE_SIZE: Final = 544
"""Size of ``tapdisk_message_t`` on the wire."""
HEADER_SIZE: Final = 8
UNION_SIZE: Final = MESSAGE_SIZE - HEADER_SIZE  # 536
NO_MINOR: Final = 0xFFFF
"""Cookie meaning "no minor" / "every minor" (LIST, STATS of all, PID)."""
PATH_MAX: Final = 256
"""Size of every ``char[]`` string field, including its terminating NUL."""
NO_PARENT: Final = 0xFFFFFFFF
"""``params.prt_devnum`` when no parent minor is given (the C client's ``-1``)."""
MAX_MINOR_COUNT: Final = 63
"""Capacity of the ``minors`` union member."""
MAX_KEY_SIZE: Final = 128
"""Largest encryption key an OPEN with OPEN_ENCRYPTED may carry."""
MAX_STATS_LENGTH: Final = 64 * 1024 * 1024
"""Largest STATS JSON body :class:`ReplyReader` accepts (a guard against a broken peer)."""


class MessageType(IntEnum):
    """``tapdisk_message_t.type``; a reply's type is its request's type + 1."""

    ERROR = 1
    RUNTIME_ERROR = 2
    PID = 3
    PID_RSP = 4
    ATTACH = 5
    ATTACH_RSP = 6
    OPEN = 7
    OPEN_RSP = 8
    PAUSE = 9
    PAUSE_RSP = 10
    RESUME = 11
    RESUME_RSP = 12
    CLOSE = 13
    CLOSE_RSP = 14
    DETACH = 15
    DETACH_RSP = 16
    LIST_MINORS = 17
    LIST_MINORS_RSP = 18
    LIST = 19
    LIST_RSP = 20
    STATS = 21
    STATS_RSP = 22
    FORCE_SHUTDOWN = 23
    XENBLKIF_CONNECT = 24
    XENBLKIF_CONNECT_RSP = 25
    XENBLKIF_DISCONNECT = 26
    XENBLKIF_DISCONNECT_RSP = 27
    DISK_INFO = 28
    DISK_INFO_RSP = 29
    EXIT = 30


class OpenFlag(IntFlag):
    """``params.flags`` of OPEN and RESUME (C: ``TAPDISK_MESSAGE_FLAG_*``)."""

    SHARED = 0x001
    RDONLY = 0x002
    ADD_CACHE = 0x004
    VHD_INDEX = 0x008
    ADD_LOG = 0x010  # OpenXT's blktap2: LOG_DIRTY
    ADD_LCACHE = 0x020
    REUSE_PRT = 0x040
    SECONDARY = 0x080
    STANDBY = 0x100
    NO_O_DIRECT = 0x200
    OPEN_ENCRYPTED = 0x400


_NO_FLAGS: Final = OpenFlag(0)


class StateBit(IntFlag):
    """The VBD ``state`` word that LIST reports (C: ``TD_VBD_*``). Wire only; see vbd.py."""

    DEAD = 0x001
    CLOSED = 0x002
    QUIESCE_REQUESTED = 0x004
    QUIESCED = 0x008
    PAUSE_REQUESTED = 0x010
    PAUSED = 0x020
    SHUTDOWN_REQUESTED = 0x040
    LOCKING = 0x080
    LOG_DROPPED = 0x100
    RESUME_FAILED = 0x200


class MessageError(ProtocolError):
    """Bytes that are not a valid control message (or message stream).

    ``cookie`` and ``type`` are the raw header values when the header could be read
    (so that a server can address its ERROR reply), else ``None``. ``errno`` is EINVAL
    except where a subclass or the raiser says otherwise (EBUSY for a second request on a
    connection, EPROTO for a reply stream that breaks the protocol).
    """

    def __init__(
        self,
        message: str,
        *,
        cookie: int | None = None,
        type: int | None = None,
        remote: bool = True,
        errno: int | None = None,
    ) -> None:
        super().__init__(message, remote=remote, errno=errno)
        self.cookie = cookie
        self.type = type


# --------------------------------------------------------------------------- payloads

_HEADER = struct.Struct("<HH4x")
# params: flags@0 devnum@4 domid@8 path[256]@12 prt_devnum@268 req_timeout@272 secondary@274
_PARAMS = struct.Struct("<III256sIH256s")
_IMAGE = struct.Struct("<QII")  # sectors@0 sector_size@8 info@12
_RESPONSE = struct.Struct("<i256s")  # error@0 message@4
_LIST = struct.Struct("<iii256s")  # count@0 minor@4 state@8 path@12
_INFO = struct.Struct("<HH4xQ")  # type@0 cookie@2 length@8
_PID = struct.Struct("<i")
_MINORS = struct.Struct(f"<i{MAX_MINOR_COUNT}i")
_STRING = struct.Struct("<256s")

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{name} {value} is outside {low}..{high}")


def _encode_string(name: str, value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise InvalidArgument(f"{name} contains a NUL byte")
    if len(raw) >= PATH_MAX:
        raise InvalidArgument(
            f"{name} is {len(raw)} bytes; at most {PATH_MAX - 1} fit in the message",
            errno=_errno.ENAMETOOLONG,
        )
    return raw


def _decode_string(name: str, raw: bytes, *, cookie: int, type: int) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise MessageError(
            f"{name} is not NUL-terminated within its {len(raw)} bytes", cookie=cookie, type=type
        )
    return raw[:end].decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Params:
    """``u.params``: what OPEN (and RESUME) carry.

    ``path`` is ``"type:/path"`` (empty in a RESUME that keeps the current image);
    ``prt_devnum`` is the parent minor for REUSE_PRT (``NO_PARENT`` if none);
    ``req_timeout`` is in seconds, 0 meaning tapdisk's default (120 s).
    """

    flags: OpenFlag = _NO_FLAGS
    devnum: int = 0
    domid: int = 0
    path: str = ""
    prt_devnum: int = NO_PARENT
    req_timeout: int = 0
    secondary: str = ""

    def _pack(self) -> bytes:
        _check_range("params.flags", int(self.flags), 0, _U32)
        _check_range("params.devnum", self.devnum, 0, _U32)
        _check_range("params.domid", self.domid, 0, _U32)
        _check_range("params.prt_devnum", self.prt_devnum, 0, _U32)
        _check_range("params.req_timeout", self.req_timeout, 0, _U16)
        return _PARAMS.pack(
            int(self.flags),
            self.devnum,
            self.domid,
            _encode_string("params.path", self.path),
            self.prt_devnum,
            self.req_timeout,
            _encode_string("params.secondary", self.secondary),
        )

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> Params:
        flags, devnum, domid, path, prt, timeout, secondary = _PARAMS.unpack_from(union)
        return cls(
            flags=OpenFlag(flags),
            devnum=devnum,
            domid=domid,
            path=_decode_string("params.path", path, cookie=cookie, type=type),
            prt_devnum=prt,
            req_timeout=timeout,
            secondary=_decode_string("params.secondary", secondary, cookie=cookie, type=type),
        )


@dataclass(frozen=True)
class ImageInfoPayload:
    """``u.image``: the size of an opened image (OPEN_RSP, DISK_INFO_RSP)."""

    sectors: int
    sector_size: int = 512
    info: int = 0

    def _pack(self) -> bytes:
        _check_range("image.sectors", self.sectors, 0, _U64)
        _check_range("image.sector_size", self.sector_size, 0, _U32)
        _check_range("image.info", self.info, 0, _U32)
        return _IMAGE.pack(self.sectors, self.sector_size, self.info)

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> ImageInfoPayload:
        sectors, sector_size, info = _IMAGE.unpack_from(union)
        return cls(sectors=sectors, sector_size=sector_size, info=info)


@dataclass(frozen=True)
class ErrorPayload:
    """``u.response``: a failed request's positive errno (ERROR, RUNTIME_ERROR).

    The C code never fills ``message``; it is decoded leniently (up to the first NUL, or
    the first 255 bytes if there is none) so that a reply's errno is never lost.
    """

    error: int
    message: str = ""

    def _pack(self) -> bytes:
        _check_range("response.error", self.error, _I32_MIN, _I32_MAX)
        return _RESPONSE.pack(self.error, _encode_string("response.message", self.message))

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> ErrorPayload:
        error, raw = _RESPONSE.unpack_from(union)
        end = raw.find(b"\0")
        text = raw[: PATH_MAX - 1 if end < 0 else end].decode("utf-8", "surrogateescape")
        return cls(error=error, message=text)


@dataclass(frozen=True)
class ListPayload:
    """``u.list``: one VBD in a LIST reply stream.

    The C tapdisk counts ``count`` down to 1 over its VBDs and ends the stream with a
    message whose ``count`` is 0 (minor -1, empty path). ``path`` is ``"type:/path"`` or
    empty for a VBD with no image open.
    """

    count: int
    minor: int
    state: int
    path: str = ""

    def _pack(self) -> bytes:
        _check_range("list.count", self.count, _I32_MIN, _I32_MAX)
        _check_range("list.minor", self.minor, _I32_MIN, _I32_MAX)
        _check_range("list.state", self.state, _I32_MIN, _I32_MAX)
        return _LIST.pack(
            self.count, self.minor, self.state, _encode_string("list.path", self.path)
        )

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> ListPayload:
        count, minor, state, path = _LIST.unpack_from(union)
        return cls(
            count=count,
            minor=minor,
            state=state,
            path=_decode_string("list.path", path, cookie=cookie, type=type),
        )


@dataclass(frozen=True)
class StatsPayload:
    """``u.info``: heads a STATS reply; ``length`` bytes of JSON follow the message."""

    type: int
    cookie: int
    length: int

    def _pack(self) -> bytes:
        _check_range("info.type", self.type, 0, _U16)
        _check_range("info.cookie", self.cookie, 0, _U16)
        _check_range("info.length", self.length, 0, _U64)
        return _INFO.pack(self.type, self.cookie, self.length)

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> StatsPayload:
        itype, icookie, length = _INFO.unpack_from(union)
        return cls(type=itype, cookie=icookie, length=length)


@dataclass(frozen=True)
class PidPayload:
    """``u.tapdisk_pid``: the answering tapdisk's process id (PID_RSP)."""

    pid: int

    def _pack(self) -> bytes:
        _check_range("tapdisk_pid", self.pid, _I32_MIN, _I32_MAX)
        return _PID.pack(self.pid)

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> PidPayload:
        (pid,) = _PID.unpack_from(union)
        return cls(pid=pid)


@dataclass(frozen=True)
class MinorsPayload:
    """``u.minors``: up to 63 minors (LIST_MINORS_RSP)."""

    minors: tuple[int, ...] = ()

    def _pack(self) -> bytes:
        if len(self.minors) > MAX_MINOR_COUNT:
            raise InvalidArgument(
                f"{len(self.minors)} minors do not fit; the message holds {MAX_MINOR_COUNT}"
            )
        for minor in self.minors:
            _check_range("minors.list[]", minor, _I32_MIN, _I32_MAX)
        padded = list(self.minors) + [0] * (MAX_MINOR_COUNT - len(self.minors))
        return _MINORS.pack(len(self.minors), *padded)

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> MinorsPayload:
        count, *values = _MINORS.unpack_from(union)
        if not 0 <= count <= MAX_MINOR_COUNT:
            raise MessageError(
                f"minors.count {count} is outside 0..{MAX_MINOR_COUNT}", cookie=cookie, type=type
            )
        return cls(minors=tuple(values[:count]))


@dataclass(frozen=True)
class StringPayload:
    """``u.string``: a NUL-terminated string of at most 255 bytes."""

    text: str = ""

    def _pack(self) -> bytes:
        return _STRING.pack(_encode_string("string", self.text))

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> StringPayload:
        (raw,) = _STRING.unpack_from(union)
        return cls(text=_decode_string("string", raw, cookie=cookie, type=type))


@dataclass(frozen=True)
class RawPayload:
    """The union kept as raw bytes (XENBLKIF_CONNECT: Xen only, out of scope here).

    ``data`` is at most 536 bytes; encoding pads it with zeros.
    """

    data: bytes = b""

    def _pack(self) -> bytes:
        if len(self.data) > UNION_SIZE:
            raise InvalidArgument(f"raw payload is {len(self.data)} bytes; at most {UNION_SIZE}")
        return bytes(self.data)

    @classmethod
    def _unpack(cls, union: bytes, cookie: int, type: int) -> RawPayload:
        return cls(data=bytes(union))


Payload: TypeAlias = (
    Params
    | ImageInfoPayload
    | ErrorPayload
    | ListPayload
    | StatsPayload
    | PidPayload
    | MinorsPayload
    | StringPayload
    | RawPayload
)

# Which union member each type carries. Types not listed carry nothing (the union is
# ignored on decode and zero on encode). RUNTIME_ERROR is an error report, so it carries
# ``u.response`` like ERROR.
_PAYLOAD_OF: dict[MessageType, type[Payload]] = {
    MessageType.ERROR: ErrorPayload,
    MessageType.RUNTIME_ERROR: ErrorPayload,
    MessageType.PID_RSP: PidPayload,
    MessageType.OPEN: Params,
    MessageType.OPEN_RSP: ImageInfoPayload,
    MessageType.RESUME: Params,
    MessageType.LIST_MINORS_RSP: MinorsPayload,
    MessageType.LIST_RSP: ListPayload,
    MessageType.STATS_RSP: StatsPayload,
    MessageType.XENBLKIF_CONNECT: RawPayload,
    MessageType.DISK_INFO_RSP: ImageInfoPayload,
}


def payload_class_for(type: MessageType) -> type[Payload] | None:
    """The payload class messages of ``type`` carry, or ``None`` for no payload."""
    return _PAYLOAD_OF.get(type)


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One ``tapdisk_message_t``. ``cookie`` is the minor, or ``NO_MINOR``."""

    type: MessageType
    cookie: int = NO_MINOR
    payload: Payload | None = None


def encode(msg: Message) -> bytes:
    """The 544 wire bytes of ``msg`` (unused bytes zero).

    Raises :class:`InvalidArgument` if the cookie is not a u16, the payload is not the kind
    ``msg.type`` carries (``None`` for a type without payload), or a field does not fit.
    """
    _check_range("cookie", msg.cookie, 0, _U16)
    mtype = MessageType(msg.type)
    expected = _PAYLOAD_OF.get(mtype)
    if expected is None:
        if msg.payload is not None:
            raise InvalidArgument(f"{mtype.name} carries no payload, got {msg.payload!r}")
        union = b""
    else:
        if not isinstance(msg.payload, expected):
            raise InvalidArgument(
                f"{mtype.name} carries {expected.__name__}, got {type(msg.payload).__name__}"
            )
        union = msg.payload._pack()
    return _HEADER.pack(int(mtype), msg.cookie) + union.ljust(UNION_SIZE, b"\0")


def _decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    raw_type, cookie = _HEADER.unpack_from(data)
    if not 1 <= raw_type <= len(MessageType):
        raise MessageError(
            f"message type {raw_type} is not a tapdisk message type (1..{len(MessageType)})",
            cookie=cookie,
            type=raw_type,
        )
    return raw_type, cookie


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse exactly one 544-byte message.

    The payload is decoded according to the type (see :func:`payload_class_for`).
    Raises :class:`MessageError` (errno EINVAL) for a length other than 544, a type outside
    1..30, or a path/secondary/list path with no NUL within its 256 bytes.
    """
    if len(data) != MESSAGE_SIZE:
        raise MessageError(f"a control message is {MESSAGE_SIZE} bytes, got {len(data)}")
    raw = bytes(data)
    raw_type, cookie = _decode_header(raw)
    mtype = MessageType(raw_type)
    cls = _PAYLOAD_OF.get(mtype)
    payload = None if cls is None else cls._unpack(raw[HEADER_SIZE:], cookie, raw_type)
    return Message(type=mtype, cookie=cookie, payload=payload)


# --------------------------------------------------------------- helpers for both sides


def is_request_type(type: MessageType) -> bool:
    """True for the types a client sends (PID, ATTACH, ..., EXIT), false for replies."""
    return type in _REPLY_OF


_REPLY_OF: dict[MessageType, MessageType] = {
    MessageType.PID: MessageType.PID_RSP,
    MessageType.ATTACH: MessageType.ATTACH_RSP,
    MessageType.OPEN: MessageType.OPEN_RSP,
    MessageType.PAUSE: MessageType.PAUSE_RSP,
    MessageType.RESUME: MessageType.RESUME_RSP,
    MessageType.CLOSE: MessageType.CLOSE_RSP,
    MessageType.DETACH: MessageType.DETACH_RSP,
    MessageType.LIST_MINORS: MessageType.LIST_MINORS_RSP,
    MessageType.LIST: MessageType.LIST_RSP,
    MessageType.STATS: MessageType.STATS_RSP,
    # The C tapdisk answers FORCE_SHUTDOWN (a forced close) with CLOSE_RSP; 24 is taken.
    MessageType.FORCE_SHUTDOWN: MessageType.CLOSE_RSP,
    MessageType.XENBLKIF_CONNECT: MessageType.XENBLKIF_CONNECT_RSP,
    MessageType.XENBLKIF_DISCONNECT: MessageType.XENBLKIF_DISCONNECT_RSP,
    MessageType.DISK_INFO: MessageType.DISK_INFO_RSP,
    # EXIT has no reply type of its own (31 does not exist); tapdisk answers with ERROR
    # or not at all.
}


def reply_type_for(request_type: MessageType) -> MessageType:
    """The success reply type for ``request_type`` (type + 1; FORCE_SHUTDOWN → CLOSE_RSP).

    Raises :class:`InvalidArgument` for a type that is not a request with a reply.
    """
    try:
        return _REPLY_OF[MessageType(request_type)]
    except KeyError:
        raise InvalidArgument(
            f"{MessageType(request_type).name} is not a request with a reply"
        ) from None


def request(type: MessageType, cookie: int = NO_MINOR, payload: Payload | None = None) -> Message:
    """A request message (checked like :func:`encode` checks it)."""
    if not is_request_type(type) and type != MessageType.EXIT:
        raise InvalidArgument(f"{MessageType(type).name} is not a request type")
    msg = Message(type=MessageType(type), cookie=cookie, payload=payload)
    encode(msg)  # validate now rather than at send time
    return msg


def reply(req: Message, payload: Payload | None = None) -> Message:
    """The success reply to ``req``: its reply type, its cookie, ``payload``."""
    return Message(type=reply_type_for(req.type), cookie=req.cookie, payload=payload)


def error_reply(cookie: int, errno: int, message: str = "") -> Message:
    """An ERROR message carrying the positive ``errno``."""
    if errno <= 0:
        raise InvalidArgument(f"an ERROR reply carries a positive errno, got {errno}")
    return Message(MessageType.ERROR, cookie, ErrorPayload(error=errno, message=message))


def list_replies(cookie: int, entries: Iterable[tuple[int, int, str]]) -> list[Message]:
    """The LIST_RSP stream for ``(minor, state, "type:path")`` entries, as C sends it.

    ``count`` runs down from the number of entries to 1; a final message with count 0,
    minor -1 and an empty path ends the stream.
    """
    items = list(entries)
    out = [
        Message(MessageType.LIST_RSP, cookie, ListPayload(len(items) - i, minor, state, path))
        for i, (minor, state, path) in enumerate(items)
    ]
    out.append(Message(MessageType.LIST_RSP, cookie, ListPayload(0, -1, 0, "")))
    return out


def encode_list_replies(cookie: int, entries: Iterable[tuple[int, int, str]]) -> bytes:
    """The bytes of :func:`list_replies`."""
    return b"".join(encode(m) for m in list_replies(cookie, entries))


def encode_stats_reply(cookie: int, body: bytes) -> bytes:
    """A STATS_RSP announcing ``len(body)`` bytes, followed by ``body`` (the JSON)."""
    head = Message(
        MessageType.STATS_RSP,
        cookie,
        StatsPayload(type=int(MessageType.STATS_RSP), cookie=cookie, length=len(body)),
    )
    return encode(head) + bytes(body)


# ---------------------------------------------------------------- server-side framing


@dataclass(frozen=True)
class Request:
    """A complete request as a server receives it.

    ``log_path`` is set iff the message is OPEN/RESUME with ADD_LOG (256 more bytes of
    path followed the message); ``key`` iff it is OPEN with OPEN_ENCRYPTED (one size byte,
    1..128, then the key followed).
    """

    message: Message
    log_path: str | None = None
    key: bytes | None = None


def _wants_log(msg: Message) -> bool:
    return (
        msg.type in (MessageType.OPEN, MessageType.RESUME)
        and isinstance(msg.payload, Params)
        and bool(msg.payload.flags & OpenFlag.ADD_LOG)
    )


def _wants_key(msg: Message) -> bool:
    return (
        msg.type == MessageType.OPEN
        and isinstance(msg.payload, Params)
        and bool(msg.payload.flags & OpenFlag.OPEN_ENCRYPTED)
    )


def encode_request(req: Request) -> bytes:
    """The bytes a client sends for ``req``: the message, then the log path (256 bytes,
    NUL-padded) if ADD_LOG, then the key size byte and key if OPEN_ENCRYPTED.

    Raises :class:`InvalidArgument` if ``log_path``/``key`` are given exactly when the
    flags do not ask for them, or do not fit.
    """
    out = bytearray(encode(req.message))
    if _wants_log(req.message):
        if req.log_path is None:
            raise InvalidArgument("ADD_LOG is set but no log path is given")
        out += _encode_string("log path", req.log_path).ljust(PATH_MAX, b"\0")
    elif req.log_path is not None:
        raise InvalidArgument("a log path needs an OPEN or RESUME with ADD_LOG")
    if _wants_key(req.message):
        if req.key is None or not 1 <= len(req.key) <= MAX_KEY_SIZE:
            size = None if req.key is None else len(req.key)
            raise InvalidArgument(
                f"OPEN_ENCRYPTED needs a key of 1..{MAX_KEY_SIZE} bytes, got {size}"
            )
        out.append(len(req.key))
        out += req.key
    elif req.key is not None:
        raise InvalidArgument("a key needs an OPEN with OPEN_ENCRYPTED")
    return bytes(out)


class RequestReader:
    """Server side: turns the bytes of one control connection into one :class:`Request`.

    Usage: :meth:`feed` whatever the socket gave, then call :meth:`next_request` until it
    returns ``None`` (more bytes needed). The C protocol carries one request per
    connection: bytes arriving after a complete request make :meth:`next_request` raise
    :class:`MessageError` with errno EBUSY (the C tapdisk answers a second request on a busy
    connection with EBUSY) after the request itself was returned. :meth:`eof` says
    whether the peer closing now loses a partial request.

    After :meth:`next_request` raised for malformed input the reader is spent: further
    calls raise the same error.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._message: Message | None = None
        self._done = False
        self._error: MessageError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf)

    def next_request(self) -> Request | None:
        """The request once complete, else ``None``; see the class docstring for errors."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except MessageError as exc:
            self._error = exc
            raise

    def _next(self) -> Request | None:
        if self._done:
            if self._buf:
                cookie = self._message.cookie if self._message else None
                raise MessageError(
                    f"{len(self._buf)} bytes after the request; one request per connection",
                    cookie=cookie,
                    errno=_errno.EBUSY,
                )
            return None
        if self._message is None:
            if len(self._buf) < MESSAGE_SIZE:
                if len(self._buf) >= HEADER_SIZE:
                    _decode_header(self._buf)  # reject a bad type before the body arrives
                return None
            self._message = decode(self._buf[:MESSAGE_SIZE])
            del self._buf[:MESSAGE_SIZE]
        msg = self._message
        need = 0
        log_path: str | None = None
        key: bytes | None = None
        if _wants_log(msg):
            if len(self._buf) < PATH_MAX:
                return None
            log_path = _decode_string(
                "log path", bytes(self._buf[:PATH_MAX]), cookie=msg.cookie, type=int(msg.type)
            )
            need = PATH_MAX
        if _wants_key(msg):
            if len(self._buf) < need + 1:
                return None
            size = self._buf[need]
            if not 1 <= size <= MAX_KEY_SIZE:
                raise MessageError(
                    f"encryption key size {size} is outside 1..{MAX_KEY_SIZE}",
                    cookie=msg.cookie,
                    type=int(msg.type),
                )
            if len(self._buf) < need + 1 + size:
                return None
            key = bytes(self._buf[need + 1 : need + 1 + size])
            need += 1 + size
        del self._buf[:need]
        self._done = True
        return Request(message=msg, log_path=log_path, key=key)

    def eof(self) -> None:
        """The peer closed. Raises :class:`MessageError` if a request was cut short."""
        if not self._done and (self._buf or self._message is not None):
            raise MessageError("connection closed in the middle of a request")


# ---------------------------------------------------------------- client-side framing


@dataclass(frozen=True)
class Reply:
    """A complete reply as a client receives it.

    ``message`` is the single reply, the ERROR, the STATS_RSP head, or for LIST the
    terminating LIST_RSP (count 0). ``entries`` are LIST's per-VBD payloads in arrival
    order; ``data`` is STATS's JSON body.
    """

    message: Message
    entries: tuple[ListPayload, ...] = ()
    data: bytes = b""

    @property
    def is_error(self) -> bool:
        """True when tapdisk answered ERROR."""
        return self.message.type == MessageType.ERROR

    @property
    def errno(self) -> int:
        """The positive errno of an ERROR reply (0 otherwise)."""
        if isinstance(self.message.payload, ErrorPayload):
            return self.message.payload.error
        return 0


@dataclass
class _ReplyState:
    entries: list[ListPayload] = field(default_factory=list)
    head: Message | None = None


class ReplyReader:
    """Client side: collects the reply to one request of type ``request_type``.

    :meth:`feed` returns the :class:`Reply` once complete and ``None`` before. Accepted:
    ERROR (the request failed) or the request's reply type; for LIST a stream of LIST_RSP
    until one with count 0; for STATS the STATS_RSP then ``length`` bytes of JSON. The
    cookie is not checked (the C client does not check it either).

    Raises :class:`MessageError` with errno EPROTO (the peer's fault) for any other
    message type, a message that does not decode, a STATS body longer than
    ``MAX_STATS_LENGTH``, or bytes after the complete reply; :meth:`eof` raises it when the
    peer closes before the reply is complete.
    """

    def __init__(self, request_type: MessageType) -> None:
        self._request_type = MessageType(request_type)
        self._expected = reply_type_for(self._request_type)
        self._buf = bytearray()
        self._state = _ReplyState()
        self._reply: Reply | None = None

    @property
    def reply(self) -> Reply | None:
        """The complete reply, once there is one."""
        return self._reply

    def _fail(self, text: str) -> MessageError:
        return MessageError(f"reply to {self._request_type.name}: {text}", errno=_errno.EPROTO)

    def feed(self, data: bytes | bytearray | memoryview) -> Reply | None:
        """Append received bytes; the reply once complete, else ``None``."""
        if data:
            if self._reply is not None:
                raise self._fail(f"{len(data)} unexpected bytes after the reply")
            self._buf += data
        while self._reply is None:
            if not self._step():
                break
        if self._reply is not None and self._buf:
            raise self._fail(f"{len(self._buf)} unexpected bytes after the reply")
        return self._reply

    def _step(self) -> bool:
        """Consume what the buffer holds of the next element; False when more is needed."""
        state = self._state
        if state.head is not None:  # STATS body
            assert isinstance(state.head.payload, StatsPayload)
            length = state.head.payload.length
            if len(self._buf) < length:
                return False
            self._reply = Reply(message=state.head, data=bytes(self._buf[:length]))
            del self._buf[:length]
            return True
        if len(self._buf) < MESSAGE_SIZE:
            return False
        try:
            msg = decode(self._buf[:MESSAGE_SIZE])
        except MessageError as exc:
            raise self._fail(exc.message) from exc
        del self._buf[:MESSAGE_SIZE]
        if msg.type == MessageType.ERROR:
            self._reply = Reply(message=msg, entries=tuple(state.entries))
        elif msg.type != self._expected:
            raise self._fail(f"unexpected {msg.type.name}")
        elif msg.type == MessageType.LIST_RSP:
            assert isinstance(msg.payload, ListPayload)
            if msg.payload.count == 0:
                self._reply = Reply(message=msg, entries=tuple(state.entries))
            else:
                state.entries.append(msg.payload)
        elif msg.type == MessageType.STATS_RSP:
            assert isinstance(msg.payload, StatsPayload)
            if msg.payload.length > MAX_STATS_LENGTH:
                raise self._fail(
                    f"STATS body of {msg.payload.length} bytes exceeds {MAX_STATS_LENGTH}"
                )
            state.head = msg
        else:
            self._reply = Reply(message=msg)
        return True

    def eof(self) -> Reply:
        """The peer closed: the complete reply, or :class:`MessageError` (EPROTO)."""
        if self._reply is None:
            raise self._fail("connection closed before the reply was complete")
        return self._reply
