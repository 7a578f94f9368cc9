"""Where an NBD export's connections come from: its listeners.

A listener binds, accepts (asyncio makes a transport per client and the server an
:class:`~blktap.frontends.nbd_connection.NbdConnection` over it) and stops. It also says
what a connection may do with the socket under its transport: :meth:`Listener.raw_fd`
gives the socket's raw descriptor, or None where bytes on the socket are not the bytes
of the protocol. Under TLS they are not (asyncio's SSL transport still hands out the
underlying socket), so a TLS listener sets ``raw_descriptor = False``; a connection
without a raw descriptor never writes the socket itself (``_flush``'s writev) and never
starts a lane: those shortcuts are off by construction, whatever the transport offers.

Listeners: :class:`UnixListener` (always, mode 0600), :class:`TcpListener` (``--tcp``,
``tap-ctl --export-tcp``; no authentication) and :class:`TlsListener` (``--export-tcp``
with ``--tls-creds``): TCP where every client must upgrade with NBD_OPT_STARTTLS before
any other option (NBD's TLS is negotiated inside the handshake, never from the first
byte), so it hands connections a :attr:`Listener.tls_context` rather than giving it to
``create_server``; the connection calls ``loop.start_tls`` when the codec says so.
:func:`tls_context` builds that context from a credentials directory laid out as
qemu's and nbdkit's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import stat
import sys
from collections.abc import Callable
from typing import ClassVar

from blktap.errors import InvalidArgument

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Listener:
    """A source of connections. The base class serves transports made elsewhere (as in
    tests and benchmarks): it only says whether the raw descriptor may be used."""

    raw_descriptor: ClassVar[bool] = True
    """The socket carries the protocol's bytes as they are (False under TLS)."""
    tls_context: ssl.SSLContext | None = None
    """Set: clients must upgrade to TLS (NBD_OPT_STARTTLS) with this server context."""

    def raw_fd(self, transport: asyncio.BaseTransport) -> int | None:
        """The descriptor a connection over ``transport`` may read and write itself, or
        None: not under this listener, or no socket under the transport."""
        if not self.raw_descriptor:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            fd = sock.fileno()
        except (OSError, AttributeError):
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    def describe(self) -> str:
        return "a stream made elsewhere"

    async def start(self, factory: ProtocolFactory) -> None:
        """Bind and accept, a protocol from ``factory`` per client. Raises OSError when
        it cannot; nothing is left behind then."""
        raise NotImplementedError("this listener does not accept connections itself")

    def close(self) -> None:
        """Stop accepting and remove what ``start`` created. Idempotent."""


class UnixListener(Listener):
    """A Unix socket at ``path``, mode 0600 (only its owner connects)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.base_events.Server | None = None
        self._sock_ino: tuple[int, int] | None = None

    def describe(self) -> str:
        return self.path

    async def start(self, factory: ProtocolFactory) -> None:
        """Raises OSError when the path is taken by something that is not a socket, or
        cannot be bound; nothing is left behind then."""
        sock = self._bind()
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                factory, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise

    def _bind(self) -> socket.socket:
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
            self._unlink()
            raise
        return sock

    def _unlink(self) -> None:
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

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._unlink()


class TcpListener(Listener):
    """TCP on ``host:port`` (port 0: any; ``port`` is the bound one after ``start``).
    No authentication: anyone who can reach it can read and write the disk."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    def describe(self) -> str:
        return f"TCP {self.host}:{self.port}"

    async def start(self, factory: ProtocolFactory) -> None:
        """Bind to exactly ``host`` (no other address). Raises OSError naming the address
        (EADDRINUSE for a port in use)."""
        try:
            server = await asyncio.get_running_loop().create_server(
                factory, self.host, self.port)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on TCP {self.address}: {why}") from None
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """``HOST:PORT`` (``[V6]:PORT``), the bound port after ``start``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


class TlsListener(TcpListener):
    """TCP on ``host:port`` where clients must negotiate TLS with ``context`` before
    anything else. The socket carries TLS records, so no raw-descriptor shortcut."""

    raw_descriptor: ClassVar[bool] = False

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(host, port)
        self.tls_context = context

    def describe(self) -> str:
        return f"TCP+TLS {self.host}:{self.port}"


X509_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
"""The files of a credentials directory (qemu's tls-creds-x509 and nbdkit's layout)."""


def tls_context(creds_dir: str, *, verify_client: bool = False) -> ssl.SSLContext:
    """A TLS server context from ``creds_dir``: ``server-cert.pem`` (the certificate, and
    any intermediates after it), ``server-key.pem`` and ``ca-cert.pem`` (the CA that must
    have signed client certificates; only read with ``verify_client``, which demands one).
    TLS 1.2 at least. Raises :class:`InvalidArgument` naming the file that is missing or
    that does not load, and why."""
    if not os.path.isdir(creds_dir):
        raise InvalidArgument(f"TLS credentials {creds_dir!r}: not a directory")
    needed = X509_FILES if verify_client else X509_FILES[1:]
    for name in needed:
        path = os.path.join(creds_dir, name)
        if not os.path.isfile(path):
            raise InvalidArgument(f"TLS credentials: {path} is missing", errno=errno.ENOENT)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = os.path.join(creds_dir, "server-cert.pem")
    key = os.path.join(creds_dir, "server-key.pem")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise InvalidArgument(f"TLS credentials: {cert} with {key} do not load: "
                              f"{exc.reason or exc}") from None
    if verify_client:
        ca = os.path.join(creds_dir, "ca-cert.pem")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise InvalidArgument(f"TLS credentials: {ca} does not load: "
                                  f"{exc.reason or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


PSK_AVAILABLE = hasattr(ssl.SSLContext, "set_psk_server_callback")
"""Whether this runtime's ssl module has PSK callbacks (Python 3.13 added them)."""


def psk_refusal(psk_file: str) -> InvalidArgument:
    """The error for ``--tls-psk``: this implementation serves no TLS-PSK."""
    why = ("this Python's ssl module has no PSK callbacks (they came in Python 3.13)"
           if not PSK_AVAILABLE else "TLS-PSK exports are not implemented yet")
    return InvalidArgument(f"--tls-psk {psk_file}: TLS-PSK is not available: "
                           f"{why} (Python {sys.version_info[0]}.{sys.version_info[1]}); "
                           "use --tls-creds with X.509 certificates", errno=errno.EOPNOTSUPP)
