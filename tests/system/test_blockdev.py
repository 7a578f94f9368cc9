"""The kernel block device frontend against the real kernel: FUSE, loop, ext4, fio.

The FUSE server (the VBD and its BlockDevice) runs on an event loop in a thread of its
own; every client I/O runs in a subprocess (dd, mkfs.ext4, mount, e2fsck, blkdiscard,
fio), so the server never waits on itself. Each test uses private run, device and image
directories, and its fixtures remove every mount, loop device and link it made, whether
the test passed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from blktap.block.driver import OpenOptions
from blktap.errors import Busy
from blktap.frontends.blockdev import BlockDevice, loop_backing_file
from blktap.vbd import VBD, ImageSpec, VBDState
from tests.fuse_uring_helpers import uring_parameter
from tests.helpers import host_block_device_support, short_tempdir

T = TypeVar("T")
MiB = 1 << 20
SIZE = 64 * MiB

_ok, _why = host_block_device_support()  # the host's: tests/unit/test_blockdev_host.py
TOOLS = ("losetup", "blockdev", "blkdiscard", "mkfs.ext4", "e2fsck", "mount", "umount", "dd",
         "fio", "fallocate")
_missing = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"no FUSE+loop block device here: {_why}"),
    pytest.mark.skipif(bool(_missing), reason=f"tools missing: {', '.join(_missing)}"),
]


def sh(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


class ServerThread:
    """An event loop running in its own thread: uvloop as in tapdisk, or plain asyncio."""

    def __init__(self, use_uvloop: bool = True) -> None:
        if use_uvloop:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuse-server",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.loop.shutdown_default_executor(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Device:
    bd: BlockDevice
    vbd: VBD
    image: str
    path: str

    @property
    def loop_device(self) -> str:
        assert self.bd.loop_device is not None
        return self.bd.loop_device


def _loops_on(prefix: str) -> list[str]:
    """Loop devices whose backing file lies under ``prefix``."""
    found = []
    for name in os.listdir("/sys/block"):
        if name.startswith("loop"):
            backing = loop_backing_file(f"/dev/{name}")
            if backing and backing.startswith(prefix):
                found.append(f"/dev/{name}")
    return found


def _mounts_under(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        points = [line.split(" ")[4] for line in info]
    return [p for p in points if p.startswith(prefix)]


def _sweep(base: str) -> None:
    """Remove whatever the test left under ``base``: mounts, loop devices."""
    for point in sorted(_mounts_under(os.path.join(base, "mnt")), reverse=True):
        sh("umount", "-l", point, check=False)
    for device in _loops_on(base):
        sh("losetup", "-d", device, check=False)
    for point in sorted(_mounts_under(base), reverse=True):
        sh("umount", "-l", point, check=False)


@pytest.fixture(autouse=True, params=["dev-fuse", "io_uring"])
def _served_path(request: pytest.FixtureRequest,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # These tests are about the path tapdisk serves (FUSE requests); passthrough, where
    # the kernel does the I/O itself, is tests/system/test_blockdev_passthrough.py's.
    # Each runs with the requests read from /dev/fuse and with them in io_uring ring
    # entries (BLKTAP_FUSE_URING=on: a device that cannot have the ring fails).
    monkeypatch.setenv("BLKTAP_FUSE_PASSTHROUGH", "off")
    if request.param == "dev-fuse":
        monkeypatch.setenv("BLKTAP_FUSE_URING", "off")
        yield "fuse"
        return
    monkeypatch.setenv("BLKTAP_FUSE_URING", "on")
    with uring_parameter("Y"):
        yield "fuse-uring"


@pytest.fixture
def base() -> Iterator[str]:
    # Every path under it is short and private; the sweep runs even if the test failed.
    with short_tempdir("blockdev-") as path:
        try:
            yield path
        finally:
            _sweep(path)


@pytest.fixture
def server() -> Iterator[ServerThread]:
    srv = ServerThread()
    try:
        yield srv
    finally:
        srv.close()


MakeDevice = Callable[..., Device]


@pytest.fixture
def make_device(base: str, server: ServerThread) -> Iterator[MakeDevice]:
    """Create an image, open a VBD on it (aio driver) and start its block device."""
    made: list[Device] = []

    def make(*, read_only: bool = False, fill: bytes | None = None, minor: int = 0,
             direct: bool = True, loop_direct: bool = True, size: int = SIZE) -> Device:
        image = os.path.join(base, f"img{minor}.raw")
        with open(image, "wb") as f:
            f.truncate(size)
            if fill is not None:
                f.write(fill)
        vbd = VBD(minor)
        server.run(vbd.open(ImageSpec("aio", image), OpenOptions(read_only=read_only,
                                                                  direct=direct)))
        bd = BlockDevice(vbd, minor, run_dir=os.path.join(base, "run"),
                         dev_dir=os.path.join(base, "dev"), direct_io=loop_direct)
        dev = Device(bd, vbd, image, "")
        made.append(dev)
        dev.path = server.run(bd.start())
        return dev

    try:
        yield make
    finally:
        for point in sorted(_mounts_under(os.path.join(base, "mnt")), reverse=True):
            sh("umount", point, check=False)
        for dev in made:
            try:
                server.run(dev.bd.stop(force=True))
            finally:
                if dev.vbd.state != VBDState.CLOSED:
                    server.run(dev.vbd.close(force=True))


def image_bytes(dev: Device, offset: int, length: int) -> bytes:
    with open(dev.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def dd_read(path: str, offset: int, length: int, bs: int = 4096) -> bytes:
    out = subprocess.run(
        ["dd", f"if={path}", f"bs={bs}", f"skip={offset // bs}", f"count={length // bs}",
         "iflag=direct", "status=none"], capture_output=True, check=True, timeout=30)
    return out.stdout


def dd_write(path: str, offset: int, data: bytes, bs: int = 4096, *,
             direct: bool = True) -> subprocess.CompletedProcess[bytes]:
    flags = ["oflag=direct"] if direct else []
    return subprocess.run(
        ["dd", f"of={path}", f"bs={bs}", f"seek={offset // bs}", "conv=notrunc,fsync",
         "status=none", "iflag=fullblock", *flags],
        input=data, capture_output=True, timeout=30)


def pattern(seed: int, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:length])


# ------------------------------------------------------------------------ tests
def test_publishes_a_loop_device_over_the_fuse_file(make_device: MakeDevice, base: str) -> None:
    dev = make_device()
    assert dev.path == os.path.join(base, "dev", "tapdev0")
    target = os.readlink(dev.path)
    assert target.startswith("/dev/loop") and target == dev.loop_device
    assert stat.S_ISBLK(os.stat(dev.path).st_mode)
    assert int(sh("blockdev", "--getsize64", dev.path).stdout) == SIZE
    assert int(sh("blockdev", "--getss", dev.path).stdout) == 512
    assert sh("blockdev", "--getro", dev.path).stdout.strip() == "0"
    mountpoint = os.path.join(base, "run", "fuse", "0")
    assert loop_backing_file(dev.loop_device) == os.path.join(mountpoint, "disk")
    assert dev.bd.direct_io, "this kernel's loop driver accepts direct I/O on FUSE files"
    # The filesystem itself, seen from outside: one file of the VBD's size.
    assert sh("ls", "-a", mountpoint).stdout.split() == [".", "..", "disk"]
    assert sh("stat", "-c", "%s %F", os.path.join(mountpoint, "disk")).stdout.strip() \
        == f"{SIZE} regular file"
    assert sh("stat", "-f", "-c", "%T", mountpoint).stdout.strip().startswith("fuse")
    missing = sh("stat", os.path.join(mountpoint, "nothing"), check=False)
    assert missing.returncode != 0 and "No such file" in missing.stderr
    assert sh("truncate", "-s", "1M", os.path.join(mountpoint, "disk"), check=False) \
        .returncode != 0, "the size of the device is fixed"
    assert sh("touch", os.path.join(mountpoint, "new"), check=False).returncode != 0


def test_dd_patterns_reach_the_image_and_come_back(make_device: MakeDevice,
                                                   _served_path: str) -> None:
    before = pattern(1, 3 * MiB)
    dev = make_device(fill=before)
    assert dd_read(dev.path, 0, 3 * MiB) == before
    stats = dev.bd.statistics()
    assert stats.io_path == _served_path, stats
    # Through the ring, every request but FORGET comes in ring entries.
    assert (stats.ring_requests >= stats.reads) if _served_path == "fuse-uring" \
        else stats.ring_requests == 0, stats
    flushes = []
    real_flush = dev.vbd.flush

    async def counting_flush() -> None:
        flushes.append(1)
        await real_flush()

    dev.vbd.flush = counting_flush  # type: ignore[method-assign]

    # Sector-sized, page-sized and 1 MiB writes at odd places, direct and buffered.
    writes = [(5 * MiB + 512, pattern(2, 512 * 7), 512, True),
              (9 * MiB + 4096, pattern(3, 4096 * 33), 4096, True),
              (17 * MiB, pattern(4, 4 * MiB), MiB, True),
              (30 * MiB + 8192, pattern(5, 200 * 4096), 4096, False),
              (SIZE - MiB, pattern(6, MiB), MiB, True)]
    for offset, data, bs, direct in writes:
        result = dd_write(dev.path, offset, data, bs, direct=direct)
        assert result.returncode == 0, result.stderr
    for offset, data, _bs, _direct in writes:
        assert image_bytes(dev, offset, len(data)) == data, f"image at {offset}"
        assert dd_read(dev.path, offset - offset % 4096, len(data) + offset % 4096)[
            offset % 4096 :] == data
    assert len(flushes) >= len(writes), "conv=fsync reached the VBD as FUSE FSYNC"
    assert image_bytes(dev, 0, 3 * MiB) == before
    assert image_bytes(dev, 4 * MiB, MiB) == bytes(MiB), "untouched range stays zero"
    # Past the end: the block layer refuses, nothing reaches the image.
    assert dd_write(dev.path, SIZE, b"x" * 4096).returncode != 0
    assert os.path.getsize(dev.image) == SIZE


def test_discard_and_zeroout_read_back_as_zeros(make_device: MakeDevice, base: str) -> None:
    full = b"\xaa" * (24 * MiB)
    dev = make_device(fill=full)
    sh("blkdiscard", "-o", str(2 * MiB), "-l", str(3 * MiB), dev.path)
    sh("blkdiscard", "-z", "-o", str(8 * MiB), "-l", str(MiB), dev.path)
    disk = os.path.join(base, "run", "fuse", "0", "disk")
    sh("fallocate", "-z", "-o", str(12 * MiB), "-l", str(4096 * 3), disk)
    sh("fallocate", "-p", "-o", str(16 * MiB + 512), "-l", str(4096), disk)
    zero_ranges = [(2 * MiB, 3 * MiB), (8 * MiB, MiB), (12 * MiB, 4096 * 3),
                   (16 * MiB + 512, 4096)]
    expected = bytearray(full)
    for offset, length in zero_ranges:
        expected[offset : offset + length] = bytes(length)
    assert image_bytes(dev, 0, len(full)) == bytes(expected)
    assert dd_read(dev.path, 0, len(full), MiB) == bytes(expected)


def test_ext4_mkfs_mount_write_umount_fsck(make_device: MakeDevice, base: str) -> None:
    dev = make_device()
    sh("mkfs.ext4", "-q", "-F", dev.path, timeout=60)
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    payload = pattern(7, 8 * MiB + 1234)
    source = os.path.join(base, "payload")
    with open(source, "wb") as f:
        f.write(payload)
    sh("mount", dev.path, mnt)
    try:
        sh("cp", source, os.path.join(mnt, "file"))
        sh("mkdir", os.path.join(mnt, "dir"))
        sh("sync", "-f", os.path.join(mnt, "file"))
    finally:
        sh("umount", mnt)
    check = sh("e2fsck", "-f", "-n", dev.path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    sh("mount", "-o", "ro", dev.path, mnt)
    try:
        got = subprocess.run(["cat", os.path.join(mnt, "file")], capture_output=True,
                             check=True, timeout=30).stdout
        assert got == payload
    finally:
        sh("umount", mnt)
    # The filesystem is in the image itself: the kernel reads it straight from the file.
    assert sh("e2fsck", "-f", "-n", dev.image, check=False).returncode == 0


def test_read_only_vbd_gives_a_read_only_device(make_device: MakeDevice, base: str) -> None:
    data = pattern(8, MiB)
    dev = make_device(read_only=True, fill=data)
    assert sh("blockdev", "--getro", dev.path).stdout.strip() == "1"
    assert dd_read(dev.path, 0, MiB) == data
    assert dd_write(dev.path, 0, b"y" * 4096).returncode != 0
    disk = os.path.join(base, "run", "fuse", "0", "disk")
    refused = dd_write(disk, 0, b"y" * 4096)
    assert refused.returncode != 0 and b"Read-only" in refused.stderr
    assert image_bytes(dev, 0, MiB) == data


def test_stop_removes_everything_and_the_minor_can_start_again(
        make_device: MakeDevice, server: ServerThread, base: str) -> None:
    dev = make_device()
    loop_device = dev.loop_device
    mountpoint = os.path.join(base, "run", "fuse", "0")
    server.run(dev.bd.stop())
    assert not os.path.lexists(dev.path)
    assert not os.path.exists(mountpoint)
    assert not os.path.exists(os.path.dirname(mountpoint)), "the last device takes fuse/"
    assert _mounts_under(base) == []
    assert base not in sh("losetup", "-a").stdout
    assert loop_backing_file(loop_device) is None
    server.run(dev.bd.stop())  # stopping twice is harmless
    # Same minor, same run directory: a new device comes up.
    again = BlockDevice(dev.vbd, 0, run_dir=os.path.join(base, "run"),
                        dev_dir=os.path.join(base, "dev"))
    try:
        path = server.run(again.start())
        assert path == dev.path and os.path.islink(path)
        assert dd_write(path, 0, b"z" * 4096).returncode == 0
        assert image_bytes(dev, 0, 4096) == b"z" * 4096
    finally:
        server.run(again.stop())
    assert _mounts_under(base) == [] and base not in sh("losetup", "-a").stdout


def test_stop_refuses_while_mounted(make_device: MakeDevice, server: ServerThread,
                                    base: str) -> None:
    dev = make_device()
    sh("mkfs.ext4", "-q", "-F", dev.path, timeout=60)
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    sh("mount", dev.path, mnt)
    try:
        with pytest.raises(Busy):
            server.run(dev.bd.stop())
        # Nothing was taken away.
        assert os.path.islink(dev.path)
        sh("dd", "if=/dev/zero", f"of={mnt}/f", "bs=64k", "count=16", "conv=fsync")
    finally:
        sh("umount", mnt)
    server.run(dev.bd.stop())
    assert not os.path.lexists(dev.path) and _mounts_under(base) == []


def test_stop_while_open_then_force(make_device: MakeDevice, server: ServerThread,
                                    base: str) -> None:
    dev = make_device()
    dev.bd.BUSY_TIMEOUT = 0.3
    holder = subprocess.Popen(["sh", "-c", f'exec 3<"{dev.path}"; echo held; exec sleep 30'],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy):
            server.run(dev.bd.stop())
        assert not os.path.lexists(dev.path), "the link goes first"
        server.run(dev.bd.stop(force=True))
        assert _mounts_under(base) == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    # The loop device was marked to detach on its last close.
    deadline = time.monotonic() + 5
    while _loops_on(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _loops_on(base) == []


def test_io_waits_while_the_vbd_is_paused(make_device: MakeDevice,
                                          server: ServerThread) -> None:
    data = pattern(9, MiB)
    dev = make_device(fill=data)
    server.run(dev.vbd.pause())
    reader = subprocess.Popen(["dd", f"if={dev.path}", "bs=4096", "count=256", "iflag=direct",
                               "status=none"], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert reader.poll() is None, "the read waits for the VBD to resume"
        server.run(dev.vbd.resume())
        out, _ = reader.communicate(timeout=20)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0 and out == data


def test_many_requests_in_flight_keep_data_intact(make_device: MakeDevice) -> None:
    dev = make_device()
    result = sh("fio", "--name=verify", "--verify_state_save=0", f"--filename={dev.path}",
                "--ioengine=libaio",
                "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=8M",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--numjobs=1",
                "--output-format=terse", check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    sh("fio", "--name=mixed", f"--filename={dev.path}", "--ioengine=libaio", "--direct=1",
       "--rw=randrw", "--bsrange=512-256k", "--iodepth=32", "--offset=32M", "--size=16M",
       "--runtime=1", "--time_based", "--output-format=terse", timeout=60)


def test_stop_with_io_waiting_for_a_paused_vbd(make_device: MakeDevice,
                                               server: ServerThread, base: str) -> None:
    dev = make_device()
    dev.bd.BUSY_TIMEOUT = 0.3
    server.run(dev.vbd.pause())
    reader = subprocess.Popen(["dd", f"if={dev.path}", "of=/dev/null", "bs=4096", "count=1",
                               "iflag=direct", "status=none"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while dev.bd.inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.bd.inflight > 0, "the read reached the paused VBD"
        with pytest.raises(Busy):
            server.run(dev.bd.stop())
        assert os.path.islink(dev.path), "a refused stop changes nothing"
        server.run(dev.bd.stop(force=True), timeout=20)  # does not wait for the resume
        assert reader.wait(10) != 0, "the waiting read failed when the connection was aborted"
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait(10)
        if reader.stderr is not None:
            reader.stderr.close()
        server.run(dev.vbd.resume())
    assert _mounts_under(base) == []
    deadline = time.monotonic() + 5
    while _loops_on(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _loops_on(base) == []


CRASHING_SERVER = """
import asyncio, sys
from blktap.block.driver import OpenOptions
from blktap.frontends.blockdev import BlockDevice
from blktap.vbd import VBD, ImageSpec

async def main(image, run_dir, dev_dir):
    vbd = VBD(0)
    await vbd.open(ImageSpec("aio", image), OpenOptions())
    path = await BlockDevice(vbd, 0, run_dir=run_dir, dev_dir=dev_dir).start()
    print(path, flush=True)
    await asyncio.sleep(60)

asyncio.run(main(*sys.argv[1:]))
"""


def test_start_recovers_from_a_killed_tapdisk(make_device: MakeDevice, base: str) -> None:
    image = os.path.join(base, "crash.raw")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    run_dir, dev_dir = os.path.join(base, "run"), os.path.join(base, "dev")
    crashing = subprocess.Popen([sys.executable, "-c", CRASHING_SERVER, image, run_dir, dev_dir],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert crashing.stdout is not None
        path = crashing.stdout.readline().strip()
        assert path == os.path.join(dev_dir, "tapdev0")
        old_loop = os.readlink(path)
    finally:
        crashing.kill()
        crashing.wait(10)
        if crashing.stdout is not None:
            crashing.stdout.close()
    # A dead server: the mount and the loop device stay behind, I/O fails.
    assert _mounts_under(run_dir) and _loops_on(base) == [old_loop]
    assert dd_write(path, 0, b"q" * 4096).returncode != 0
    dev = make_device(minor=0)
    assert _loops_on(base) == [dev.loop_device]
    assert len(_mounts_under(run_dir)) == 1
    assert dd_write(dev.path, 0, b"r" * 4096).returncode == 0
    assert image_bytes(dev, 0, 4096) == b"r" * 4096


def _kernel_reads_mbr() -> bool:
    """Whether the kernel parses MBR partition tables (False only when known not to)."""
    try:
        config = subprocess.run(["zcat", "/proc/config.gz"], capture_output=True, text=True,
                                timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True
    return not config or "CONFIG_MSDOS_PARTITION=y" in config


@pytest.mark.skipif(not _kernel_reads_mbr(),
                    reason="this kernel has no MBR partition support (CONFIG_MSDOS_PARTITION)")
def test_partition_table_format_and_mount_a_partition(make_device: MakeDevice,
                                                      server: ServerThread, base: str) -> None:
    dev = make_device()
    # An MBR with one Linux partition from sector 2048 to the end, written by a "guest".
    first, count = 2048, SIZE // 512 - 2048
    entry = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), first, count)
    mbr = bytes(446) + entry + bytes(48) + b"\x55\xaa"
    assert dd_write(dev.path, 0, mbr, 512).returncode == 0
    sh("blockdev", "--rereadpt", dev.path)
    part = dev.loop_device + "p1"
    deadline = time.monotonic() + 5
    while not os.path.exists(part) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(sh("blockdev", "--getsize64", part).stdout) == count * 512
    sh("mkfs.ext4", "-q", "-F", part, timeout=60)
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    sh("mount", part, mnt)
    try:
        sh("dd", "if=/dev/urandom", f"of={mnt}/f", "bs=1M", "count=2", "conv=fsync")
        with pytest.raises(Busy):
            server.run(dev.bd.stop())
    finally:
        sh("umount", mnt)
    assert sh("e2fsck", "-f", "-n", part, check=False).returncode == 0
    assert image_bytes(dev, 510, 2) == b"\x55\xaa"
    server.run(dev.bd.stop())
    assert not os.path.exists(part)


def test_buffered_loop_device_and_buffered_image(make_device: MakeDevice) -> None:
    """Without direct I/O anywhere: page cache above the FUSE file, none in it."""
    dev = make_device(direct=False, loop_direct=False)
    assert not dev.bd.direct_io
    data = pattern(10, 3 * MiB)
    result = dd_write(dev.path, 7 * MiB, data, 64 * 1024, direct=False)
    assert result.returncode == 0, result.stderr
    assert image_bytes(dev, 7 * MiB, len(data)) == data, "fsync reached the image"
    sh("mkfs.ext4", "-q", "-F", dev.path, timeout=60)
    sh("sync")
    assert sh("e2fsck", "-f", "-n", dev.image, check=False).returncode == 0


def test_two_devices_at_once_and_one_mib_requests(make_device: MakeDevice) -> None:
    first, second = make_device(minor=3), make_device(minor=12)
    assert first.path.endswith("tapdev3") and second.path.endswith("tapdev12")
    assert first.loop_device != second.loop_device
    a, b = pattern(11, 8 * MiB), pattern(12, 8 * MiB)
    writers = [subprocess.Popen(["dd", f"of={dev.path}", "bs=1M", "oflag=direct",
                                 "iflag=fullblock",
                                 "conv=notrunc,fsync", "status=none"], stdin=subprocess.PIPE)
               for dev in (first, second)]
    try:
        for writer, data in zip(writers, (a, b), strict=True):
            assert writer.stdin is not None
            writer.stdin.write(data)
            writer.stdin.close()
        assert [w.wait(30) for w in writers] == [0, 0]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    assert image_bytes(first, 0, len(a)) == a and image_bytes(second, 0, len(b)) == b
    assert dd_read(first.path, 0, 4 * MiB, MiB) == a[: 4 * MiB]
    # max_write/max_pages were negotiated: without them the kernel would split every
    # request into 128 KiB pieces (32 pages). The loop queue allows 512 KiB (128 segments)
    # to about 1 MiB, depending on how contiguous the pages are.
    for dev in (first, second):
        stats = dev.bd.statistics()
        assert stats.largest_write >= MiB // 2, stats
        assert stats.writes >= 8
    assert first.bd.statistics().largest_read >= MiB // 2


def test_run_directory_behind_a_symlink(make_device: MakeDevice, server: ServerThread,
                                        base: str) -> None:
    """/var/run is often a link to /run: the kernel names the backing file resolved."""
    dev = make_device()
    server.run(dev.bd.stop())
    real = os.path.join(base, "real-run")
    os.mkdir(real)
    link = os.path.join(base, "linked-run")
    os.symlink(real, link)
    bd = BlockDevice(dev.vbd, 5, run_dir=link, dev_dir=os.path.join(base, "dev"))
    try:
        path = server.run(bd.start())
        assert loop_backing_file(os.readlink(path)) == os.path.join(real, "fuse", "5", "disk")
        assert dd_write(path, 4096, b"s" * 4096).returncode == 0
    finally:
        server.run(bd.stop())
    assert _mounts_under(real) == [] and _loops_on(base) == []
    assert image_bytes(dev, 4096, 4096) == b"s" * 4096


def test_size_not_a_multiple_of_the_page_size(make_device: MakeDevice) -> None:
    size = 5 * MiB + 3 * 512
    tail = pattern(13, 3 * 512)
    dev = make_device(size=size, fill=bytes(size - len(tail)) + tail)
    assert int(sh("blockdev", "--getsize64", dev.path).stdout) == size
    assert dd_read(dev.path, size - 3 * 512, 3 * 512, 512) == tail
    new_tail = pattern(14, 512)
    assert dd_write(dev.path, size - 512, new_tail, 512).returncode == 0
    assert image_bytes(dev, size - 512, 512) == new_tail
    assert dd_write(dev.path, size, new_tail, 512).returncode != 0
    assert os.path.getsize(dev.image) == size


def test_served_from_a_plain_asyncio_loop(base: str) -> None:
    srv = ServerThread(use_uvloop=False)
    image = os.path.join(base, "plain.raw")
    with open(image, "wb") as f:
        f.truncate(SIZE)
    vbd = VBD(7)
    bd = BlockDevice(vbd, 7, run_dir=os.path.join(base, "run"),
                     dev_dir=os.path.join(base, "dev"))
    try:
        srv.run(vbd.open(ImageSpec("aio", image), OpenOptions()))
        path = srv.run(bd.start())
        data = pattern(15, MiB)
        assert dd_write(path, MiB, data, 64 * 1024).returncode == 0
        assert dd_read(path, MiB, MiB) == data
        srv.run(bd.stop())
    finally:
        try:
            srv.run(bd.stop(force=True))
            srv.run(vbd.close(force=True))
        finally:
            srv.close()
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == data
