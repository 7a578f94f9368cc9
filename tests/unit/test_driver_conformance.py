"""The shared driver conformance suite: every case in tests/conformance.py vs a bytearray.

Each test builds a real image (file, tmpfs file or loop device), opens it with the
driver, and compares every read with a ``bytearray`` model of what it must hold.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from blktap.block.chain import Chain
from blktap.block.driver import SECTOR_SIZE, Alloc, Image
from blktap.errors import BlktapError
from blktap.util.buffers import aligned
from tests.conformance import (
    CASE_IDS,
    CASES,
    LAYER_CASE_IDS,
    LAYER_CASES,
    DriverCase,
    open_fds,
    sectors_equal_or_zero,
)

T = TypeVar("T")

SIZE = 1 << 20  # 1 MiB: 2048 sectors, 256 pages

SYNCHRONOUS_DRIVERS = {"ram", "aio"}
"""Drivers whose images must offer the synchronous forms (blktap.block.driver.FastIO):
read_now always, write_now for memory and buffered files (O_DIRECT writes go through AIO).
A case of them (without layers) that stops offering them fails; other cases skip."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(params=CASES + LAYER_CASES, ids=CASE_IDS + LAYER_CASE_IDS)
def case(request: pytest.FixtureRequest) -> DriverCase:
    param: DriverCase = request.param
    return param


@pytest.fixture
def initial() -> bytes:
    return random.Random(1234).randbytes(SIZE)


@pytest.fixture
def image_path(case: DriverCase, tmp_path: Path, initial: bytes) -> Iterator[str]:
    with case.make(tmp_path, initial) as path:
        yield path


async def read_into(image: Image, offset: int, buf: memoryview) -> None:
    """Read as the chain does: ``image.read`` only where the image holds DATA."""
    if image.fully_allocated:
        await image.read(offset, buf)
        return
    for ext in image.allocation(offset, len(buf)):
        part = buf[ext.offset - offset : ext.offset - offset + ext.length]
        if ext.alloc == Alloc.DATA:
            await image.read(ext.offset, part)
        else:  # no parent in these tests: zeros
            part[:] = bytes(ext.length)


async def read_all(image: Image, offset: int = 0, length: int | None = None) -> bytes:
    if length is None:
        length = image.info.size - offset
    buf = bytearray(length)
    await read_into(image, offset, memoryview(buf))
    return bytes(buf)


async def stored(case: DriverCase, path: str) -> bytes:
    """What a fresh read-only open of the image reads."""
    image = await case.open(path, read_only=True)
    try:
        return await read_all(image)
    finally:
        await image.close()


