"""Sans-IO NBD server codec: fixed-newstyle handshake and transmission phase.

The codec never touches a socket. Feed it the bytes a client sent (:meth:`ServerCodec.feed`);
it returns typed events (:class:`Negotiated`, :class:`Aborted`, :class:`Request`) and queues
the bytes the server must send back in :attr:`ServerCodec.output` (the handshake's option
replies, and error replies for requests it rejects by itself). Replies to requests the
application served are encoded with the ``reply_*`` methods.

The protocol is ``doc/proto.md`` of the NetworkBlockDevice/nbd project ("the spec" below).

Connection states (an enum plus a transition table, see ``_TRANSITIONS``)::

    CLIENT_FLAGS --flags ok--> OPTIONS --EXPORT_NAME / GO--> TRANSMISSION --DISC--> CLOSED
                                  |  \\--ABORT--> CLOSED
                                  \\--INFO, LIST, STRUCTURED_REPLY, META_CONTEXT, unknown--> OPTIONS
    any state --client breaks the protocol--> FAILED (ProtocolError raised; disconnect)

What is validated here (the edge of the system, STYLE rule 4): magic numbers, option
lengths and layouts, command codes, command flags against what was negotiated, the maximum
read/write payload. Range checks are left to the VBD, which raises InvalidArgument (EINVAL) or
NoSpace (ENOSPC); the server maps them with :func:`nbd_error`.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from blktap.errors import ProtocolError

# ------------------------------------------------------------------ wire constants
NBD_MAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

MAX_STRING: Final = 4096
"""The spec: a string (export name, query, message) MUST be no longer than 4096 bytes."""
MAX_OPTION_LENGTH: Final = 64 * 1024
"""Longer option payloads are refused with NBD_REP_ERR_TOO_BIG and the client is dropped."""
MIN_BLOCK: Final = 1
PREFERRED_BLOCK: Final = 4096
MAX_BLOCK: Final = 32 * 1024 * 1024
"""Largest READ/WRITE payload accepted (advertised as NBD_INFO_BLOCK_SIZE maximum)."""
MAX_STATUS_EXTENTS: Final = 4096
"""A BLOCK_STATUS reply carries at most this many extents (the spec lets a server truncate)."""
BASE_ALLOCATION: Final = "base:allocation"
BASE_ALLOCATION_ID: Final = 1
"""The metadata context id we give ``base:allocation`` in SET_META_CONTEXT replies."""
DIRTY_BITMAP_PREFIX: Final = "qemu:dirty-bitmap:"
"""The namespace of changed-block bitmaps, as qemu-nbd names them: flag 1 = changed."""
DIRTY_BITMAP_ID: Final = 2
"""The metadata context id we give ``qemu:dirty-bitmap:<name>``."""


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE: Final = 1 << 0

# The spec's error values ("Error values"): anything else goes on the wire as EIO.
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

_ERRNO_TO_NBD: dict[int, int] = {
    _errno.EPERM: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int) -> int:
    """The NBD wire error for the positive errno ``err`` (the one errno→wire mapping)."""
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


# ----------------------------------------------------------------------- structs
_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
REQUEST = struct.Struct(">IHHQQI")
"""A request header: magic, command flags, type, cookie, offset, length (28 bytes)."""
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header + OFFSET_DATA's offset
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
_CHUNK_STATUS = struct.Struct(">IHHQII")  # chunk header + metadata context id
_ZEROES_124 = bytes(124)
_CHUNK_NONE = CHUNK
_SIMPLE = SIMPLE_REPLY
_NONE: Final = 0  # ReplyType values as plain ints for the reply fast path
_OFFSET_DATA: Final = 1

_REQ_SIZE: Final = REQUEST.size
_NONE_REPLY_LENGTH: Final = 0


# ------------------------------------------------------------------------ events
@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server exports: the VBD's size and capabilities."""

    size: int
    read_only: bool = False
    description: str = ""
    rotational: bool = False
    flush: bool = True
    """FLUSH and the FUA flag are served (SEND_FLUSH, SEND_FUA)."""
    trim: bool = True
    """TRIM is served (SEND_TRIM, when writable)."""
    zero: bool = True
    """WRITE_ZEROES is served (SEND_WRITE_ZEROES and SEND_FAST_ZERO, when writable)."""
    multi_conn: bool = True
    """Connections see one consistent export (CAN_MULTI_CONN)."""
    block_status: bool = True
    """The ``base:allocation`` metadata context is offered."""
    dirty_bitmap: str = ""
    """The name of the changed-block bitmap offered as ``qemu:dirty-bitmap:<name>``
    ("": none)."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake ended (NBD_OPT_EXPORT_NAME or NBD_OPT_GO); transmission starts."""

    export_name: str
    structured: bool
    base_allocation: bool
    transmission_flags: int
    dirty_bitmap: str = ""
    """The bitmap whose ``qemu:dirty-bitmap:`` context was selected ("": none)."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT: send :attr:`ServerCodec.output`, then close."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client sent NBD_OPT_STARTTLS and :attr:`ServerCodec.output` holds its ACK:
    send it, run the TLS handshake as the server, then call
    :meth:`ServerCodec.tls_started` and feed the decrypted bytes. No byte may arrive in
    between (the client waits for the ACK, then speaks TLS)."""


