"""Property tests: coalesce, fill and resize against a bytearray model of the disk.

Data goes in through the project's ``vhd`` driver (random writes into a base and a
child); vhd-util then transforms the images and the result must read exactly as the
model says.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.vhd.image import VhdFile
from blktap.vhdutil.coalesce import coalesce
from blktap.vhdutil.create import create, snapshot
from blktap.vhdutil.fill import fill
from blktap.vhdutil.progress import Progress
from blktap.vhdutil.reader import ChainReader
from blktap.vhdutil.resize import resize

SIZE = 12 << 20
SECTOR = 512

writes = st.lists(
    st.tuples(
        st.integers(0, SIZE // SECTOR - 1),  # first sector
        st.integers(1, 2 * 4096 + 7),  # sectors (up to two blocks and a bit)
        st.integers(1, 255),  # fill byte
    ),
    max_size=6,
)


def apply(path: str, model: bytearray, ops: list[tuple[int, int, int]]) -> None:
    async def go() -> None:
        chain = await Chain.open("vhd", path, OpenOptions(read_only=False, direct=False))
        try:
            for first, count, byte in ops:
                count = min(count, SIZE // SECTOR - first)
                data = bytes([byte]) * (count * SECTOR)
                await chain.write(first * SECTOR, memoryview(data))
                model[first * SECTOR : (first + count) * SECTOR] = data
            await chain.flush()
        finally:
            await chain.close()

    asyncio.run(go())


def read_all(path: str) -> bytes:
    with ChainReader.open(path) as chain:
        return chain.read(0, chain.size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_ops=writes, child_ops=writes, sparse=st.booleans())
def test_coalesce_matches_model(
    base_ops: list[tuple[int, int, int]], child_ops: list[tuple[int, int, int]], sparse: bool
) -> None:
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.vhd")
        child = os.path.join(d, "child.vhd")
        model = bytearray(SIZE)
        create(base, SIZE)
        apply(base, model, base_ops)
        snapshot(child, base, exact=True)
        apply(child, model, child_ops)
        assert read_all(child) == model
        coalesce(child, sparse=sparse, progress=False)
        assert read_all(base) == model


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_ops=writes, child_ops=writes)
def test_fill_keeps_contents(
    base_ops: list[tuple[int, int, int]], child_ops: list[tuple[int, int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.vhd")
        child = os.path.join(d, "child.vhd")
        model = bytearray(SIZE)
        create(base, SIZE)
        apply(base, model, base_ops)
        snapshot(child, base, exact=True)
        apply(child, model, child_ops)
        fill(child, progress=False)
        # Filled, the leaf alone holds the whole disk: read its blocks without parents.
        with VhdFile.open(child, resolve_parent=False) as image:
            assert len(image.full_blocks) == len(image.bat)
            got = bytearray()
            for block in range(len(image.bat)):
                off = image.data_offset_of(block)
                assert off is not None
                got += os.pread(image.fd, image.block_size, off)
        assert bytes(got[:SIZE]) == model


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=writes, grow_mib=st.sampled_from([13, 64, 600]))
def test_resize_keeps_contents(ops: list[tuple[int, int, int]], grow_mib: int) -> None:
    """600 MiB needs a three-sector BAT: the first block (at 3584) moves out of its way."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.vhd")
        model = bytearray(SIZE)
        create(path, SIZE)
        apply(path, model, ops)
        result = resize(path, grow_mib << 20, journal=os.path.join(d, "j"))
        assert result.new_size == grow_mib << 20
        if grow_mib == 600:
            assert result.moved_blocks == (1 if ops else 0)
        with ChainReader.open(path) as chain:
            assert chain.size == grow_mib << 20
            assert chain.read(0, SIZE) == model
            assert not any(chain.read(SIZE, 1 << 20))
            assert not any(chain.read(chain.size - (1 << 20), 1 << 20))


def test_progress_bar_only_when_enabled() -> None:
    quiet = io.StringIO()
    p = Progress("coalesce x", 10, enabled=False, stream=quiet)
    p.update(5, force=True)
    p.finish()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    p = Progress("coalesce x", 10, enabled=True, stream=loud)
    p.update(5, force=True)
    p.finish()
    text = loud.getvalue()
    assert "coalesce x [" in text and " 50%" in text and text.endswith("100%\n")
    # A StringIO is no terminal: the default is quiet.
    assert Progress("x", 1, stream=io.StringIO()).enabled is False
