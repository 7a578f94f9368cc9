"""fio writes and verifies through a VHD served by our tapdisk's NBD export (O_DIRECT,
the C tapdisk's default): a dynamic disk that fills as fio writes, and a differencing
child over a parent full of other data. Reads of what the leaf holds take the vhd
driver's fast reads (the event loop's ``read_now``, the connection's read lane at queue
depth 1), the rest the chain; fio checks every block it wrote, and the chain is a valid
VHD chain after the close."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.vhd import check_file, create_dynamic, snapshot
from tests.helpers import Tapdisk
from tests.system.test_tapdisk_control import CLOSE, CLOSE_RSP, attach_open, one

SIZE = 32 << 20

pytestmark = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is missing")


async def _fill(path: str, data: bytes) -> None:
    chain = await Chain.open("vhd", path, OpenOptions())
    try:
        await chain.write(0, memoryview(data))
    finally:
        await chain.close()


@pytest.mark.parametrize(("kind", "iodepth", "bs"), [
    ("dynamic", 1, "4k-4k"),
    ("dynamic", 32, "4k-128k"),
    ("differencing", 1, "4k-128k"),
    ("differencing", 32, "4k-4k"),
])
def test_fio_verify_through_a_vhd(run_dir: str, tapdisk: Tapdisk, kind: str, iodepth: int,
                                  bs: str) -> None:
    leaf = os.path.join(run_dir, "leaf.vhd")
    if kind == "dynamic":
        create_dynamic(leaf, SIZE)
    else:
        base = os.path.join(run_dir, "base.vhd")
        create_dynamic(base, SIZE)
        asyncio.run(_fill(base, os.urandom(SIZE)))
        snapshot(leaf, base)
    attach_open(run_dir, tapdisk, 0, f"vhd:{leaf}")
    uri = f"nbd+unix:///?socket={run_dir}/nbd{tapdisk.pid}.0"
    # Unaligned random offsets within 4 KiB granularity: requests cross 2 MiB blocks.
    proc = subprocess.run(
        ["fio", "--output-format=json", "--name=vhd", "--ioengine=nbd", f"--uri={uri}",
         "--rw=randrw", f"--iodepth={iodepth}", f"--bsrange={bs}", "--blockalign=4k",
         f"--size={SIZE}", "--io_size=24M", "--verify=crc32c", "--verify_fatal=1",
         "--do_verify=1", "--verify_state_save=0"],
        capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] > 0 and job["write"]["io_bytes"] > 0
    assert one(tapdisk, CLOSE, 0)[0] == CLOSE_RSP
    assert all(r.valid for r in check_file(leaf, check_parents=True))
