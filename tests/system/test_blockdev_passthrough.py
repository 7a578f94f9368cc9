"""The kernel block device with FUSE passthrough, through tapdisk and tap-ctl.

Where a VBD is one raw file and the kernel offers FUSE passthrough, the loop device's
reads and writes go to the image file in the kernel (blktap.frontends.blockdev): these
tests check that the path is chosen and reported (STATS ``blockdev``, ``tap-ctl list
--json``), that BLKTAP_FUSE_PASSTHROUGH=off forces the served path, that fio's verify
passes through either, and what a pause holds with passthrough on: writes wait, none is
lost. Every tapdisk, loop device and mount goes with the ``run_dir`` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TAP_CTL, host_block_device_support

MiB = 1 << 20
SIZE = 64 * MiB

_ok, _why = host_block_device_support()
_missing = [tool for tool in ("fio", "dd", "fallocate") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"no FUSE+loop block device here: {_why}"),
    pytest.mark.skipif(bool(_missing), reason=f"tools missing: {', '.join(_missing)}"),
]


def tapctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([TAP_CTL, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc


class Vbd:
    """A VBD made by ``tap-ctl create -a aio:IMAGE`` with its block device."""

    def __init__(self, image: Path, *flags: str) -> None:
        self.image = image
        self.device = tapctl("create", "-a", f"aio:{image}", *flags).stdout.strip()
        (entry,) = [e for e in json.loads(tapctl("list", "--json").stdout)
                    if e["path"] == str(image)]
        self.pid, self.minor = int(entry["pid"]), int(entry["minor"])
        self.listed = entry

    def ids(self) -> list[str]:
        return ["-p", str(self.pid), "-m", str(self.minor)]

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(tapctl("stats", *self.ids()).stdout)
        return doc

    def blockdev(self) -> dict[str, Any]:
        info: dict[str, Any] = self.stats()["blockdev"]
        return info

    def destroy(self) -> None:
        tapctl("destroy", *self.ids(), check=False)


@pytest.fixture
def image(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    # Read-write devices use passthrough only when asked (auto: read-only ones only).
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", "on")
    path = Path(run_dir) / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def make(image: Path, request: pytest.FixtureRequest, *flags: str) -> Vbd:
    vbd = Vbd(image, *flags)
    request.addfinalizer(vbd.destroy)  # before run_dir's sweep: a clean destroy first
    return vbd


def passthrough_vbd(image: Path, request: pytest.FixtureRequest, *flags: str) -> Vbd:
    """A VBD whose block device passes I/O through; skips where the kernel cannot."""
    vbd = make(image, request, *flags)
    info = vbd.blockdev()
    if info["io_path"] != "passthrough" and "kernel" in info["passthrough_reason"]:
        pytest.skip(f"no FUSE passthrough here: {info['passthrough_reason']}")
    assert info["io_path"] == "passthrough", info
    return vbd


def dd_write(device: str, data: bytes, offset: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["dd", f"of={device}", "bs=4096", f"seek={offset // 4096}", "oflag=direct",
         "conv=notrunc", "status=none"], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def dd_read(device: str, offset: int, length: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["dd", f"if={device}", "bs=4096", f"skip={offset // 4096}",
         f"count={length // 4096}", "iflag=direct", "status=none"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def image_bytes(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def still_running(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return True


def fio_verify(device: str, engine: str) -> None:
    proc = subprocess.run(
        ["fio", "--name=verify", f"--filename={device}", f"--ioengine={engine}",
         "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB


def test_passthrough_is_chosen_and_reported(image: Path,
                                            request: pytest.FixtureRequest) -> None:
    vbd = passthrough_vbd(image, request)
    assert vbd.listed["block_device_io"] == "passthrough"
    data = os.urandom(MiB)
    writer = dd_write(vbd.device, data, 8 * MiB)
    assert writer.wait(30) == 0
    assert image_bytes(image, 8 * MiB, MiB) == data
    reader = dd_read(vbd.device, 8 * MiB, MiB)
    out, _ = reader.communicate(timeout=30)
    assert out == data
    info = vbd.blockdev()
    # The I/O bypassed tapdisk: its FUSE counters stay at zero, the loop device's count.
    assert info["fuse_reads"] == 0 and info["fuse_writes"] == 0
    assert info["loop_read_sectors"] >= MiB // 512
    assert info["loop_write_sectors"] >= MiB // 512


def test_forced_fallback_serves_every_request(image: Path, request: pytest.FixtureRequest,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", "off")
    vbd = make(image, request)
    info = vbd.blockdev()
    assert info["io_path"] == "fuse"
    assert "BLKTAP_FUSE_PASSTHROUGH=off" in info["passthrough_reason"]
    assert vbd.listed["block_device_io"] == "fuse"
    data = os.urandom(256 << 10)
    assert dd_write(vbd.device, data, MiB).wait(30) == 0
    assert image_bytes(image, MiB, len(data)) == data
    assert vbd.blockdev()["fuse_writes"] > 0


def test_auto_passes_through_read_only_devices_only(image: Path,
                                                     request: pytest.FixtureRequest,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The default keeps a read-write device's pause and live-snapshot unpause whole."""
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", "auto")
    rw = make(image, request)
    info = rw.blockdev()
    assert info["io_path"] == "fuse"
    assert "read-write device" in info["passthrough_reason"]
    rw.destroy()
    ro = make(image, request, "-R")
    info = ro.blockdev()
    if "kernel" in info["passthrough_reason"]:
        pytest.skip(f"no FUSE passthrough here: {info['passthrough_reason']}")
    assert info["io_path"] == "passthrough", info


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
@pytest.mark.parametrize("engine", ["io_uring", "libaio"])
def test_fio_verify_through_each_path(image: Path, request: pytest.FixtureRequest,
                                      monkeypatch: pytest.MonkeyPatch, mode: str,
                                      engine: str) -> None:
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", mode)
    vbd = make(image, request)
    assert vbd.blockdev()["io_path"] in (("fuse",) if mode != "on"
                                         else ("passthrough", "fuse"))
    probe = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, timeout=30)
    if engine not in probe.stdout:
        pytest.skip(f"fio has no {engine}")
    fio_verify(vbd.device, engine)


