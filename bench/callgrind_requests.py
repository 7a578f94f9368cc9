#!/usr/bin/env python3
"""Instructions per NBD request in the server's user space, counted by callgrind.

The harness of docs/performance.md: one NBD connection (``_Connection`` of
blktap.frontends.nbd_server over a transport that drops what it is given, no socket),
batches of 32 requests of 4 KiB at random aligned offsets fed to ``buffer_updated``
at once, each batch answered before the next (the event loop runs for O_DIRECT's AIO
completions). The image is a raw file of 64 MiB on the disk the repository is on.

    bench/callgrind_requests.py [--direct] [--prefix null:] [--vhd] [--batch N] read|write

runs the workload twice under ``valgrind --tool=callgrind`` (few and many batches) and
prints the difference of the two totals per request: start-up and teardown cancel out.
``--vhd`` serves the same bytes as a fully allocated dynamic VHD (bench/vhd_make.py)
instead of the raw file; ``--batch 1`` sends one request at a time (without
``--socket`` the harness feeds the next request without the loop running in between when
the last one completed at once, so an O_DIRECT image's synchronous reads, which take one
per loop iteration, mostly go to AIO: use ``--socket`` for queue depth 1 as a client
sees it).
``--socket`` serves a real NBD socket instead, to a client in another process (not
counted) that sends each batch and waits for its replies: with ``--batch 1`` that is
queue depth 1 as fio's, served by the connection's read lane (nbd_lane) where the VBD
allows it, so the count covers the lane's thread too.
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
from collections.abc import Iterator
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


async def _run(spec: str, direct: bool, write: bool, batches: int, batch: int) -> None:
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
    for requests in _batches(write, batches, batch):
        feed(requests)
        while conn._inflight or conn._backlog:
            # Long enough for a batch's AIO completions (the loop serves them meanwhile):
            # one look per batch, so that the disk's pace does not change the count.
            await asyncio.sleep(0.005)
    assert conn.requests == batches * batch and not conn.errors, (conn.requests, conn.errors)
    conn.connection_lost(None)
    await vbd.close()


async def _run_socket(spec: str, direct: bool, write: bool, batches: int, batch: int) -> None:
    from blktap.block.driver import OpenOptions
    from blktap.frontends.nbd_server import NbdServer
    from blktap.vbd import VBD, ImageSpec

    vbd = VBD(0)
    await vbd.open(ImageSpec.parse(spec), OpenOptions(direct=direct))
    with tempfile.TemporaryDirectory(prefix="cgr-", dir="/tmp") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        server = NbdServer(vbd, sock)
        await server.start()
        client = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--client", sock, "--run", str(batches),
            "--batch", str(batch), "write" if write else "read")
        status = await client.wait()
        # Which route served them: lane_reads are the read lane's (stderr, for a look).
        print(server.statistics(), file=sys.stderr)
        await server.stop(timeout=5.0)
    await vbd.close()
    assert status == 0, f"the client exited {status}"


def _client(sock_path: str, write: bool, batches: int, batch: int) -> None:
    """The NBD client of ``--socket``: handshake, then each batch sent at once and all its
    replies read before the next."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)

    def recv(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError("the server closed the connection")
            out += chunk
        return bytes(out)

    recv(18)  # NBDMAGIC, IHAVEOPT, handshake flags
    sock.sendall(_handshake())
    recv(10)  # size and transmission flags (NO_ZEROES: nothing after them)
    for requests in _batches(write, batches, batch):
        sock.sendall(requests)
        for _ in range(batch):
            magic, error, _cookie = struct.unpack(">IIQ", recv(16))
            assert magic == 0x67446698 and not error, (magic, error)
            if not write:
                recv(LENGTH)
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC
    sock.close()


def _batches(write: bool, batches: int, batch: int) -> Iterator[bytes]:
    """The NBD requests of each batch, as the client sends them: ``batch`` 4 KiB reads or
    writes (with their payload) at random aligned offsets, the same ones every run."""
    rng = random.Random(1)
    header = struct.Struct(">IHHQQI")
    payload = bytes(range(256)) * (LENGTH // 256)
    command = 1 if write else 0
    for n in range(batches):
        parts = []
        for i in range(batch):
            offset = rng.randrange(IMAGE_SIZE // LENGTH) * LENGTH
            parts.append(header.pack(0x25609513, 0, command, n * batch + i, offset, LENGTH))
            if write:
                parts.append(payload)
        yield b"".join(parts)


def _measure(args: argparse.Namespace) -> None:
    totals = []
    # Not tmpfs: the --direct cases open the image with O_DIRECT.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        image = os.path.join(tmp, "image.raw")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_SIZE))  # written, not sparse: reads hit the page cache
        spec = f"{args.prefix}aio:{image}"
        if args.vhd:
            vhd = os.path.join(tmp, "image.vhd")
            subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "vhd_make.py"),
                            image, vhd], check=True, stdout=subprocess.DEVNULL)
            spec = f"{args.prefix}vhd:{vhd}"
        # The same number of requests whatever the batch size.
        for batches in (FEW * BATCH // args.batch, MANY * BATCH // args.batch):
            out = os.path.join(tmp, "callgrind.out")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, os.path.abspath(__file__), "--run", str(batches),
                   "--image", spec, "--batch", str(args.batch), args.op]
            if args.socket:
                cmd.append("--socket")
            if args.direct:
                cmd.append("--direct")
            # A fixed hash seed: the same dict layouts, hence the same counts, every run.
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONHASHSEED="0"))
            with open(out) as f:
                match = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            assert match, "no totals in callgrind's output"
            totals.append(int(match.group(1)))
    per = (totals[1] - totals[0]) / ((MANY - FEW) * BATCH // args.batch * args.batch)
    mode = "O_DIRECT" if args.direct else "buffered"
    kind = "vhd" if args.vhd else "aio"
    via = "socket" if args.socket else "no socket"
    print(f"{args.prefix}{kind} {mode} 4 KiB {args.op}, {args.batch} per batch, {via}: "
          f"{per:.0f} instructions per request")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=("read", "write"))
    ap.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    ap.add_argument("--prefix", default="", help="layers before aio:, e.g. null:")
    ap.add_argument("--vhd", action="store_true",
                    help="serve a fully allocated dynamic VHD of the same bytes")
    ap.add_argument("--batch", type=int, default=BATCH, metavar="N",
                    help=f"requests per batch (default {BATCH}; 1: queue depth 1)")
    ap.add_argument("--socket", action="store_true",
                    help="serve a Unix socket to a client process (read lanes included)")
    ap.add_argument("--client", metavar="SOCKET", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, metavar="N", help="run N batches (no valgrind)")
    ap.add_argument("--image", help="with --run: the TYPE:PATH to open")
    args = ap.parse_args()
    if args.client is not None:
        _client(args.client, args.op == "write", args.run, args.batch)
    elif args.run is not None:
        import uvloop  # the daemon's loop

        uvloop.install()
        run = _run_socket if args.socket else _run
        asyncio.run(run(args.image, args.direct, args.op == "write", args.run, args.batch))
    else:
        _measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
