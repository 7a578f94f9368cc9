"""The VBD: validation at the entry, statistics, pause/resume/close semantics."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from blktap.block.driver import SYNC_WRITE_MAX, OpenOptions
from blktap.block.drivers.aio import SYNC_READ_MAX
from blktap.errors import BlktapError, InvalidArgument, NoSpace, ReadOnly, Shutdown
from blktap.util.buffers import aligned
from blktap.vbd import VBD, ImageSpec, IOCounts, VBDState

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return str(path)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def opened(image: str, *, read_only: bool = False, direct: bool = False) -> VBD:
    vbd = VBD(3)
    await vbd.open(ImageSpec("aio", image), OpenOptions(read_only=read_only, direct=direct))
    return vbd


def test_image_spec_parsing() -> None:
    assert ImageSpec.parse("vhd:/tmp/a:b") == ImageSpec("vhd", "/tmp/a:b")
    for bad in ("", "aio", ":/x", "aio:"):
        with pytest.raises(InvalidArgument):
            ImageSpec.parse(bad)


def test_aligned_and_unaligned_io_and_statistics(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image)
        buf = memoryview(bytearray(4096))
        await vbd.read(4096, buf)  # aligned: the fast path
        assert bytes(buf) == bytes(range(256)) * 16
        await vbd.write(0, memoryview(b"\xaa" * 1024))
        await vbd.write(1000, memoryview(b"\xbb" * 100))  # unaligned: read-modify-write
        small = memoryview(bytearray(200))
        await vbd.read(950, small)
        assert bytes(small) == b"\xaa" * 50 + b"\xbb" * 100 + bytes(range(76, 126))
        stats = vbd.stats()
        assert stats["secs"] == [8, 2]  # whole sectors of the requests
        # Image hits are sectors, as the C tapdisk counts them; the unaligned requests
        # reach the image as whole sectors (and a read-modify-write reads its edges).
        assert stats["images"][0]["hits"][0] >= 8 and stats["images"][0]["hits"][1] >= 2
        assert stats["errors"] == [0, 0] and stats["reqs_outstanding"] == 0
        assert stats["read_only"] is False and stats["name"] == f"aio:{image}"
        await vbd.close()
        assert vbd.state is VBDState.CLOSED

    run(main())


def test_requests_are_validated_at_the_entry(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image)
        with pytest.raises(InvalidArgument):
            await vbd.read(SIZE - 512, memoryview(bytearray(1024)))
        with pytest.raises(InvalidArgument):
            await vbd.read(-512, memoryview(bytearray(512)))
        with pytest.raises(NoSpace):
            await vbd.write(SIZE, memoryview(bytes(512)))
        with pytest.raises(NoSpace):
            await vbd.write_zeroes(SIZE - 512, 1024, may_unmap=False, fua=False)
        await vbd.close()
        ro = await opened(image, read_only=True)
        for op in (ro.write(0, memoryview(bytes(512))), ro.trim(0, 512),
                   ro.write_zeroes(0, 512, may_unmap=True, fua=False)):
            with pytest.raises(ReadOnly):
                await op
        await ro.close()

    run(main())


def test_synchronous_io_serves_what_it_can_and_declines_the_rest(image: str) -> None:
    """read_now/write_now: buffered raw images are served at once, with the same
    statistics as read/write; anything else is declined (False) and left untouched."""

    async def main() -> None:
        vbd = await opened(image)
        buf = memoryview(bytearray(4096))
        assert vbd.read_now(8192, buf)
        assert bytes(buf) == bytes(range(256)) * 16
        assert vbd.write_now(0, memoryview(b"\x5a" * 1024), fua=True)
        check = memoryview(bytearray(1024))
        await vbd.read(0, check)
        assert bytes(check) == b"\x5a" * 1024
        stats = vbd.stats()
        assert stats["secs"] == [8 + 2, 2] and stats["errors"] == [0, 0]
        assert stats["images"][0]["hits"] == stats["secs"]  # in sectors, as in C
        # Declined: large writes (the driver may copy them in a thread), unaligned, out
        # of range (validated by read/write), while paused.
        big = memoryview(b"\x66" * SYNC_WRITE_MAX)
        assert not vbd.write_now(0, big)
        await vbd.write(0, big)  # the buffered aio driver: in its worker thread
        check = memoryview(bytearray(SYNC_WRITE_MAX))
        assert vbd.read_now(0, check) and check == big
        untouched = bytes(buf)
        assert not vbd.read_now(100, buf[:512])
        assert not vbd.read_now(SIZE, buf[:512])
        assert not vbd.write_now(SIZE - 512, memoryview(bytes(1024)))
        await vbd.pause()
        assert not vbd.read_now(0, buf[:512]) and not vbd.write_now(0, buf[:512])
        assert bytes(buf) == untouched
        await vbd.resume()
        assert vbd.read_now(0, buf[:512])
        await vbd.close()
        assert not vbd.read_now(0, buf[:512])

        ro = await opened(image, read_only=True)  # writes go the checked way
        assert not ro.write_now(0, memoryview(bytes(512)))
        assert ro.read_now(0, buf[:512])
        await ro.close()
        # O_DIRECT: a read is served at once while the device is idle and fast, one per
        # loop iteration (others arriving with it go to the kernel together), into
        # memory O_DIRECT can take; writes always go through Linux AIO.
        direct = await opened(image, direct=True)
        page = aligned(4096)
        assert direct.read_now(8192, page) and page == big[8192 : 8192 + 4096]
        assert not direct.read_now(0, page)  # the same loop iteration
        await asyncio.sleep(0)
        large = aligned(SYNC_READ_MAX + 4096)
        assert not direct.read_now(0, large)  # large reads: always to the kernel
        assert large == bytes(len(large))
        assert not direct.write_now(0, page[:512])
        assert direct.stats()["images"][0]["hits"] == [8, 0]
        await direct.close()

    run(main())


def test_sync_file_is_lent_only_while_running_buffered_and_counts(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image)
        sync = vbd.sync_file()
        assert sync is not None and (sync.size, sync.writable) == (SIZE, True)
        buf = memoryview(bytearray(4096))
        assert os.preadv(sync.fd, [buf], 4096) == 4096 and bytes(buf) == bytes(range(256)) * 16
        vbd.count(IOCounts(reads=2, read_bytes=8192, writes=1, written_bytes=512))
        stats = vbd.stats()
        assert stats["secs"] == [16, 1] and stats["images"][0]["hits"] == [16, 1]
        await vbd.pause()
        assert vbd.sync_file() is None  # paused: requests wait, through vbd.read/write
        await vbd.resume()
        resumed = vbd.sync_file()
        assert resumed is not None and resumed.fd >= 0
        await vbd.close()
        assert vbd.sync_file() is None
        read_only = await opened(image, read_only=True)
        lent = read_only.sync_file()
        assert lent is not None and not lent.writable
        await read_only.close()
        direct = await opened(image, direct=True)
        assert direct.sync_file() is None  # O_DIRECT goes through AIO
        await direct.close()
        ram = VBD(4)
        await ram.open(ImageSpec("ram", image), OpenOptions())
        assert ram.sync_file() is None  # no descriptor
        await ram.close()

    run(main())


def test_synchronous_io_errors_are_counted_and_raised(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image)
        os.truncate(image, 0)
        # The file shrank under the VBD: a read past its end is short -> EIO.
        with pytest.raises(OSError) as info:
            vbd.read_now(SIZE - 4096, memoryview(bytearray(4096)))
        assert info.value.errno == errno.EIO
        stats = vbd.stats()
        assert stats["errors"] == [1, 0] and stats["images"][0]["fail"] == [8, 0]  # sectors
        await vbd.close()

    run(main())


def test_io_waits_while_paused_and_completes_after_resume(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image)
        await vbd.pause()
        assert vbd.state is VBDState.PAUSED and vbd.state_bits == 0x2A
        buf = memoryview(bytearray(512))
        waiting = asyncio.ensure_future(vbd.read(512, buf))
        writing = asyncio.ensure_future(vbd.write(0, memoryview(b"\x11" * 512)))
        await asyncio.sleep(0.05)
        assert not waiting.done() and not writing.done()
        await vbd.resume()
        await asyncio.gather(waiting, writing)
        assert bytes(buf) == bytes(range(256)) * 2
        check = memoryview(bytearray(512))
        await vbd.read(0, check)
        assert bytes(check) == b"\x11" * 512
        await vbd.close()

    run(main())


def test_pause_waits_for_in_flight_io(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image, direct=True)  # Linux AIO: reads really are in flight
        reads = [asyncio.ensure_future(vbd.read(i * 512, memoryview(bytearray(512))))
                 for i in range(50)]
        await asyncio.sleep(0)  # let them start
        assert vbd.inflight > 0
        await vbd.pause()
        assert all(r.done() for r in reads)
        await vbd.resume()
        await vbd.close()

    run(main())


def test_close_of_a_paused_vbd_fails_waiting_io(image: str) -> None:
    async def main() -> None:
        vbd = await opened(image)
        await vbd.pause()
        waiting = asyncio.ensure_future(vbd.read(0, memoryview(bytearray(512))))
        await asyncio.sleep(0.01)
        vbd.fail_waiting_io()
        await vbd.close()
        with pytest.raises(Shutdown):
            await waiting

    run(main())


def test_resume_must_keep_the_size(image: str, tmp_path: Path) -> None:
    other = tmp_path / "small.raw"
    other.write_bytes(bytes(SIZE // 2))

    async def main() -> None:
        vbd = await opened(image)
        vbd.RESUME_TRIES = 1
        await vbd.pause()
        with pytest.raises(BlktapError) as info:
            await vbd.resume(ImageSpec("aio", str(other)))
        assert info.value.errno == errno.EMEDIUMTYPE
        assert vbd.state is VBDState.RESUME_FAILED and vbd.state_bits & 0x200
        with pytest.raises(Shutdown):
            await vbd.read(0, memoryview(bytearray(512)))
        await vbd.resume()
        assert vbd.state_bits == 0
        await vbd.close()

    run(main())


def test_a_failed_open_leaves_the_vbd_closed(tmp_path: Path) -> None:
    async def main() -> None:
        vbd = VBD(0)
        with pytest.raises(OSError):
            await vbd.open(ImageSpec("aio", str(tmp_path / "missing")), OpenOptions())
        assert vbd.state is VBDState.CLOSED and vbd.chain is None

    run(main())
