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

TAP_CTL = str(Path(sys.executable).parent / "tap-ctl")


def run(*args: str) -> str:
    proc = subprocess.run([TAP_CTL, *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"tap-ctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def timed(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = run(*args)
    return (time.perf_counter() - t0) * 1000, out


def vbds() -> list[tuple[int, int]]:
    out = []
    for line in run("list").splitlines():
        f = dict(kv.split("=", 1) for kv in line.split())
        if "pid" in f and "minor" in f:
            out.append((int(f["pid"]), int(f["minor"])))
    return out


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=100)
    ap.add_argument("--blockdev", choices=("off", "on"), default="off")
    args = ap.parse_args()

    run_dir = tempfile.mkdtemp(prefix="tc-bench-", dir="/tmp")
    os.environ.update(BLKTAP_RUN_DIR=run_dir, BLKTAP_DEV_DIR=os.path.join(run_dir, "dev"),
                      BLKTAP_BLOCKDEV=args.blockdev)
    image = os.path.join(run_dir, "disk.raw")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    try:
        creates, destroys = [], []
        for _ in range(args.rounds):
            ms, _dev = timed("create", "-a", f"aio:{image}")
            creates.append(ms)
            ((pid, minor),) = vbds()
            ms, _ = timed("destroy", "-p", str(pid), "-m", str(minor))
            destroys.append(ms)
        print(f"blockdev={args.blockdev} load={os.getloadavg()[0]:.2f}")
        print(f"tap-ctl create  ms: {quartiles(creates)}")
        print(f"tap-ctl destroy ms: {quartiles(destroys)}")

        images = []
        for i in range(args.parallel):
            path = os.path.join(run_dir, f"p{i}.raw")
            with open(path, "wb") as f:
                f.truncate(16 << 20)
            images.append(path)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda p: run("create", "-a", f"aio:{p}"), images))
        created = time.perf_counter() - t0
        found = vbds()
        assert len(found) == args.parallel, found
        total = sum(rss_kib(pid) for pid, _ in found)
        print(f"{args.parallel} parallel creates: {created:.2f} s; tapdisk RSS total "
              f"{total / 1024:.0f} MiB ({total / 1024 / len(found):.1f} MiB each)")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda pm: run("destroy", "-p", str(pm[0]), "-m", str(pm[1])), found))
        print(f"{args.parallel} parallel destroys: {time.perf_counter() - t0:.2f} s")
    finally:
        for pid, minor in vbds():
            subprocess.run([TAP_CTL, "destroy", "-p", str(pid), "-m", str(minor)],
                           capture_output=True, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
