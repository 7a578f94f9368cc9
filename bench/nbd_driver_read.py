"""Benchmark (not a test): 4 KiB random reads from an NBD server, libnbd's Python bindings
driven from asyncio against a pure-Python asyncio client.

Decides which client the ``nbd`` image driver (blktap.block.drivers.nbd) is built on. Both
clients run in this process on one asyncio loop, as the driver would inside tapdisk:

* ``libnbd`` — Debian's python3-libnbd: one handle, ``aio_pread`` into the caller's buffer
  (``nbd.Buffer.from_buffer``, no copy), completion callbacks resolving futures, the
  handle's descriptor watched with ``loop.add_reader`` and ``aio_notify_read``;
* ``driver`` — the ``nbd`` driver built on the first (its request bookkeeping on top);
* ``own`` — a minimal client of our own (fixed newstyle, structured replies, OPT_GO), an
  ``asyncio.Protocol`` parsing simple and structured replies with ``struct``: the shape the
  driver's own client would have had (proto/ codec plus a protocol).

The server is nbdkit's file plugin over a file of random bytes in /dev/shm (no holes, so
structured replies carry data), on a Unix socket. Each run does ``--count`` reads at
queue depth 1 and 32; the medians of ``--runs`` runs are printed (the machine is shared):
IOPS, and the client process's CPU time per read (steadier on a busy machine).

    .venv/bin/python bench/nbd_driver_read.py [--runs 5] [--count 20000] [--multi-conn]

``--multi-conn`` measures the driver alone at depth 32 over 1, 2 and 4 connections
(``connections=N``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

nbd: Any = importlib.import_module("nbd")  # python3-libnbd, linked into the venv by setup

BS = 4096
SIZE = 256 << 20


async def libnbd_run(sock: str, depth: int, count: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    h = nbd.NBD()
    h.connect_unix(sock)
    fd = h.aio_get_fd()

    def readable() -> None:
        h.aio_notify_read()
        if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
            h.aio_notify_write()

    loop.add_reader(fd, readable)
    rng = random.Random(1)
    blocks = SIZE // BS

    async def worker(n: int) -> None:
        buf = memoryview(bytearray(BS))
        nb = nbd.Buffer.from_buffer(buf)
        for _ in range(n):
            fut = loop.create_future()

            def done(err: Any, fut: asyncio.Future[int] = fut) -> int:
                fut.set_result(err.value if hasattr(err, "value") else err)
                return 1

            h.aio_pread(nb, rng.randrange(blocks) * BS, completion=done)
            if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
                h.aio_notify_write()
            await fut

    start = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(worker(count // depth) for _ in range(depth)))
    took = time.perf_counter() - start
    cpu = time.process_time() - cpu
    loop.remove_reader(fd)
    h.shutdown()
    done = count // depth * depth
    return done / took, cpu / done * 1e6


class OwnClient(asyncio.Protocol):
    """Just enough of a client for reads: handshake, READ, simple and structured replies."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state = "greeting"
        self.pending: dict[int, tuple[memoryview, int, asyncio.Future[None]]] = {}
        self.cookie = 0
        self.transport: asyncio.Transport

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.step():
            pass

    def step(self) -> bool:
        b = self.buf
        if self.state == "greeting":
            if len(b) < 18:
                return False
            del b[:18]
            self.transport.write(struct.pack(">I", 3))
            opt = struct.pack(">QII", 0x49484156454F5054, 8, 0)
            go = struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0)
            self.transport.write(opt + go)
            self.state = "options"
            return True
        if self.state == "options":
            if len(b) < 20:
                return False
            _, opt, rep, n = struct.unpack_from(">QIII", b)
            if len(b) < 20 + n:
                return False
            del b[: 20 + n]
            if rep >> 31:
                raise RuntimeError(f"option {opt} refused {rep:#x}")
            if opt == 7 and rep == 1:
                self.state = "tx"
                self.ready.set_result(None)
            return True
        if len(b) < 16:
            return False
        magic = struct.unpack_from(">I", b)[0]
        if magic == 0x67446698:
            _, _err, cookie = struct.unpack_from(">IIQ", b)
            view, _off, fut = self.pending[cookie]
            if len(b) < 16 + len(view):
                return False
            view[:] = b[16 : 16 + len(view)]
            del b[: 16 + len(view)]
            del self.pending[cookie]
            fut.set_result(None)
            return True
        if len(b) < 20:
            return False
        _, flags, typ, cookie, n = struct.unpack_from(">IHHQI", b)
        if len(b) < 20 + n:
            return False
        view, base, fut = self.pending[cookie]
        if typ == 1:
            (off,) = struct.unpack_from(">Q", b, 20)
            view[off - base : off - base + n - 8] = b[28 : 20 + n]
        elif typ == 2:
            off, m = struct.unpack_from(">QI", b, 20)
            view[off - base : off - base + m] = bytes(m)
        elif typ != 0:
            raise RuntimeError(f"reply type {typ}")
        del b[: 20 + n]
        if flags & 1:
            del self.pending[cookie]
            fut.set_result(None)
        return True

    def read(self, view: memoryview, offset: int) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.cookie += 1
        self.pending[self.cookie] = (view, offset, fut)
        self.transport.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, self.cookie, offset,
                                         len(view)))
        return fut