def file_bytes(path: str) -> bytes:
    """Every byte of the file (or device), whatever its format."""
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- basics
def test_open_reports_size_and_reads_initial_contents(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    async def body() -> None:
        image = await case.open(image_path)
        try:
            assert image.type_name == case.type_name
            assert image.path == image_path
            assert image.info.size == SIZE
            assert not image.read_only
            assert await read_all(image) == initial
            assert await read_all(image, 0, SECTOR_SIZE) == initial[:SECTOR_SIZE]
            assert await read_all(image, SIZE - SECTOR_SIZE) == initial[-SECTOR_SIZE:]
        finally:
            await image.close()

    run(body())


def test_read_after_write_at_many_offsets(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    rng = random.Random(42)
    model = bytearray(initial)
    sectors = SIZE // SECTOR_SIZE

    async def body() -> None:
        image = await case.open(image_path)
        try:
            spans = [(0, 1), (0, 8), (sectors - 1, 1), (sectors - 8, 8), (0, sectors), (7, 9)]
            spans += [(s, rng.randint(1, min(64, sectors - s)))
                      for s in (rng.randrange(sectors) for _ in range(60))]
            for i, (start, count) in enumerate(spans):
                offset, length = start * SECTOR_SIZE, count * SECTOR_SIZE
                data = rng.randbytes(length)
                await image.write(offset, memoryview(data), fua=(i % 5 == 0))
                model[offset : offset + length] = data
                assert await read_all(image, offset, length) == data
                # A neighbouring range is untouched.
                lo = max(0, offset - 4 * SECTOR_SIZE)
                hi = min(SIZE, offset + length + 4 * SECTOR_SIZE)
                assert await read_all(image, lo, hi - lo) == model[lo:hi]
            assert await read_all(image) == model
        finally:
            await image.close()
        # Reopened, the image holds the writes (ram: the file never changes).
        assert await stored(case, image_path) == (model if case.persistent else initial)

    run(body())


def test_synchronous_forms_match_the_model(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    """Drivers that offer read_now/write_now (blktap.block.driver) do with them what read
    and write do, or decline having done nothing (False)."""
    rng = random.Random(7)
    model = bytearray(initial)
    offered: list[bool] = []

    async def body() -> None:
        image = await case.open(image_path)
        served = [0, 0]
        try:
            fast = image.fast_io()
            read_now, write_now = fast.read_now, fast.write_now
            offered.append(read_now is not None or write_now is not None)
            if case.type_name in SYNCHRONOUS_DRIVERS and not case.layers:
                assert read_now is not None, f"{case.id}: read_now is no longer offered"
                if case.type_name == "ram" or not case.direct:
                    assert write_now is not None, f"{case.id}: write_now is no longer offered"
            if not offered[0]:
                return
            for i in range(40):
                start = rng.randrange(SIZE // SECTOR_SIZE)
                count = rng.randint(1, min(16, SIZE // SECTOR_SIZE - start))
                offset, length = start * SECTOR_SIZE, count * SECTOR_SIZE
                data = rng.randbytes(length)
                fua = i % 4 == 0
                if write_now is not None and write_now(offset, memoryview(data), fua):
                    served[1] += 1
                else:
                    await image.write(offset, memoryview(data), fua)
                model[offset : offset + length] = data
                # Page-aligned memory, as the NBD server's buffers (O_DIRECT can take it).
                back = aligned(length)
                back[:] = b"\xa5" * length
                if read_now is not None and read_now(offset, back):
                    served[0] += 1
                    assert bytes(back) == data
                else:
                    assert bytes(back) == b"\xa5" * length  # declined: untouched
                await asyncio.sleep(0)  # a new loop iteration (see AioContext.may_block)
            assert await read_all(image) == model
        finally:
            await image.close()
        # Whatever is offered serves some requests (aio direct: every aligned read).
        assert served[0] if read_now is not None else True
        assert served[1] if write_now is not None else True
        assert await stored(case, image_path) == (model if case.persistent else initial)

    run(body())
    if not offered[0]:
        pytest.skip(f"{case.id}: the driver offers no synchronous forms (read_now/write_now)")


def test_unaligned_and_read_only_buffers(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    """Buffers at odd memory addresses and immutable bytes work (O_DIRECT bounces)."""
    model = bytearray(initial)

    async def body() -> None:
        image = await case.open(image_path)
        try:
            backing = bytearray(3 * 4096 + 1)
            view = memoryview(backing)[1 : 1 + 3 * 4096]  # odd address
            await read_into(image, 4096, view)
            assert bytes(view) == model[4096 : 4 * 4096]
            data = bytes(range(256)) * 8  # 2048 bytes, immutable
            await image.write(512, memoryview(data))
            model[512 : 512 + len(data)] = data
            view[:1024] = b"\xab" * 1024
            await image.write(8192, view[:1024])
            model[8192 : 8192 + 1024] = b"\xab" * 1024
            assert await read_all(image) == model
        finally:
            await image.close()

    run(body())


def test_flush_and_fua_writes_land(case: DriverCase, image_path: str, initial: bytes) -> None:
    async def body() -> None:
        image = await case.open(image_path)
        try:
            await image.write(0, memoryview(b"\x01" * 4096), fua=True)
            await image.write(SIZE - 4096, memoryview(b"\x02" * 4096))
            await image.flush()
            await image.flush()  # twice: nothing pending is fine
        finally:
            await image.close()
        expected = b"\x01" * 4096 + initial[4096:-4096] + b"\x02" * 4096
        assert await stored(case, image_path) == (expected if case.persistent else initial)

    run(body())


@pytest.mark.parametrize("may_unmap", [False, True], ids=["zero", "unmap"])
def test_write_zeroes(case: DriverCase, image_path: str, initial: bytes, may_unmap: bool) -> None:
    model = bytearray(initial)

    async def body() -> None:
        image = await case.open(image_path)
        try:
            for offset, length in [(0, 512), (4096, 65536), (1536, 1024),
                                   (SIZE - 8192, 8192), (100 * 512, 3 * 512)]:
                await image.write_zeroes(offset, length, may_unmap)
                model[offset : offset + length] = bytes(length)
                assert await read_all(image, offset, length) == bytes(length)
            assert await read_all(image) == model
            await image.flush()
        finally:
            await image.close()
        assert await stored(case, image_path) == (model if case.persistent else initial)

    run(body())


def test_discard_reads_old_data_or_zeros(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    async def body() -> None:
        image = await case.open(image_path)
        try:
            ranges = [(0, 4096), (65536, 131072), (3 * 512, 5 * 512), (SIZE - 4096, 4096)]
            for offset, length in ranges:
                await image.discard(offset, length)
            got = await read_all(image)
            assert sectors_equal_or_zero(got, initial)
            # Bytes outside the discarded ranges are exactly as before.
            keep = bytearray(got)
            old = bytearray(initial)
            for offset, length in ranges:
                keep[offset : offset + length] = bytes(length)
                old[offset : offset + length] = bytes(length)
            assert keep == old
            # Writes after a discard land normally.
            await image.write(65536, memoryview(b"\x07" * 4096))
            assert await read_all(image, 65536, 4096) == b"\x07" * 4096
        finally:
            await image.close()

    run(body())


def test_block_status_covers_the_range(case: DriverCase, image_path: str) -> None:
    async def body() -> None:
        image = await case.open(image_path)
        try:
            await image.write_zeroes(0, 65536, True)
            await image.discard(131072, 65536)
            for offset, length in [(0, SIZE), (0, 512), (512, 4096), (65536 - 512, 1024),
                                   (SIZE - 512, 512), (100 * 512, 777 * 512)]:
                extents = image.block_status(offset, length)
                assert extents, "no extents"
                pos = offset
                for ext in extents:
                    assert ext.offset == pos
                    assert ext.length > 0
                    assert ext.alloc in (Alloc.DATA, Alloc.ZERO, Alloc.UNALLOCATED)
                    if ext.alloc == Alloc.ZERO:
                        assert await read_all(image, ext.offset, ext.length) == bytes(ext.length)
                    pos += ext.length
                assert pos == offset + length
                alloc = image.allocation(offset, length)
                assert sum(e.length for e in alloc) == length
                assert alloc[0].offset == offset
        finally:
            await image.close()

    run(body())


# ------------------------------------------------------------------------ read-only
def test_read_only_open_refuses_writes_and_changes_nothing(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    if case.file_times:
        # atime older than mtime: a plain read would update it even under relatime.
        st = os.stat(image_path)
        os.utime(image_path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    local = os.path.exists(image_path)  # not an rbd image in a cluster
    before = os.stat(image_path) if local else None
    before_bytes = file_bytes(image_path) if local else b""
    if case.file_times:  # reading it just now must not count as an access
        assert before is not None
        os.utime(image_path, ns=(before.st_atime_ns, before.st_mtime_ns))
        before = os.stat(image_path)

    async def body() -> None:
        image = await case.open(image_path, read_only=True)
        try:
            assert image.read_only
            assert await read_all(image) == initial
            with pytest.raises((BlktapError, OSError)):
                await image.write(0, memoryview(bytes(512)))
            with pytest.raises((BlktapError, OSError)):
                await image.write_zeroes(0, 4096, True)
            with pytest.raises((BlktapError, OSError)):
                await image.discard(0, 4096)
            await image.flush()
        finally:
            await image.close()

    run(body())
    if not local:
        assert run(stored(case, image_path)) == initial
        return
    after = os.stat(image_path)
    assert file_bytes(image_path) == before_bytes
    if case.file_times:
        assert before is not None
        assert after.st_atime_ns == before.st_atime_ns
        assert after.st_mtime_ns == before.st_mtime_ns
        assert after.st_ctime_ns == before.st_ctime_ns


# ---------------------------------------------------------------------- lifecycle
def test_close_releases_every_descriptor(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    first = bytes(512) if case.persistent else initial[:512]

    async def body() -> None:
        before = open_fds()
        image = await case.open(image_path)
        await image.write(0, memoryview(bytes(4096)))
        await read_all(image, 0, 4096)
        await image.close()
        assert open_fds() == before
        # Two images at once, closed in either order.
        a = await case.open(image_path, read_only=True)
        b = await case.open(image_path, read_only=True)
        await a.close()
        assert await read_all(b, 0, 512) == first
        await b.close()
        assert open_fds() == before

    run(body())


# -------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_many_concurrent_reads_and_writes(
    case: DriverCase, image_path: str, initial: bytes, loop: str
) -> None:
    rng = random.Random(7)
    model = bytearray(initial)

    async def body() -> None:
        image = await case.open(image_path)
        try:
            # 300 writes of 1..4 sectors to distinct sectors, all in flight at once.
            sectors = rng.sample(range(0, SIZE // SECTOR_SIZE - 4, 4), 300)
            writes = []
            for s in sectors:
                data = rng.randbytes(rng.randint(1, 4) * SECTOR_SIZE)
                model[s * SECTOR_SIZE : s * SECTOR_SIZE + len(data)] = data
                writes.append(image.write(s * SECTOR_SIZE, memoryview(data)))
            await asyncio.gather(*writes)
            bufs = [bytearray(4 * SECTOR_SIZE) for _ in sectors]
            await asyncio.gather(*[read_into(image, s * SECTOR_SIZE, memoryview(b))
                                   for s, b in zip(sectors, bufs, strict=True)])
            for s, b in zip(sectors, bufs, strict=True):
                assert b == model[s * SECTOR_SIZE : (s + 4) * SECTOR_SIZE]
            assert await read_all(image) == model
        finally:
            await image.close()

    if loop == "uvloop":  # what the tapdisk daemon runs on
        uvloop.run(body())
    else:
        run(body())


# ------------------------------------------------------------ through the chain
def test_chain_unaligned_reads_and_writes(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    rng = random.Random(99)
    model = bytearray(initial)

    async def body() -> None:
        chain = Chain([await case.open(image_path)])
        try:
            for _ in range(80):
                offset = rng.randrange(SIZE - 1)
                length = rng.randint(1, min(5000, SIZE - offset))
                if rng.random() < 0.5:
                    data = rng.randbytes(length)
                    await chain.write(offset, memoryview(data))
                    model[offset : offset + length] = data
                buf = bytearray(length)
                await chain.read(offset, memoryview(buf))
                assert buf == model[offset : offset + length]
            await chain.write_zeroes(1000, 7000, True, False)
            model[1000:8000] = bytes(7000)
            await chain.write(SIZE - 3, memoryview(b"end"))
            model[-3:] = b"end"
            await chain.flush()
            buf = bytearray(SIZE)
            await chain.read(0, memoryview(buf))
            assert buf == model
            extents = chain.block_status(0, SIZE)
            assert sum(e.length for e in extents) == SIZE
        finally:
            await chain.close()

    run(body())


def test_chain_concurrent_unaligned_writes_sharing_a_sector(
    case: DriverCase, image_path: str, initial: bytes
) -> None:
    model = bytearray(initial)

    async def body() -> None:
        chain = Chain([await case.open(image_path)])
        try:
            writes = []
            # Pairs of writes that share sector boundaries (and, on 4k devices, blocks).
            for base in range(0, 64 * 4096, 4096):
                for off, data in ((base + 100, b"a" * 300), (base + 400, b"b" * 200),
                                  (base + 600, b"c" * 700), (base + 1300, b"d" * 10)):
                    model[off : off + len(data)] = data
                    writes.append(chain.write(off, memoryview(data)))
            await asyncio.gather(*writes)
            buf = bytearray(SIZE)
            await chain.read(0, memoryview(buf))
            assert buf == model
        finally:
            await chain.close()

    run(body())
