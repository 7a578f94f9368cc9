"""The vhd driver's fast reads (``FastIO.reads_held_only``): the VBD's synchronous route
(``VBD.read_now``) and the threads' blocking route (``ThreadIO.read``) serve a read only
when the leaf holds every sector of it inside one block, decline everything else (block
boundaries, partly present bitmaps, holes, the parent's sectors), and what they serve
is always the chain's answer, also while writes allocate blocks under them.

Each case checks the bytes a route returns, that a declined request left the buffer
alone, and that the general route (``VBD.read``) then returns the right bytes.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from blktap.block.driver import OpenOptions
from blktap.util.buffers import aligned
from blktap.vbd import VBD, ImageSpec, ThreadIO
from blktap.vhd import create_dynamic, create_fixed, snapshot

BS = 64 << 10  # 64 KiB blocks: many blocks in a small disk
SIZE = 16 * BS
PAGE = 4096
UNTOUCHED = 0xA5


def data(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


async def opened(path: str, direct: bool, read_only: bool = False) -> VBD:
    vbd = VBD(1)
    await vbd.open(ImageSpec("vhd", path), OpenOptions(read_only=read_only, direct=direct))
    return vbd


async def general_read(vbd: VBD, offset: int, length: int) -> bytes:
    buf = aligned(length)
    await vbd.read(offset, buf)
    return bytes(buf)


async def fast_read(vbd: VBD, io: ThreadIO, offset: int, length: int,
                    direct: bool) -> bytes | None:
    """The bytes the blocking route serves, or None when it declines (its buffer then
    untouched). The synchronous route must serve the same bytes or decline; buffered,
    it must decide as the blocking one (direct, it also declines by the engine's timing
    rules, AioImage._read_direct_now)."""
    buf = aligned(length)
    buf[:] = bytes([UNTOUCHED]) * length
    await asyncio.sleep(0)  # a new loop iteration: O_DIRECT's read_now may block once
    now = vbd.read_now(offset, buf)
    got = bytes(buf)
    buf[:] = bytes([UNTOUCHED]) * length
    blocking = await asyncio.to_thread(io.read, offset, buf)
    if not direct:
        assert now is blocking, (offset, length, now, blocking)
    if not blocking:
        assert not now, (offset, length)
        assert got == bytes(buf) == bytes([UNTOUCHED]) * length, "a declined read wrote"
        return None
    if now:
        assert got == bytes(buf)
    else:
        assert got == bytes([UNTOUCHED]) * length, "a declined read wrote"
    return bytes(buf)


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def direct(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def test_dynamic_disk_full_block_partial_bitmap_hole_and_boundary(
        tmp_path: Path, direct: bool) -> None:
    """Block 0 full, block 1 with its first half present, block 2 a hole, block 3 full."""
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, SIZE, block_size=BS)
    b0, b1, b3 = data(0, BS), data(1, BS // 2), data(3, BS)
    model = bytearray(SIZE)
    model[0:BS] = b0
    model[BS : BS + BS // 2] = b1
    model[3 * BS : 4 * BS] = b3

    async def body() -> None:
        vbd = await opened(path, direct)
        try:
            for off, chunk in ((0, b0), (BS, b1), (3 * BS, b3)):
                await vbd.write(off, memoryview(chunk))
            adm = vbd.admission
            assert adm is not None
            # The read routes past the chain (a lone disk reads its holes as zeros, as
            # the chain would); writes keep the chain (it drops its owner cache).
            assert adm.read_now is not None and adm.read_blocking is not None
            assert adm.read_image is not None and not vbd.thread_io_possible(write=True)
            io = vbd.thread_io()
            assert io is not None
            try:
                hits = vbd.stats()["images"][0]["hits"][0]
                for off, length, held in [
                    (0, PAGE, True),                      # a full block
                    (BS - PAGE, PAGE, True),              # its last page
                    (0, BS, True),                        # the whole block
                    (BS, PAGE, True),                     # present half of block 1
                    (BS + BS // 2 - 512, 512, True),      # its last present sector
                    (3 * BS + 8192, 3 * PAGE, True),
                    (BS - PAGE, 2 * PAGE, False),         # block boundary, both held
                    (BS + BS // 2 - PAGE, 2 * PAGE, False),  # half present, half not
                    (BS + BS // 2, PAGE, False),          # absent sectors of block 1
                    (2 * BS, PAGE, False),                # a hole (no block)
                    (2 * BS - PAGE, 2 * PAGE, False),     # held, then a hole
                    (3 * BS - 512, 1024, False),          # a hole, then held
                ]:
                    want = bytes(model[off : off + length])
                    got = await fast_read(vbd, io, off, length, direct)
                    assert got == (want if held else None), (off, length)
                    assert await general_read(vbd, off, length) == want, (off, length)
            finally:
                vbd.release_thread_io(io)
            # The fast routes count their reads as the leaf's, as the chain does.
            assert vbd.stats()["images"][0]["hits"][0] >= hits + (2 * BS + 5 * PAGE) // 512
            assert await general_read(vbd, 0, SIZE) == bytes(model)
        finally:
            await vbd.close()

    asyncio.run(body())


def test_differencing_child_serves_its_own_sectors_and_declines_the_parents(
        tmp_path: Path, direct: bool) -> None:
    """base.vhd full of data <- leaf.vhd holding block 1 and half of block 2."""
    base = str(tmp_path / "base.vhd")
    leaf = str(tmp_path / "leaf.vhd")
    create_dynamic(base, SIZE, block_size=BS)
    model = bytearray(data(10, SIZE))

    async def body() -> None:
        vbd = await opened(base, direct)
        await vbd.write(0, memoryview(bytes(model)))
        await vbd.close()
        snapshot(leaf, base)
        vbd = await opened(leaf, direct)
        try:
            for off, chunk in ((BS, data(11, BS)), (2 * BS, data(12, BS // 2))):
                await vbd.write(off, memoryview(chunk))
                model[off : off + len(chunk)] = chunk
            adm = vbd.admission
            assert adm is not None and adm.read_image is None  # holes are the parent's
            io = vbd.thread_io()
            assert io is not None
            try:
                for off, length, held in [
                    (BS, PAGE, True),
                    (BS, BS, True),
                    (2 * BS + PAGE, PAGE, True),
                    (0, PAGE, False),                     # the parent's
                    (BS - PAGE, 2 * PAGE, False),         # parent, then child
                    (2 * BS + BS // 2 - PAGE, 2 * PAGE, False),  # child, then parent
                    (5 * BS, BS, False),
                ]:
                    want = bytes(model[off : off + length])
                    got = await fast_read(vbd, io, off, length, direct)
                    assert got == (want if held else None), (off, length)
                    assert await general_read(vbd, off, length) == want, (off, length)
            finally:
                vbd.release_thread_io(io)
            assert await general_read(vbd, 0, SIZE) == bytes(model)
            # The base was read through the chain only: the leaf's hits are its own.
            images = vbd.stats()["images"]
            assert [i["name"] for i in images] == [leaf, base]
            assert images[1]["hits"][0] > 0
        finally:
            await vbd.close()

    asyncio.run(body())


def test_reads_while_writes_allocate_blocks(tmp_path: Path, direct: bool) -> None:
    """A differencing child over a parent full of data, written 16 KiB at a time (each
    write allocating a block or setting bitmap bits) by many concurrent writes on the
    loop, while a thread reads 4 KiB pages through ThreadIO and the loop through
    VBD.read_now: whatever a fast route serves is the new data, complete (it serves a
    page only once the bitmap says the leaf holds it, after the data is on disk); the
    general route returns the old or the new page, never anything else."""
    base = str(tmp_path / "base.vhd")
    leaf = str(tmp_path / "leaf.vhd")
    create_dynamic(base, SIZE, block_size=BS)
    old = data(20, SIZE)
    new = data(21, SIZE)
    piece = 16 << 10
    pages = SIZE // PAGE

    async def body() -> None:
        vbd = await opened(base, direct)
        await vbd.write(0, memoryview(old))
        await vbd.close()
        snapshot(leaf, base)
        vbd = await opened(leaf, direct)
        stop = threading.Event()
        served = {"thread": 0, "loop": 0}
        errors: list[str] = []
        io = vbd.thread_io()
        assert io is not None

        def reader() -> None:
            rng = random.Random(5)
            buf = aligned(PAGE)
            while not stop.is_set():
                off = rng.randrange(pages) * PAGE
                if io.read(off, buf):
                    served["thread"] += 1
                    if bytes(buf) != new[off : off + PAGE]:
                        errors.append(f"thread read at {off}: not the new data")

        async def loop_reader() -> None:
            rng = random.Random(6)
            buf = aligned(PAGE)
            while not stop.is_set():
                off = rng.randrange(pages) * PAGE
                if vbd.read_now(off, buf):
                    served["loop"] += 1
                    if bytes(buf) != new[off : off + PAGE]:
                        errors.append(f"loop read at {off}: not the new data")
                else:
                    got = await general_read(vbd, off, PAGE)
                    if got not in (old[off : off + PAGE], new[off : off + PAGE]):
                        errors.append(f"general read at {off}: neither old nor new")
                await asyncio.sleep(0)

        async def write(off: int) -> None:
            await vbd.write(off, memoryview(new[off : off + piece]))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            looper = asyncio.create_task(loop_reader())
            order = list(range(0, SIZE, piece))
            random.Random(7).shuffle(order)
            for i in range(0, len(order), 8):  # eight writes in flight at a time
                await asyncio.gather(*(write(off) for off in order[i : i + 8]))
                await asyncio.sleep(0)
            for _ in range(1000):  # every page is the leaf's now: the thread serves some
                if served["thread"]:
                    break
                await asyncio.sleep(0.01)
            stop.set()
            await looper
        finally:
            stop.set()
            thread.join(30)
            vbd.release_thread_io(io)
        try:
            assert not errors, errors[:5]
            assert served["thread"] > 0, served
            assert await general_read(vbd, 0, SIZE) == new
            if not direct:  # (direct, read_now also follows the engine's timing rules)
                buf = aligned(PAGE)
                assert vbd.read_now(0, buf) and bytes(buf) == new[:PAGE]  # all held now
        finally:
            await vbd.close()

    asyncio.run(body())


def test_fixed_disk_serves_every_read_at_the_same_offsets(tmp_path: Path, direct: bool) -> None:
    path = str(tmp_path / "f.vhd")
    create_fixed(path, SIZE)
    content = data(30, SIZE)
    with open(path, "r+b") as f:
        f.write(content)  # a fixed VHD's data is the file's first bytes

    async def body() -> None:
        vbd = await opened(path, direct, read_only=True)
        try:
            adm = vbd.admission
            assert adm is not None and adm.read_image is not None  # fully allocated
            io = vbd.thread_io()
            assert io is not None
            try:
                for off, length in ((0, PAGE), (BS - PAGE, 2 * PAGE), (SIZE - PAGE, PAGE),
                                    (BS + PAGE, 1024)):
                    got = await fast_read(vbd, io, off, length, direct)
                    assert got == content[off : off + length]
            finally:
                vbd.release_thread_io(io)
        finally:
            await vbd.close()

    asyncio.run(body())
