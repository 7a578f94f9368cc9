"""The ``nbd`` driver: an image served by a remote NBD server (the C ``block-nbd.c``).

What follows ``nbd:`` in the image string names the server, in one of these forms:

* ``/run/x.sock`` — a Unix socket path, the default export (as the C driver);
* ``HOST:PORT`` — TCP, the default export (``10.0.0.2:10809``, ``[::1]:10809``; as C);
* an NBD URI (the NBD URI specification, parsed by libnbd): ``nbd://HOST[:PORT]/EXPORT``,
  ``nbd+unix:///EXPORT?socket=PATH``, and with TLS ``nbds://...``, ``nbds+unix://...``.
  The client's TLS credentials are named in the query as libnbd's URIs name them:
  ``tls-certificates=DIR`` (a directory laid out as qemu's and nbdkit's: ``ca-cert.pem``,
  and for client certificates ``client-cert.pem``, ``client-key.pem``) or
  ``tls-psk-file=FILE`` (a PSK file as ``nbdkit --tls-psk`` reads; the user name is the
  URI's ``user@``). Other schemes (``nbd+vsock``, ``http``...) are refused (EINVAL).

Usable as a leaf and as the parent of a differencing VHD: a local snapshot over a remote
base is made with ``vhd-util snapshot -m -n child.vhd -p nbd:SERVER`` (a raw parent: null
parent uuid; the locators hold ``nbd:SERVER`` verbatim, see
``blktap.vhd.image.NETWORK_PARENT_TYPES``; the child's size is the export's). The vhd
driver opens such a parent with this driver, read-only, after checking that the export
still covers the child's virtual size (:func:`check_export_covers`): a smaller export is
refused (EINVAL) rather than read as zeros past its end.

Client: libnbd's Python bindings, not a client of our own
---------------------------------------------------------
Chosen by measurement and by what each brings. bench/nbd_driver_read.py: 4 KiB random
reads from nbdkit's file plugin (random bytes in /dev/shm) on a Unix socket, 20000 reads
per run, in one asyncio process: libnbd's asynchronous API driven from the loop
(``aio_pread`` into the caller's buffer, completion callbacks, ``add_reader``), this driver
on top of it, and a minimal asyncio client of our own (fixed newstyle, structured
replies, ``struct`` parsing in an ``asyncio.Protocol``). The machine is shared (2 cores,
other helpers' tests), so IOPS swing 10x between runs; the client's CPU time per read
is steadier. Medians of 15 runs (in brackets: the medians of two earlier series of 9):

======  ============  ========================  ========================  ================
depth   client        IOPS                      CPU per read              ratio CPU
======  ============  ========================  ========================  ================
QD1     libnbd        16172 (16852, 17427)      18.9 us (19.7, 18.9)
QD1     own           9345 (9064, 17404)        35.1 us (45.9, 13.4)      0.7x-2.4x libnbd
QD1     this driver   11859 (-, 13343)          22.6 us (-, 24.3)
QD32    libnbd        20798 (29695, 34630)      12.9 us (15.1, 11.4)
QD32    own           26029 (31190, 30500)      7.5 us (8.6, 6.4)         ~0.55x libnbd
QD32    this driver   18375 (-, 18346)          18.4 us (-, 15.6)
======  ============  ========================  ========================  ================

At depth 32 a client of our own costs about half libnbd's CPU per read (one parse per
batch of replies, where libnbd calls back into Python once per reply); IOPS are the
server's and within the noise. At depth 1 ours swings with timing (a reply whose header
and data arrive in separate segments costs a second loop wakeup; libnbd reads both in C
in one notify) and is as often dearer as cheaper. Neither is a bottleneck next to a
network round trip. libnbd brings what a client of our own would still need written
and tested against every server: URIs, STARTTLS with X.509 *and PSK* (Python 3.11's ssl
module has no PSK), structured replies, block status, the block-size constraints, and
strict checking of what the server sends. So libnbd it is: Debian's python3-libnbd, made
importable in the venv by scripts/setup.sh (a ``.pth`` naming a directory of links to the
Debian module, only when its ABI tag matches the venv's Python). What this driver adds
per request (its request record, retry bookkeeping) costs 4-6 us of CPU.

Behaviour
---------
* Many requests in flight on each connection; structured replies (holes arrive as
  OFFSET_HOLE chunks) and ``base:allocation`` block status are asked for. When the server
  offers block status, the whole export's allocation is read at open into an extent map
  (kept current by this image's own writes), so :meth:`NbdImage.allocation` answers from
  memory: holes read as zeros without a request, and a chain over this image sees them.
  Without block status every byte is DATA. The map is kept in pieces of
  :data:`MAP_CHUNK` bytes: random writes over holes fragment it, and in one sorted list
  over the whole export each write moved every run after it, a cost that grew with the
  number of writes. (bench/nbd_driver_writes.py, 4 KiB random writes into an empty
  export through a chain on this driver: 149k instructions each with one list and a
  task per write, 94k with pieces, no task, the loop kept and one libnbd call less.)
* Flush, FUA, trim and write-zeroes are sent when the server offers them; otherwise FUA
  becomes write + flush, write-zeroes writes zeros, trim does nothing (it is advisory),
  and flush does nothing when the server has no flush (it says its writes are durable).
* Multi-conn: with ``connections=N`` in a URI's query (1 to 8; default 1) and a server
  that offers CAN_MULTI_CONN, N connections share the requests (a flush on one covers the
  others then). Refused for a server that does not offer it. Off by default because on
  one host it does not help: ``bench/nbd_driver_read.py --multi-conn`` (nbdkit file
  plugin, QD32, medians of 7 runs) gave 30386 IOPS at 15.2 us CPU per read over one
  connection, 16840 / 25147 IOPS at 21.2 / 23.6 us over two / four: one event loop serves
  them all, and nbdkit already serves one connection's requests in parallel. It is for a
  network path where one TCP stream is window- or latency-limited.
* Reconnect: when a connection drops, the requests it had in flight and every new one wait
  while the driver reconnects with exponential backoff (:data:`BACKOFF_FIRST_S` doubling up
  to :data:`BACKOFF_MAX_S`). A request that waits longer than :data:`REQUEST_WAIT_S` fails
  with EIO naming the last connection error; so does one that was in flight on
  :data:`MAX_SENDS` connections that each dropped before it was answered (a server that
  hangs up in the middle of one reply). A server that comes back with another size fails
  every request with EIO.
* Retried after a reconnect: every request that was not answered. Reads, flush and block
  status change nothing. A WRITE, WRITE_ZEROES or TRIM that the old connection may already
  have applied is idempotent: applying the same bytes (or zeros) at the same offset twice
  leaves what applying it once does. No write that depends on it can have been sent
  meanwhile, because it was never acknowledged, and any write in flight beside it was
  unordered against it anyway. The one hazard left is a server that is still executing an
  old connection's write after that connection is gone, and applies it after a newer
  write to the same range was acknowledged on a new connection. A restarted server has
  no such request; a server that only lost the connection (a network cut) might, and
  this driver cannot rule it out: that is the price of retrying writes instead of
  failing them.
* Not bounded: a request in flight on a connection that stays up while the server never
  answers waits until the server answers or the connection drops: the driver sets no
  deadline on a request a live connection carries.
* The VBD's request timeout (``tap-ctl -t``) does not reach drivers (OpenOptions has no
  such field), so the wait is :data:`REQUEST_WAIT_S`, tapdisk's default request timeout.

Errors: an image string that names no server, or a URI with an unknown scheme: EINVAL;
a server that cannot be reached or refuses the export at open: the connection's errno
(ECONNREFUSED, ENOENT...); a read-write open of a read-only export: EROFS; an export the
server's block-size constraints make unusable: EINVAL; TLS refused (a certificate the
client cannot verify, an unknown PSK user): EIO with GnuTLS's message; a server that
requires TLS reached without it: ENOTSUP; a server error on a request: its errno; a lost
connection: EIO after the wait above.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from blktap.block.driver import (
    SECTOR_SIZE,
    Alloc,
    Extent,
    FastIO,
    ImageInfo,
    OpenOptions,
    register,
)
from blktap.errors import BlktapError, ImageFormatError, InvalidArgument

log = logging.getLogger(__name__)

REQUEST_WAIT_S = 120.0
"""How long a request waits for a connection before failing with EIO (tapdisk's default
request timeout: 0 in the OPEN message means 120 s)."""
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
CONNECT_TIMEOUT_S = 10.0
"""One connection attempt (connect, TLS, handshake) gives up after this long."""
MAX_SENDS = 4
"""A request is sent on at most this many connections that dropped before answering it."""
MAX_CONNECTIONS = 8
MAX_REQUEST = 32 << 20
"""Largest READ/WRITE sent when the server states no maximum (the spec's default)."""
_ZERO_CHUNK = 1 << 30
"""Largest WRITE_ZEROES/TRIM/BLOCK_STATUS length sent (the wire length is 32 bits)."""
_ZEROS = memoryview(bytes(1 << 20))

URI_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
"""The NBD URI schemes accepted (TCP and Unix sockets, without or with TLS)."""

_LOST = frozenset({errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE})
"""Completion errors that are no answer from the server: the request is sent again."""

_READ, _WRITE, _FLUSH, _TRIM, _ZERO, _STATUS = range(6)
_NAMES = ("read", "write", "flush", "trim", "write-zeroes", "block-status")

_nbd: Any = None


def _libnbd() -> Any:
    """The ``nbd`` module (python3-libnbd). Raises BlktapError (ENOSYS) when absent."""
    global _nbd
    if _nbd is None:
        try:
            _nbd = importlib.import_module("nbd")
        except ImportError:
            raise BlktapError(
                "the nbd driver needs libnbd's Python bindings (Debian python3-libnbd, "
                "made importable in the venv by scripts/setup.sh)", errno=errno.ENOSYS,
            ) from None
    return _nbd


# ------------------------------------------------------------------ targets
@dataclass(frozen=True, slots=True)
class Target:
    """A server and export, parsed from what follows ``nbd:``."""

    text: str
    """As given (shown in logs and errors)."""
    unix: str | None = None
    """A Unix socket path (the C driver's path form)."""
    host: str | None = None
    port: int = 0
    """TCP host and port (the C driver's ``IP:PORT`` form)."""
    uri: str | None = None
    """An NBD URI for libnbd (our own ``connections`` parameter removed)."""
    connections: int = 1


def parse_target(text: str) -> Target:
    """Parse what follows ``nbd:``. Raises InvalidArgument (EINVAL) for anything that is
    not a socket path, ``HOST:PORT`` or an NBD URI of a scheme in :data:`URI_SCHEMES`."""
    if not text:
        raise InvalidArgument("nbd: names no server (a socket path, HOST:PORT or an NBD URI)")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in URI_SCHEMES:
            raise InvalidArgument(
                f"nbd:{text}: unknown NBD URI scheme {parts.scheme!r} "
                f"(accepted: {', '.join(URI_SCHEMES)})")
        base, _, query = text.partition("?")
        conns = 1
        kept = []
        for piece in query.split("&") if query else []:
            key, _, value = piece.partition("=")
            if key == "connections":
                if not value.isdigit() or not 1 <= int(value) <= MAX_CONNECTIONS:
                    raise InvalidArgument(
                        f"nbd:{text}: connections={value!r} is not 1 to {MAX_CONNECTIONS}")
                conns = int(value)
            else:
                kept.append(piece)  # as written: libnbd decodes it
        uri = f"{base}?{'&'.join(kept)}" if kept else base
        return Target(text, uri=uri, connections=conns)
    if text.startswith("/"):
        return Target(text, unix=text)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(
            f"nbd:{text}: not a socket path (absolute), HOST:PORT or an NBD URI")
    return Target(text, host=host, port=int(port))


# --------------------------------------------------------- allocation map
MAP_CHUNK = 64 << 20
"""Span of one piece of :class:`AllocMap`: a change moves at most one piece's runs."""


class _Runs:
    """Piecewise-constant allocation of ``[base, end)``: ``starts[i]`` begins a run of kind
    ``kinds[i]`` (Alloc.DATA or Alloc.ZERO) that lasts until ``starts[i + 1]`` (or end).
    Adjacent runs always differ."""

    __slots__ = ("end", "kinds", "starts")

    def __init__(self, base: int, end: int, kind: Alloc) -> None:
        self.end = end
        self.starts: list[int] = [base]
        self.kinds: list[Alloc] = [kind]

    def set(self, offset: int, end: int, kind: Alloc) -> None:
        """Make ``[offset, end)`` (inside the piece, not empty) of ``kind``."""
        starts, kinds = self.starts, self.kinds
        i = bisect.bisect_right(starts, offset) - 1
        j = bisect.bisect_right(starts, end - 1) - 1
        if i == j and kinds[i] == kind:
            return
        after = kinds[j]  # the kind that resumes at ``end``
        new_starts = [offset]
        new_kinds = [kind]
        if end < self.end and (j + 1 >= len(starts) or starts[j + 1] != end):
            new_starts.append(end)
            new_kinds.append(after)
        lo = i + 1 if starts[i] < offset else i
        starts[lo : j + 1] = new_starts
        kinds[lo : j + 1] = new_kinds
        # Merge equal neighbours around the change.
        k = max(lo - 1, 0)
        stop = min(lo + len(new_starts) + 1, len(starts))
        while k + 1 < stop:
            if kinds[k] == kinds[k + 1]:
                del starts[k + 1]
                del kinds[k + 1]
                stop -= 1
            else:
                k += 1

    def extents(self, offset: int, end: int, out: list[Extent]) -> None:
        """Append the extents covering ``[offset, end)``, merging with ``out``'s last."""
        starts, kinds = self.starts, self.kinds
        i = bisect.bisect_right(starts, offset) - 1
        pos = offset
        while pos < end:
            stop = min(starts[i + 1] if i + 1 < len(starts) else self.end, end)
            _append(out, pos, stop - pos, kinds[i])
            pos = stop
            i += 1

    def all_data(self, offset: int, end: int) -> bool:
        starts = self.starts
        i = bisect.bisect_right(starts, offset) - 1
        return self.kinds[i] == Alloc.DATA and (i + 1 >= len(starts) or starts[i + 1] >= end)


def _append(out: list[Extent], offset: int, length: int, kind: Alloc) -> None:
    if out and out[-1].alloc == kind:
        last = out[-1]
        out[-1] = Extent(last.offset, last.length + length, kind)
    else:
        out.append(Extent(offset, length, kind))


class AllocMap:
    """The allocation of ``[0, size)``, DATA or ZERO at byte granularity, kept as one
    piece per :data:`MAP_CHUNK` bytes: a piece of one kind is that kind, a mixed one is
    a :class:`_Runs`. Random small writes over holes fragment the map; pieces keep
    the cost of a change to the runs of one piece (one sorted list over the whole export
    made each write move every run after it)."""

    def __init__(self, size: int, chunk: int = MAP_CHUNK) -> None:
        self.size = size
        self.chunk = chunk
        self.pieces: list[Alloc | _Runs] = [Alloc.DATA] * max(1, -(-size // chunk))

    def set(self, offset: int, length: int, kind: Alloc) -> None:
        """Make ``[offset, offset + length)`` of ``kind``."""
        end = min(self.size, offset + length)
        chunk, pieces = self.chunk, self.pieces
        while offset < end:
            n = offset // chunk
            base = n * chunk
            stop = min(base + chunk, end)
            piece = pieces[n]
            whole = min(base + chunk, self.size)
            if offset == base and stop == whole:
                pieces[n] = kind
            elif isinstance(piece, _Runs):
                piece.set(offset, stop, kind)
                if len(piece.kinds) == 1:
                    pieces[n] = piece.kinds[0]
            elif piece != kind:
                runs = _Runs(base, whole, piece)
                runs.set(offset, stop, kind)
                pieces[n] = runs
            offset = stop

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Extents covering exactly the range, in order, adjacent ones of different kinds."""
        end = offset + length
        chunk, pieces = self.chunk, self.pieces
        out: list[Extent] = []
        while offset < end:
            n = offset // chunk
            stop = min((n + 1) * chunk, end)
            piece = pieces[n]
            if isinstance(piece, _Runs):
                piece.extents(offset, stop, out)
            else:
                _append(out, offset, stop - offset, piece)
            offset = stop
        return out

    def holds(self, offset: int, length: int) -> int:
        """1 when the range is all DATA, else -1 (never 0: nothing here is UNALLOCATED)."""
        end = offset + length
        chunk, pieces = self.chunk, self.pieces
        while offset < end:
            n = offset // chunk
            stop = min((n + 1) * chunk, end)
            piece = pieces[n]
            if isinstance(piece, _Runs):
                if not piece.all_data(offset, stop):
                    return -1
            elif piece != Alloc.DATA:
                return -1
            offset = stop
        return 1

    def all_data(self) -> bool:
        return all(piece == Alloc.DATA for piece in self.pieces)


# ------------------------------------------------------------ connections
class _Op:
    """One request, possibly sent on several connections (see the module docstring)."""

    __slots__ = (
        "buf",
        "extents",
        "flags",
        "fut",
        "kind",
        "length",
        "nbuf",
        "offset",
        "sends",
        "since",
        "token",
    )

    def __init__(self, kind: int, offset: int, length: int, buf: memoryview | None,
                 flags: int, fut: asyncio.Future[None]) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.buf = buf
        self.flags = flags
        self.fut = fut
        self.sends = 0
        self.since = 0.0
        """When it started waiting for a connection (0 while it has one)."""
        self.token = 0
        """Which send a completion belongs to (a stale send's completion is ignored)."""
        self.extents: list[tuple[int, int]] = []
        self.nbuf: Any = None
        """The libnbd Buffer over ``buf``, kept while a send may use it."""


class ConnectError(BlktapError):
    """A connection attempt failed (errno from the socket or the handshake)."""


class _Connection:
    """One libnbd handle driven by the event loop: its descriptor is watched for reading
    always and for writing while libnbd has bytes to send."""

    def __init__(self, image: NbdImage, handle: Any) -> None:
        self.image = image
        self.h = handle
        self.fd = handle.aio_get_fd()
        self.loop = asyncio.get_running_loop()
        self.alive = True
        self.writing = False
        self.inflight: dict[int, _Op] = {}
        self.loop.add_reader(self.fd, self._readable)
        self._after()

    def _readable(self) -> None:
        try:
            self.h.aio_notify_read()
        except Exception as exc:
            self.lost(f"{exc}")
            return
        self._after()

    def _writable(self) -> None:
        try:
            self.h.aio_notify_write()
        except Exception as exc:
            self.lost(f"{exc}")
            return
        self._after()

    def _after(self) -> None:
        """Watch for writability while libnbd wants to send; notice a dead handle."""
        if not self.alive:
            return
        h = self.h
        if h.aio_is_dead() or h.aio_is_closed():
            self.lost("the server closed the connection")
            return
        want = bool(h.aio_get_direction() & 2)  # AIO_DIRECTION_WRITE
        if want != self.writing:
            self.writing = want
            if want:
                self.loop.add_writer(self.fd, self._writable)
            else:
                self.loop.remove_writer(self.fd)

    def lost(self, reason: str) -> None:
        """The connection is gone: stop watching it, hand its requests back to the image."""
        if not self.alive:
            return
        self.alive = False
        self.loop.remove_reader(self.fd)
        if self.writing:
            self.loop.remove_writer(self.fd)
        ops = list({id(op): op for op in self.inflight.values()}.values())
        self.inflight.clear()
        self.image._connection_lost(self, reason, ops)

    def close(self) -> None:
        """Disconnect (requests in flight are the caller's to fail). Never waits for the
        server: with requests still in flight the socket is shut down first, so that
        libnbd's orderly shutdown (which waits for their answers) ends at once."""
        was = self.alive
        self.alive = False
        if was:
            self.loop.remove_reader(self.fd)
            if self.writing:
                self.loop.remove_writer(self.fd)
        if self.h.aio_in_flight() > 0:
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.h.shutdown()


async def _drive(handle: Any, done: Callable[[], bool], deadline: float, what: str) -> None:
    """Run ``handle``'s state machine from the loop until ``done()``. Raises ConnectError
    when the handle dies (with libnbd's message and errno) or at ``deadline``."""
    nbd = _libnbd()
    loop = asyncio.get_running_loop()
    while not done():
        if handle.aio_is_dead() or handle.aio_is_closed():
            raise ConnectError(f"{what}: the server closed the connection during the "
                               "handshake", errno=errno.ECONNRESET)
        fd = handle.aio_get_fd()
        direction = handle.aio_get_direction()
        ready: asyncio.Future[int] = loop.create_future()

        def fire(which: int, fut: asyncio.Future[int] = ready) -> None:
            if not fut.done():
                fut.set_result(which)

        if direction & nbd.AIO_DIRECTION_READ:
            loop.add_reader(fd, fire, nbd.AIO_DIRECTION_READ)
        if direction & nbd.AIO_DIRECTION_WRITE:
            loop.add_writer(fd, fire, nbd.AIO_DIRECTION_WRITE)
        try:
            which = await asyncio.wait_for(ready, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ConnectError(f"{what}: no answer within {CONNECT_TIMEOUT_S:.0f} s",
                               errno=errno.ETIMEDOUT) from None
        finally:
            if direction & nbd.AIO_DIRECTION_READ:
                loop.remove_reader(fd)
            if direction & nbd.AIO_DIRECTION_WRITE:
                loop.remove_writer(fd)
        try:
            if which == nbd.AIO_DIRECTION_READ:
                handle.aio_notify_read()
            else:
                handle.aio_notify_write()
        except nbd.Error as exc:
            raise ConnectError(f"{what}: {exc.string}", errno=exc.args[1] or errno.EIO) from None


async def _connect(target: Target) -> Any:
    """A ready libnbd handle for ``target`` (structured replies and base:allocation asked
    for). Raises ConnectError with the failure's errno."""
    nbd = _libnbd()
    h = nbd.NBD()
    what = f"nbd:{target.text}"
    try:
        h.set_handle_name("blktap")
        h.add_meta_context("base:allocation")
        h.set_pread_initialize(False)  # the buffer is the caller's; libnbd need not zero it
        if target.uri is not None:
            h.set_uri_allow_transports(nbd.ALLOW_TRANSPORT_TCP | nbd.ALLOW_TRANSPORT_UNIX)
            h.set_uri_allow_local_file(True)  # tls-certificates=DIR, tls-psk-file=FILE
            h.aio_connect_uri(target.uri)
        elif target.unix is not None:
            h.aio_connect_unix(target.unix)
        else:
            h.aio_connect_tcp(target.host, str(target.port))
    except nbd.Error as exc:
        raise ConnectError(f"{what}: {exc.string}", errno=exc.args[1] or errno.EIO) from None
    await _drive(h, lambda: bool(h.aio_is_ready()), time.monotonic() + CONNECT_TIMEOUT_S, what)
    return h


async def check_export_covers(target_text: str, size: int, child: str) -> None:
    """Raise ImageFormatError (EINVAL) when ``nbd:target_text`` exports fewer than
    ``size`` bytes: the parent of ``child``, a differencing VHD of that virtual size.
    Raises as :func:`open_nbd` when the server cannot be reached."""
    target = parse_target(target_text)
    h = await _connect(target)
    try:
        have = h.get_size()
    finally:
        h.shutdown()
    if have < size:
        raise ImageFormatError(
            f"parent export nbd:{target_text} has {have} bytes, fewer than the child's "
            f"virtual size {size}", path=child, structure="parent locator", field="size",
            value=have)


# ------------------------------------------------------------------ image
class NbdImage:
    """An open ``nbd`` image. Create it with :func:`open_nbd`."""

    type_name = "nbd"
    parent = None

    def __init__(self, path: str, target: Target, handle: Any, read_only: bool) -> None:
        nbd = _libnbd()
        self.path = path
        self.target = target
        self.read_only = read_only
        size = handle.get_size()
        self.export_size = size
        self.info = ImageInfo(size=size - size % SECTOR_SIZE)
        self.can_flush = bool(handle.can_flush())
        self.can_fua = bool(handle.can_fua())
        self.can_trim = bool(handle.can_trim())
        self.can_zero = bool(handle.can_zero())
        self.can_fast_zero = self.can_zero and bool(handle.can_fast_zero())
        self.can_multi_conn = bool(handle.can_multi_conn())
        self.can_status = bool(handle.can_meta_context("base:allocation"))
        self.structured = bool(handle.get_structured_replies_negotiated())
        maximum = handle.get_block_size(nbd.SIZE_MAXIMUM)
        self.max_request = min(MAX_REQUEST, maximum) if maximum else MAX_REQUEST
        self.max_request -= self.max_request % SECTOR_SIZE
        self.map: AllocMap | None = AllocMap(self.info.size) if self.can_status else None
        self.fully_allocated = self.map is None
        """True without block status, or when the export had no hole at open: reads then
        need no allocation lookup (holes that appear later are read from the server)."""
        self.wait_s = REQUEST_WAIT_S
        """How long a request waits for a connection (tests shorten it)."""
        self.reconnects = 0
        self.requests_sent = 0
        """Requests sent to the server (each send of a retried one counts)."""
        self._loop = asyncio.get_running_loop()
        """Kept: asking for the running loop costs a getpid() system call each time."""
        self._conns: list[_Connection] = []
        self._next = 0
        self._want = target.connections
        self._waiting: collections.deque[_Op] = collections.deque()
        self._reconnector: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        """Set when a request starts waiting: the reconnector tries again at once."""
        self._last_error = ""
        self._closed = False
        self._broken = "the image is closed"
        """Why requests fail once closed (a size change on reconnect closes it too)."""
        self._adopt(handle)

    # ------------------------------------------------------------ connections
    def _adopt(self, handle: Any) -> _Connection:
        conn = _Connection(self, handle)
        if conn.alive:  # it may have died already (then _connection_lost has run)
            self._conns.append(conn)
        return conn

    def _connection_lost(self, conn: _Connection, reason: str, ops: list[_Op]) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        if self._closed:
            return
        self._last_error = reason
        log.warning("nbd:%s: connection lost (%s); %d requests wait for a new one",
                    self.target.text, reason, len(ops))
        for op in ops:
            self._requeue(op, reason)
        self._start_reconnect()

    def _requeue(self, op: _Op, reason: str) -> None:
        if op.fut.done():
            return
        if self._closed:
            op.fut.set_exception(OSError(errno.EIO, f"nbd:{self.target.text}: the image "
                                         "is closed"))
            return
        if op.sends >= MAX_SENDS:
            op.fut.set_exception(OSError(
                errno.EIO, f"nbd:{self.target.text}: {_NAMES[op.kind]} at {op.offset}: "
                f"the connection dropped before the answer {op.sends} times ({reason})"))
            return
        op.token += 1
        if self._conns:
            self._send(op)  # another connection is up (multi-conn)
            return
        if not op.since:
            op.since = time.monotonic()
        self._waiting.append(op)

    def _start_reconnect(self) -> None:
        if self._reconnector is None and not self._closed:
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = BACKOFF_FIRST_S
        try:
            while not self._closed and len(self._conns) < self._want:
                self._expire()
                try:
                    h = await _connect(self.target)
                except ConnectError as exc:
                    self._last_error = exc.message
                    log.log(logging.INFO if delay == BACKOFF_FIRST_S else logging.DEBUG,
                            "nbd:%s: reconnect failed: %s (next try in %.2f s)",
                            self.target.text, exc.message, delay)
                    self._kick.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._kick.wait(), self._sleep_for(delay))
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                if self._closed:
                    h.shutdown()
                    return
                size = h.get_size()
                if size != self.export_size:
                    h.shutdown()
                    self._broken = (f"the server came back exporting {size} bytes instead "
                                    f"of {self.export_size}")
                    log.error("nbd:%s: %s: every request fails from now on",
                              self.target.text, self._broken)
                    self._fail_all(self._broken)
                    self._closed = True
                    return
                self.reconnects += 1
                self._adopt(h)
                log.info("nbd:%s: reconnected", self.target.text)
                delay = BACKOFF_FIRST_S
                waiting = list(self._waiting)
                self._waiting.clear()
                for op in waiting:
                    op.since = 0.0
                    self._send(op)
        finally:
            self._reconnector = None

    def _sleep_for(self, delay: float) -> float:
        if not self._waiting:
            return delay
        first = min(op.since for op in self._waiting)
        return max(0.01, min(delay, first + self.wait_s - time.monotonic() + 0.01))

    def _expire(self) -> None:
        """Fail the requests that have waited :attr:`wait_s` for a connection."""
        now = time.monotonic()
        keep: collections.deque[_Op] = collections.deque()
        for op in self._waiting:
            if op.fut.done():
                continue
            if now - op.since >= self.wait_s:
                op.fut.set_exception(OSError(
                    errno.EIO, f"nbd:{self.target.text}: {_NAMES[op.kind]} at {op.offset}: "
                    f"no connection for {self.wait_s:g} s ({self._last_error})"))
            else:
                keep.append(op)
        self._waiting = keep

    def _fail_all(self, reason: str) -> None:
        for op in self._waiting:
            if not op.fut.done():
                op.fut.set_exception(OSError(errno.EIO, f"nbd:{self.target.text}: {reason}"))
        self._waiting.clear()

    # -------------------------------------------------------------- requests
    def _pick(self) -> _Connection | None:
        conns = self._conns
        if not conns:
            return None
        self._next = (self._next + 1) % len(conns)
        return conns[self._next]

    def _send(self, op: _Op) -> None:
        conn = self._pick()
        if conn is None:
            if self._closed:
                op.fut.set_exception(OSError(errno.EIO, f"nbd:{self.target.text}: closed"))
                return
            op.since = op.since or time.monotonic()
            if not self._waiting:
                self._kick.set()  # the first request to wait: try at once, not after backoff
            self._waiting.append(op)
            self._start_reconnect()
            return
        nbd = _nbd
        h = conn.h
        op.sends += 1
        self.requests_sent += 1
        op.token += 1
        token = op.token
        cookie = -1  # until libnbd returns it (a completion during the call finds -1)

        def done(err: Any) -> int:
            conn.inflight.pop(cookie, None)
            if op.token != token or op.fut.done():
                return 1
            value = err.value
            if value == 0:
                op.fut.set_result(None)
            elif value in _LOST or not conn.alive or h.aio_is_dead() or h.aio_is_closed():
                # Not an answer: libnbd retires the requests of a connection that dropped
                # (ENOTCONN), or the server is going away (ESHUTDOWN: not performed).
                reason = f"connection lost: {os.strerror(value)}"
                if conn.alive:
                    conn.inflight[cookie] = op
                    conn.lost(reason)
                else:
                    self._requeue(op, reason)
                    self._start_reconnect()
            else:
                op.fut.set_exception(OSError(
                    value, f"nbd:{self.target.text}: {_NAMES[op.kind]} at {op.offset}, "
                    f"{op.length} bytes: the server answered {os.strerror(value)}"))
            return 1

        try:
            kind = op.kind
            if kind == _READ:
                assert op.buf is not None
                op.nbuf = op.nbuf or nbd.Buffer.from_buffer(op.buf)
                cookie = h.aio_pread(op.nbuf, op.offset, completion=done)
            elif kind == _WRITE:
                assert op.buf is not None
                op.nbuf = op.nbuf or nbd.Buffer.from_buffer(op.buf)
                cookie = h.aio_pwrite(op.nbuf, op.offset, completion=done, flags=op.flags)
            elif kind == _FLUSH:
                cookie = h.aio_flush(completion=done)
            elif kind == _TRIM:
                cookie = h.aio_trim(op.length, op.offset, completion=done, flags=op.flags)
            elif kind == _ZERO:
                cookie = h.aio_zero(op.length, op.offset, completion=done, flags=op.flags)
            else:
                extents = op.extents

                def extent(meta: str, offset: int, entries: list[int], err: Any) -> int:
                    if meta == "base:allocation" and op.token == token:
                        extents.extend(zip(entries[0::2], entries[1::2], strict=False))
                    return 0

                cookie = h.aio_block_status(op.length, op.offset, extent, completion=done)
        except nbd.Error as exc:
            # Refused at once: a dead handle (then retried) or a request libnbd rejects.
            if not conn.alive or h.aio_is_dead() or h.aio_is_closed() or not h.aio_is_ready():
                conn.lost(exc.string)
                if not op.fut.done() and op.token == token:
                    op.sends -= 1
                    self._requeue(op, exc.string)
                return
            op.fut.set_exception(OSError(exc.args[1] or errno.EIO,
                                         f"nbd:{self.target.text}: {exc.string}"))
            return
        conn.inflight[cookie] = op
        # The handle took the request, so it is alive: only the direction can change.
        if not conn.writing and conn.h.aio_get_direction() & 2:  # AIO_DIRECTION_WRITE
            conn.writing = True
            conn.loop.add_writer(conn.fd, conn._writable)

    async def _run(self, kind: int, offset: int, length: int, buf: memoryview | None = None,
                   flags: int = 0) -> list[tuple[int, int]]:
        if self._closed:
            raise OSError(errno.EIO, f"nbd:{self.target.text}: {self._broken}")
        fut: asyncio.Future[None] = self._loop.create_future()
        op = _Op(kind, offset, length, buf, flags, fut)
        self._send(op)
        await fut
        return op.extents

    # ---------------------------------------------------------- the interface
    def fast_io(self) -> FastIO:
        """The map's probe (when the server gives block status); I/O is all coroutines.
        Write-zeroes counts as fast only where the server understands NBD FAST_ZERO
        (it then promises to refuse a zeroing that is not fast; ours never sets it)."""
        return FastIO(holds=self.map.holds if self.map is not None else None,
                      zero_is_fast=self.can_fast_zero)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        """From the in-memory map: DATA, or ZERO where the server reported zeros."""
        if self.map is None:
            return [Extent(offset, length, Alloc.DATA)]
        return self.map.extents(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.allocation(offset, length)

    async def load_map(self) -> None:
        """Read the export's whole allocation (base:allocation) into :attr:`map`."""
        if self.map is None:
            return
        nbd = _libnbd()
        size = self.info.size
        pos = 0
        while pos < size:
            length = min(_ZERO_CHUNK, size - pos)
            got = await self._run(_STATUS, pos, length)
            if not got:
                raise OSError(errno.EIO, f"nbd:{self.target.text}: empty block status "
                              f"reply at {pos}")
            for n, flags in got:
                n = min(n, size - pos)
                if n <= 0:
                    break
                zero = flags & nbd.STATE_ZERO
                if zero:
                    self.map.set(pos, n, Alloc.ZERO)
                pos += n

    async def read(self, offset: int, buf: memoryview) -> None:
        step = self.max_request
        if len(buf) <= step:
            await self._run(_READ, offset, len(buf), buf)
            return
        await asyncio.gather(*(self._run(_READ, offset + i, min(step, len(buf) - i),
                                         buf[i : i + step])
                               for i in range(0, len(buf), step)))

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"nbd:{self.target.text} is open read-only")

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` durable on return (FUA, else write + flush)."""
        self._check_writable()
        flags = 1 if fua and self.can_fua else 0  # NBD_CMD_FLAG_FUA
        step = self.max_request
        try:
            if len(data) <= step:  # one request: no task per piece
                await self._run(_WRITE, offset, len(data), data, flags)
            else:
                await asyncio.gather(*(self._run(_WRITE, offset + i,
                                                 min(step, len(data) - i),
                                                 data[i : i + step], flags)
                                       for i in range(0, len(data), step)))
        finally:
            if self.map is not None:
                self.map.set(offset, len(data), Alloc.DATA)
        if fua and not self.can_fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check_writable()
        if not self.can_zero:
            try:
                for i in range(0, length, len(_ZEROS)):
                    await self.write(offset + i, _ZEROS[: min(len(_ZEROS), length - i)])
            finally:
                if self.map is not None:
                    self.map.set(offset, length, Alloc.DATA)
            return
        flags = 0 if may_unmap else 2  # NBD_CMD_FLAG_NO_HOLE
        ok = False
        try:
            for i in range(0, length, _ZERO_CHUNK):
                await self._run(_ZERO, offset + i, min(_ZERO_CHUNK, length - i), None, flags)
            ok = True
        finally:
            if self.map is not None:
                self.map.set(offset, length, Alloc.ZERO if ok else Alloc.DATA)

    async def discard(self, offset: int, length: int) -> None:
        """TRIM when offered (the range then reads as whatever the server keeps)."""
        self._check_writable()
        if not self.can_trim:
            return
        if self.map is not None:
            self.map.set(offset, length, Alloc.DATA)
        for i in range(0, length, _ZERO_CHUNK):
            await self._run(_TRIM, offset + i, min(_ZERO_CHUNK, length - i))

    async def flush(self) -> None:
        if self.can_flush and not self.read_only:
            await self._run(_FLUSH, 0, 0)

    async def close(self) -> None:
        """Disconnect every connection; requests still waiting fail with EIO. Idempotent."""
        if self._closed and not self._conns:
            return
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            self._reconnector = None
        self._fail_all("the image is closed")
        for conn in list(self._conns):
            conn.close()
            for op in conn.inflight.values():
                if not op.fut.done():
                    op.fut.set_exception(OSError(errno.EIO,
                                                 f"nbd:{self.target.text}: the image is closed"))
        self._conns.clear()


async def open_nbd(path: str, options: OpenOptions) -> NbdImage:
    """Open ``nbd:path`` (see the module docstring for the forms of ``path``).

    Raises InvalidArgument (EINVAL) for a path that names no server or an unknown URI
    scheme, or ``connections=N`` against a server without multi-conn; ConnectError with
    the socket's or handshake's errno when the server cannot be reached (no retry at open);
    OSError(EROFS) for a read-write open of a read-only export. ``options.direct`` is
    ignored. Nothing is left open on failure.
    """
    nbd = _libnbd()
    target = parse_target(path)
    h = await _connect(target)
    try:
        if not options.read_only and h.is_read_only():
            raise OSError(errno.EROFS, f"nbd:{path}: the server exports it read-only")
        minimum = h.get_block_size(nbd.SIZE_MINIMUM)
        if minimum > SECTOR_SIZE:
            raise InvalidArgument(
                f"nbd:{path}: the server's minimum block size {minimum} exceeds a sector")
        if target.connections > 1 and not h.can_multi_conn():
            raise InvalidArgument(
                f"nbd:{path}: connections={target.connections} but the server does not "
                "offer multi-conn")
    except BaseException:
        h.shutdown()
        raise
    image = NbdImage(path, target, h, options.read_only)
    try:
        for _ in range(target.connections - 1):
            image._adopt(await _connect(target))
        await image.load_map()
    except BaseException:
        await image.close()
        raise
    if image.map is not None and image.map.all_data():
        # No holes: the chain may skip allocation lookups (fast routes); the map still
        # answers block status and follows write-zeroes.
        image.fully_allocated = True
    log.debug("nbd:%s: %d bytes, %d connection(s), flush=%s fua=%s trim=%s zero=%s "
              "block-status=%s", path, image.info.size, len(image._conns), image.can_flush,
              image.can_fua, image.can_trim, image.can_zero, image.can_status)
    return image


register("nbd", open_nbd)
