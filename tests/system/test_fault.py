"""The fault layer end to end: ``tap-ctl create -a fault:SETTINGS:TYPE:PATH`` and real NBD
clients (qemu-io, nbdinfo, libnbd's Python binding) on the VBD's socket.

Each injected error reaches the client as its NBD error; EAGAIN is retried until the
VBD's request timeout (``-t``) and then fails; another VBD of the same tapdisk keeps
serving meanwhile; a real ENOSPC while a VHD allocates a block (a full tmpfs) leaves an
image ``vhd-util check`` accepts, holding every earlier write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import VHD_UTIL
from tests.system.test_nbd_server import small_tmpfs
from tests.system.test_tap_ctl import QEMU_IO, nbd_uri, ok, parse_list, tapctl

LIBNBD_PYTHON = "/usr/bin/python3"
pytestmark = [
    pytest.mark.skipif(QEMU_IO is None or shutil.which("nbdinfo") is None,
                       reason="qemu-io and nbdinfo are needed (scripts/setup.sh installs "
                              "qemu-utils and libnbd-bin)"),
    pytest.mark.skipif(subprocess.run([LIBNBD_PYTHON, "-c", "import nbd"],
                                      capture_output=True).returncode != 0,
                       reason="libnbd's Python binding (python3-libnbd) is not installed"),
]
MIB = 1 << 20

# Runs ops given as JSON [[name, offset, length], ...] on one connection; prints, per op,
# "ok" or the errno name libnbd reports (which it takes from the NBD reply's error).
CLIENT = """
import errno, json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
out = []
for name, offset, length in json.loads(sys.argv[2]):
    try:
        if name == "read":
            data = h.pread(length, offset)
            out.append("ok:" + data[:1].hex())
        elif name == "write":
            h.pwrite(bytes([0x5a]) * length, offset)
            out.append("ok")
        elif name == "zero":
            h.zero(length, offset)
            out.append("ok")
        elif name == "trim":
            h.trim(length, offset)
            out.append("ok")
        elif name == "flush":
            h.flush()
            out.append("ok")
    except nbd.Error as exc:
        out.append(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
print(json.dumps(out))
"""


def client(uri: str, *ops: tuple[str, int, int], timeout: float = 60) -> list[str]:
    proc = subprocess.run([LIBNBD_PYTHON, "-c", CLIENT, uri, json.dumps(ops)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    result: list[str] = json.loads(proc.stdout)
    return result


def raw_image(path: Path, size: int = 16 * MIB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@contextlib.contextmanager
def vbd(run_dir: str, spec: str, *flags: str) -> Iterator[str]:
    """``tap-ctl create -a spec``; yields its NBD URI; destroys it after."""
    ok("create", "-a", spec, *flags)
    (entry,) = [e for e in parse_list(ok("list")) if e.get("args") == spec]
    pid, minor = entry["pid"], entry["minor"]
    try:
        yield nbd_uri(run_dir, int(pid), int(minor))
    finally:
        ok("destroy", "-p", pid, "-m", minor)


def qemu_io_output(uri: str, *commands: str) -> str:
    assert QEMU_IO is not None
    args = [QEMU_IO, "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(("name", "message"), [("EIO", "Input/output error"),
                                               ("ENOSPC", "No space left on device")])
def test_injected_write_error_reaches_qemu_io_and_libnbd(
        run_dir: str, tmp_path: Path, name: str, message: str) -> None:
    img = raw_image(tmp_path / "disk.img")
    with vbd(run_dir, f"fault:op=write,errno={name}:aio:{img}") as uri:
        out = qemu_io_output(uri, "write -P 0x11 0 64k", "read -P 0 0 64k")
        assert f"write failed: {message}" in out, out
        assert "read failed" not in out and "Pattern verification failed" not in out, out
        assert client(uri, ("write", 0, 4096), ("read", 0, 4096), ("zero", 0, 4096),
                      ("flush", 0, 0)) == [name, "ok:00", "ok", "ok"]
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                         text=True, check=True, timeout=60).stdout)
        assert info["exports"][0]["export-size"] == 16 * MIB


def test_read_faults_by_range_after_and_count(run_dir: str, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.img")
    spec = f"fault:op=read,errno=EIO,offset=1M-2M,after=1,count=2:aio:{img}"
    with vbd(run_dir, spec) as uri:
        # Outside the range: never hit. Inside: the first passes (after=1), the next two
        # fail (count=2), then pass-through.
        assert client(uri, ("read", 0, 4096), ("read", MIB, 4096), ("read", MIB + 4096, 512),
                      ("read", 2 * MIB - 512, 1024), ("read", MIB, 4096),
                      ("read", 2 * MIB, 4096)) == ["ok:00", "ok:00", "EIO", "EIO", "ok:00",
                                                   "ok:00"]
        out = qemu_io_output(uri, "read 0 4k")
        assert "read failed" not in out, out


def test_flush_and_trim_faults(run_dir: str, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.img")
    with vbd(run_dir, f"fault:op=flush+trim,errno=EIO:aio:{img}") as uri:
        assert client(uri, ("write", 0, 4096), ("trim", 0, 4096), ("flush", 0, 0),
                      ("read", 0, 4096)) == ["ok", "EIO", "EIO", "ok:5a"]


def test_eagain_is_retried_until_the_request_timeout_then_fails(
        run_dir: str, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.img")
    # Three failures, then success: the retries hide them from the client.
    with vbd(run_dir, f"fault:op=write,errno=EAGAIN,count=3:aio:{img}", "-t", "30") as uri:
        assert client(uri, ("write", 0, 4096), ("read", 0, 4096)) == ["ok", "ok:5a"]
    # Always failing: retried for -t seconds, then the client gets EIO.
    img2 = raw_image(tmp_path / "disk2.img")
    with vbd(run_dir, f"fault:op=write,errno=EAGAIN:aio:{img2}", "-t", "1") as uri:
        started = time.monotonic()
        assert client(uri, ("write", 0, 4096), ("read", 0, 4096)) == ["EIO", "ok:00"]
        assert time.monotonic() - started >= 1.0  # it was retried, not failed at once
        stats = json.loads(ok("stats", *_pid_minor(uri)))
        assert stats["errors"] == [0, 1]


def test_other_vbds_of_the_tapdisk_serve_while_one_retries(
        run_dir: str, tmp_path: Path) -> None:
    bad, good = raw_image(tmp_path / "bad.img"), raw_image(tmp_path / "good.img")
    pid = ok("spawn").strip()
    minors: list[str] = []
    try:
        for spec in (f"fault:op=write,errno=EAGAIN:aio:{bad}", f"aio:{good}"):
            minor = ok("allocate").strip().rsplit("-", 1)[1]
            minors.append(minor)
            ok("attach", "-p", pid, "-m", minor)
            ok("open", "-p", pid, "-m", minor, "-a", spec, "-t", "5")
        bad_uri, good_uri = (nbd_uri(run_dir, int(pid), int(m)) for m in minors)
        stuck = subprocess.Popen([LIBNBD_PYTHON, "-c", CLIENT, bad_uri,
                                  json.dumps([["write", 0, 4096]])],
                                 stdout=subprocess.PIPE, text=True)
        try:
            # While minor 0's write is being retried, minor 1 serves verified I/O.
            out = qemu_io_output(good_uri, "write -P 0x33 0 1M", "read -P 0x33 0 1M",
                                 "flush")
            assert "failed" not in out, out
            assert stuck.poll() is None  # still retrying
            stdout, _ = stuck.communicate(timeout=60)
            assert json.loads(stdout) == ["EIO"]
        finally:
            stuck.kill()
            stuck.wait()
        assert json.loads(ok("stats", "-p", pid, "-m", minors[1]))["errors"] == [0, 0]
    finally:
        for minor in minors:
            tapctl("close", "-p", pid, "-m", minor)
            tapctl("detach", "-p", pid, "-m", minor)
            tapctl("free", "-m", minor)


def test_latency_only_passes_data_through(run_dir: str, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.img")
    with vbd(run_dir, f"fault:errno=none,latency=20ms,rate=0.5,seed=3:aio:{img}") as uri:
        out = qemu_io_output(uri, "write -P 0x44 0 256k", "read -P 0x44 0 256k")
        assert "failed" not in out, out


def test_bad_settings_fail_the_open_with_einval(run_dir: str, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.img")
    proc = tapctl("create", "-a", f"fault:errno=ENOTANERRNO:aio:{img}")
    assert proc.returncode == 22, proc.stderr
    assert "errno" in proc.stderr
    assert parse_list(ok("list")) == []


def test_enospc_while_a_vhd_allocates_a_block_leaves_a_valid_image(
        run_dir: str, tmp_path: Path) -> None:
    """A dynamic VHD on a 3 MiB tmpfs: the first 2 MiB block fits, the second does not.
    Its allocation fails with ENOSPC (answered as such); the image stays valid and holds
    the earlier write, and writes into the allocated block still succeed."""
    with small_tmpfs(str(tmp_path / "small"), "3m") as mount:
        path = os.path.join(mount, "disk.vhd")
        subprocess.run([VHD_UTIL, "create", "-n", path, "-s", "64"], check=True,
                       capture_output=True, timeout=60)
        try:
            with vbd(run_dir, f"vhd:{path}") as uri:
                assert client(uri, ("write", 0, 2 * MIB), ("flush", 0, 0)) == ["ok", "ok"]
                after = client(uri, ("write", 2 * MIB, 2 * MIB), ("write", 8 * MIB, 2 * MIB),
                               ("write", 4096, 4096), ("flush", 0, 0),
                               ("read", 0, 4096), ("read", 2 * MIB, 4096))
                assert after == ["ENOSPC", "ENOSPC", "ok", "ok", "ok:5a", "ok:00"]
            check = subprocess.run([VHD_UTIL, "check", "-n", path], capture_output=True,
                                   text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
            with vbd(run_dir, f"vhd:{path}", "-R") as uri:
                assert client(uri, ("read", 0, 4096), ("read", 2 * MIB - 512, 512),
                              ("read", 2 * MIB, 4096), ("read", 8 * MIB, 4096)) == [
                    "ok:5a", "ok:5a", "ok:00", "ok:00"]
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _pid_minor(uri: str) -> tuple[str, str, str, str]:
    pid, minor = uri.rsplit("/nbd", 1)[1].split(".")
    return "-p", pid, "-m", minor
