"""The drivers every conformance test runs against, and helpers to build their images.

Adding a driver (or a new way to open one) is one line in :data:`CASES`: a
:class:`DriverCase` whose ``make`` creates an image holding given bytes. The suites in
``tests/unit/test_driver_conformance.py`` and ``tests/property/test_chain_model.py``
check each case against a plain ``bytearray`` model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from blktap.block.chain import STATE_HOLE, Chain
from blktap.block.driver import Alloc, Extent, FastIO, Image, ImageInfo, OpenOptions, opener_for
from blktap.block.layer import Layer, LayerOpener, Stack, open_stack
from blktap.block.layers.mirror import MirrorSlot
from blktap.vhd.create import create_dynamic, create_fixed
from tests.ceph_helpers import rbd_image
from tests.nbdkit_helpers import nbdkit_memory_image

ImageMaker = Callable[[Path, bytes], contextlib.AbstractContextManager[str]]
"""``make(tmp_dir, initial)``: a context giving the path of an image that reads as
``initial``; leaving it removes everything it created (files, loop devices)."""


@dataclass(frozen=True)
class DriverCase:
    id: str
    type_name: str
    make: ImageMaker
    direct: bool = True
    persistent: bool = True
    """Writes reach the file (False for ram, which never writes back)."""
    file_times: bool = True
    """The path is a regular file whose timestamps a read-only open must not change."""
    layers: tuple[str | LayerOpener, ...] = ()
    """Layers (top first) over the driver: the case then tests them, through
    :class:`StackImage`, in their pass-through mode."""

    def options(self, read_only: bool = False) -> OpenOptions:
        return OpenOptions(read_only=read_only, direct=self.direct)

    async def open(self, path: str, read_only: bool = False) -> Image:
        options = self.options(read_only)
        image = await opener_for(self.type_name)(path, options)
        if not self.layers:
            return image
        stack = await open_stack(self.layers, Chain([image]), options)
        return StackImage(stack, image)


class StackImage:
    """A stack of layers over a one-image chain, seen as an :class:`Image`, so that the
    driver suites check layers as they check drivers. Reads, writes, zeroes, discards,
    flushes and block status go through the top layer; ``allocation`` is the image's (a
    stack has none). Offers no synchronous forms (they would skip the layers)."""

    def __init__(self, stack: Stack, image: Image) -> None:
        self.stack = stack
        self.image = image
        self.type_name = image.type_name
        self.path = image.path
        self.info: ImageInfo = image.info
        self.read_only = image.read_only
        self.parent = None
        self.fully_allocated = True  # the chain below reads unallocated ranges as zeros

    def fast_io(self) -> FastIO:
        return FastIO()

    def allocation(self, offset: int, length: int) -> list[Extent]:
        return self.image.allocation(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(e.offset, e.length, Alloc.ZERO if e.flags & STATE_HOLE else Alloc.DATA)
                for e in self.stack.block_status(offset, length)]

    async def read(self, offset: int, buf: memoryview) -> None:
        await self.stack.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self.stack.write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.stack.write_zeroes(offset, length, may_unmap, False)

    async def discard(self, offset: int, length: int) -> None:
        await self.stack.discard(offset, length)

    async def flush(self) -> None:
        await self.stack.flush()

    async def close(self) -> None:
        await self.stack.close()


# ------------------------------------------------------------------- image makers
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4]
            sep = fields.index("-")
            inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, fields[sep + 1]
    return fstype


@contextlib.contextmanager
def raw_file(tmp: Path, initial: bytes) -> Iterator[str]:
    """A regular file on a disk filesystem: the test's temporary directory, or /var/tmp
    when that is in memory (O_DIRECT must be tested against a real block device)."""
    if filesystem_type(tmp) in MEMORY_FILESYSTEMS:
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="blktap-test-") as disk:
            if filesystem_type(Path(disk)) in MEMORY_FILESYSTEMS:
                pytest.skip("no disk-backed filesystem for temporary files (tmp, /var/tmp)")
            path = Path(disk) / "image.raw"
            path.write_bytes(initial)
            yield str(path)
        return
    path = tmp / "image.raw"
    path.write_bytes(initial)
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def shm_file(tmp: Path, initial: bytes) -> Iterator[str]:
    """A regular file on tmpfs (/dev/shm)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs on this host")
    path = Path("/dev/shm") / f"blktap-conformance-{os.getpid()}-{tmp.name}.raw"
    path.write_bytes(initial)
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def loop_device_unavailable() -> str | None:
    """Why a loop device cannot be set up here, or None when it can."""
    if os.geteuid() != 0:
        return "loop devices need root (losetup)"
    if shutil.which("losetup") is None:
        return "losetup is not installed (util-linux)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: the loop module is not loaded"
    return None


