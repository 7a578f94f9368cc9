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

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    # bench/crash.py --seed N repeats the choices of the run (offsets, delays), not its timing
    assert bad == [], f"seed {s['seed']}: " + json.dumps(bad[:3], indent=1)
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


def _harness_module() -> Any:
    spec = importlib.util.spec_from_file_location("crash_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_model_flags_lost_torn_and_foreign_sectors() -> None:
    """The checker itself: a lost flushed write, an unflushed write, a torn sector and
    another sector's data are told apart (no tapdisk; the model alone)."""
    crash = _harness_module()
    sectors = 16
    model = crash.Model({}, sectors)
    W = crash.Write
    # write 0 covers sectors 0-7 and was flushed; write 1 covers 4-11 and was not.
    writes = [W(0, 0, 8 * 512, True), W(1, 4 * 512, 8 * 512, True)]
    allowed = model.allowed(writes, 1, 7, 3)
    h = crash.Harness.__new__(crash.Harness)

    def run(image: bytes) -> list[str]:
        r = crash.Round("g", "raw", "nbd", 0)
        h.verify(r, image, crash.Model({}, sectors), allowed)
        return list(r.violations)

    def t(seq: int, lba: int) -> bytes:
        return bytes(crash.tag(7, 3, seq, lba))

    good = b"".join([t(0, i) for i in range(4)] + [t(1, i) for i in range(4, 12)]
                    + [bytes(512)] * 4)
    assert run(good) == []
    # sectors 4-11 may still hold write 0 or nothing: write 1 was never flushed
    older = b"".join([t(0, i) for i in range(8)] + [bytes(512)] * 8)
    assert run(older) == []
    lost = bytes(512) + good[512:]
    assert "lost acknowledged+flushed write" in run(lost)[0]
    torn = good[:256] + bytes(256) + good[512:]
    assert len(run(torn)) == 1
    foreign = good[:15 * 512] + t(0, 2)
    assert "changed without a write" in run(foreign)[0]
    shifted = good[:8 * 512] + t(1, 4) + good[9 * 512:]
    assert "data never written" in run(shifted)[0]
