"""``tap-ctl create --supervise``: a tapdisk that dies is restarted on the same minor,
image and NBD socket path, and a reconnecting NBD client carries on.

The client is qemu-io with ``reconnect-delay`` (qemu retries the requests a broken
connection interrupted once it has reconnected): it writes and verifies patterns while
the tapdisk is killed with SIGKILL several times; no command may fail and every
acknowledged write must be in the image file afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import VHD_UTIL, process_cmdline
from tests.system.test_tap_ctl import image, ok, parse_list, tapctl, tapdisk_pids

QEMU_IO = shutil.which("qemu-io")
needs_qemu_io = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io is not installed (scripts/setup.sh installs qemu-utils)"
)
KiB = 1024
CHUNK = 64 * KiB
SLOTS = 64


def supervisors(run_dir: str) -> list[int]:
    """Live supervisor processes of ``run_dir`` (from their state files)."""
    found = []
    for name in os.listdir(run_dir):
        if name.startswith("supervise") and name.endswith(".json"):
            pid = json.loads(Path(run_dir, name).read_text())["supervisor_pid"]
            if "blktap.control.supervisor" in " ".join(process_cmdline(pid)):
                found.append(pid)
    return found


@pytest.fixture
def supervised_run_dir(run_dir: str) -> Iterator[str]:
    """``run_dir``; afterwards, even on failure, its supervisors are killed before the
    run_dir fixture kills the tapdisks (else they would be restarted)."""
    yield run_dir
    for pid in supervisors(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def state(run_dir: str, minor: int = 0) -> dict[str, object]:
    doc: dict[str, object] = json.loads(Path(run_dir, f"supervise{minor}.json").read_text())
    return doc


def current_pid(minor: int = 0) -> int | None:
    entries = [e for e in parse_list(ok("list", "-m", str(minor))) if "pid" in e]
    return int(entries[0]["pid"]) if entries else None


def wait_for_new_tapdisk(old: int, timeout: float = 30.0) -> tuple[int, float]:
    """(new pid, seconds from now until it lists with the image open)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        pid = current_pid()
        if pid is not None and pid != old:
            return pid, time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"no tapdisk replaced {old} within {timeout} s")


def create_supervised(img: str) -> int:
    ok("create", "--supervise", "-a", f"aio:{img}")
    pid = current_pid()
    assert pid is not None
    return pid