@contextlib.contextmanager
def loop_device(backing: str, sector_size: int = 512) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; detached on exit."""
    why = loop_device_unavailable()
    if why is not None:
        pytest.skip(why)
    cmd = ["losetup", "-f", "--show"]
    if sector_size != 512:
        cmd += ["--sector-size", str(sector_size)]
    for _ in range(5):  # another process may grab the same free device: retry
        res = subprocess.run([*cmd, backing], capture_output=True, text=True, timeout=30)
        if res.returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def loop_maker(sector_size: int) -> ImageMaker:
    @contextlib.contextmanager
    def make(tmp: Path, initial: bytes) -> Iterator[str]:
        with raw_file(tmp, initial) as backing, loop_device(backing, sector_size) as dev:
            yield dev

    return make


def vhd_maker(create: Callable[[str, int], None]) -> ImageMaker:
    """A VHD made by ``create(path, size)``, then filled through the vhd driver."""

    @contextlib.contextmanager
    def make(tmp: Path, initial: bytes) -> Iterator[str]:
        path = tmp / "image.vhd"
        create(str(path), len(initial))

        async def fill() -> None:
            image = await opener_for("vhd")(str(path), OpenOptions(direct=False))
            try:
                await image.write(0, memoryview(initial))
            finally:
                await image.close()

        try:
            asyncio.run(fill())
            yield str(path)
        finally:
            path.unlink(missing_ok=True)

    return make


async def mirror_over_ram(next: Stack, options: OpenOptions) -> Layer:
    """The mirror layer over ``next`` with a ram secondary of its size (reading as zeros)."""
    fd, path = tempfile.mkstemp(prefix="mirror-secondary-")
    try:
        os.ftruncate(fd, next.size)
        os.close(fd)
        slot = MirrorSlot()
        slot.set(f"ram:{path}")
        return await slot.opener()(next, options)  # ram reads the file whole at open
    finally:
        os.unlink(path)


CASES: list[DriverCase] = [
    DriverCase("ram", "ram", raw_file, persistent=False),
    DriverCase("aio-direct", "aio", raw_file),
    DriverCase("aio-buffered", "aio", raw_file, direct=False),
    DriverCase("aio-direct-tmpfs", "aio", shm_file),
    DriverCase("aio-direct-loop", "aio", loop_maker(512), file_times=False),
    DriverCase("aio-direct-loop4k", "aio", loop_maker(4096), file_times=False),
    DriverCase("aio-buffered-loop", "aio", loop_maker(512), direct=False, file_times=False),
    DriverCase("vhd-dynamic", "vhd", vhd_maker(create_dynamic), direct=False),
    DriverCase("vhd-fixed", "vhd", vhd_maker(create_fixed), direct=False),
    DriverCase("rbd", "rbd", rbd_image, file_times=False),  # on tests/ceph_helpers' cluster
    DriverCase("nbd", "nbd", nbdkit_memory_image, file_times=False),  # nbdkit memory, Unix socket
]
"""Every driver configuration the shared suites check. Add a driver here."""

CASE_IDS = [c.id for c in CASES]

LAYER_CASES: list[DriverCase] = [
    replace(case, id=f"null-{case.id}", layers=("null",)) for case in CASES
] + [replace(CASES[2], id="null-null-aio-buffered", layers=("null", "null"))] + [
    # fault: every request is a hit that injects nothing (errno=none, no latency).
    replace(case, id=f"fault-{case.id}", layers=("fault:errno=none",))
    for case in CASES if case.id in ("aio-buffered", "vhd-dynamic")
] + [
    # mirror: every write also goes to a ram secondary (a zero file of the same size).
    replace(case, id=f"mirror-ram-{case.id}", layers=(mirror_over_ram,))
    for case in CASES if case.id in ("aio-buffered", "vhd-dynamic")
]
"""Every layer in pass-through mode over every driver configuration (and a stack of
two): the driver suite runs them too. Add a layer here."""

LAYER_CASE_IDS = [c.id for c in LAYER_CASES]


def sectors_equal_or_zero(got: bytes, old: bytes, sector: int = 512) -> bool:
    """Each sector of ``got`` equals the same sector of ``old`` or is all zeros."""
    zero = bytes(sector)
    for pos in range(0, len(got), sector):
        part = got[pos : pos + sector]
        if part != old[pos : pos + sector] and part != zero:
            return False
    return True


def open_fds() -> set[int]:
    """The descriptors this process holds now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}