class Request(NamedTuple):
    """One transmission-phase request the application must serve.

    ``data`` is the WRITE payload, in a buffer from the codec's ``alloc`` (None for other
    commands); the application owns it from now on. ``length`` is the request's length
    (for WRITE, ``len(data)``). A ``Command.DISC`` request needs no reply: the server
    finishes the requests in flight, then closes.

    Immutable like the other events, but a NamedTuple rather than a frozen dataclass: one
    is built per request, and a frozen dataclass costs five times as much to construct.
    """

    command: Command
    flags: int
    cookie: int
    offset: int
    length: int
    data: memoryview | None = None


Event = Negotiated | Aborted | StartTls | Request


@dataclass(frozen=True, slots=True)
class HeaderCheck:
    """The one check of an NBD request header (built by the codec when transmission
    starts, from what was negotiated): whether a request is one the server serves as it
    stands. Every reader of request headers uses it: the codec, a connection's inline
    path, its lanes (blktap.frontends); a reader that copies :meth:`accepts` inline for
    speed says so, and tests/unit/test_nbd_codec.py pins the copies to it.

    A header it refuses is not necessarily an error: the codec decides how to answer it
    (EINVAL, a payload to skip, a protocol error)."""

    allowed: dict[int, int]
    """Command (as on the wire) -> the flags it may carry, for each command served."""

    def accepts(self, magic: int, flags: int, command: int, length: int) -> bool:
        """Right magic, a command served, only flags it may carry, and for READ and WRITE
        (whose data is carried) at most MAX_BLOCK bytes."""
        allowed = self.allowed.get(command)
        return (magic == REQUEST_MAGIC and allowed is not None and not flags & ~allowed
                and (length <= MAX_BLOCK or command > _WRITE))  # READ 0, WRITE 1

    def flags(self, command: Command) -> int:
        """The flags ``command`` may carry (0 when it is not served)."""
        return self.allowed.get(command, 0)
_new_tuple = tuple.__new__
_WRITE_COMMAND: Final = Command.WRITE
_WRITE: Final = int(Command.WRITE)


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    FAILED = "failed"


# Which state each step may start from, and where it leads.
_TRANSITIONS: dict[str, tuple[frozenset[State], State]] = {
    "client-flags": (frozenset({State.CLIENT_FLAGS}), State.OPTIONS),
    "enter-transmission": (frozenset({State.OPTIONS}), State.TRANSMISSION),
    "abort": (frozenset({State.OPTIONS}), State.CLOSED),
    "disconnect": (frozenset({State.TRANSMISSION}), State.CLOSED),
}

_COMMANDS: dict[int, Command] = {c.value: c for c in Command}
Buffer = bytes | bytearray | memoryview
# Plain ints: ``~`` of an IntFlag would drop the bits the enum does not know.
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE) | int(ClientFlag.NO_ZEROES)


def _default_alloc(length: int) -> memoryview:
    return memoryview(bytearray(length))


