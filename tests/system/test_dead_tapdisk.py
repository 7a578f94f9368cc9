"""A tapdisk killed with SIGKILL leaves nothing behind once its minor is freed, destroyed
or a new VBD is created: no sockets, FUSE mount, loop device or tapdev link.

As a user would: ``tap-ctl create`` with the kernel block device, ``mkfs.ext4``, mount,
write, ``kill -9`` the tapdisk, then ``tap-ctl list/free/destroy/create``. What stays is
read from the kernel (``/proc/self/mountinfo``, ``/sys/block/loop*``) and the run
directory, not from the code under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import host_block_device_support
from tests.system.test_tap_ctl import image, ok, parse_list, tapctl, tapdisk_pids

_ok, _why = host_block_device_support()
_missing = [t for t in ("mkfs.ext4", "mount", "umount") if shutil.which(t) is None]


def create(img: str) -> tuple[int, int]:
    """``tap-ctl create``; (pid, minor) from the device path it prints (a marker
    ``tapdisk-N`` or a block device ``tapdevN``) and ``list``."""
    device = ok("create", "-a", f"aio:{img}").strip()
    match = re.search(r"([0-9]+)$", device)
    assert match is not None, device
    minor = int(match.group(1))
    (entry,) = [e for e in parse_list(ok("list", "-m", str(minor))) if "pid" in e]
    return int(entry["pid"]), minor


def _exited(pid: int) -> bool:
    """Gone, or every thread of it a zombie: its descriptors (the control socket) are
    closed by then. (Its command line empties earlier, and the leader turns zombie while
    other threads still exit holding the descriptor table, so the socket may still
    accept a connection.)"""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] not in ("Z", "X"):
                    return False
        except OSError:
            continue  # that thread is gone
    return True


def kill9(run_dir: str, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _exited(pid) and pid not in tapdisk_pids(run_dir)


def loops_on(run_dir: str) -> list[str]:
    """Loop devices bound to a file under ``run_dir`` (the kernel's view)."""
    root = os.path.realpath(run_dir) + "/"
    found = []
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(root):
            found.append(f"/dev/{name}")
    return found


def loop_exists(device: str) -> bool:
    return Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").exists()


def mounts_under(path: str) -> list[str]:
    root = os.path.realpath(path) + "/"
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split(" ")[4]
            if point.startswith(root):
                points.append(point)
    return points


def run_dir_entries(run_dir: str) -> list[str]:
    return sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"})


def dev_entries(run_dir: str) -> list[str]:
    dev = os.path.join(run_dir, "dev")
    return sorted(os.listdir(dev)) if os.path.isdir(dev) else []


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


# ------------------------------------------------------------- NBD only (no block device)


def test_free_of_a_dead_tapdisks_minor_removes_its_sockets(run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    assert sorted(run_dir_entries(run_dir)) == [f"ctl{pid}", f"nbd{pid}.{minor}"]
    kill9(run_dir, pid)
    # Listed as the C tap-ctl lists a minor with no tapdisk; --json says what is left.
    assert parse_list(ok("list")) == [{"minor": str(minor)}]
    (doc,) = json.loads(ok("list", "--json"))
    assert doc["pid"] is None and doc["dead_pids"] == [pid]
    assert sorted(doc["leftovers"]) == [f"{run_dir}/nbd{pid}.{minor}"]
    ok("free", "-m", str(minor))
    assert run_dir_entries(run_dir) == []
    assert ok("list") == ""


def test_destroy_of_a_dead_tapdisk_frees_its_minor(run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    kill9(run_dir, pid)
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert run_dir_entries(run_dir) == []
    assert ok("list") == ""
    # Again: the pid left nothing here any more.
    proc = tapctl("destroy", "-p", str(pid), "-m", str(minor))
    assert proc.returncode == 2, proc.stderr


def test_destroy_with_a_dead_pid_leaves_another_tapdisks_minor(
    run_dir: str, tmp_path: Path
) -> None:
    dead, dead_minor = create(image(tmp_path, "a.img"))
    live, live_minor = create(image(tmp_path, "b.img"))
    kill9(run_dir, dead)
    proc = tapctl("destroy", "-p", str(dead), "-m", str(live_minor))
    assert proc.returncode == 2, proc.stderr
    assert {"pid": str(live), "minor": str(live_minor), "state": "0",
            "args": f"aio:{tmp_path}/b.img"} in parse_list(ok("list"))
    ok("destroy", "-p", str(live), "-m", str(live_minor))
    ok("free", "-m", str(dead_minor))
    assert run_dir_entries(run_dir) == []


def test_create_sweeps_dead_sockets_and_keeps_the_minor(run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path, "a.img"))
    kill9(run_dir, pid)
    pid2, minor2 = create(image(tmp_path, "b.img"))
    assert minor2 != minor
    assert run_dir_entries(run_dir) == [f"ctl{pid2}", f"nbd{pid2}.{minor2}"]
    assert {"minor": str(minor)} in parse_list(ok("list"))
    ok("destroy", "-p", str(pid2), "-m", str(minor2))
    ok("free", "-m", str(minor))
    assert ok("list") == ""


# ------------------------------------------------------------------ with a block device

needs_blockdev = pytest.mark.skipif(
    not _ok or bool(_missing),
    reason=f"no FUSE+loop block device here: {_why}" if not _ok
    else f"tools missing: {', '.join(_missing)}",
)


def _mounted_vbd(run_dir: str, tmp_path: Path, mnt: Path,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, str]:
    """create + mkfs.ext4 + mount + write; return (pid, minor, loop device)."""
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    pid, minor = create(image(tmp_path))
    tapdev = os.path.join(run_dir, "dev", f"tapdev{minor}")
    loop = os.path.realpath(tapdev)
    subprocess.run(["mkfs.ext4", "-q", tapdev], check=True, timeout=60)
    subprocess.run(["mount", tapdev, str(mnt)], check=True, timeout=30)
    (mnt / "data").write_bytes(os.urandom(1 << 20))
    subprocess.run(["sync"], check=True, timeout=30)
    return pid, minor, loop


@needs_blockdev
@pytest.mark.parametrize("how", ["free", "destroy", "create"])
def test_block_device_leftovers_are_removed_after_umount(
    how: str, run_dir: str, tmp_path: Path, mnt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid, minor, loop = _mounted_vbd(run_dir, tmp_path, mnt, monkeypatch)
    kill9(run_dir, pid)
    # Before: everything the issue lists is still there.
    assert loops_on(run_dir) == [loop]
    assert mounts_under(run_dir) == [f"{os.path.realpath(run_dir)}/fuse/{minor}"]
    assert dev_entries(run_dir) == [f"tapdev{minor}"]
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    if how == "free":
        ok("free", "-m", str(minor))
    elif how == "destroy":
        ok("destroy", "-p", str(pid), "-m", str(minor))
    else:
        pid2, minor2 = create(image(tmp_path, "other.img"))
        ok("destroy", "-p", str(pid2), "-m", str(minor2))
        assert parse_list(ok("list")) == [{"minor": str(minor)}]
        ok("free", "-m", str(minor))
    assert not loop_exists(loop)
    assert loops_on(run_dir) == []
    assert mounts_under(run_dir) == []
    assert dev_entries(run_dir) == []
    assert run_dir_entries(run_dir) == []


@needs_blockdev
def test_still_mounted_loop_is_reported_and_goes_at_umount(
    run_dir: str, tmp_path: Path, mnt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid, minor, loop = _mounted_vbd(run_dir, tmp_path, mnt, monkeypatch)
    kill9(run_dir, pid)
    proc = tapctl("free", "-m", str(minor))
    assert proc.returncode == 0, proc.stderr
    assert f"{loop} still holds a mounted file system" in proc.stderr
    assert str(mnt) in proc.stderr and "umount" in proc.stderr
    # The minor, sockets and link are gone; the file system stays mounted, unusable
    # but unmountable, and its loop device goes with the unmount.
    assert ok("list") == ""
    assert run_dir_entries(run_dir) == []
    assert dev_entries(run_dir) == []
    assert str(mnt) in Path("/proc/self/mountinfo").read_text()
    subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    deadline = time.monotonic() + 10
    while loop_exists(loop) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loop_exists(loop)
    assert mounts_under(run_dir) == []