def test_pause_holds_passthrough_writes_and_loses_none(
        image: Path, request: pytest.FixtureRequest) -> None:
    vbd = passthrough_vbd(image, request)
    tapctl("pause", *vbd.ids())
    assert vbd.blockdev()["held"] is True
    # A read alone still reaches the image file (the kernel cannot hold it).
    reader = dd_read(vbd.device, 0, 4096)
    assert len(reader.communicate(timeout=30)[0]) == 4096
    data = os.urandom(64 << 10)
    writer = dd_write(vbd.device, data, 4 * MiB)
    try:
        assert still_running(writer, 1.0), "a write went through while paused"
        assert image_bytes(image, 4 * MiB, len(data)) == bytes(len(data))
    finally:
        tapctl("unpause", *vbd.ids())
    assert writer.wait(30) == 0
    assert image_bytes(image, 4 * MiB, len(data)) == data
    assert vbd.blockdev()["held"] is False
    # And the device goes on passing I/O through.
    more = os.urandom(4096)
    assert dd_write(vbd.device, more, 0).wait(30) == 0
    assert image_bytes(image, 0, 4096) == more


def test_resume_onto_another_file_is_refused(image: Path, request: pytest.FixtureRequest,
                                             run_dir: str) -> None:
    vbd = passthrough_vbd(image, request)
    other = Path(run_dir) / "other.raw"
    shutil.copyfile(image, other)
    tapctl("pause", *vbd.ids())
    refused = tapctl("unpause", *vbd.ids(), "-a", f"aio:{other}", check=False)
    assert refused.returncode != 0
    state = next(e for e in json.loads(tapctl("list", "--json").stdout)
                 if e["minor"] == vbd.minor)["state"]
    assert state != 0, "the VBD runs on a file its device does not reach"
    tapctl("unpause", *vbd.ids(), "-a", f"aio:{image}")
    assert vbd.blockdev()["held"] is False


def test_destroy_while_paused_with_passthrough(image: Path,
                                               request: pytest.FixtureRequest) -> None:
    vbd = passthrough_vbd(image, request)
    loop = os.path.realpath(vbd.device)
    tapctl("pause", *vbd.ids())
    assert vbd.blockdev()["held"] is True
    tapctl("destroy", *vbd.ids())
    assert not os.path.exists(vbd.device)
    backing = Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")
    assert not backing.exists() or str(image) not in backing.read_text()


def test_read_only_pause_holds_reads_and_resume_follows_a_new_file(
        image: Path, request: pytest.FixtureRequest, run_dir: str) -> None:
    first = os.urandom(MiB)
    with open(image, "r+b") as f:
        f.write(first)
    vbd = passthrough_vbd(image, request, "-R")
    out, _ = dd_read(vbd.device, 0, MiB).communicate(timeout=30)
    assert out == first
    tapctl("pause", *vbd.ids())
    assert vbd.blockdev()["held"] is True
    # The loop device reads tapdisk's served name now: a read waits for the resume.
    reader = dd_read(vbd.device, 0, MiB)
    try:
        assert still_running(reader, 1.0), "a read went through while paused"
        other = Path(run_dir) / "other.raw"
        second = os.urandom(MiB)
        with open(other, "wb") as f:
            f.truncate(SIZE)
            f.write(second)
    finally:
        tapctl("unpause", *vbd.ids(), "-a", f"aio:{other}")
    out, _ = reader.communicate(timeout=30)
    assert out == second  # the held read was served by the resumed VBD, on the new file
    info = vbd.blockdev()
    assert info["held"] is False and info["io_path"] == "passthrough", info
    reads_before = info["fuse_reads"]
    out, _ = dd_read(vbd.device, 0, MiB).communicate(timeout=30)
    assert out == second
    assert vbd.blockdev()["fuse_reads"] == reads_before  # passthrough again
