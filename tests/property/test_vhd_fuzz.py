"""Fuzzing the VHD metadata parsers: any corruption of a small image's metadata either
opens (and then reads without error) or raises ImageFormatError; the validator never
raises at all. Nothing is ever written by a failed open."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.errors import ImageFormatError
from blktap.proto.vhd.check import check_vhd
from blktap.vhd import create_dynamic, snapshot

KiB = 1024


async def _prepare(d: Path) -> None:
    create_dynamic(str(d / "base.vhd"), 512 * KiB, block_size=16 * KiB)
    chain = await Chain.open("vhd", str(d / "base.vhd"), OpenOptions(direct=False))
    try:
        for off in (0, 20 * KiB, 100 * KiB + 512, 511 * KiB):
            await chain.write(off, memoryview(bytes([off % 255 + 1]) * 1024))
    finally:
        await chain.close()
    snapshot(str(d / "leaf.vhd"), str(d / "base.vhd"))
    chain = await Chain.open("vhd", str(d / "leaf.vhd"), OpenOptions(direct=False))
    try:
        await chain.write(40 * KiB, memoryview(b"\x77" * 3000))
    finally:
        await chain.close()


@pytest.fixture(scope="module")
def originals() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhd-fuzz-"))
    try:
        asyncio.run(_prepare(d))
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _open_and_read(path: str, read_only: bool) -> None:
    chain = await Chain.open("vhd", path, OpenOptions(read_only=read_only, direct=False))
    try:
        buf = bytearray(chain.size)
        await chain.read(0, memoryview(buf))
        chain.block_status(0, chain.size)
    finally:
        await chain.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["base.vhd", "leaf.vhd"]),
    edits=st.lists(
        st.tuples(st.one_of(st.integers(0, 8 * KiB), st.integers(-512, -1)),
                  st.integers(0, 255)),
        min_size=1, max_size=6,
    ),
    read_only=st.booleans(),
)
def test_corrupted_metadata_raises_only_format_errors(
    originals: Path, which: str, edits: list[tuple[int, int]], read_only: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="vhd-fuzz-case-") as tmp:
        d = Path(tmp)
        for name in ("base.vhd", "leaf.vhd"):
            shutil.copyfile(originals / name, d / name)
        target = d / which
        data = bytearray(target.read_bytes())
        for pos, value in edits:
            data[pos] = value
        target.write_bytes(data)
        # The sans-IO validator judges anything without raising.
        result = check_vhd(str(target), lambda o, n: bytes(data[o : o + n]), len(data),
                           now_vhd=10**9)
        assert isinstance(result.faults, list)
        before = hashlib.sha256(data).hexdigest()
        try:
            asyncio.run(_open_and_read(str(target), read_only))
        except ImageFormatError as exc:
            assert exc.path is not None and exc.structure
            assert hashlib.sha256(target.read_bytes()).hexdigest() == before
