"""The NBD export of one VBD: its listeners and its connections.

:class:`NbdServer` listens on a Unix socket (mode 0600) and, optionally, TCP
(:mod:`.nbd_listen`); each client gets an :class:`~.nbd_connection.NbdConnection`. The
connection is put together from parts, one module each (docs/architecture.md has the
map): ``nbd_connection`` (protocol callbacks, dispatch, replies), ``nbd_flow`` (flow
control), ``nbd_output`` (output batching, buffers), ``nbd_inline`` (inline serving),
``nbd_lane_policy`` and ``nbd_lane`` (lanes); ``nbd_base`` declares what they share.

Run standalone (for benchmarks, before the daemon)::

    python -m blktap.frontends.nbd_server --socket PATH --image TYPE:PATH [--no-direct]
        [--read-only] [--tcp HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from dataclasses import fields

from blktap.errors import BlktapError
from blktap.frontends.nbd_connection import (
    SOCKET_BUFFER,
    STATUS_QUERY_MAX,
    WRITE_BUFFER_HIGH,
    NbdConnection,
    Statistics,
)
from blktap.frontends.nbd_listen import Listener, TcpListener, TlsListener, UnixListener
from blktap.util.buffers import BufferPool
from blktap.vbd import VBD

__all__ = ["SOCKET_BUFFER", "STATUS_QUERY_MAX", "WRITE_BUFFER_HIGH", "NbdServer",
           "Statistics", "main"]

log = logging.getLogger(__name__)

_Connection = NbdConnection  # the name bench/ and older tests use


class NbdServer:
    """Serve ``vbd`` over NBD on the Unix socket ``path`` (mode 0600).

    ``tcp=(host, port)`` adds a TCP listener (off by default: anyone who can reach it can
    read and write the disk); with ``tls`` (a server context,
    :func:`.nbd_listen.tls_context`) its clients must upgrade to TLS before anything
    else. ``start`` binds and listens; ``stop`` stops accepting, lets in-flight
    requests finish, closes every connection and removes the socket file.
    Per connection at most ``max_inflight`` requests and ``max_inflight_bytes`` of
    READ/WRITE payload are in flight (both at least 1; :mod:`.nbd_flow`).
    """

    def __init__(
        self,
        vbd: VBD,
        path: str,
        *,
        buffers: BufferPool | None = None,
        tcp: tuple[str, int] | None = None,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        max_inflight: int = 128,
        max_inflight_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError("max_inflight and max_inflight_bytes must be at least 1")
        self.vbd = vbd
        self.path = path
        self.buffers = buffers if buffers is not None else BufferPool()
        self.tcp = tcp
        self.tls = tls
        self.tcp_address: str | None = None
        """``HOST:PORT`` of the TCP listener once started (the bound port)."""
        self.handshake_timeout = handshake_timeout
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.log = logging.LoggerAdapter(log, vbd.log_context)
        self.tcp_port: int | None = None
        self._listeners: list[Listener] = []
        self._conns: set[NbdConnection] = set()
        self._closed_totals = [0] * len(fields(Statistics))
        self._stopping = False
        self._serial = 0  # connections accepted so far

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Bind and listen. Raises OSError when the path is taken by something that is not
        a socket, or cannot be bound; nothing is left behind then."""
        await self._listen(UnixListener(self.path))
        if self.tcp is not None:
            host, port = self.tcp
            tcp = TcpListener(host, port) if self.tls is None else TlsListener(
                host, port, self.tls)
            try:
                await self._listen(tcp)
            except BaseException:
                await self.stop()
                raise
            self.tcp_port = tcp.port
            self.tcp_address = tcp.address
            if self.tls is None:
                self.log.warning("minor %d: NBD export also on TCP %s (no authentication)",
                                 self.vbd.minor, tcp.address)
            else:
                self.log.info("minor %d: NBD export also on TCP %s, TLS required",
                              self.vbd.minor, tcp.address)
        self.log.info("minor %d: NBD export on %s", self.vbd.minor, self.path)

    async def _listen(self, listener: Listener) -> None:
        """Start ``listener``; its connections are this server's."""
        await listener.start(lambda: NbdConnection(self, listener))
        self._listeners.append(listener)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; finish in-flight requests; close every connection; remove the
        socket. With ``timeout``, connections still busy after that many seconds are
        aborted (their requests finish later, unanswered). Idempotent."""
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        conns = list(self._conns)
        for conn in conns:
            conn.shutdown("server stopping")
        waits = [conn.closed for conn in conns if not conn.closed.done()]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                self.log.warning("minor %d: aborting %d busy NBD connections",
                                 self.vbd.minor, len(pending))
                for conn in conns:
                    conn.abort()
                await asyncio.wait(pending)
        self.log.info("minor %d: NBD export on %s stopped", self.vbd.minor, self.path)

    def _forget(self, conn: NbdConnection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            totals = self._closed_totals
            for i, value in enumerate(conn.counters()):
                totals[i] += value

    # --------------------------------------------------------------- statistics
    @property
    def connections(self) -> int:
        return len(self._conns)

    def connection_statistics(self) -> dict[str, Statistics]:
        """The counters of each open connection, by peer ("unix#N" for Unix clients)."""
        return {conn.peer: conn.statistics() for conn in self._conns}

    def statistics(self) -> Statistics:
        """Totals over every connection this server has had (``connections`` counts them)."""
        totals = list(self._closed_totals)
        for conn in self._conns:
            for i, value in enumerate(conn.counters()):
                totals[i] += value
        return Statistics(*totals)


# ------------------------------------------------------------------ standalone use
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m blktap.frontends.nbd_server",
        description="Serve one image over NBD in the foreground until SIGINT/SIGTERM.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--image", required=True, help="TYPE:PATH, e.g. aio:/srv/disk.raw")
    parser.add_argument("--no-direct", action="store_true", help="open without O_DIRECT")
    parser.add_argument("--read-only", action="store_true", help="export read-only")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (no auth!)")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own loop")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    from blktap.block.driver import OpenOptions
    from blktap.vbd import ImageSpec

    loop = asyncio.get_running_loop()
    vbd = VBD(0)
    await vbd.open(ImageSpec.parse(args.image),
                   OpenOptions(read_only=args.read_only, direct=not args.no_direct))
    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        tcp = (host or "127.0.0.1", int(port))
    server = NbdServer(vbd, args.socket, tcp=tcp)
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await server.start()
        await done.wait()
    finally:
        await server.stop(timeout=10.0)
        await vbd.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            log.warning("uvloop is not available; using asyncio's event loop")
    try:
        asyncio.run(_serve(args))
    except (BlktapError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
