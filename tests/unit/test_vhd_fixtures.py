"""Every reference image read through the chain with the vhd driver: contents hash to
the manifest's sha256, block status matches the manifest's map, and the file-level
check gives the reference verdict."""

from __future__ import annotations

import os
from typing import Any

import pytest

from blktap.block.chain import STATE_HOLE, STATE_ZERO, Chain
from blktap.block.driver import OpenOptions
from blktap.vhd import VhdFile, check_file
from tests.vhd_helpers import FIXTURES, MANIFEST, VHD_FILES, run, sha256


@pytest.mark.parametrize("entry", MANIFEST, ids=VHD_FILES)
def test_chain_reads_reference_contents_and_map(entry: dict[str, Any]) -> None:
    path = str(FIXTURES / entry["file"])

    async def body() -> tuple[bytes, list[tuple[int, int, bool]], list[str]]:
        chain = await Chain.open("vhd", path, OpenOptions(read_only=True))
        try:
            buf = bytearray(chain.size)
            # Read in uneven pieces so that runs cross block boundaries.
            pos = 0
            step = 3 * 1024 * 1024 + 512
            while pos < chain.size:
                n = min(step, chain.size - pos)
                await chain.read(pos, memoryview(buf)[pos : pos + n])
                pos += n
            status = [
                (e.offset, e.length, e.flags == 0) for e in chain.block_status(0, chain.size)
            ]
            for e in chain.block_status(0, chain.size):
                assert e.flags in (0, STATE_HOLE | STATE_ZERO)
            return bytes(buf), status, [i.type_name for i in chain.images]
        finally:
            await chain.close()

    data, status, types = run(body())
    assert len(data) == entry["virtual_size"]
    assert sha256(data) == entry["virtual_sha256"]
    expected = [(m["offset"], m["length"], m["type"] == 0) for m in entry["map"]]
    if entry["file"] == "raw-child.vhd":
        # The C tapdisk calls all of a raw parent data; the aio driver reports the sparse
        # raw file's holes as zero holes. Holes must read as zeros, and the child's own
        # sectors are data.
        assert types == ["vhd", "aio"]
        for offset, length, is_data in status:
            if not is_data:
                assert data[offset : offset + length] == bytes(length)
    else:
        assert status == expected


@pytest.mark.parametrize("entry", MANIFEST, ids=VHD_FILES)
def test_check_file_gives_reference_verdict(entry: dict[str, Any]) -> None:
    path = str(FIXTURES / entry["file"])
    results = check_file(path, check_parents=True)
    expected = entry["reference_check"]
    if expected.startswith("valid (fixed"):
        assert [r.verdict for r in results] == [""]
    elif expected.endswith(" is valid"):
        assert all(r.valid for r in results), [r.faults for r in results]
        assert results[0].verdict == f"{path} is valid"
    else:
        assert results[0].verdict == expected


def test_parents_resolve_to_the_right_files() -> None:
    with VhdFile.open(str(FIXTURES / "grandchild.vhd")) as vf:
        assert vf.parent is not None
        assert vf.parent.path == os.path.realpath(FIXTURES / "child.vhd")
        assert not vf.parent.raw
    with VhdFile.open(str(FIXTURES / "raw-child.vhd")) as vf:
        assert vf.parent is not None and vf.parent.raw
        assert vf.parent.path == os.path.realpath(FIXTURES / "raw-parent.img")


def test_opening_fixtures_read_only_changes_nothing() -> None:
    before = {n: os.stat(FIXTURES / n).st_mtime_ns for n in VHD_FILES}
    for name in VHD_FILES:
        run(_open_close(str(FIXTURES / name)))
    assert before == {n: os.stat(FIXTURES / n).st_mtime_ns for n in VHD_FILES}


async def _open_close(path: str) -> None:
    chain = await Chain.open("vhd", path, OpenOptions(read_only=True))
    await chain.close()
