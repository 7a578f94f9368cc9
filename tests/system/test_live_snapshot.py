"""End to end on VHD: I/O waits across a pause, and the live-snapshot workflow.

write A; pause; `vhd-util snapshot` the leaf; `unpause -a` the new child; write B:
the parent holds A and not B, the child holds B, reads through the VBD see both, and the
old leaf is not modified after the snapshot.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from tests.helpers import VHD_UTIL
from tests.system.test_tap_ctl import QEMU_IO, assert_clean, nbd_uri, ok, parse_list, qemu_io

MiB = 1 << 20


def vhd_util(*args: str) -> str:
    proc = subprocess.run([VHD_UTIL, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io_vpc(path: Path, *commands: str) -> None:
    """qemu's vpc driver reads one VHD file alone (it does not follow parents)."""
    assert QEMU_IO is not None
    args = [QEMU_IO, "-r", "-f", "vpc"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fail" not in proc.stdout.lower(), proc.stdout + proc.stderr


def test_live_snapshot_workflow(run_dir: str, tmp_path: Path) -> None:
    leaf, child = tmp_path / "leaf.vhd", tmp_path / "child.vhd"
    vhd_util("create", "-n", str(leaf), "-s", "64")
    device = ok("create", "-a", f"vhd:{leaf}").strip()
    minor = int(device.rsplit("-", 1)[1].removeprefix("tapdev"))
    (entry,) = [e for e in parse_list(ok("list", "-m", str(minor))) if "pid" in e]
    pid = int(entry["pid"])
    uri = nbd_uri(run_dir, pid, minor)
    try:
        qemu_io(uri, f"write -P 0xa1 0 {MiB}", f"write -P 0xa1 {4 * MiB} 512")
        ok("pause", "-p", str(pid), "-m", str(minor))
        assert parse_list(ok("list", "-m", str(minor)))[0]["state"] == "0x2a"

        # I/O sent while paused waits, and completes after the unpause.
        assert QEMU_IO is not None
        waiting = subprocess.Popen(
            [QEMU_IO, "-f", "raw", "-c", f"read -P 0xa1 0 {MiB}", uri],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            vhd_util("snapshot", "-n", str(child), "-p", str(leaf))
            after_snapshot = sha256(leaf)
            time.sleep(0.5)
            assert waiting.poll() is None, "a read completed while the VBD was paused"
            ok("unpause", "-p", str(pid), "-m", str(minor), "-a", f"vhd:{child}")
            out, err = waiting.communicate(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 0 and "fail" not in out.lower(), out + err

        assert parse_list(ok("list", "-m", str(minor)))[0]["args"] == f"vhd:{child}"
        qemu_io(uri, f"write -P 0xb2 {2 * MiB} {MiB}", "write -P 0xb2 4194560 256")
        # Reads through the VBD see both A (from the parent) and B (from the child),
        # including within one sector half written after the snapshot.
        qemu_io(uri, f"read -P 0xa1 0 {MiB}", f"read -P 0xb2 {2 * MiB} {MiB}",
                f"read -P 0xa1 {4 * MiB} 256", "read -P 0xb2 4194560 256",
                f"read -P 0 {MiB} {MiB}")
    finally:
        ok("destroy", "-p", str(pid), "-m", str(minor))
    assert_clean(run_dir)

    assert sha256(leaf) == after_snapshot, "the parent changed after the snapshot"
    qemu_io_vpc(leaf, f"read -P 0xa1 0 {MiB}", f"read -P 0 {2 * MiB} {MiB}")
    qemu_io_vpc(child, f"read -P 0xb2 {2 * MiB} {MiB}", f"read -P 0 0 {MiB}")
    assert f"{child} is valid" in vhd_util("check", "-n", str(child), "-p")
    assert vhd_util("query", "-n", str(child), "-p").strip() == str(leaf)
