"""Every reference VHD image, read through our tapdisk's NBD export, matches its manifest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any

import pytest

from tests.helpers import FIXTURES, Tapdisk
from tests.system.test_tapdisk_control import CLOSE, CLOSE_RSP, attach_open, one

RDONLY = 0x2
MANIFEST: list[dict[str, Any]] = json.loads((FIXTURES / "manifest.json").read_text())["images"]


def _data_extents(entries: list[dict[str, Any]]) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) with neighbours of the same kind merged."""
    out: list[tuple[int, int, bool]] = []
    for e in entries:
        data = not e["type"] & 1
        if out and out[-1][2] == data and out[-1][0] + out[-1][1] == e["offset"]:
            off, length, _ = out.pop()
            out.append((off, length + e["length"], data))
        else:
            out.append((e["offset"], e["length"], data))
    return out


def _data_ranges(entries: list[dict[str, Any]]) -> set[int]:
    """The 512-byte sectors reported as data."""
    return {s for off, length, data in _data_extents(entries) if data
            for s in range(off // 512, (off + length) // 512)}


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["file"] for e in MANIFEST])
def test_fixture_reads_as_the_reference_tapdisk(
        run_dir: str, tapdisk: Tapdisk, entry: dict[str, Any]) -> None:
    path = str(FIXTURES / entry["file"])
    before = os.stat(path)
    attach_open(run_dir, tapdisk, 0, f"vhd:{path}", RDONLY)
    uri = f"nbd+unix:///?socket={run_dir}/nbd{tapdisk.pid}.0"

    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                     check=True, timeout=30).stdout)
    export = info["exports"][0]
    assert export["export-size"] == entry["virtual_size"]
    assert export["is_read_only"] is True

    digest = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE) as copy:
        assert copy.stdout is not None
        while chunk := copy.stdout.read(1 << 20):
            digest.update(chunk)
    assert copy.returncode == 0
    assert digest.hexdigest() == entry["virtual_sha256"]

    ours = json.loads(subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True,
                                     check=True, timeout=30).stdout)
    # The C tapdisk reports holes as HOLE only; ours adds ZERO (they do read as zeros).
    assert all(e["type"] in (0, 3) for e in ours)
    if entry["file"] == "raw-child.vhd":
        # The C tapdisk reports a raw parent as all data; ours also reports the parent
        # file's sparse holes (they read as zeros, which the checksum above confirms).
        assert _data_ranges(ours) <= _data_ranges(entry["map"])
    else:
        assert _data_extents(ours) == _data_extents(entry["map"])

    assert one(tapdisk, CLOSE, 0)[0] == CLOSE_RSP
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
