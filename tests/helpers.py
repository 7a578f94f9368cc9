"""Helpers shared by the tests: spawning tapdisks and talking to them by hand."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
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


RUN_DIRS: list[str] = []
"""Every directory :func:`short_tempdir` made in this process (resolved): where this test
run's tapdisks, sockets, FUSE mounts and loop-device backing files live. The end-of-run
check (tests/conftest.py) looks for leftovers under these and nowhere else."""


@contextlib.contextmanager
def short_tempdir(prefix: str = "blktap-") -> Iterator[str]:
    """A temporary directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    RUN_DIRS.append(os.path.realpath(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------ what a test run leaves behind
def host_block_device_support() -> tuple[bool, str]:
    """Whether this host can give a VBD a kernel block device (FUSE file + loop device),
    decided from the host alone - never by the code under test: ``(True, "")`` or
    ``(False, reason)``."""
    if os.geteuid() != 0:
        return False, "not root: mounting FUSE and binding loop devices needs root"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        try:
            mode = os.stat(dev).st_mode
        except FileNotFoundError:
            return False, f"{dev} is missing"
        if not stat.S_ISCHR(mode):
            return False, f"{dev} is not a character device"
    return True, ""


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def process_cmdline(pid: int) -> list[str]:
    """The argument vector of ``pid`` ([] when it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_tapdisk_process(pid: int) -> bool:
    """``pid`` runs the project's tapdisk (its console script or ``-m blktap.tapdisk``),
    is not a zombie, and is not a tapdisk fork server (blktap.tapdisk.forkserver: it
    serves no VBD and leaves when its run directory goes)."""
    args = process_cmdline(pid)
    if not any(os.path.basename(a) == "tapdisk" or a == "blktap.tapdisk" for a in args[:3]):
        return False
    if is_fork_server(pid):
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return False


def is_fork_server(pid: int) -> bool:
    """``pid`` is a tapdisk fork server (its process name, /proc/PID/comm)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "tapdisk-forksrv"
    except OSError:
        return False


def unix_socket_inodes(path: str) -> set[int]:
    """Inodes of the Unix sockets bound to ``path`` (from /proc/net/unix)."""
    found = set()
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f, None)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].rstrip("\n") == path:
                found.add(int(fields[6]))
    return found


def process_socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def is_tapdisk_of(pid: int, run_dir: str) -> bool:
    """``pid`` is a live tapdisk that holds the control socket ``<run_dir>/ctl<pid>``: a
    tapdisk of that run directory, not a stranger that reused a stale socket's pid."""
    if not is_tapdisk_process(pid):
        return False
    bound = unix_socket_inodes(os.path.join(run_dir, f"ctl{pid}"))
    bound |= unix_socket_inodes(os.path.join(os.path.realpath(run_dir), f"ctl{pid}"))
    return bool(bound & process_socket_inodes(pid))


def tapdisks_under(prefixes: list[str]) -> list[int]:
    """Live tapdisks of this test run: their BLKTAP_RUN_DIR, or a Unix socket they are
    bound to, lies under one of ``prefixes``."""
    if not prefixes:
        return []
    in_prefix: set[int] = set()
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f, None)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and _under(fields[7].rstrip("\n"), prefixes):
                in_prefix.add(int(fields[6]))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not is_tapdisk_process(int(entry)):
            continue
        pid = int(entry)
        run_dir = ""
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(b"BLKTAP_RUN_DIR="):
                    run_dir = os.path.realpath(var[15:].decode(errors="replace"))
        if (run_dir and _under(run_dir, prefixes)) or in_prefix & process_socket_inodes(pid):
            found.append(pid)
    return found


def mounts_under(prefixes: list[str]) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount under ``prefixes``, deepest first."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split(" ")
            point = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            if _under(point, prefixes):
                found.append((point, fstype))
    return sorted(found, key=lambda m: m[0].count("/"), reverse=True)


def loops_backed_under(prefixes: list[str]) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose backing file lies under
    ``prefixes`` (as the kernel names it: resolved, `` (deleted)`` when unlinked)."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # not bound
        if _under(backing.removesuffix(" (deleted)"), prefixes):
            found.append((f"/dev/{name}", backing))
    return found


def sweep(prefixes: list[str]) -> list[str]:
    """Remove what tests left under ``prefixes``: kill their tapdisks, unmount their
    mounts (lazily: a dead FUSE server cannot answer), detach their loop devices.
    Returns what it found, one line each."""
    found = []
    for pid in tapdisks_under(prefixes):
        found.append(f"tapdisk pid {pid} ({' '.join(process_cmdline(pid))})")
        Tapdisk(pid, "").kill()
    for point, fstype in mounts_under(prefixes):
        found.append(f"{fstype} mount at {point}")
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    for device, backing in loops_backed_under(prefixes):
        found.append(f"loop device {device} backed by {backing}")
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
    return found
