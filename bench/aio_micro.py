"""Micro-benchmark: 4 KiB random O_DIRECT reads at QD32, the ``aio`` driver vs fio.

Prints IOPS (median of ``--runs``) of:
* the ``aio`` driver: ``--depth`` coroutines each awaiting ``image.read`` in a loop
  (asyncio, or uvloop with ``--uvloop``);
* ``fio --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth=<depth>``;
on the same file (created, filled with data, once; kept between runs).

    .venv/bin/python bench/aio_micro.py [--file /var/tmp/blktap-aio-bench.raw] [--size 1G]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

from blktap.block.driver import OpenOptions, opener_for
from blktap.util.buffers import aligned
from blktap.util.linux_aio import AioContext

BS = 4096
CPU: list[tuple[float, float]] = []  # (user, system) CPU microseconds per request, per run


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def ensure_file(path: str, size: int) -> None:
    """A fully written (no holes, no unwritten extents) file of ``size`` bytes."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    chunk = random.Random(0).randbytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


async def driver_run(
    path: str, depth: int, seconds: float, submit_batch: int | None, unaligned: bool = False
) -> float:
    ctx = AioContext.for_loop()  # the context the driver will share
    if submit_batch is not None:
        ctx.submit_batch = submit_batch
    try:
        image = await opener_for("aio")(path, OpenOptions(read_only=True, direct=True))
    finally:
        ctx.release()
    blocks = image.info.size // BS
    stop = False
    count = 0

    async def worker(seed: int) -> None:
        nonlocal count
        rnd = random.Random(seed).randrange
        # bytearray memory is not sector-aligned: every read then uses a bounce buffer.
        buf = memoryview(bytearray(BS)) if unaligned else aligned(BS)
        n = 0
        while not stop:
            await image.read(rnd(blocks) * BS, buf)
            n += 1
        count += n

    try:
        tasks = [asyncio.ensure_future(worker(i)) for i in range(depth)]
        await asyncio.sleep(0.5)  # warm up
        count = 0
        start = time.perf_counter()
        cpu = os.times()
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        cpu_end = os.times()
        user = (cpu_end.user - cpu.user) / count * 1e6
        system = (cpu_end.system - cpu.system) / count * 1e6
        CPU.append((user, system))
        return count / elapsed
    finally:
        await image.close()


def fio_run(path: str, depth: int, seconds: float) -> float:
    out = subprocess.run(
        ["fio", "--name=randread", f"--filename={path}", "--ioengine=libaio", "--direct=1",
         "--rw=randread", f"--bs={BS}", f"--iodepth={depth}", f"--runtime={seconds}",
         "--time_based", "--ramp_time=0.5", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default="/var/tmp/blktap-aio-bench.raw")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--unaligned", action="store_true",
                    help="read into bytearrays (not sector-aligned): the bounce-buffer path")
    ap.add_argument("--submit-batch", type=int, default=None,
                    help="AioContext.submit_batch (default: the library's; 1000000000 "
                         "submits only at the end of each loop iteration)")
    args = ap.parse_args()
    ensure_file(args.file, parse_size(args.size))
    if args.uvloop:
        import uvloop

        uvloop.install()
    results: dict[str, list[float]] = {"driver": [], "fio": []}
    for _ in range(args.runs):
        results["driver"].append(asyncio.run(
            driver_run(args.file, args.depth, args.seconds, args.submit_batch, args.unaligned)
        ))
        if not args.no_fio and shutil.which("fio"):
            results["fio"].append(fio_run(args.file, args.depth, args.seconds))
    loop_name = "uvloop" if args.uvloop else "asyncio"
    for name, values in results.items():
        if values:
            runs = " ".join(f"{v:.0f}" for v in values)
            if name == "driver":
                runs += "; CPU us/request user+sys: " + " ".join(
                    f"{u:.1f}+{s:.1f}" for u, s in CPU)
            label = f"aio driver ({loop_name})" if name == "driver" else "fio libaio"
            sys.stdout.write(
                f"{label:22s} QD{args.depth} 4k randread: median {statistics.median(values):8.0f}"
                f" IOPS  (runs: {runs})\n"
            )


if __name__ == "__main__":
    main()