@needs_qemu_io
@pytest.mark.parametrize("kind", ["aio", "vhd"])
def test_qemu_io_carries_on_while_the_tapdisk_is_killed(
    supervised_run_dir: str, tmp_path: Path, kind: str
) -> None:
    run_dir = supervised_run_dir
    if kind == "aio":
        img = image(tmp_path, size=f"{SLOTS * CHUNK}")
    else:  # a dynamic VHD: kills land in block allocation too
        img = str(tmp_path / "disk.vhd")
        subprocess.run([VHD_UTIL, "create", "-n", img, "-s", str(SLOTS * CHUNK >> 20)],
                       check=True, timeout=60)
    ok("create", "--supervise", "-a", f"{kind}:{img}")
    first = current_pid()
    assert first is not None
    stable = f"{run_dir}/nbd{first}.0"
    rounds = 400
    expected: dict[int, int] = {}
    args: list[str] = []
    for i in range(rounds):
        offset = (i * 37 % SLOTS) * CHUNK
        pattern = (i * 7 + 1) % 255 + 1
        expected[offset] = pattern
        args += ["-c", f"write -P {pattern} {offset} {CHUNK}",
                 "-c", f"read -P {pattern} {offset} {CHUNK}",
                 "-c", "sleep 20"]
    assert QEMU_IO is not None
    opts = f"driver=nbd,server.type=unix,server.path={stable},reconnect-delay=60"
    client = subprocess.Popen([QEMU_IO, *args, "--image-opts", opts],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    restart_seconds = []
    try:
        pid = first
        for _ in range(4):
            time.sleep(1.0)
            assert client.poll() is None, "qemu-io finished before the kills: make it longer"
            os.kill(pid, signal.SIGKILL)
            pid, took = wait_for_new_tapdisk(pid)
            restart_seconds.append(took)
        output, _ = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    print("restart to listed, seconds:", [f"{s:.2f}" for s in restart_seconds])
    assert client.returncode == 0, output[-3000:]
    assert "fail" not in output.lower() and "error" not in output.lower(), output[-3000:]
    assert output.count("wrote 65536/65536") == rounds
    assert output.count("read 65536/65536") == rounds
    # Every acknowledged write is in the image, whichever tapdisk served it: read back
    # through the current tapdisk, and for raw in the file itself.
    verify: list[str] = []
    for offset, pattern in sorted(expected.items()):
        verify += ["-c", f"read -P {pattern} {offset} {CHUNK}"]
    check = subprocess.run([QEMU_IO, "-r", *verify, "--image-opts", opts],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "fail" not in check.stdout.lower(), check.stdout[-3000:]
    if kind == "aio":
        data = Path(img).read_bytes()
        for offset, pattern in expected.items():
            assert data[offset : offset + CHUNK] == bytes([pattern]) * CHUNK, offset
    doc = state(run_dir)
    assert doc["restarts"] == 4 and len(doc["pids"]) == 5  # type: ignore[arg-type]
    assert doc["nbd_path"] == stable
    assert os.readlink(stable) == f"nbd{pid}.0"
    # destroy by the first pid: the current tapdisk, the supervisor and its files go.
    ok("destroy", "-p", str(first), "-m", "0")
    assert supervisors(run_dir) == []
    assert tapdisk_pids(run_dir) == []
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []
    assert ok("list") == ""
    if kind == "vhd":
        subprocess.run([VHD_UTIL, "check", "-n", img], check=True, capture_output=True,
                       timeout=60)


def test_supervised_vbd_lists_its_supervisor_and_destroys_by_a_later_pid(
    supervised_run_dir: str, tmp_path: Path
) -> None:
    run_dir = supervised_run_dir
    first = create_supervised(image(tmp_path))
    (doc,) = json.loads(ok("list", "--json"))
    assert doc["supervisor"]["tapdisk_pids"] == [first] and doc["supervisor"]["running"]
    assert doc["supervisor"]["nbd_path"] == f"{run_dir}/nbd{first}.0"
    os.kill(first, signal.SIGKILL)
    second, _ = wait_for_new_tapdisk(first)
    (doc,) = json.loads(ok("list", "--json"))
    assert doc["pid"] == second and doc["supervisor"]["restarts"] == 1
    # The dead tapdisk's own sockets are gone; its NBD name is now the stable link.
    assert not os.path.exists(f"{run_dir}/ctl{first}")
    assert os.path.islink(f"{run_dir}/nbd{first}.0")
    ok("destroy", "-p", str(second), "-m", "0")
    assert supervisors(run_dir) == []
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []


def test_a_tapdisk_that_exits_on_purpose_is_not_restarted(
    supervised_run_dir: str, tmp_path: Path
) -> None:
    run_dir = supervised_run_dir
    pid = create_supervised(image(tmp_path))
    (sup,) = supervisors(run_dir)
    ok("close", "-p", str(pid), "-m", "0")
    ok("detach", "-p", str(pid), "-m", "0")  # its last VBD: the tapdisk exits
    deadline = time.monotonic() + 20
    while process_cmdline(sup) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_cmdline(sup) == []
    assert tapdisk_pids(run_dir) == []
    assert parse_list(ok("list")) == [{"minor": "0"}]
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []
    ok("free", "-m", "0")


def test_supervised_create_of_a_missing_image_leaves_nothing(
    supervised_run_dir: str, tmp_path: Path
) -> None:
    run_dir = supervised_run_dir
    proc = tapctl("create", "--supervise", "-a", f"aio:{tmp_path}/missing.img")
    assert proc.returncode == 2, proc.stderr
    assert supervisors(run_dir) == []
    assert tapdisk_pids(run_dir) == []
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []
    assert ok("list") == ""


def test_control_library_supervises(supervised_run_dir: str, tmp_path: Path) -> None:
    from blktap.control import Control

    ctl = Control()
    created = ctl.create(f"aio:{image(tmp_path)}", supervised=True)
    first = ctl.supervision(created.minor)
    assert first is not None and first.pids == (created.pid,) and ctl.supervised(created.minor)
    os.kill(created.pid, signal.SIGKILL)
    new_pid, _ = wait_for_new_tapdisk(created.pid)
    later = ctl.supervision(created.minor)
    assert later is not None and later.pid == new_pid and later.restarts == 1
    ctl.destroy(created.pid, created.minor)
    assert ctl.supervision(created.minor) is None
    assert ctl.list() == []
