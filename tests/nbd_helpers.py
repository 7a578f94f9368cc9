"""The NBD export served in a test process, and a hand-written client for the wire.

Shared by tests/system/test_nbd_server.py (the server against raw-socket clients) and
tests/interop/test_nbd_clients.py (against real clients). The ``workdir`` and ``serve``
fixtures are registered for every test by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from blktap.block.driver import OpenOptions
from blktap.block.layer import LayerOpener
from blktap.frontends.nbd_server import NbdServer
from blktap.vbd import VBD, ImageSpec
from tests.helpers import short_tempdir

SIZE = 64 * 1024 * 1024
MIB = 1 << 20

# The wire, written out for the raw-socket clients (doc/proto.md of NetworkBlockDevice/nbd).
OPTS = 0x49484156454F5054
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698


class ServedImage:
    """An NbdServer on a VBD, running in a thread with its own (uvloop) event loop;
    ``layers`` go on top of the VBD's stack (VBD.open's).

    If the constructor raises, whatever it started (loop thread, VBD) is stopped first;
    :meth:`close` stops the server, closes the VBD and stops the loop, each even when the
    one before failed (the first error is raised).
    """

    def __init__(self, directory: str, image: str, *, read_only: bool = False,
                 direct: bool = True, layers: Sequence[LayerOpener] = (),
                 **server_args: Any) -> None:
        import uvloop

        self.image = image
        self.socket = os.path.join(directory, "nbd0.0")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.loop = uvloop.new_event_loop()
        # Anything that reaches the loop's exception handler is a bug in the server.
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.vbd = VBD(0)
        opened = False
        try:
            self.call(self.vbd.open(ImageSpec("aio", image),
                                    OpenOptions(read_only=read_only, direct=direct), layers))
            opened = True
            self.server = NbdServer(self.vbd, self.socket, **server_args)
            self.call(self.server.start())
        except BaseException:
            try:
                if opened:
                    self.call(self.vbd.close(force=True))
            finally:
                self._stop_loop()
            raise

    def call(self, coro: Any, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the server's loop thread and return its result."""

        async def wrapper() -> Any:
            return fn()

        return self.call(wrapper())

    def close(self) -> None:
        try:
            self.call(self.server.stop(timeout=5.0))
        finally:
            try:
                self.call(self.vbd.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def workdir() -> Iterator[str]:
    with short_tempdir("nbdt-") as path:
        yield path


def make_image(directory: str, name: str = "disk.raw", size: int = SIZE,
               data: dict[int, bytes] | None = None) -> str:
    """A sparse raw file of ``size`` bytes with ``data`` written at the given offsets."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {}).items():
            f.seek(offset)
            f.write(chunk)
    return path


@pytest.fixture
def serve(workdir: str) -> Iterator[Callable[..., ServedImage]]:
    """``serve(image=None, **ServedImage options)``: a served image (a new empty one by
    default). Every server is closed after the test, each even if closing another one
    failed; then each must have removed its socket and met no loop error."""
    served: list[ServedImage] = []
    with contextlib.ExitStack() as closing:

        def start(image: str | None = None, **kwargs: Any) -> ServedImage:
            s = ServedImage(workdir, image or make_image(workdir), **kwargs)
            served.append(s)
            closing.callback(s.close)
            return s

        yield start
    for s in served:
        assert not os.path.exists(s.socket), "stop() must remove the socket"
        assert not s.loop_errors, s.loop_errors


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (length // 256)


# ------------------------------------------------------------------ raw sockets
class RawClient:
    """A hand-written NBD client on a plain socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def handshake(self) -> None:
        magic, opts, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opts, flags) == (0x4E42444D41474943, OPTS, 3)
        self.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", OPTS, 7, 6)
                          + struct.pack(">IH", 0, 0))
        while True:
            _magic, _opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            self.recv_exact(length)
            if rtype == 1:
                return

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection within ``timeout`` seconds (anything
        it sends meanwhile is discarded); False when it is still open then."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length)


def random_image(workdir: str, size: int = 8 << 20) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = os.path.join(workdir, "random.raw")
    with open(path, "wb") as f:
        f.write(data)
    return path, data
