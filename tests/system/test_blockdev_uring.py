"""The kernel block device with FUSE over io_uring, through tapdisk and tap-ctl.

With BLKTAP_FUSE_URING=on (or auto) and the fuse module's ``enable_uring`` parameter on,
tapdisk takes the block device's FUSE requests from io_uring ring entries instead of
reading ``/dev/fuse`` (blktap.frontends.blockdev, blktap.frontends.fuse_uring): these
tests check that the path is chosen and reported (STATS ``blockdev``, ``tap-ctl list
--json``), that fio's verify passes through it on a raw and a VHD image, that a pause
holds the requests in flight and loses none, and the fallbacks: ``off`` keeps
``/dev/fuse``, ``auto`` without the parameter too, ``on`` without it fails the device
with the reason. Each test sets the parameter and restores it afterwards; every tapdisk,
loop device and mount goes with the ``run_dir`` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.fuse_uring_helpers import uring_parameter
from tests.helpers import VHD_UTIL, host_block_device_support
from tests.system.test_blockdev_passthrough import (
    Vbd,
    dd_write,
    image_bytes,
    still_running,
    tapctl,
)

MiB = 1 << 20
SIZE = 64 * MiB

_ok, _why = host_block_device_support()
_missing = [tool for tool in ("fio", "dd") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"no FUSE+loop block device here: {_why}"),
    pytest.mark.skipif(bool(_missing), reason=f"tools missing: {', '.join(_missing)}"),
]


@pytest.fixture
def image(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", "off")  # every request to tapdisk
    monkeypatch.setenv("BLKTAP_FUSE_URING", "on")
    path = Path(run_dir) / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def make(image: Path, request: pytest.FixtureRequest, *flags: str, driver: str = "aio") -> Vbd:
    if driver == "aio":
        vbd = Vbd(image, *flags)
    else:
        vbd = Vbd.__new__(Vbd)
        vbd.image = image
        vbd.device = tapctl("create", "-a", f"{driver}:{image}", *flags).stdout.strip()
        (entry,) = [e for e in json.loads(tapctl("list", "--json").stdout)
                    if e["path"] == str(image)]
        vbd.pid, vbd.minor, vbd.listed = int(entry["pid"]), int(entry["minor"]), entry
    request.addfinalizer(vbd.destroy)  # before run_dir's sweep: a clean destroy first
    return vbd


def fio(device: str, *extra: str, size: str = "16M") -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["fio", "--name=verify", f"--filename={device}", "--ioengine=io_uring",
         "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_result(proc: subprocess.Popen[str], size: int) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == size
    assert job["read"]["io_bytes"] == size  # every block read back and verified


def test_ring_is_chosen_and_reported(image: Path, request: pytest.FixtureRequest) -> None:
    with uring_parameter("Y"):
        vbd = make(image, request)
        info = vbd.blockdev()
        assert info["io_path"] == "fuse-uring", info
        assert info["uring_reason"] == ""
        assert info["uring_entries"] > 0
        assert vbd.listed["block_device_io"] == "fuse-uring"
        data = os.urandom(MiB)
        assert dd_write(vbd.device, data, 8 * MiB).wait(30) == 0
        assert image_bytes(image, 8 * MiB, MiB) == data
        info = vbd.blockdev()
        assert info["fuse_writes"] > 0
        assert info["fuse_ring_requests"] >= info["fuse_writes"]


@pytest.mark.parametrize("driver", ["aio", "vhd"])
def test_fio_verify_through_the_ring(image: Path, request: pytest.FixtureRequest,
                                     run_dir: str, driver: str) -> None:
    if driver == "vhd":
        image = Path(run_dir) / "disk.vhd"
        subprocess.run([VHD_UTIL, "create", "-n", str(image), "-s", str(SIZE // MiB)],
                       check=True, capture_output=True, timeout=60)
    with uring_parameter("Y"):
        vbd = make(image, request, driver=driver)
        assert vbd.blockdev()["io_path"] == "fuse-uring"
        fio_result(fio(vbd.device), 16 * MiB)
        info = vbd.blockdev()
        assert info["fuse_ring_requests"] >= info["fuse_writes"] + info["fuse_reads"]


def test_pause_holds_ring_requests_and_loses_none(image: Path,
                                                  request: pytest.FixtureRequest) -> None:
    with uring_parameter("Y"):
        vbd = make(image, request)
        # fio keeps writing (and then verifies) across the pause.
        writer = fio(vbd.device, "--rate_iops=1500", size="8M")
        try:
            time.sleep(0.5)
            tapctl("pause", *vbd.ids())
            try:
                deadline = time.monotonic() + 10
                while vbd.blockdev()["fuse_inflight"] == 0:  # requests reach the paused VBD
                    assert time.monotonic() < deadline, "no request held while paused"
                    assert writer.poll() is None, "fio ended before the pause held anything"
                    time.sleep(0.05)
                held = vbd.blockdev()
                time.sleep(0.5)
                # Nothing completes while paused: the writes wait in their ring entries.
                assert vbd.blockdev()["fuse_writes"] == held["fuse_writes"]
                single = os.urandom(64 << 10)
                lone = dd_write(vbd.device, single, SIZE - MiB)
                assert still_running(lone, 1.0), "a write went through while paused"
                assert image_bytes(image, SIZE - MiB, len(single)) == bytes(len(single))
            finally:
                tapctl("unpause", *vbd.ids())
            assert lone.wait(30) == 0
            assert image_bytes(image, SIZE - MiB, len(single)) == single
        finally:
            if writer.poll() is None:
                fio_result(writer, 8 * MiB)
        assert writer.returncode == 0
        assert vbd.blockdev()["io_path"] == "fuse-uring"


def test_off_keeps_dev_fuse(image: Path, request: pytest.FixtureRequest,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_FUSE_URING", "off")
    with uring_parameter("Y"):
        vbd = make(image, request)
        info = vbd.blockdev()
        assert info["io_path"] == "fuse", info
        assert info["uring_reason"] == "BLKTAP_FUSE_URING=off"
        assert vbd.listed["block_device_io"] == "fuse"
        data = os.urandom(256 << 10)
        assert dd_write(vbd.device, data, MiB).wait(30) == 0
        assert image_bytes(image, MiB, len(data)) == data
        info = vbd.blockdev()
        assert info["fuse_writes"] > 0 and info["fuse_ring_requests"] == 0
        assert info["uring_entries"] == 0


def test_auto_falls_back_without_the_parameter(image: Path, request: pytest.FixtureRequest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_FUSE_URING", "auto")
    with uring_parameter("N"):
        vbd = make(image, request)
        info = vbd.blockdev()
        assert info["io_path"] == "fuse", info
        assert "enable_uring is N" in info["uring_reason"]
        data = os.urandom(64 << 10)
        assert dd_write(vbd.device, data, 0).wait(30) == 0
        assert image_bytes(image, 0, len(data)) == data
    with uring_parameter("Y"):
        other = Path(str(image) + ".2")
        shutil.copyfile(image, other)
        vbd = make(other, request)
        assert vbd.blockdev()["io_path"] == "fuse-uring"


def test_on_without_the_parameter_fails_with_the_reason(image: Path) -> None:
    with uring_parameter("N"):
        proc = tapctl("create", "-a", f"aio:{image}", check=False)
    assert proc.returncode != 0
    assert "BLKTAP_FUSE_URING=on but FUSE over io_uring is unavailable" in proc.stderr
    assert "enable_uring is N" in proc.stderr
    assert not [e for e in json.loads(tapctl("list", "--json").stdout)
                if e["path"] == str(image)], "a failed create leaves no VBD"


def test_killed_tapdisk_fails_the_requests_in_its_ring(image: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """kill -9 with requests in ring entries: they fail (EIO), nothing waits forever,
    and ``tap-ctl free`` takes the leftovers away."""
    with uring_parameter("Y"):
        vbd = make(image, request)
        assert vbd.blockdev()["io_path"] == "fuse-uring"
        load = subprocess.Popen(
            ["fio", "--name=load", f"--filename={vbd.device}", "--ioengine=io_uring",
             "--direct=1", "--rw=randrw", "--bs=4k", "--iodepth=32", "--time_based",
             "--runtime=60", "--output-format=terse"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while vbd.blockdev()["fuse_ring_requests"] < 1000:
                assert time.monotonic() < deadline and load.poll() is None
                time.sleep(0.1)
            os.kill(vbd.pid, 9)
            _out, err = load.communicate(timeout=60)  # not stuck in the kernel
        finally:
            if load.poll() is None:
                load.kill()
                load.wait(10)
        assert load.returncode != 0 and "Input/output error" in err
        tapctl("free", "-m", str(vbd.minor))
        assert not os.path.exists(vbd.device)
        assert str(image) not in tapctl("list").stdout
