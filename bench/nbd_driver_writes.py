#!/usr/bin/env python3
"""Instructions per 4 KiB write through the ``nbd`` driver and the mirror layer, in one
process, counted by callgrind (steady on a shared machine, where CPU time is not).

    .venv/bin/python bench/nbd_driver_writes.py [--modes file,nbd,mirror-file,mirror-nbd]
                                                [--src SRC]

Each mode writes at random 4 KiB-aligned offsets of a 256 MiB image, 32 writes in flight,
on uvloop as tapdisk does:

- ``file``: a chain on a sparse raw file (``aio``, buffered): the baseline;
- ``nbd``: a chain on ``nbd:SOCKET``, qemu-nbd serving a sparse raw file;
- ``mirror-file``: the ``file`` chain under a mirror layer whose secondary is another raw
  file (``aio:``): the layer's own cost plus a second file write;
- ``mirror-nbd``: the ``file`` chain mirrored to ``nbd:SOCKET`` (``bench/mirror_write.py``'s
  configuration, without the NBD export in front).

Each mode runs twice under ``valgrind --tool=callgrind`` (1024 and 4096 writes); the
difference of the two totals over 3072 is the count per write (start-up cancels out).
``--src SRC`` imports blktap from SRC (``PYTHONPATH``) to count an older version. The
secondary's timeout is 300 s (valgrind is slow): the mirror must stay in sync, checked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 256 << 20
QD = 32
MODES = ("file", "nbd", "mirror-file", "mirror-nbd")


async def _writes(mode: str, work: str, sock: str, n: int) -> None:
    from blktap.block.chain import Chain
    from blktap.block.driver import OpenOptions
    from blktap.block.layer import Stack
    from blktap.block.layers.mirror import MirrorLayer, MirrorState, Phase, SecondarySpec

    opts = OpenOptions(read_only=False, direct=False)
    stack: Stack
    if mode == "nbd":
        stack = await Chain.open("nbd", sock, opts)
    else:
        stack = await Chain.open("aio", os.path.join(work, "p.raw"), opts)
    state = None
    if mode.startswith("mirror-"):
        target = f"aio:{work}/s.raw" if mode == "mirror-file" else f"nbd:{sock}"
        state = MirrorState(SecondarySpec.parse(f"timeout=300:{target}"))
        stack = await MirrorLayer.open_with(stack, opts, state)
    rng = random.Random(1)
    data = memoryview(os.urandom(4096))

    async def worker(k: int) -> None:
        for _ in range(k):
            await stack.write(rng.randrange(SIZE // 4096) * 4096, data)

    await asyncio.gather(*(worker(n // QD) for _ in range(QD)))
    if state is not None and state.phase != Phase.IN_SYNC:
        raise SystemExit(f"the mirror left sync: {state.report()}")
    await stack.close()


def child(mode: str, work: str, sock: str, n: int) -> None:
    for name in ("p.raw", "s.raw"):
        with open(os.path.join(work, name), "wb") as f:
            f.truncate(SIZE)
    import uvloop

    uvloop.install()
    asyncio.run(_writes(mode, work, sock, n))


def count(mode: str, work: str, sock: str, n: int, env: dict[str, str]) -> int:
    out = os.path.join(work, f"cg.{mode}.{n}")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, __file__, "--child", mode, work, sock, str(n)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {out}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--src", help="import blktap from SRC (an older version)")
    ns = ap.parse_args()
    for tool in ("valgrind", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    env = dict(os.environ)
    if ns.src:
        env["PYTHONPATH"] = os.path.abspath(ns.src)
    work = tempfile.mkdtemp(prefix="nbdw-", dir="/tmp")
    sock = os.path.join(work, "q.sock")
    backing = os.path.join(work, "remote.raw")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    server = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-k", sock, backing],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not Path(sock).exists():
            time.sleep(0.02)
        print(f"# blktap from {ns.src or 'this tree'}; load average {os.getloadavg()[0]:.1f} "
              "(instruction counts do not depend on it)", flush=True)
        for mode in ns.modes.split(","):
            few, many = count(mode, work, sock, 1024, env), count(mode, work, sock, 4096, env)
            print(f"{mode:12} {(many - few) / 3072:9.0f} instructions/write", flush=True)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
