"""The rbd driver alone, in-process (no tapdisk, no NBD): requests per second at a queue
depth, against librbd's own synchronous calls from as many threads.

    CEPH_CONF=/tmp/ceph/ceph.conf .venv/bin/python bench/rbd_micro.py rbd/bench \\
        [--bs 4096] [--qd 32] [--seconds 5] [--write] [--switch-interval MS]

The image must exist and be at least 64 MiB (write runs overwrite it). ``--busy`` keeps
the event loop busy between completions (a coroutine doing small CPU-bound steps), as a
tapdisk serving clients is: completions from librbd's threads then wait for the GIL,
which ``--switch-interval`` (sys.setswitchinterval) bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
import time

from blktap.block.driver import OpenOptions
from blktap.block.drivers.rbd import _bindings, open_rbd, parse_target

SPAN = 64 << 20


async def driver_run(path: str, bs: int, qd: int, seconds: float, write: bool,
                     busy: bool) -> float:
    image = await open_rbd(path, OpenOptions())
    done = 0
    stop = time.monotonic() + seconds
    data = memoryview(bytearray(os.urandom(bs)))  # as an NBD payload arrives

    async def worker() -> None:
        nonlocal done
        buf = memoryview(bytearray(bs))
        rng = random.Random()
        while time.monotonic() < stop:
            offset = rng.randrange(SPAN // bs) * bs
            if write:
                await image.write(offset, data)
            else:
                await image.read(offset, buf)
            done += 1

    async def spin() -> None:
        while time.monotonic() < stop:
            sum(range(2000))  # ~20-50 us of Python work per step
            await asyncio.sleep(0)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(qd)), *([spin()] if busy else []))
    took = time.monotonic() - start
    await image.close()
    return done / took


def sync_run(path: str, bs: int, qd: int, seconds: float, write: bool) -> float:
    rados, rbd = _bindings()
    target = parse_target(path)
    cluster = rados.Rados(conffile=target.conf or "")
    cluster.connect()
    ioctx = cluster.open_ioctx(target.pool)
    image = rbd.Image(ioctx, target.image)
    done = [0] * qd
    stop = time.monotonic() + seconds
    data = os.urandom(bs)

    def worker(i: int) -> None:
        rng = random.Random()
        while time.monotonic() < stop:
            offset = rng.randrange(SPAN // bs) * bs
            if write:
                image.write(data, offset)
            else:
                image.read(offset, bs)
            done[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(qd)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    image.close()
    ioctx.close()
    cluster.shutdown()
    return sum(done) / took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="POOL/IMAGE[:key=value...] as the rbd driver takes it")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--switch-interval", type=float, metavar="MS")
    a = ap.parse_args()
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval / 1000)
    kind = "write" if a.write else "read"
    ours = asyncio.run(driver_run(a.image, a.bs, a.qd, a.seconds, a.write, a.busy))
    theirs = sync_run(a.image, a.bs, a.qd, a.seconds, a.write)
    mib = a.bs / (1 << 20)
    print(f"{kind} bs={a.bs} qd={a.qd}{' busy loop' if a.busy else ''} "
          f"switch={sys.getswitchinterval() * 1000:g} ms")
    print(f"  rbd driver (aio, event loop): {ours:9.0f} req/s {ours * mib:8.1f} MiB/s")
    print(f"  librbd sync, {a.qd} threads:   {theirs:9.0f} req/s {theirs * mib:8.1f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