async def own_run(sock: str, depth: int, count: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_unix_connection(OwnClient, sock)
    await client.ready
    rng = random.Random(1)
    blocks = SIZE // BS

    async def worker(n: int) -> None:
        buf = memoryview(bytearray(BS))
        for _ in range(n):
            await client.read(buf, rng.randrange(blocks) * BS)

    start = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(worker(count // depth) for _ in range(depth)))
    took = time.perf_counter() - start
    cpu = time.process_time() - cpu
    transport.close()
    done = count // depth * depth
    return done / took, cpu / done * 1e6


async def driver_run(sock: str, depth: int, count: int) -> tuple[float, float]:
    """The nbd driver itself (blktap.block.drivers.nbd, on libnbd)."""
    from blktap.block.driver import OpenOptions, opener_for

    image = await opener_for("nbd")(sock, OpenOptions(read_only=True))
    rng = random.Random(1)
    blocks = SIZE // BS

    async def worker(n: int) -> None:
        buf = memoryview(bytearray(BS))
        for _ in range(n):
            await image.read(rng.randrange(blocks) * BS, buf)

    start = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(*(worker(count // depth) for _ in range(depth)))
    took = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await image.close()
    done = count // depth * depth
    return done / took, cpu / done * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--multi-conn", action="store_true",
                    help="instead: the driver at QD32 over 1, 2 and 4 connections")
    args = ap.parse_args()
    if shutil.which("nbdkit") is None:
        sys.exit("nbdkit is not installed (scripts/setup.sh installs it)")
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    image = os.path.join(tmp, "disk.raw")
    with open(image, "wb") as f:
        f.write(os.urandom(SIZE))
    sock = os.path.join(tmp, "nbd.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", image])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.runs if args.multi_conn else 0):
            for n in (1, 2, 4):
                got = asyncio.run(driver_run(f"nbd+unix:///?socket={sock}&connections={n}",
                                             32, args.count))
                results.setdefault(f"driver QD32 {n} conn", []).append(got)
        for _ in range(0 if args.multi_conn else args.runs):
            for depth in (1, 32):
                for name, run in (("libnbd", libnbd_run), ("own", own_run),
                                  ("driver", driver_run)):
                    got = asyncio.run(run(sock, depth, args.count))
                    results.setdefault(f"{name} QD{depth}", []).append(got)
        for key, values in results.items():
            iops = [v[0] for v in values]
            cpu = [v[1] for v in values]
            print(f"{key:20} median {statistics.median(iops):7.0f} IOPS "
                  f"{statistics.median(cpu):5.1f} us CPU/read  "
                  f"(IOPS runs: {', '.join(f'{v:.0f}' for v in iops)})")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
