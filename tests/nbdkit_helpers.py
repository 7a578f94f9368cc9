"""nbdkit servers for tests of the ``nbd`` driver (tests/interop/test_nbd_driver.py and
the ``nbd`` case of tests/conformance.py).

:class:`Nbdkit` runs one ``nbdkit -f`` on a Unix socket (or a loopback TCP port) and can
be stopped and started again on the same address (reconnect tests); it is always killed
when its context exits, even when the test failed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import short_tempdir

NBDKIT = shutil.which("nbdkit")


def libnbd_missing() -> str | None:
    """Why the nbd driver cannot run here, or None."""
    if NBDKIT is None:
        return "nbdkit is not installed (scripts/setup.sh installs it)"
    try:
        importlib.import_module("nbd")
    except ImportError:
        return "libnbd's Python bindings are not importable (scripts/setup.sh links them)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Nbdkit:
    """``nbdkit -f [filters] PLUGIN ARGS`` on ``sock`` (a Unix socket) or on
    127.0.0.1:``port``."""

    def __init__(self, args: list[str], *, sock: str | None = None,
                 port: int | None = None) -> None:
        self.args = args
        self.sock = sock
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert NBDKIT is not None
        where = ["-U", self.sock] if self.sock else ["-i", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen([NBDKIT, "-f", *where, *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nbdkit exited: {err}")
            if self._listening():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("nbdkit did not start listening within 10 s")

    def _listening(self) -> bool:
        """A connection is accepted (the socket file appears before nbdkit listens)."""
        if self.sock is not None:
            if not os.path.exists(self.sock):
                return False
            with socket.socket(socket.AF_UNIX) as s:
                return s.connect_ex(self.sock) == 0
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port or 0)) == 0

    def stop(self, sig: int = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        if self.sock is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sock)


@contextlib.contextmanager
def nbdkit(args: list[str], *, sock: str | None = None,
           port: int | None = None) -> Iterator[Nbdkit]:
    server = Nbdkit(args, sock=sock, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def nbdkit_memory_image(tmp: Path, initial: bytes) -> Iterator[str]:
    """A conformance image: nbdkit's memory plugin on a Unix socket holding ``initial``
    (written through libnbd before the test opens it); the path is an ``nbd+unix`` URI."""
    why = libnbd_missing()
    if why is not None:
        pytest.skip(why)
    nbd: Any = importlib.import_module("nbd")
    with short_tempdir("nbdk-") as sock_dir:
        sock = os.path.join(sock_dir, "s")
        with nbdkit(["memory", f"size={len(initial)}"], sock=sock):
            h = nbd.NBD()
            h.connect_unix(sock)
            step = 1 << 20
            for off in range(0, len(initial), step):
                chunk = initial[off : off + step]
                if chunk.count(0) != len(chunk):
                    h.pwrite(chunk, off)
            h.shutdown()
            yield f"nbd+unix:///?socket={sock}"
