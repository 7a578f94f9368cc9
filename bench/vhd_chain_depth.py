#!/usr/bin/env python3
"""4 KiB random reads through VHD chains of several depths: IOPS and the loss vs depth 1.

    bench/vhd_chain_depth.py [--depths 1,4,16,32] [--layouts base,spread,scatter]
                             [--size-mib 256] [--seconds 3] [--repeat 3] [--fio]

For each layout and depth it builds a chain in a scratch directory (``--dir``, default
/var/tmp): a dynamic base VHD and depth-1 differencing snapshots over it, with random data:

* ``base``    every block written in the base; the snapshots above are empty (a VM's disk
              after a chain of snapshots it has not written since);
* ``spread``  whole blocks spread over the levels: block b is written in level b % depth
              (level 0 is the base), so each read finds its data in one level, often deep;
* ``scatter`` the base is fully written, then each 64 KiB piece is rewritten, with
              probability 1/2, in one randomly chosen level above it: most blocks are held
              partly by several levels (per-sector bitmaps decide).

Then it reads 4 KiB at random aligned offsets over the whole disk:

* in-process through ``blktap.block.chain.Chain`` (buffered, files in the page cache, one
  request at a time driven without an event loop wait): the CPU cost of the chain and the
  driver alone, requests per second. ``first`` is the first pass over 64Ki random
  offsets on a freshly opened chain (the chain's per-unit/per-page owner cache is being
  filled), ``warm`` the following passes over the same offsets;
* with ``--fio`` also through a real tapdisk (bench/serve_tapdisk.py --no-direct) and fio's
  nbd engine, randread bs=4k iodepth=32, for ``--seconds`` each.

Repeats are interleaved over depths; the table gives medians and the loss vs depth 1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.block.drivers.vhd import open_vhd
from blktap.vhd.create import create_dynamic, snapshot

MiB = 1 << 20
BLOCK = 2 * MiB
PIECE = 64 * 1024
ROOT = Path(__file__).resolve().parent.parent


def drive(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never has to wait (page-cache I/O) to its end."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("request had to wait; this harness needs buffered page-cache I/O")


async def _write_levels(paths: list[str], plan: list[list[tuple[int, int]]], seed: int) -> None:
    """Write random bytes at each (offset, length) of plan[level] into paths[level]."""
    rnd = random.Random(seed)
    for path, writes in zip(paths, plan, strict=True):
        if not writes:
            continue
        image = await open_vhd(path, OpenOptions(direct=False))
        try:
            for offset, length in writes:
                await image.write(offset, memoryview(rnd.randbytes(length)))
        finally:
            await image.close()


def build_chain(directory: str, depth: int, layout: str, size: int, seed: int) -> str:
    """Create the chain; return the leaf's path."""
    paths = [os.path.join(directory, f"{layout}-{depth}-{i:02d}.vhd") for i in range(depth)]
    create_dynamic(paths[0], size)
    for parent, child in itertools.pairwise(paths):
        snapshot(child, parent)
    blocks = size // BLOCK
    plan: list[list[tuple[int, int]]] = [[] for _ in range(depth)]
    if layout == "base":
        plan[0] = [(b * BLOCK, BLOCK) for b in range(blocks)]
    elif layout == "spread":
        for b in range(blocks):
            plan[b % depth].append((b * BLOCK, BLOCK))
    elif layout == "scatter":
        plan[0] = [(b * BLOCK, BLOCK) for b in range(blocks)]
        rnd = random.Random(seed + 1)
        if depth > 1:
            for p in range(size // PIECE):
                if rnd.random() < 0.5:
                    plan[rnd.randrange(1, depth)].append((p * PIECE, PIECE))
    else:
        raise SystemExit(f"unknown layout {layout!r}")
    asyncio.run(_write_levels(paths, plan, seed))
    for path in paths:
        with open(path, "rb") as f:  # into the page cache
            while f.read(8 * MiB):
                pass
    return paths[-1]


async def _inproc(leaf: str, seconds: float, seed: int) -> tuple[float, float]:
    """(IOPS of the first pass over 64Ki random offsets on a freshly opened chain, IOPS of
    the following passes over the same offsets for ``seconds``)."""
    chain = await Chain.open("vhd", leaf, OpenOptions(read_only=True, direct=False))
    try:
        rnd = random.Random(seed)
        slots = chain.size // 4096
        offsets = [rnd.randrange(slots) * 4096 for _ in range(1 << 16)]
        buf = memoryview(bytearray(4096))
        read = chain.read
        start = time.perf_counter()
        for offset in offsets:
            drive(read(offset, buf))
        cold = len(offsets) / (time.perf_counter() - start)
        done = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for offset in offsets:
                drive(read(offset, buf))
            done += len(offsets)
            now = time.perf_counter()
            if now >= deadline:
                return cold, done / (now - start)
    finally:
        await chain.close()


def run_inproc(leaf: str, seconds: float, seed: int) -> tuple[float, float]:
    return asyncio.run(_inproc(leaf, seconds, seed))


def run_fio(leaf: str, seconds: float) -> float:
    """IOPS of fio randread 4k QD32 over NBD against a tapdisk serving ``leaf``."""
    tmp = tempfile.mkdtemp(prefix="vhd-depth-")
    sock = os.path.join(tmp, "nbd.sock")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "serve_tapdisk.py"), "--no-direct",
         "--read-only", "--socket", sock, f"vhd:{leaf}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # tapdisk's log
    )
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            if server.poll() is not None:
                raise SystemExit(f"serve_tapdisk exited with {server.returncode}")
            time.sleep(0.05)
        else:
            raise SystemExit("serve_tapdisk did not create its socket")
        out = subprocess.run(
            ["fio", "--name=depth", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
             "--rw=randread", "--bs=4k", "--iodepth=32", f"--runtime={seconds}",
             "--time_based", "--ramp_time=1", "--output-format=json"],
            check=True, capture_output=True, text=True,
        ).stdout
        # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
        return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="1,4,16,32")
    ap.add_argument("--layouts", default="base,spread,scatter")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fio", action="store_true", help="also measure through tapdisk + fio")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    layouts = args.layouts.split(",")
    size = args.size_mib * MiB
    if size % BLOCK:
        raise SystemExit("--size-mib must be a multiple of 2")
    work = tempfile.mkdtemp(prefix="vhd-chain-depth-", dir=args.dir)
    modes = ["first", "warm"] + (["fio"] if args.fio else [])
    try:
        leaves = {}
        for layout in layouts:
            for depth in depths:
                t0 = time.monotonic()
                leaves[layout, depth] = build_chain(work, depth, layout, size, args.seed)
                print(f"built {layout} depth {depth} in {time.monotonic() - t0:.1f}s",
                      file=sys.stderr)
        results: dict[tuple[str, str, int], list[float]] = {}
        for rep in range(args.repeat):
            for layout in layouts:
                for depth in depths:
                    leaf = leaves[layout, depth]
                    values = dict(zip(("first", "warm"),
                                      run_inproc(leaf, args.seconds, args.seed + rep),
                                      strict=True))
                    if args.fio:
                        values["fio"] = run_fio(leaf, args.seconds)
                    for mode, value in values.items():
                        results.setdefault((layout, mode, depth), []).append(value)
                        print(f"rep {rep + 1} {layout:8} {mode:5} depth {depth:3}: "
                              f"{value:10.0f} IOPS", file=sys.stderr)
        print(f"\n4 KiB random reads, {args.size_mib} MiB disk, median of {args.repeat} x "
              f"{args.seconds:g}s; loss = 1 - IOPS / IOPS at depth {depths[0]}")
        print(f"{'layout':8} {'path':5} " + "".join(f"{'depth ' + str(d):>20}" for d in depths))
        for layout in layouts:
            for mode in modes:
                meds = [statistics.median(results[layout, mode, d]) for d in depths]
                cells = "".join(
                    f"{m:>11.0f} ({1 - m / meds[0]:+5.1%})".rjust(20) for m in meds
                )
                print(f"{layout:8} {mode:5} {cells}")
        print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
              f"{os.getloadavg()[2]:.2f}; cpus: {os.cpu_count()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
