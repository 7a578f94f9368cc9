#!/usr/bin/env python3
"""tap-ctl create/destroy latency, and 100 devices created in parallel.

    .venv/bin/python bench/tapctl_create.py [--rounds 20] [--parallel 100] [--blockdev off|on]

Prints the median and quartiles of `tap-ctl create` and `tap-ctl destroy` (milliseconds,
wall clock of the command as a toolstack runs it), then the total seconds to create
--parallel devices at once, the total and per-tapdisk RSS of their tapdisks, and the
time to destroy them all. Runs in a private run directory; removes everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TAP_CTL = str(Path(sys.executable).parent / "tap-ctl")


class TapCtl:
    """tap-ctl in a private run directory (BLKTAP_RUN_DIR/BLKTAP_DEV_DIR/BLKTAP_BLOCKDEV)."""

    def __init__(self, run_dir: str, blockdev: str, program: str = TAP_CTL) -> None:
        self.program = program
        self.env = dict(os.environ, BLKTAP_RUN_DIR=run_dir,
                        BLKTAP_DEV_DIR=os.path.join(run_dir, "dev"), BLKTAP_BLOCKDEV=blockdev)

    def run(self, *args: str) -> str:
        proc = subprocess.run([self.program, *args], capture_output=True, text=True, check=False,
                              env=self.env)
        if proc.returncode:
            raise RuntimeError(f"tap-ctl {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr}")
        return proc.stdout

    def timed(self, *args: str) -> float:
        """Milliseconds of wall clock of one tap-ctl command."""
        t0 = time.perf_counter()
        self.run(*args)
        return (time.perf_counter() - t0) * 1000

    def vbds(self) -> list[tuple[int, int]]:
        out = []
        for line in self.run("list").splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "pid" in f and "minor" in f:
                out.append((int(f["pid"]), int(f["minor"])))
        return out

    def destroy_all(self) -> None:
        for pid, minor in self.vbds():
            subprocess.run([self.program, "destroy", "-p", str(pid), "-m", str(minor)],
                           capture_output=True, check=False, env=self.env)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    med = statistics.median(values)
    return f"median {med:7.1f}  (q1 {q[0]:.1f}, q3 {q[2]:.1f}, n={len(values)})"


def measure(rounds: int = 20, parallel: int = 100, blockdev: str = "off") -> dict[str, Any]:
    """``create_ms``/``destroy_ms``: each of ``rounds`` sequential create + destroy of one
    device; then ``parallel`` devices created at once: ``parallel_create_s``,
    ``parallel_rss_kib`` (each tapdisk's VmRSS), ``parallel_destroy_s``. Runs in a private
    run directory; destroys every device and removes everything, also on an exception."""
    run_dir = tempfile.mkdtemp(prefix="tc-bench-", dir="/tmp")
    tc = TapCtl(run_dir, blockdev)
    image = os.path.join(run_dir, "disk.raw")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    result: dict[str, Any] = {"rounds": rounds, "parallel": parallel, "blockdev": blockdev}
    try:
        creates, destroys = [], []
        for _ in range(rounds):
            creates.append(tc.timed("create", "-a", f"aio:{image}"))
            ((pid, minor),) = tc.vbds()
            destroys.append(tc.timed("destroy", "-p", str(pid), "-m", str(minor)))
        result.update(create_ms=creates, destroy_ms=destroys)

        images = []
        for i in range(parallel):
            path = os.path.join(run_dir, f"p{i}.raw")
            with open(path, "wb") as f:
                f.truncate(16 << 20)
            images.append(path)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda p: tc.run("create", "-a", f"aio:{p}"), images))
        result["parallel_create_s"] = time.perf_counter() - t0
        found = tc.vbds()
        if len(found) != parallel:
            raise RuntimeError(f"{parallel} creates left {len(found)} devices")
        result["parallel_rss_kib"] = [rss_kib(pid) for pid, _ in found]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda pm: tc.run("destroy", "-p", str(pm[0]), "-m", str(pm[1])),
                          found))
        result["parallel_destroy_s"] = time.perf_counter() - t0
    finally:
        tc.destroy_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=100)
    ap.add_argument("--blockdev", choices=("off", "on"), default="off")
    args = ap.parse_args()
    r = measure(args.rounds, args.parallel, args.blockdev)
    total = sum(r["parallel_rss_kib"])
    print(f"blockdev={args.blockdev} load={os.getloadavg()[0]:.2f}")
    print(f"tap-ctl create  ms: {quartiles(r['create_ms'])}")
    print(f"tap-ctl destroy ms: {quartiles(r['destroy_ms'])}")
    print(f"{args.parallel} parallel creates: {r['parallel_create_s']:.2f} s; tapdisk RSS total "
          f"{total / 1024:.0f} MiB ({total / 1024 / args.parallel:.1f} MiB each)")
    print(f"{args.parallel} parallel destroys: {r['parallel_destroy_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
