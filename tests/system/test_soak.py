"""A 10-second smoke run of bench/soak.py: 4 VBDs under verified I/O with pause/unpause
and connect/disconnect churn; no I/O error, no mismatch, no dead tapdisk, and the
RSS/descriptor samples are there. The soak proper (32 VBDs, an hour) runs on demand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "soak.py"

pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import nbd"], capture_output=True).returncode != 0,
    reason="libnbd's Python binding is not importable (scripts/setup.sh links it)")


def test_soak_smoke_four_vbds(run_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--vbds", "4", "--seconds", "10", "--size-mib", "8",
         "--json", str(out)], capture_output=True, text=True, timeout=300,
        env=dict(os.environ))
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["io_errors"] == 0, result["io_error_samples"]
    assert result["mismatches"] == 0, result["mismatch_samples"]
    assert result["dead_tapdisks"] == [] and result["pause_errors"] == []
    assert proc.returncode == 0, proc.stderr
    assert result["operations"] > 0 and result["pages_verified_at_end"] > 0
    assert result["connections"] > 4 and result["pauses"] > 0
    assert len(result["samples"]) >= 5
    assert all(rss > 0 for row in result["samples"] for rss in row["rss_kib"].values())
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []
