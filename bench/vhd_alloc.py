#!/usr/bin/env python3
"""Write throughput of the vhd driver: first writes (block allocation) vs rewrites.

    bench/vhd_alloc.py [--size-mib 256] [--bs 4k,64k,1m,2m] [--patterns seq,rand]
                       [--repeat 3] [--dir /var/tmp] [--direct]

For each block size and pattern it writes the whole disk once, through
``blktap.block.chain.Chain`` (the path an NBD write takes after the VBD), into:

* ``dynamic-new``  an empty dynamic VHD: every 2 MiB block is allocated by the first
                   write that touches it (zero-filled bitmap + block, then data, BAT entry,
                   sector bitmap), and every partial write updates the sector bitmap;
* ``diff-new``     an empty differencing VHD over a fully written base: the same, with
                   the chain's parent open below;
* ``allocated``    the dynamic VHD written by ``dynamic-new`` once more: every block full,
                   no metadata written;
* ``raw``          a raw file of the same size through the ``aio`` driver (reference).

``seq`` writes in order; ``rand`` in a random permutation of the bs-sized slots (blocks
are allocated in random order and filled a piece at a time). Time includes the final
flush (fdatasync). Buffered by default (--direct: O_DIRECT as tapdisk's default).
Prints MiB/s, median of --repeat runs (each on fresh files), and the ratio to ``allocated``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.util.buffers import aligned
from blktap.vhd.create import create_dynamic, snapshot

MiB = 1 << 20
KINDS = ["dynamic-new", "diff-new", "allocated", "raw"]


def parse_size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20}.get(text[-1].lower(), 1)
    return int(text.rstrip("kKmM")) * mult


async def write_all(kind: str, path: str, order: list[int], bs: int, direct: bool) -> float:
    """Write every slot of ``order`` (slot numbers of size bs); return seconds taken."""
    chain = await Chain.open("aio" if kind == "raw" else "vhd", path,
                             OpenOptions(direct=direct))
    try:
        data = aligned(bs)
        data[:] = random.Random(bs).randbytes(bs)
        start = time.perf_counter()
        for slot in order:
            await chain.write(slot * bs, data)
        await chain.flush()
        return time.perf_counter() - start
    finally:
        await chain.close()


def prepare(work: str, size: int, tag: str) -> dict[str, str]:
    paths = {
        "dynamic-new": os.path.join(work, f"dyn-{tag}.vhd"),
        "base": os.path.join(work, f"base-{tag}.vhd"),
        "diff-new": os.path.join(work, f"diff-{tag}.vhd"),
        "raw": os.path.join(work, f"raw-{tag}.img"),
    }
    create_dynamic(paths["dynamic-new"], size)
    create_dynamic(paths["base"], size)
    asyncio.run(write_all("dynamic-new", paths["base"], list(range(size // MiB)), MiB, False))
    snapshot(paths["diff-new"], paths["base"])
    with open(paths["raw"], "wb") as f:
        chunk = random.Random(0).randbytes(MiB)
        for _ in range(size // MiB):
            f.write(chunk)
    paths["allocated"] = paths["dynamic-new"]  # written again after dynamic-new
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--bs", default="4k,64k,1m,2m")
    ap.add_argument("--patterns", default="seq,rand")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    size = args.size_mib * MiB
    sizes = [parse_size(b) for b in args.bs.split(",")]
    patterns = args.patterns.split(",")
    work = tempfile.mkdtemp(prefix="vhd-alloc-", dir=args.dir)
    results: dict[tuple[int, str, str], list[float]] = {}
    try:
        for rep in range(args.repeat):
            for bs in sizes:
                for pattern in patterns:
                    tag = f"{rep}-{bs}-{pattern}"
                    paths = prepare(work, size, tag)
                    order = list(range(size // bs))
                    if pattern == "rand":
                        random.Random(args.seed + rep).shuffle(order)
                    for kind in KINDS:
                        secs = asyncio.run(write_all(kind, paths[kind], order, bs, args.direct))
                        mibs = size / MiB / secs
                        results.setdefault((bs, pattern, kind), []).append(mibs)
                        print(f"rep {rep + 1} bs {bs:>8} {pattern:4} {kind:12}: "
                              f"{mibs:8.1f} MiB/s", file=sys.stderr)
                    for path in set(paths.values()):
                        os.unlink(path)
        mode = "O_DIRECT" if args.direct else "buffered"
        print(f"\nwhole-disk writes of {args.size_mib} MiB through the chain, {mode}, "
              f"MiB/s (median of {args.repeat}; ratio to allocated)")
        print(f"{'bs':>6} {'order':5} " + "".join(f"{k:>20}" for k in KINDS))
        for bs in sizes:
            for pattern in patterns:
                meds = {k: statistics.median(results[bs, pattern, k]) for k in KINDS}
                ref = meds["allocated"]
                cells = "".join(f"{meds[k]:>11.1f} ({meds[k] / ref:4.2f})".rjust(20)
                                for k in KINDS)
                label = f"{bs // 1024}k" if bs < MiB else f"{bs // MiB}m"
                print(f"{label:>6} {pattern:5} {cells}")
        la = os.getloadavg()
        print(f"load: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; cpus: {os.cpu_count()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
