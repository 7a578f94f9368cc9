"""The vhd driver against the shared driver conformance suite and a bytearray model.

tests/conformance.py already lists a dynamic and a fixed VHD; this module runs the whole
shared suite (tests/unit/test_driver_conformance.py) on more kinds of VHD: dynamic disks
with 2 MiB and 64 KiB blocks filled piecemeal out of order (partial bitmaps), and a
dynamic disk written by qemu-img, and a dynamic and a fixed one opened O_DIRECT (the
aio engine). Differencing chains, which a single-image suite cannot
express, are checked through :class:`Chain` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import SECTOR_SIZE, OpenOptions
from blktap.vhd import check_file, create_dynamic, create_fixed, snapshot
from tests.conformance import DriverCase, ImageMaker, sectors_equal_or_zero
from tests.unit.test_driver_conformance import (  # the shared suite, run on more VHDs
    SIZE,
    test_block_status_covers_the_range,
    test_chain_concurrent_unaligned_writes_sharing_a_sector,
    test_chain_unaligned_reads_and_writes,
    test_close_releases_every_descriptor,
    test_discard_reads_old_data_or_zeros,
    test_flush_and_fua_writes_land,
    test_many_concurrent_reads_and_writes,
    test_open_reports_size_and_reads_initial_contents,
    test_read_after_write_at_many_offsets,
    test_read_only_open_refuses_writes_and_changes_nothing,
    test_synchronous_forms_match_the_model,
    test_unaligned_and_read_only_buffers,
    test_write_zeroes,
)
from tests.vhd_helpers import need, run

__all__ = [
    "test_block_status_covers_the_range",
    "test_chain_concurrent_unaligned_writes_sharing_a_sector",
    "test_chain_unaligned_reads_and_writes",
    "test_close_releases_every_descriptor",
    "test_discard_reads_old_data_or_zeros",
    "test_flush_and_fua_writes_land",
    "test_many_concurrent_reads_and_writes",
    "test_open_reports_size_and_reads_initial_contents",
    "test_read_after_write_at_many_offsets",
    "test_read_only_open_refuses_writes_and_changes_nothing",
    "test_synchronous_forms_match_the_model",
    "test_unaligned_and_read_only_buffers",
    "test_write_zeroes",
]


# ------------------------------------------------------------------- makers
@contextlib.contextmanager
def fixed_vhd(tmp: Path, initial: bytes) -> Iterator[str]:
    path = tmp / "fixed.vhd"
    create_fixed(str(path), len(initial))
    with open(path, "r+b") as f:
        f.write(initial)  # a fixed VHD's data is the file's first bytes
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


async def _write_pieces(path: str, initial: bytes, seed: int) -> None:
    """Write ``initial`` in random sector-granular pieces, in random order, so that
    blocks are allocated out of order and bitmaps fill piecemeal."""
    rng = random.Random(seed)
    cuts = sorted({0, len(initial), *(rng.randrange(0, len(initial), SECTOR_SIZE)
                                      for _ in range(40))})
    pieces = list(itertools.pairwise(cuts))
    rng.shuffle(pieces)
    chain = await Chain.open("vhd", path, OpenOptions())
    try:
        for a, b in pieces:
            await chain.write(a, memoryview(initial[a:b]))
    finally:
        await chain.close()


def dynamic_vhd(block_size: int) -> ImageMaker:
    @contextlib.contextmanager
    def make(tmp: Path, initial: bytes) -> Iterator[str]:
        path = tmp / "dynamic.vhd"
        create_dynamic(str(path), len(initial), block_size=block_size)
        asyncio.run(_write_pieces(str(path), initial, seed=block_size))
        try:
            yield str(path)
        finally:
            path.unlink(missing_ok=True)

    return make


@contextlib.contextmanager
def qemu_dynamic_vhd(tmp: Path, initial: bytes) -> Iterator[str]:
    """A dynamic VHD written by qemu-img (creator "qem2": exact size, all-ones bitmaps)."""
    need("qemu-img")
    raw = tmp / "initial.raw"
    raw.write_bytes(initial)
    path = tmp / "qemu.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                    "subformat=dynamic,force_size=on", str(raw), str(path)],
                   check=True, capture_output=True, timeout=60)
    raw.unlink()
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


CASES = [
    DriverCase("vhd-fixed-raw-filled", "vhd", fixed_vhd, direct=False),
    DriverCase("vhd-dynamic-2m", "vhd", dynamic_vhd(2 << 20), direct=False),
    DriverCase("vhd-dynamic-64k", "vhd", dynamic_vhd(64 << 10), direct=False),
    DriverCase("vhd-dynamic-qemu", "vhd", qemu_dynamic_vhd, direct=False),
    # O_DIRECT: data through the aio engine, fast reads through its read_now.
    DriverCase("vhd-dynamic-64k-direct", "vhd", dynamic_vhd(64 << 10)),
    DriverCase("vhd-fixed-direct", "vhd", fixed_vhd),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
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


# ---------------------------------------------------------- differencing chains
@pytest.fixture
def diff_chain(tmp_path: Path, initial: bytes) -> Iterator[str]:
    """base.vhd (dynamic, 64 KiB blocks, holding ``initial``) <- leaf.vhd (empty)."""
    base = tmp_path / "base.vhd"
    create_dynamic(str(base), SIZE, block_size=64 << 10)
    asyncio.run(_write_pieces(str(base), initial, seed=3))
    snapshot(str(tmp_path / "leaf.vhd"), str(base))
    yield str(tmp_path / "leaf.vhd")


async def _chain_read(chain: Chain, offset: int = 0, length: int = SIZE) -> bytes:
    buf = bytearray(length)
    await chain.read(offset, memoryview(buf))
    return bytes(buf)


def test_differencing_reads_writes_and_reopens(diff_chain: str, initial: bytes) -> None:
    rng = random.Random(8)
    model = bytearray(initial)
    base_before = Path(diff_chain).with_name("base.vhd").read_bytes()

    async def body() -> None:
        chain = await Chain.open("vhd", diff_chain, OpenOptions())
        try:
            assert [i.type_name for i in chain.images] == ["vhd", "vhd"]
            assert await _chain_read(chain) == initial
            for _ in range(60):
                off = rng.randrange(SIZE - 1)
                n = rng.randint(1, min(9000, SIZE - off))
                data = rng.randbytes(n)
                await chain.write(off, memoryview(data))
                model[off : off + n] = data
                assert await _chain_read(chain, off, n) == data
            assert await _chain_read(chain) == model
        finally:
            await chain.close()
        chain = await Chain.open("vhd", diff_chain, OpenOptions(read_only=True))
        try:
            assert await _chain_read(chain) == model
        finally:
            await chain.close()

    run(body())
    assert Path(diff_chain).with_name("base.vhd").read_bytes() == base_before
    assert all(r.valid for r in check_file(diff_chain, check_parents=True))


@pytest.mark.parametrize("may_unmap", [False, True], ids=["zero", "unmap"])
def test_differencing_write_zeroes_hides_the_parent(
    diff_chain: str, initial: bytes, may_unmap: bool
) -> None:
    model = bytearray(initial)

    async def body() -> None:
        chain = await Chain.open("vhd", diff_chain, OpenOptions())
        try:
            for off, n in [(0, 4096), (70000, 200000), (SIZE - 512, 512), (1000, 3000)]:
                await chain.write_zeroes(off, n, may_unmap, False)
                model[off : off + n] = bytes(n)
            assert await _chain_read(chain) == model
            status = chain.block_status(0, SIZE)
            assert sum(e.length for e in status) == SIZE
        finally:
            await chain.close()
        assert await _reopened(diff_chain) == model

    run(body())


def test_differencing_discard_never_exposes_the_parent(diff_chain: str, initial: bytes) -> None:
    rng = random.Random(4)
    mine = rng.randbytes(SIZE)

    async def body() -> None:
        chain = await Chain.open("vhd", diff_chain, OpenOptions())
        try:
            await chain.write(0, memoryview(mine))
            await chain.discard(0, SIZE)
            await chain.discard(12345, 54321)
            got = await _chain_read(chain)
            # Each sector reads as the leaf's data or zeros, never the parent's.
            assert sectors_equal_or_zero(got, mine)
        finally:
            await chain.close()

    run(body())


async def _reopened(path: str) -> bytes:
    chain = await Chain.open("vhd", path, OpenOptions(read_only=True))
    try:
        return await _chain_read(chain)
    finally:
        await chain.close()


def test_dynamic_discard_reads_zeros(tmp_path: Path, initial: bytes) -> None:
    path = str(tmp_path / "d.vhd")
    create_dynamic(path, SIZE, block_size=64 << 10)
    asyncio.run(_write_pieces(path, initial, seed=9))
    model = bytearray(initial)

    async def body() -> None:
        chain = await Chain.open("vhd", path, OpenOptions())
        try:
            for off, n in [(0, 65536), (100000, 5000), (SIZE - 4096, 4096)]:
                await chain.discard(off, n)
                start = -(-off // 512) * 512
                end = (off + n) // 512 * 512
                model[start:end] = bytes(end - start)
            assert await _chain_read(chain) == model
            holes = [e for e in chain.block_status(0, SIZE) if e.flags]
            assert any(e.offset == 0 and e.length >= 65536 for e in holes)
        finally:
            await chain.close()
        assert await _reopened(path) == model

    run(body())
    assert check_file(path)[0].valid
