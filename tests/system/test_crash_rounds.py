"""kill -9 rounds of bench/crash.py: a tapdisk killed at random instants (some in the middle
of a VHD block allocation) under a writer through NBD and through the block device, on
raw, dynamic VHD and differencing VHD images; ``vhd-util resize`` and ``coalesce`` killed
too. Each reopen is a plain ``tap-ctl create`` after ``tap-ctl free`` of the dead minor.

Asserted from the harness's JSON: the rounds ran across every image kind and frontend,
no write acknowledged before a completed flush was lost, no sector holds data never
written to it, ``vhd-util check`` accepted every image after every kill, and some kills
landed inside an allocating write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import host_block_device_support

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "bench" / "crash.py"
ROUNDS = 54

_blockdev, _why = host_block_device_support()
pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import nbd"], capture_output=True).returncode != 0,
    reason="libnbd's Python binding is not importable (scripts/setup.sh links it)")


def test_kill9_rounds_lose_no_flushed_write_and_leave_valid_images(
        run_dir: str, tmp_path: Path) -> None:
    frontends = "nbd,blockdev" if _blockdev else "nbd"
    out = tmp_path / "crash.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--rounds", str(ROUNDS), "--per-image", "3",
         "--frontends", frontends, "--json", str(out), "--dir", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    s = result["summary"]
    bad = [r for r in result["rounds"] if r["violations"] or r["invalid"]]
    assert bad == [], json.dumps(bad[:3], indent=1)
    assert s["violations"] == 0 and s["invalid_images"] == 0
    assert proc.returncode == 0, proc.stderr
    assert s["kill_rounds"] == ROUNDS
    expected = {f"{k}/{f}" for k in ("raw", "vhd", "diff") for f in frontends.split(",")}
    assert expected <= set(s["by_group"])
    assert {"resize/vhd-util", "coalesce/vhd-util"} <= set(s["by_group"])
    # The model had something to check: flushed writes and a read of every sector.
    assert s["writes_durable_verified"] > 0 and s["flushes_completed"] > 0
    assert s["sectors_verified"] >= ROUNDS * (16 << 20) // 512
    assert s["kills_in_allocation"] > 0
    # Nothing of the dead tapdisks is left: only the run directory's own entries.
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []
