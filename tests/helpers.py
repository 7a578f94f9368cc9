"""Helpers shared by the tests: spawning tapdisks and talking to them by hand."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.reference_data import reference_dir

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TAPDISK = str(BIN / "tapdisk")
TAP_CTL = str(BIN / "tap-ctl")
VHD_UTIL = str(BIN / "vhd-util")
FIXTURES = reference_dir("vhd")  # the C-made reference VHD images (tests/data/vhd.tar.xz)

# tapdisk_message_t, built from the reference byte table (not with the project's codec).
MESSAGE_SIZE = 544
HEADER = struct.Struct("<HH4x")


def message(type_: int, cookie: int, union: bytes = b"") -> bytes:
    """A 544-byte message: header then ``union`` zero-padded to 536 bytes."""
    assert len(union) <= MESSAGE_SIZE - 8
    return HEADER.pack(type_, cookie) + union.ljust(MESSAGE_SIZE - 8, b"\0")


def params(path: str, flags: int = 0) -> bytes:
    """The params union member of OPEN/RESUME."""
    raw = path.encode()
    return (struct.pack("<III", flags, 0, 0) + raw.ljust(256, b"\0")
            + struct.pack("<IH", 0xFFFFFFFF, 0) + bytes(256))


def exchange(ctl: str, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection to ``ctl``; return everything until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(ctl)
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, cookie, union) for each whole message in ``data``."""
    out = []
    for i in range(0, len(data) - len(data) % MESSAGE_SIZE, MESSAGE_SIZE):
        t, c = HEADER.unpack_from(data, i)
        out.append((t, c, data[i + 8 : i + MESSAGE_SIZE]))
    return out


def error_of(union: bytes) -> int:
    return int(struct.unpack_from("<i", union)[0])


@dataclass
class Tapdisk:
    pid: int
    ctl: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    def wait_exit(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait_exit(5)


def spawn_tapdisk(env: dict[str, str] | None = None) -> Tapdisk:
    """Start a daemonized tapdisk as tap-ctl does; read its control socket path."""
    proc = subprocess.run([TAPDISK], capture_output=True, env=env, timeout=20, check=True)
    path = proc.stdout.decode().strip()
    assert path, proc.stderr.decode()
    pid = int(os.path.basename(path)[3:])
    return Tapdisk(pid, path)


def allocate_marker(run_dir: str, minor: int) -> str:
    d = os.path.join(run_dir, "tapdisk")
    os.makedirs(d, mode=0o700, exist_ok=True)
    marker = os.path.join(d, f"tapdisk-{minor}")
    fd = os.open(marker, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    return marker


@contextlib.contextmanager
def short_tempdir(prefix: str = "blktap-") -> Iterator[str]:
    """A temporary directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
