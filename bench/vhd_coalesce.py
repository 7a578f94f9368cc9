"""Benchmark: ``vhd-util coalesce`` of a 1 GiB child vs a plain sequential copy of the
same bytes on the same disk.

Setup (not timed): in a scratch directory (default /var/tmp) an empty 1 GiB dynamic
parent, and a differencing child over it whose every block holds 2 MiB of data (random
bytes, written straight into the child's blocks). Each round:

* coalesce: a fresh copy of the empty parent, then ``coalesce`` of the child into it,
  timed up to the end of ``vhd-util coalesce`` (which syncs the parent);
* copy: ``dd if=<1 GiB raw file with the same bytes> of=<new file> bs=4M conv=fsync``.

Prints MiB/s of both (median of 3 rounds) and their ratio.

    .venv/bin/python bench/vhd_coalesce.py [--dir /var/tmp] [--size-mib 1024] [--rounds 3]
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

from blktap.vhd.image import VhdFile, pwrite_all
from blktap.vhdutil.coalesce import coalesce
from blktap.vhdutil.common import MB
from blktap.vhdutil.create import create, snapshot
from blktap.vhdutil.fill import fill
from blktap.vhdutil.modify import set_parent


def build(workdir: str, size: int) -> tuple[str, str, str]:
    base = os.path.join(workdir, "base.vhd")
    child = os.path.join(workdir, "child.vhd")
    raw = os.path.join(workdir, "child.raw")
    create(base, size)
    snapshot(child, base)
    fill(child, progress=False)  # every block allocated, bitmaps full
    chunk = bytearray(os.urandom(2 * MB))
    with VhdFile.open(child, writable=True) as image, open(raw, "wb") as out:
        for block in range(len(image.bat)):
            chunk[:8] = block.to_bytes(8, "big")  # every block different
            off = image.data_offset_of(block)
            assert off is not None
            pwrite_all(image.fd, [chunk], off)
            out.write(chunk)
        image.sync()
    os.sync()
    return base, child, raw


def time_coalesce(workdir: str, base: str, child: str) -> float:
    parent = os.path.join(workdir, "parent.vhd")
    shutil.copyfile(base, parent)
    # The child names "./base.vhd": point a private copy of it at the fresh parent.
    leaf = os.path.join(workdir, "leaf.vhd")
    shutil.copyfile(child, leaf)
    set_parent(leaf, parent)
    os.sync()
    t0 = time.perf_counter()
    coalesce(leaf, progress=False)
    elapsed = time.perf_counter() - t0
    os.unlink(parent)
    os.unlink(leaf)
    return elapsed


def time_copy(workdir: str, raw: str) -> float:
    dst = os.path.join(workdir, "copy.raw")
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={raw}", f"of={dst}", "bs=4M", "conv=fsync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    os.unlink(dst)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory (default /var/tmp)")
    ap.add_argument("--size-mib", type=int, default=1024, help="child size (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    a = ap.parse_args()
    size = a.size_mib * MB
    workdir = tempfile.mkdtemp(prefix="vhd-coalesce-bench.", dir=a.dir)
    try:
        print(f"setting up a {a.size_mib} MiB child in {workdir} ...", file=sys.stderr)
        base, child, raw = build(workdir, size)
        co: list[float] = []
        cp: list[float] = []
        for r in range(a.rounds):
            co.append(time_coalesce(workdir, base, child))
            cp.append(time_copy(workdir, raw))
            print(f"round {r + 1}: coalesce {co[-1]:.2f} s, copy {cp[-1]:.2f} s",
                  file=sys.stderr)
        mib = size / MB
        co_rate = mib / statistics.median(co)
        cp_rate = mib / statistics.median(cp)
        print(f"coalesce: {co_rate:.0f} MiB/s (median of {a.rounds}, {a.size_mib} MiB)")
        print(f"sequential copy (dd bs=4M conv=fsync): {cp_rate:.0f} MiB/s")
        print(f"ratio coalesce/copy: {co_rate / cp_rate:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
