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
no authentication). A ``TlsListener`` belongs next to them (issue 16): a TcpListener
with an ``ssl.SSLContext`` passed to ``create_server`` and ``raw_descriptor = False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import ClassVar

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Listener:
    """A source of connections. The base class serves transports made elsewhere (as in
    tests and benchmarks): it only says whether the raw descriptor may be used."""

    raw_descriptor: ClassVar[bool] = True
    """The socket carries the protocol's bytes as they are (False under TLS)."""

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
        server = await asyncio.get_running_loop().create_server(factory, self.host, self.port)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
