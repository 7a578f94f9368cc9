#!/usr/bin/env python3
"""Resident memory of a tapdisk: idle with one VBD, and with N NBD connections.

    .venv/bin/python bench/memory.py [--connections 32] [--type aio|vhd]

Spawns a real tapdisk in a private run directory, opens one 1 GiB image (sparse raw, or a
dynamic VHD made with our vhd-util), prints VmRSS; then opens N NBD connections (fixed
newstyle handshake, NBD_OPT_GO), has each read 1 MiB, keeps them open and prints VmRSS
again. Removes everything afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blktap.control import client, minors
from blktap.control.rundir import RunDir

BIN = Path(sys.executable).parent
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_GO, REP_ACK, INFO_EXPORT = 7, 1, 0


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit("NBD server closed the connection")
        buf += chunk
    return buf


def nbd_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0))
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if rtype == REP_ACK:
            return s


def nbd_read(s: socket.socket, offset: int, length: int) -> None:
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, offset, length))
    magic, error, _cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698 and error == 0
    recv_exact(s, length)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(connections: int = 32, kind: str = "aio") -> dict[str, int]:
    """VmRSS (KiB) of a fresh tapdisk: ``no_vbd``, ``idle`` with one 1 GiB ``kind`` VBD, and
    ``busy`` with ``connections`` NBD connections open (each has read 1 MiB). Removes
    everything it made, also on an exception."""
    run_dir = tempfile.mkdtemp(prefix="mem-bench-", dir="/tmp")
    env = dict(os.environ, BLKTAP_RUN_DIR=run_dir, BLKTAP_BLOCKDEV="off")
    proc = subprocess.Popen([str(BIN / "tapdisk"), "-D"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    conns: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the control socket path: tapdisk is listening
        baseline = rss_kib(proc.pid)
        if kind == "aio":
            image = os.path.join(run_dir, "disk.raw")
            with open(image, "wb") as f:
                f.truncate(1 << 30)
        else:
            image = os.path.join(run_dir, "disk.vhd")
            subprocess.run([str(BIN / "vhd-util"), "create", "-n", image, "-s", "1024"],
                           check=True)
        rundir = RunDir(Path(run_dir), Path(run_dir) / "dev")
        minor = minors.allocate(rundir)
        client.attach(rundir, proc.pid, minor)
        client.open(rundir, proc.pid, minor, f"{kind}:{image}")
        time.sleep(0.2)
        idle = rss_kib(proc.pid)
        nbd = str(rundir.nbd_socket(proc.pid, minor))
        for i in range(connections):
            s = nbd_connect(nbd)
            nbd_read(s, i << 20, 1 << 20)
            conns.append(s)
        time.sleep(0.2)
        busy = rss_kib(proc.pid)
    finally:
        for s in conns:
            s.close()
        proc.terminate()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"no_vbd_kib": baseline, "idle_kib": idle, "busy_kib": busy,
            "connections": connections}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--type", choices=("aio", "vhd"), default="aio")
    args = ap.parse_args()
    m = measure(args.connections, args.type)
    print(f"tapdisk RSS: {m['no_vbd_kib'] / 1024:.1f} MiB with no VBD, "
          f"{m['idle_kib'] / 1024:.1f} MiB idle with one {args.type} VBD, "
          f"{m['busy_kib'] / 1024:.1f} MiB with {args.connections} "
          f"NBD connections (each has read 1 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
