#!/usr/bin/env python3
"""Instructions per NBD request in the server's user space, counted by callgrind.

The harness of docs/performance.md: one NBD connection (``_Connection`` of
blktap.frontends.nbd_server over a transport that drops what it is given, no socket),
batches of 32 requests of 4 KiB at random aligned offsets fed to ``buffer_updated``
at once, each batch answered before the next (the event loop runs for O_DIRECT's AIO
completions). The image is a raw file of 64 MiB on the disk the repository is on.

    bench/callgrind_requests.py [--direct] [--prefix null:] read|write

runs the workload twice under ``valgrind --tool=callgrind`` (few and many batches) and
prints the difference of the two totals per request: start-up and teardown cancel out.
``--run N`` runs N batches without valgrind (what the two measured runs do).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
from typing import Any

IMAGE_SIZE = 64 << 20
BATCH = 32
LENGTH = 4096
FEW, MANY = 20, 120  # batches in the two measured runs


class _Transport:
    """What the connection needs of an asyncio transport; sends nothing."""

    def __init__(self) -> None:
        self.sent = 0

    def write(self, data: Any) -> None:
        self.sent += len(data)

    def writelines(self, items: Any) -> None:
        for item in items:
            self.sent += len(item)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _handshake() -> bytes:
    # Client flags FIXED_NEWSTYLE|NO_ZEROES, then NBD_OPT_EXPORT_NAME "" (simple replies).
    return struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0)


async def _run(spec: str, direct: bool, write: bool, batches: int) -> None:
    from blktap.block.driver import OpenOptions
    from blktap.frontends.nbd_server import NbdServer, _Connection
    from blktap.vbd import VBD, ImageSpec

    vbd = VBD(0)
    await vbd.open(ImageSpec.parse(spec), OpenOptions(direct=direct))
    server = NbdServer(vbd, "/nonexistent")
    conn = _Connection(server)
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]

    def feed(data: bytes) -> None:
        view = conn.get_buffer(len(data))
        view[: len(data)] = data
        conn.buffer_updated(len(data))

    feed(_handshake())
    rng = random.Random(1)
    header = struct.Struct(">IHHQQI")
    payload = bytes(range(256)) * (LENGTH // 256)
    command = 1 if write else 0
    for n in range(batches):
        parts = []
        for i in range(BATCH):
            offset = rng.randrange(IMAGE_SIZE // LENGTH) * LENGTH
            parts.append(header.pack(0x25609513, 0, command, n * BATCH + i, offset, LENGTH))
            if write:
                parts.append(payload)
        feed(b"".join(parts))
        while conn._inflight or conn._backlog:
            # Long enough for a batch's AIO completions (the loop serves them meanwhile):
            # one look per batch, so that the disk's pace does not change the count.
            await asyncio.sleep(0.005)
    assert conn.requests == batches * BATCH and not conn.errors, (conn.requests, conn.errors)
    conn.connection_lost(None)
    await vbd.close()


def _measure(args: argparse.Namespace) -> None:
    totals = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as tmp:
        image = os.path.join(tmp, "image.raw")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_SIZE))  # written, not sparse: reads hit the page cache
        for batches in (FEW, MANY):
            out = os.path.join(tmp, "callgrind.out")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, os.path.abspath(__file__), "--run", str(batches),
                   "--image", f"{args.prefix}aio:{image}", args.op]
            if args.direct:
                cmd.append("--direct")
            # A fixed hash seed: the same dict layouts, hence the same counts, every run.
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONHASHSEED="0"))
            with open(out) as f:
                match = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            assert match, "no totals in callgrind's output"
            totals.append(int(match.group(1)))
    per = (totals[1] - totals[0]) / ((MANY - FEW) * BATCH)
    mode = "O_DIRECT" if args.direct else "buffered"
    print(f"{args.prefix}aio {mode} 4 KiB {args.op}: {per:.0f} instructions per request")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=("read", "write"))
    ap.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    ap.add_argument("--prefix", default="", help="layers before aio:, e.g. null:")
    ap.add_argument("--run", type=int, metavar="N", help="run N batches (no valgrind)")
    ap.add_argument("--image", help="with --run: the TYPE:PATH to open")
    args = ap.parse_args()
    if args.run is not None:
        import uvloop  # the daemon's loop

        uvloop.install()
        asyncio.run(_run(args.image, args.direct, args.op == "write", args.run))
    else:
        _measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
