"""What the ``aio`` and ``ram`` drivers do beyond the shared conformance suite."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blktap.block.driver import Alloc, OpenOptions, opener_for, registered_types
from blktap.block.drivers import aio as aio_module
from blktap.block.drivers.aio import AioImage, open_aio
from blktap.block.drivers.ram import open_ram
from blktap.errors import ImageFormatError
from blktap.util.linux_aio import AioContext
from tests.conformance import loop_device, open_fds

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_file(tmp_path: Path, content: bytes, name: str = "image.raw") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


async def read(image: Any, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await image.read(offset, memoryview(buf))
    return bytes(buf)


def test_drivers_are_registered_under_their_c_type_strings() -> None:
    assert {"aio", "ram"} <= set(registered_types())
    assert opener_for("aio") is open_aio
    assert opener_for("ram") is open_ram


def test_direct_is_really_o_direct_and_buffered_is_not(tmp_path: Path) -> None:
    path = make_file(tmp_path, bytes(65536))

    async def body() -> None:
        direct = await open_aio(path, OpenOptions(direct=True))
        buffered = await open_aio(path, OpenOptions(direct=False))
        try:
            assert isinstance(direct, AioImage) and direct.direct
            assert fcntl.fcntl(direct._fd, fcntl.F_GETFL) & os.O_DIRECT
            assert not buffered.direct
            assert not fcntl.fcntl(buffered._fd, fcntl.F_GETFL) & os.O_DIRECT
        finally:
            await direct.close()
            await buffered.close()

    run(body())


def test_read_only_uses_o_noatime_and_o_rdonly(tmp_path: Path) -> None:
    path = make_file(tmp_path, bytes(4096))

    async def body() -> None:
        image = await open_aio(path, OpenOptions(read_only=True))
        try:
            flags = fcntl.fcntl(image._fd, fcntl.F_GETFL)
            assert flags & os.O_ACCMODE == os.O_RDONLY
            if os.geteuid() == 0 or os.stat(path).st_uid == os.geteuid():
                assert flags & os.O_NOATIME
        finally:
            await image.close()

    run(body())


def test_size_rounds_down_to_whole_sectors(tmp_path: Path) -> None:
    path = make_file(tmp_path, b"\x01" * 1500)

    async def body() -> None:
        for opener in (open_aio, open_ram):
            image = await opener(path, OpenOptions())
            try:
                assert image.info.size == 1024
                assert await read(image, 512, 512) == b"\x01" * 512
            finally:
                await image.close()

    run(body())


def test_paths_that_are_not_images_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        before = open_fds()
        for opener in (open_aio, open_ram):
            with pytest.raises(ImageFormatError):
                await opener("/dev/null", OpenOptions(direct=False))
            with pytest.raises(FileNotFoundError):
                await opener(str(tmp_path / "missing.raw"), OpenOptions())
            with pytest.raises((OSError, ImageFormatError)) as info:
                await opener(str(tmp_path), OpenOptions(direct=False))
            assert getattr(info.value, "errno", None) in (errno.EISDIR, errno.EINVAL)
        assert open_fds() == before

    run(body())


def test_holes_are_reported_as_zero_extents(tmp_path: Path) -> None:
    path = str(tmp_path / "sparse.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)

    async def body() -> None:
        image = await open_aio(path, OpenOptions())
        try:
            assert [(e.offset, e.length, e.alloc) for e in image.block_status(0, 1 << 20)] == [
                (0, 1 << 20, Alloc.ZERO)
            ]
            await image.write(65536, memoryview(b"\x01" * 4096))
            extents = image.block_status(0, 1 << 20)
            data = [e for e in extents if e.alloc == Alloc.DATA]
            assert data and data[0].offset <= 65536
            assert data[0].offset + data[0].length >= 65536 + 4096
            # Punching the data away makes it a hole again.
            await image.write_zeroes(0, 1 << 20, True)
            assert all(e.alloc == Alloc.ZERO for e in image.block_status(0, 1 << 20))
            await image.write(8192, memoryview(b"\x02" * 4096))
            await image.discard(8192, 4096)
            assert all(e.alloc == Alloc.ZERO for e in image.block_status(0, 1 << 20))
            assert await read(image, 8192, 4096) == bytes(4096)
        finally:
            await image.close()

    run(body())


def test_block_device_size_and_status(tmp_path: Path) -> None:
    backing = make_file(tmp_path, os.urandom(3 << 20))
    with loop_device(backing) as dev:

        async def body() -> None:
            image = await open_aio(dev, OpenOptions())
            try:
                assert isinstance(image, AioImage) and image.is_block_device
                assert image.info.size == 3 << 20
                assert [(e.offset, e.length, e.alloc) for e in image.block_status(512, 4096)] == [
                    (512, 4096, Alloc.DATA)
                ]
            finally:
                await image.close()
            ram = await open_ram(dev, OpenOptions())
            try:
                assert ram.info.size == 3 << 20
                with open(backing, "rb") as f:
                    assert await read(ram, 0, 3 << 20) == f.read()
            finally:
                await ram.close()

        run(body())


def test_concurrent_sector_writes_in_one_4k_block_all_survive(tmp_path: Path) -> None:
    """On a 4096-byte-sector device each 512-byte write is a read-modify-write."""
    backing = make_file(tmp_path, bytes(1 << 20))
    with loop_device(backing, sector_size=4096) as dev:

        async def body() -> None:
            image = await open_aio(dev, OpenOptions())
            try:
                assert isinstance(image, AioImage) and image.offset_align == 4096
                writes = []
                model = bytearray(1 << 20)
                for block in range(16):
                    for sector in range(8):
                        off = block * 4096 + sector * 512
                        data = bytes([block * 8 + sector + 1]) * 512
                        model[off : off + 512] = data
                        writes.append(image.write(off, memoryview(data)))
                # A whole-block write overlapping the read-modify-writes of block 20.
                for sector in (1, 3):
                    model[20 * 4096 + sector * 512 : 20 * 4096 + sector * 512 + 512] = b"s" * 512
                    writes.append(image.write(20 * 4096 + sector * 512, memoryview(b"s" * 512)))
                random.Random(3).shuffle(writes)
                await asyncio.gather(*writes)
                assert await read(image, 0, 1 << 20) == model
            finally:
                await image.close()

        run(body())


def test_coarser_alignment_uses_rmw_and_a_buffered_tail(tmp_path: Path) -> None:
    """A 4096-byte O_DIRECT alignment on a file whose size is not a multiple of it.

    Forced on an ext4 file (which would take 512): the driver must widen requests,
    read-modify-write, and serve the partial last block without growing the file.
    """
    size = 64 * 1024 + 1536
    content = os.urandom(size)
    path = make_file(tmp_path, content)
    model = bytearray(content)

    async def body() -> None:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        image = AioImage(
            path, fd, size=size, read_only=False, is_block=False, direct=True,
            offset_align=4096, mem_align=4096, aio=AioContext.for_loop(),
        )  # fmt: skip
        try:
            rng = random.Random(5)
            ops = []
            for _ in range(200):
                sector = rng.randrange(size // 512)
                count = rng.randint(1, min(10, size // 512 - sector))
                data = rng.randbytes(count * 512)
                model[sector * 512 : sector * 512 + len(data)] = data
                ops.append((sector * 512, data))
            # Non-overlapping batches run concurrently; overlapping ones in order.
            for off, data in ops:
                await image.write(off, memoryview(data))
            assert await read(image, 0, size) == model
            await image.write(size - 512, memoryview(b"T" * 512))
            model[-512:] = b"T" * 512
            assert await read(image, size - 1024, 1024) == model[-1024:]
            await asyncio.gather(*[image.write(i * 512, memoryview(bytes([i]) * 512))
                                   for i in range(32)])
            for i in range(32):
                model[i * 512 : i * 512 + 512] = bytes([i]) * 512
            assert await read(image, 0, size) == model
            # Zeroing one sector while another sector of its block is written: the
            # zeroing starts as the write's read-modify-write has read the block.
            async def zero_soon(base: int, unmap: bool) -> None:
                await read(image, 15 * 4096, 4096)  # an O_DIRECT read in the same batch
                await image.write_zeroes(base, 512, unmap)

            for block in range(8):
                base = block * 4096
                await asyncio.gather(
                    image.write(base + 512, memoryview(b"w" * 512)),
                    zero_soon(base, bool(block & 1)),
                )
                model[base : base + 512] = bytes(512)
                model[base + 512 : base + 1024] = b"w" * 512
            assert await read(image, 0, size) == model
        finally:
            await image.close()
        assert os.path.getsize(path) == size
        with open(path, "rb") as f:
            assert f.read() == model

    run(body())


def test_ram_never_writes_back(tmp_path: Path) -> None:
    content = os.urandom(65536)
    path = make_file(tmp_path, content)
    st = os.stat(path)

    async def body() -> None:
        a = await open_ram(path, OpenOptions())
        b = await open_ram(path, OpenOptions())
        try:
            await a.write(0, memoryview(b"\xff" * 4096), fua=True)
            await a.flush()
            assert await read(a, 0, 4096) == b"\xff" * 4096
            assert await read(b, 0, 4096) == content[:4096]  # each open is its own copy
        finally:
            await a.close()
            await b.close()

    run(body())
    with open(path, "rb") as f:
        assert f.read() == content
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_file_truncated_under_the_image_reads_fail_with_eio(tmp_path: Path, direct: bool) -> None:
    path = make_file(tmp_path, os.urandom(65536))

    async def body() -> None:
        image = await open_aio(path, OpenOptions(direct=direct))
        try:
            os.truncate(path, 8192)
            assert len(await read(image, 0, 8192)) == 8192
            for offset, length in [(4096, 8192), (32768, 4096)]:  # partly / wholly past EOF
                with pytest.raises(OSError) as info:
                    await read(image, offset, length)
                assert info.value.errno == errno.EIO
        finally:
            await image.close()

    run(body())


def test_buffered_reads_complete_eagerly_direct_reads_later(tmp_path: Path) -> None:
    """Run as the NBD server runs requests (util/eager.py): a buffered (page-cache)
    read finishes inside ``start``; an O_DIRECT read finishes when the loop reaps it."""
    from blktap.util import eager

    content = os.urandom(65536)
    path = make_file(tmp_path, content)

    async def body() -> None:
        for direct in (False, True):
            image = await open_aio(path, OpenOptions(direct=direct))
            try:
                buf = bytearray(4096)
                done: list[tuple[Any, BaseException | None]] = []

                def on_done(res: Any, exc: BaseException | None,
                            done: list[tuple[Any, BaseException | None]] = done) -> None:
                    done.append((res, exc))

                eager.start(image.read(8192, memoryview(buf)), on_done)
                if direct:
                    assert done == []
                    for _ in range(1000):
                        await asyncio.sleep(0.001)
                        if done:
                            break
                assert done == [(None, None)]
                assert buf == content[8192 : 8192 + 4096]
            finally:
                await image.close()

    run(body())


def test_direct_reads_go_synchronous_while_fast_and_back_off_when_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_now of an O_DIRECT image: served (True) while the device is idle and its
    reads are fast on average; once they are slow, declined (False, buffer untouched:
    read() sends them to the kernel) until the back-off ends."""
    from blktap.util.buffers import aligned

    content = os.urandom(65536)
    path = make_file(tmp_path, content)
    clock = [0]
    monkeypatch.setattr(aio_module, "_now_ns", lambda: clock[0])

    async def body() -> None:
        image = await open_aio(path, OpenOptions(direct=True))
        try:
            assert image.direct and image.read_now is not None
            buf = aligned(4096)

            def read_now(offset: int, takes_ns: int) -> bool:
                # Each synchronous read "takes" takes_ns on the patched clock.
                real = os.preadv

                def timed(fd: int, bufs: Any, off: int) -> int:
                    clock[0] += takes_ns
                    return real(fd, bufs, off)

                monkeypatch.setattr(os, "preadv", timed)
                try:
                    return bool(image.read_now(offset, buf))
                finally:
                    monkeypatch.setattr(os, "preadv", real)

            for i in range(20):  # fast: every one served at once
                assert read_now(4096 * (i % 16), 30_000)
                assert buf == content[4096 * (i % 16) : 4096 * (i % 16 + 1)]
                await asyncio.sleep(0)  # one per loop iteration (AioContext.may_block)
            slow = 0
            while read_now(0, 2_000_000):  # the device turns slow: a few reads tell
                slow += 1
                await asyncio.sleep(0)
            assert 1 <= slow <= 4
            buf[:] = b"\xa5" * 4096
            clock[0] += aio_module.SYNC_READ_BACKOFF_NS // 2
            assert not read_now(8192, 30_000) and buf == b"\xa5" * 4096  # backing off
            assert await read(image, 8192, 4096) == content[8192:12288]  # read(): async
            clock[0] += aio_module.SYNC_READ_BACKOFF_NS
            await asyncio.sleep(0)
            assert read_now(8192, 30_000) and buf == content[8192:12288]  # tried again
            # Large reads always go to the kernel.
            large = aligned(aio_module.SYNC_READ_MAX * 2)
            await asyncio.sleep(0)
            assert not image.read_now(0, large)
        finally:
            await image.close()

    run(body())


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_read_blocking_from_another_thread(tmp_path: Path, direct: bool) -> None:
    """read_blocking (for NBD lanes) reads in whatever thread calls it, without the
    loop's rules (busy device, size); in direct mode it declines, untouched, what
    O_DIRECT cannot take as it is (unaligned, memory it refuses, the buffered tail)."""
    import threading

    from blktap.util.buffers import aligned

    size = 4 * 65536 + 1536  # a tail past the last whole 4096-byte block
    content = os.urandom(size)
    path = make_file(tmp_path, content)

    async def body() -> None:
        if direct:  # with the coarser alignment, as test_coarser_alignment_... forces it
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            image: Any = AioImage(
                path, fd, size=size, read_only=True, is_block=False, direct=True,
                offset_align=4096, mem_align=4096, aio=AioContext.for_loop(),
            )  # fmt: skip
        else:
            image = await open_aio(path, OpenOptions(direct=False))
        results: list[tuple[bool, bytes]] = []

        def in_thread(offset: int, buf: memoryview) -> None:
            buf[:] = b"\xa5" * len(buf)
            results.append((image.read_blocking(offset, buf), bytes(buf)))

        cases = [(0, aligned(4096)), (65536, aligned(4 * 65536 - 65536)),
                 (512, aligned(512)), (4096, memoryview(bytearray(4097))[1:]),
                 (4 * 65536, aligned(1536))]
        try:
            for offset, buf in cases:
                thread = threading.Thread(target=in_thread, args=(offset, buf))
                thread.start()
                thread.join()
        finally:
            await image.close()
        for (offset, buf), (done, got) in zip(cases, results, strict=True):
            n = len(buf)
            want = content[offset : offset + n]
            if direct and offset in (512, 4096, 4 * 65536):
                assert not done and got == b"\xa5" * n, offset  # declined, untouched
            else:
                assert done and got == want, offset

    run(body())