class ServerCodec:
    """The server side of one NBD connection.

    ``alloc(length)`` provides the buffer a WRITE payload is received into (use page-aligned
    pool buffers for O_DIRECT). With ``borrow_payloads``, a WRITE payload that arrives
    whole within one :meth:`feed` is instead a view of the bytes given to ``feed`` (no
    copy): the caller must be done with it, or copy it, before it reuses that buffer.
    ``greeting()`` must be sent first. After a ProtocolError the
    codec is FAILED: every later ``feed`` raises again; send :attr:`output` (it may hold an
    error reply) and disconnect.
    """

    def __init__(
        self,
        export: ExportInfo,
        alloc: Callable[[int], memoryview] = _default_alloc,
        borrow_payloads: bool = False,
        tls_required: bool = False,
    ) -> None:
        self.export = export
        self.tls_required = tls_required
        """Only NBD_OPT_STARTTLS and NBD_OPT_ABORT are served before TLS is up."""
        self.tls_active = False
        self._tls_pending = False  # STARTTLS acknowledged, handshake not done
        self.borrow_payloads = borrow_payloads
        self.state = State.CLIENT_FLAGS
        self.output = bytearray()
        """Bytes the server must send (option replies, codec-made error replies)."""
        self.structured = False
        self.base_allocation = False
        self.dirty_bitmap = ""
        """The name of the bitmap whose context was selected ("": none)."""
        self.no_zeroes = False
        self.export_name = ""
        self.transmission_flags = 0
        self._alloc = alloc
        self._hs = bytearray()  # unparsed handshake bytes
        self._partial = b""  # a request header split across feeds
        self._payload: memoryview | None = None  # WRITE payload being received
        self._payload_filled = 0
        self._payload_header: tuple[int, int, int, int] | None = None  # flags, cookie, offset, len
        self._skip = 0  # bytes of a rejected WRITE payload still to discard
        self._allowed: dict[int, int] = {}
        self._fast: dict[int, tuple[Command, int]] = {}
        self.header_check = HeaderCheck({})
        """The request header rule (:class:`HeaderCheck`), set when transmission starts."""

    # ------------------------------------------------------------------ plumbing
    def _transition(self, step: str) -> None:
        allowed, target = _TRANSITIONS[step]
        assert self.state in allowed, (step, self.state)
        self.state = target

    def _fail(self, message: str) -> ProtocolError:
        self.state = State.FAILED
        return ProtocolError(message, remote=True)

    def greeting(self) -> bytes:
        """The server's first bytes: magic, IHAVEOPT and the handshake flags."""
        return _GREETING.pack(
            NBD_MAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        )

    def feed(self, data: Buffer) -> list[Event]:
        """Consume bytes from the client; return the events they complete, in order.

        ``data`` may be a view of a buffer the caller reuses: nothing refers to it after
        the call returns. Incomplete input is kept (copied) for the next call. Raises
        ProtocolError (remote=True) when the client broke the protocol; the events of that
        call are lost and the connection must be dropped (after sending :attr:`output`).
        """
        if self.state is State.TRANSMISSION:
            return self._feed_transmission(data)
        if self.state is State.FAILED:
            raise ProtocolError("connection already failed", remote=True)
        if self.state is State.CLOSED:
            return []  # after DISC or ABORT the client must send nothing; ignore it
        if self._tls_pending and data:
            raise self._fail("bytes before the TLS handshake after NBD_OPT_STARTTLS")
        self._hs += data
        events: list[Event] = []
        while self.state in (State.CLIENT_FLAGS, State.OPTIONS) and not self._tls_pending:
            if not self._handshake_step(events):
                break
        if self._tls_pending and self._hs:
            raise self._fail("bytes after NBD_OPT_STARTTLS before its reply")
        if self._in_transmission() and self._hs:
            rest, self._hs = bytes(self._hs), bytearray()
            events.extend(self._feed_transmission(rest))
        return events

    def _in_transmission(self) -> bool:
        return self.state is State.TRANSMISSION

    # ----------------------------------------------------------------- handshake
    def _handshake_step(self, events: list[Event]) -> bool:
        """Parse one handshake message from ``_hs``; False when more bytes are needed."""
        hs = self._hs
        if self.state is State.CLIENT_FLAGS:
            if len(hs) < 4:
                return False
            (flags,) = _CLIENT_FLAGS.unpack_from(hs)
            del hs[:4]
            # The spec: the server MUST drop the connection on unknown client flags.
            if flags & ~_KNOWN_CLIENT_FLAGS:
                raise self._fail(f"unknown client flags {flags:#x}")
            if not flags & ClientFlag.FIXED_NEWSTYLE:
                raise self._fail("client does not speak fixed newstyle negotiation")
            self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._transition("client-flags")
            return True
        if len(hs) < _OPTION.size:
            return False
        magic, option, length = _OPTION.unpack_from(hs)
        if magic != IHAVEOPT:
            raise self._fail(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            if option != Option.EXPORT_NAME:
                self._option_reply(option, Rep.ERR_TOO_BIG, b"option data too long")
            raise self._fail(f"option {option} data too long ({length} bytes)")
        if len(hs) < _OPTION.size + length:
            return False
        payload = bytes(hs[_OPTION.size : _OPTION.size + length])
        del hs[: _OPTION.size + length]
        self._handle_option(option, payload, events)
        return True

    def _option_reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self.output += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data))
        self.output += data

    def _handle_option(self, option: int, data: bytes, events: list[Event]) -> None:
        if option == Option.STARTTLS or (self.tls_required and not self.tls_active
                                         and option != Option.ABORT):
            self._tls_option(option, data, events)
        elif option == Option.EXPORT_NAME:
            if len(data) > MAX_STRING:
                raise self._fail("export name too long")
            # Any name is accepted: one VBD is served (NBD_OPT_EXPORT_NAME cannot fail).
            self.export_name = data.decode("utf-8", "replace")
            self._enter_transmission()
            self.output += _EXPORT_NAME_REPLY.pack(self.export.size, self.transmission_flags)
            if not self.no_zeroes:
                self.output += _ZEROES_124
            events.append(self._negotiated())
        elif option == Option.ABORT:
            self._option_reply(option, Rep.ACK)
            self._transition("abort")
            events.append(Aborted())
        elif option == Option.LIST:
            if data:
                self._option_reply(option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return
            self._option_reply(option, Rep.SERVER, _U32.pack(0))  # one export: ""
            self._option_reply(option, Rep.ACK)
        elif option in (Option.INFO, Option.GO):
            self._info_or_go(option, data, events)
        elif option == Option.STRUCTURED_REPLY:
            if data:
                self._option_reply(option, Rep.ERR_INVALID, b"takes no data")
                return
            self.structured = True
            self._option_reply(option, Rep.ACK)
        elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            # Unknown options and EXTENDED_HEADERS (libnbd falls
            # back to compact headers): NBD_REP_ERR_UNSUP, payload already discarded.
            self._option_reply(option, Rep.ERR_UNSUP, b"option not supported")

    def _tls_option(self, option: int, data: bytes, events: list[Event]) -> None:
        """STARTTLS, and every option but ABORT while TLS is required and not up."""
        if option != Option.STARTTLS:
            if option == Option.EXPORT_NAME:  # no reply is possible: hang up (the spec)
                raise self._fail("NBD_OPT_EXPORT_NAME before TLS, which is required")
            self._option_reply(option, Rep.ERR_TLS_REQD, b"TLS is required: NBD_OPT_STARTTLS")
        elif not self.tls_required:
            self._option_reply(option, Rep.ERR_UNSUP, b"this export offers no TLS")
        elif self.tls_active:
            self._option_reply(option, Rep.ERR_INVALID, b"TLS is already up")
        elif data:
            self._option_reply(option, Rep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        else:
            self._option_reply(option, Rep.ACK)
            self._tls_pending = True
            events.append(StartTls())

    def tls_started(self) -> None:
        """The TLS handshake is done: option haggling starts over (the spec: what was
        negotiated before TLS is forgotten)."""
        assert self._tls_pending and self.state is State.OPTIONS
        self._tls_pending = False
        self.tls_active = True
        self.structured = False
        self.base_allocation = False
        self.dirty_bitmap = ""

    def _info_or_go(self, option: int, data: bytes, events: list[Event]) -> None:
        # Data: u32 name length, name, u16 number of info requests, u16 each.
        bad = self._parse_info_request(data)
        if isinstance(bad, str):
            self._option_reply(option, Rep.ERR_INVALID, bad.encode())
            return
        name, requests = bad
        flags = self._flags_for(self.structured)
        export = _INFO_EXPORT.pack(Info.EXPORT, self.export.size, flags)
        self._option_reply(option, Rep.INFO, export)
        if Info.BLOCK_SIZE in requests:
            self._option_reply(
                option,
                Rep.INFO,
                _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK),
            )
        if Info.NAME in requests:
            self._option_reply(option, Rep.INFO, _U16.pack(Info.NAME) + name.encode())
        if Info.DESCRIPTION in requests and self.export.description:
            text = self.export.description.encode()[:MAX_STRING]
            self._option_reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION) + text)
        self._option_reply(option, Rep.ACK)
        if option == Option.GO:
            self.export_name = name
            self._enter_transmission()
            events.append(self._negotiated())

    @staticmethod
    def _parse_info_request(data: bytes) -> tuple[str, set[int]] | str:
        if len(data) < 6:
            return "option data too short"
        (name_len,) = _U32.unpack_from(data)
        if name_len > MAX_STRING:
            return "export name too long"
        if 4 + name_len + 2 > len(data):
            return "export name runs past the option data"
        name = data[4 : 4 + name_len]
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if 6 + name_len + 2 * count != len(data):
            return "information request count does not match the option length"
        base = 6 + name_len
        requests = {_U16.unpack_from(data, base + 2 * i)[0] for i in range(count)}
        return name.decode("utf-8", "replace"), requests

    def _meta_context(self, option: int, data: bytes) -> None:
        # Data: u32 export name length, name, u32 number of queries, (u32 length, query)*.
        if not self.structured:
            # The spec: only after structured replies were negotiated; SHOULD be INVALID.
            self._option_reply(option, Rep.ERR_INVALID, b"negotiate structured replies first")
            return
        queries = self._parse_queries(data)
        if isinstance(queries, str):
            self._option_reply(option, Rep.ERR_INVALID, queries.encode())
            return
        offered = self.export.block_status
        bitmap = self.export.dirty_bitmap
        dirty = DIRTY_BITMAP_PREFIX + bitmap if bitmap else ""
        if option == Option.LIST_META_CONTEXT:
            # No query lists everything; "base:" (and "qemu:", "qemu:dirty-bitmap:")
            # lists the whole namespace.
            if offered and (not queries
                            or any(q in ("base:", BASE_ALLOCATION) for q in queries)):
                self._option_reply(option, Rep.META_CONTEXT,
                                   _U32.pack(0) + BASE_ALLOCATION.encode())
            if dirty and (not queries or any(q in ("qemu:", DIRTY_BITMAP_PREFIX, dirty)
                                             for q in queries)):
                self._option_reply(option, Rep.META_CONTEXT, _U32.pack(0) + dirty.encode())
        else:
            # SET replaces the selection; an empty selection is allowed.
            self.base_allocation = offered and BASE_ALLOCATION in queries
            if self.base_allocation:
                self._option_reply(option, Rep.META_CONTEXT,
                                   _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
            self.dirty_bitmap = bitmap if dirty and dirty in queries else ""
            if self.dirty_bitmap:
                self._option_reply(option, Rep.META_CONTEXT,
                                   _U32.pack(DIRTY_BITMAP_ID) + dirty.encode())
        self._option_reply(option, Rep.ACK)

    @staticmethod
    def _parse_queries(data: bytes) -> list[str] | str:
        if len(data) < 8:
            return "option data too short"
        (name_len,) = _U32.unpack_from(data)
        if name_len > MAX_STRING:
            return "export name too long"
        pos = 4 + name_len
        if pos + 4 > len(data):
            return "export name runs past the option data"
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(count):
            if pos + 4 > len(data):
                return "query count does not match the option length"
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > MAX_STRING:
                return "query too long"
            if pos + qlen > len(data):
                return "query runs past the option data"
            queries.append(data[pos : pos + qlen].decode("utf-8", "replace"))
            pos += qlen
        if pos != len(data):
            return "trailing bytes after the queries"
        return queries

    def _flags_for(self, structured: bool) -> int:
        export = self.export
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_CACHE
        if export.flush:
            flags |= TransmissionFlag.SEND_FLUSH
        if export.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if export.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if export.flush:
                flags |= TransmissionFlag.SEND_FUA
            if export.trim:
                flags |= TransmissionFlag.SEND_TRIM
            if export.zero:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
        if structured:
            flags |= TransmissionFlag.SEND_DF
        if self.export.rotational:
            flags |= TransmissionFlag.ROTATIONAL
        return int(flags)

    def _enter_transmission(self) -> None:
        self._transition("enter-transmission")
        self.transmission_flags = self._flags_for(self.structured)
        # Which command flags each command accepts. FUA is accepted on every command
        # (the spec: the server MUST accept it when SEND_FUA was negotiated, and
        # clients are known to set it everywhere).
        # Commands the export does not serve are refused with EINVAL (not in _allowed).
        export = self.export
        fua = int(CommandFlag.FUA) if export.flush else 0
        df = int(CommandFlag.DF) if self.structured else 0
        self._allowed = {
            Command.READ: fua | df,
            Command.WRITE: fua,
            Command.DISC: fua,
            Command.CACHE: fua,
            Command.BLOCK_STATUS: fua | int(CommandFlag.REQ_ONE),
        }
        if export.flush:
            self._allowed[Command.FLUSH] = fua
        if export.trim:
            self._allowed[Command.TRIM] = fua
        if export.zero:
            self._allowed[Command.WRITE_ZEROES] = (fua | int(CommandFlag.NO_HOLE)
                                                   | int(CommandFlag.FAST_ZERO))
        # Commands without payload or special handling, for the parser's fast path.
        fast = [c for c in (Command.READ, Command.FLUSH, Command.TRIM, Command.CACHE,
                            Command.WRITE_ZEROES) if c in self._allowed]
        status = self.base_allocation or bool(self.dirty_bitmap)  # a context to report
        if status:
            fast.append(Command.BLOCK_STATUS)
        self._fast = {int(c): (c, self._allowed[c]) for c in fast}
        self.header_check = HeaderCheck({
            int(c): f for c, f in self._allowed.items()
            if c is not Command.BLOCK_STATUS or status})

    def _negotiated(self) -> Negotiated:
        return Negotiated(self.export_name, self.structured, self.base_allocation,
                          self.transmission_flags, self.dirty_bitmap)

    # -------------------------------------------------------------- transmission
    def feed_partial(self, data: Buffer) -> tuple[list[Event], int]:
        """In transmission, consume only the bytes that complete the request an earlier
        feed left incomplete (the rest of its header, of its payload, or of a payload
        being skipped): its events, and how many bytes of ``data`` that took (all of them
        when it is still incomplete; none :attr:`between_requests`). The caller may then
        read the requests that follow itself, or feed them. Raises as :meth:`feed`."""
        events: list[Event] = []
        return events, self._finish_partial(data, events)

    def feed_request(self, data: Buffer, pos: int) -> tuple[list[Event], int]:
        """Between requests, in transmission: parse the one request whose whole header
        starts at ``data[pos]``, with as much of its payload as ``data`` holds (the rest
        goes to later feeds): its events, and the position after what it took. Raises
        as :meth:`feed`."""
        events: list[Event] = []
        return events, self._request(data, pos, data, pos + _REQ_SIZE, events)

    def _finish_partial(self, data: Buffer, events: list[Event]) -> int:
        pos = 0
        end = len(data)
        if self._skip:
            take = min(self._skip, end)
            self._skip -= take
            pos = take
        elif self._payload is not None:
            pos = self._fill_payload(data, 0, events)
        if self._partial and pos < end:
            need = _REQ_SIZE - len(self._partial)
            head = self._partial + bytes(data[pos : pos + need])
            pos += len(head) - len(self._partial)
            if len(head) < _REQ_SIZE:
                self._partial = head
                return end
            self._partial = b""
            pos = self._request(head, 0, data, pos, events)
        return pos

    def _feed_transmission(self, data: Buffer) -> list[Event]:
        events: list[Event] = []
        end = len(data)
        pos = self._finish_partial(data, events)
        unpack = REQUEST.unpack_from
        fast = self._fast
        write_flags = self._allowed[Command.WRITE]
        alloc = self._alloc
        borrow = self.borrow_payloads
        if pos < end and type(data) is not memoryview:
            data = memoryview(data)  # payloads are sliced out of it without a copy
        while pos < end:
            if self.state is not State.TRANSMISSION:
                return events  # DISC: ignore whatever follows
            if end - pos < _REQ_SIZE:
                self._partial = bytes(data[pos:])
                break
            magic, flags, cmd, cookie, offset, length = unpack(data, pos)
            pos += _REQ_SIZE
            entry = fast.get(cmd)
            # HeaderCheck.accepts, inline (twice: without and with a payload).
            if (
                entry is not None
                and magic == REQUEST_MAGIC
                and not flags & ~entry[1]
                and length <= MAX_BLOCK
            ):
                # The fast path: a valid request without payload (built without the
                # NamedTuple's Python-level __new__, which costs more than the tuple).
                events.append(_new_tuple(Request, (entry[0], flags, cookie, offset, length, None)))
                continue
            if (
                cmd == _WRITE
                and magic == REQUEST_MAGIC
                and not flags & ~write_flags
                and length <= end - pos
                and length <= MAX_BLOCK
            ):
                # A valid WRITE whose payload is all here: lent or copied out at once,
                # without _fill_payload's state.
                if borrow:
                    payload = data[pos : pos + length]
                else:
                    payload = alloc(length)
                    payload[:] = data[pos : pos + length]
                pos += length
                events.append(_new_tuple(Request, (_WRITE_COMMAND, flags, cookie, offset, length,
                                                   payload)))
                continue
            pos = self._request(data, pos - _REQ_SIZE, data, pos, events)
        return events

    def _request(self, hbuf: Buffer, hpos: int, data: Buffer, pos: int,
                 events: list[Event]) -> int:
        """Handle the header at ``hbuf[hpos:]``; its payload (if any) starts at ``data[pos]``.

        Returns the position in ``data`` after what was consumed.
        """
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(hbuf, hpos)
        if magic != REQUEST_MAGIC:
            raise self._fail(f"bad request magic {magic:#x}")
        if self.state is not State.TRANSMISSION:
            return len(data)
        command = _COMMANDS.get(cmd)
        if cmd == Command.WRITE:
            if length > MAX_BLOCK:
                # The payload cannot be skipped safely: error, then disconnect.
                self.output += self.reply_error(cookie, _errno.EINVAL,
                                                f"write of {length} bytes exceeds {MAX_BLOCK}")
                raise self._fail(f"write payload of {length} bytes exceeds {MAX_BLOCK}")
            if flags & ~self._allowed[Command.WRITE]:
                self.output += self.reply_error(cookie, _errno.EINVAL,
                                                f"invalid flags {flags:#x} for WRITE")
                self._skip = length
                take: int = min(length, len(data) - pos)
                self._skip -= take
                return pos + take
            self._payload = self._alloc(length)
            self._payload_filled = 0
            self._payload_header = (flags, cookie, offset, length)
            return self._fill_payload(data, pos, events)
        if command is None:
            self.output += self.reply_error(cookie, _errno.EINVAL, f"unknown command {cmd}")
            return pos
        if command not in self._allowed and command is not Command.RESIZE:
            self.output += self.reply_error(cookie, _errno.EINVAL,
                                            f"{command.name} is not served by this export")
            return pos
        if flags & ~self._allowed.get(cmd, 0):
            self.output += self.reply_error(
                cookie, _errno.EINVAL, f"invalid flags {flags:#x} for {command.name}",
                read=command is Command.READ)
            return pos
        if command is Command.READ and length > MAX_BLOCK:
            self.output += self.reply_error(cookie, _errno.EINVAL,
                                            f"read of {length} bytes exceeds {MAX_BLOCK}",
                                            read=True)
            return pos
        if (command is Command.BLOCK_STATUS and not self.base_allocation
                and not self.dirty_bitmap):
            self.output += self.reply_error(cookie, _errno.EINVAL,
                                            "no metadata context was negotiated")
            return pos
        if command is Command.RESIZE:
            self.output += self.reply_error(cookie, _errno.EINVAL, "resize is not supported")
            return pos
        if command is Command.DISC:
            self._transition("disconnect")
        events.append(Request(command, flags, cookie, offset, length))
        return pos

    def _fill_payload(self, data: Buffer, pos: int, events: list[Event]) -> int:
        payload = self._payload
        assert payload is not None and self._payload_header is not None
        filled = self._payload_filled
        take = min(len(payload) - filled, len(data) - pos)
        if take:
            payload[filled : filled + take] = memoryview(data)[pos : pos + take]
        filled += take
        if filled < len(payload):
            self._payload_filled = filled
            return pos + take
        flags, cookie, offset, length = self._payload_header
        self._payload = None
        self._payload_header = None
        events.append(Request(Command.WRITE, flags, cookie, offset, length, payload))
        return pos + take

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the WRITE payload being received goes, or None.

        A server may receive straight into it (no copy), then call
        :meth:`payload_received` with the number of bytes it stored there.
        """
        if self._payload is None or self.state is not State.TRANSMISSION:
            return None
        return self._payload[self._payload_filled :]

    def payload_received(self, length: int) -> list[Event]:
        """``length`` bytes were stored at the start of :meth:`payload_buffer`; returns
        the WRITE request when its payload is complete."""
        payload = self._payload
        assert payload is not None and self._payload_header is not None
        assert 0 <= length <= len(payload) - self._payload_filled
        self._payload_filled += length
        if self._payload_filled < len(payload):
            return []
        flags, cookie, offset, size = self._payload_header
        self._payload = None
        self._payload_header = None
        return [Request(Command.WRITE, flags, cookie, offset, size, payload)]

    @property
    def payload_pending(self) -> int:
        """Bytes of a partly received WRITE payload already buffered."""
        return self._payload_filled if self._payload is not None else 0

    def allowed_flags(self, command: Command) -> int:
        """The request flags ``command`` may carry (as negotiated); others get EINVAL."""
        return self._allowed.get(command, 0)

    @property
    def between_requests(self) -> bool:
        """In transmission with nothing of a next request buffered (no part of a header,
        no partly received payload): the stream may be read elsewhere from here."""
        return (self.state is State.TRANSMISSION and not self._partial
                and self._payload is None and not self._skip)

    # ------------------------------------------------------------------- replies
    def reply_read(self, cookie: int, offset: int, data: memoryview) -> list[bytes | memoryview]:
        """Buffers to send for a successful READ: a header and ``data`` itself (not copied)."""
        head = self.read_reply_header(cookie, offset, len(data))
        return [head, data] if len(data) else [head]

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The bytes that precede ``length`` bytes of READ data in a successful reply (for a
        zero-length read with structured replies, the whole reply)."""
        if self.structured:
            if not length:
                return _CHUNK_NONE.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, _NONE, cookie, 0)
            return _CHUNK_DATA.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, _OFFSET_DATA,
                                    cookie, 8 + length, offset)
        return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    @staticmethod
    def reply_ok(cookie: int) -> bytes:
        """A successful reply without payload (simple replies are allowed even when
        structured replies were negotiated, for every command but READ)."""
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, err: int, message: str = "", *, read: bool = False) -> bytes:
        """An error reply for errno ``err`` (mapped with :func:`nbd_error`).

        With structured replies it is an NBD_REPLY_TYPE_ERROR chunk carrying ``message``;
        otherwise a simple reply (for a READ, no data follows).
        """
        code = nbd_error(err)
        if self.structured:
            text = message.encode("utf-8", "replace")[:MAX_STRING]
            return _CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR,
                                     cookie, 6 + len(text), code, len(text)) + text
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, cookie)

    def reply_block_status(
        self, cookie: int, length: int, extents: Sequence[tuple[int, int]], req_one: bool,
        context: int = BASE_ALLOCATION_ID, done: bool = True,
    ) -> bytes:
        """One NBD_REPLY_TYPE_BLOCK_STATUS chunk for the metadata context ``context``
        (BASE_ALLOCATION_ID or DIRTY_BITMAP_ID), with the DONE flag when ``done`` (a
        reply has one chunk per selected context; the last one is DONE).

        ``extents`` are (length, flags) pairs in order from the request offset. Zero-length
        extents are dropped; at most MAX_STATUS_EXTENTS (one with ``req_one``) are sent; the
        extents never run past ``length``. Raises ValueError when none is left (the
        caller's bug: the VBD always describes a non-empty range).
        """
        limit = 1 if req_one else MAX_STATUS_EXTENTS
        body = bytearray()
        total = 0
        count = 0
        pack = _EXTENT.pack
        for ext_len, ext_flags in extents:
            if ext_len <= 0:
                continue
            ext_len = min(ext_len, length - total)
            if ext_len <= 0:
                break
            body += pack(ext_len, ext_flags)
            total += ext_len
            count += 1
            if count == limit or total >= length:
                break
        if not count:
            raise ValueError("block status reply without extents")
        head = _CHUNK_STATUS.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                  ReplyType.BLOCK_STATUS, cookie, 4 + len(body), context)
        return head + body


_EXTENT = struct.Struct(">II")