def test_o_direct_refused_falls_back_to_buffered_and_logs_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sysfs refuses O_DIRECT at open (EINVAL), as tmpfs did before Linux 6.6."""
    path = "/sys/kernel/uevent_seqnum"
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not there: sysfs is not mounted")
    # As in a fresh process: no filesystem's fallback has been logged yet.
    monkeypatch.setattr(aio_module, "_buffered_fallback_logged", set())

    async def body() -> None:
        for _ in range(2):
            image = await open_aio(path, OpenOptions(read_only=True, direct=True))
            try:
                assert isinstance(image, AioImage)
                assert not image.direct
                assert not fcntl.fcntl(image._fd, fcntl.F_GETFL) & os.O_DIRECT
            finally:
                await image.close()

    with caplog.at_level("WARNING", logger="blktap.block.drivers.aio"):
        run(body())
    refused = [r for r in caplog.records if "O_DIRECT is not available" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]  # two opens, one message
    assert path in refused[0].getMessage()
    assert os.stat(path).st_dev in aio_module._buffered_fallback_logged


def test_as_a_file_engine_writes_may_extend_the_file(tmp_path: Path) -> None:
    path = make_file(tmp_path, b"\x01" * 8192)

    async def body() -> None:
        image = await open_aio(path, OpenOptions())
        try:
            assert isinstance(image, AioImage) and image.direct
            await image.write(8192, memoryview(b"\x02" * 4096 + b"\x03" * 512))
            await image.write(12800, memoryview(bytearray(b"\x04" * 1024)))
            assert await read(image, 8192, 5632) == (
                b"\x02" * 4096 + b"\x03" * 512 + b"\x04" * 1024
            )
        finally:
            await image.close()

    run(body())
    assert os.path.getsize(path) == 13824
    with open(path, "rb") as f:
        assert f.read() == b"\x01" * 8192 + b"\x02" * 4096 + b"\x03" * 512 + b"\x04" * 1024


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_enospc_is_reported_and_the_image_keeps_serving(tmp_path: Path, direct: bool) -> None:
    """A sparse image on a full filesystem (a 256 KiB tmpfs): the kernel's ENOSPC
    reaches the caller as OSError, and the image keeps working."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        path = str(mnt / "image.raw")
        with open(path, "wb") as f:
            f.truncate(4 << 20)

        async def body() -> None:
            image = await open_aio(path, OpenOptions(direct=direct))
            try:
                chunk = memoryview(bytearray(b"x" * 65536))
                with pytest.raises(OSError) as info:
                    for i in range(64):
                        await image.write(i * 65536, chunk)
                assert info.value.errno == errno.ENOSPC
                assert await read(image, 0, 4096) == b"x" * 4096
                await image.write(0, memoryview(b"y" * 4096))  # allocated: still fine
                assert await read(image, 0, 4096) == b"y" * 4096
            finally:
                await image.close()

        run(body())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
