#!/usr/bin/env python3
"""What mirroring costs: 4 KiB random writes at QD32 through a VBD with and without a
secondary image.

    .venv/bin/python bench/mirror_write.py [--reps 5] [--runtime 5] [--size-mib 1024]
                                           [--secondary qemu-nbd|tapdisk] [--direct]
                                           [--before SRC]

fio (``--ioengine=nbd``, one job, ``--iodepth=32``, ``--rw=randwrite --bs=4k``) writes
through the VBD's NBD socket for ``--runtime`` seconds. Configurations, run in turn in
each repetition (so that noise from other load on the machine spreads over all of them):

- ``plain``: ``tap-ctl create -a aio:IMG`` (no secondary);
- ``slow``: ``tap-ctl create -a fault:rate=0:aio:IMG``, a layer that sees every request
  and changes none: what losing the fast routes costs, which any layer that must see
  writes pays (the mirror's baseline);
- ``mirror``: ``tap-ctl create -a aio:IMG -2 nbd:SOCKET``, the secondary a sparse raw
  file served on a Unix socket by ``qemu-nbd`` (``--secondary qemu-nbd``, the default)
  or by a second tapdisk's NBD export (``--secondary tapdisk``);
- ``before`` (with ``--before SRC``): ``mirror`` again, with tap-ctl and the tapdisks
  importing the ``blktap`` package from ``SRC`` (``PYTHONPATH``; e.g. ``git archive
  COMMIT src | tar -x -C /tmp/old``, then ``--before /tmp/old/src``), in a run
  directory of its own (its own fork server): an older version measured in the same run.

Each run gets fresh sparse images and its own tapdisks. Prints every run, then the
median IOPS, mean completion latency, and CPU time per write of the VBD's tapdisk (user +
system of all its threads, from /proc) and of the secondary's server. The images are
opened without O_DIRECT unless ``--direct``: the writes then cost the least, which
shows the mirror's own cost at its largest. Everything shares the machine's CPUs with
whatever else runs: read the numbers as noisy.

Why mirrored writes cost so much more (issue 16): not serialisation. All 32 writes are in
flight on the secondary's one connection at once (strace of the tapdisk, 10000 mirrored
writes: per write one pwritev2 to the primary, two sendto and one recvfrom on the NBD
connection - libnbd sends the header and the payload apart -, one writev of the reply to
fio, one epoll_pwait: one loop wake-up per secondary reply, since the server answers
them one by one and the loop takes each at once; and three getpid, asyncio asking for
the running loop). The cost is CPU in the tapdisk: a mirrored write does the work of two
writes, and the NBD client's write is the dear one. Instructions per 4 KiB write in one
process (bench/nbd_driver_writes.py, callgrind; before = 17560c6, after = this tree; the
nbd modes vary by some 10 % between runs, with how many replies one wake-up reads):

===========  ============  ============
mode         before        after
===========  ============  ============
file         12757         13188
nbd          149219        93547
mirror-file  76784         69406
mirror-nbd   194188        139735, 152598
===========  ============  ============

What changed: the nbd driver kept its extent map in one sorted list, and each random
write over a hole moved every run after it (a cost growing with the number of writes);
it is in 64 MiB pieces now. A write of one request no longer goes through
``asyncio.gather`` (a task per write). The loop is kept instead of asked for (each
``get_running_loop`` is a getpid() system call); a send asks libnbd one thing (the
direction) instead of three. The mirror's secondary request wakes
its waiter itself instead of through a done-callback round. What is left is Python
and libnbd: a task per secondary request, libnbd's call and completion callback, and
the layer's bookkeeping (record, generation, timeout). Multi-conn would not help:
the tapdisk is CPU-bound on one event loop (bench/nbd_driver_read.py --multi-conn:
more connections, less IOPS), and qemu-nbd serves one connection's requests
concurrently already.

fio through the tapdisk, before and after in one run (``--reps 3 --runtime 4 --before
/tmp/old/src``, 1 GiB sparse images, 2026-12-03 18:55 UTC, load average 32: IOPS are
noise), medians of tapdisk CPU per write: plain 9.2 us, slow 16.1, mirror 103.4 (before
114.2); IOPS plain 15493, slow 11958, mirror 1447 (before 981). An earlier run at load
10-37: mirror 119.4 us (before 144.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TAP_CTL = str(BIN / "tap-ctl")


def sh(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process (all its threads) has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create(env: dict[str, str], img: Path, *flags: str, layer: str = "") -> tuple[str, str]:
    device = sh(TAP_CTL, "create", "-a", f"{layer}aio:{img}", *flags, env=env).strip()
    minor = device.rsplit("-", 1)[1]
    for line in sh(TAP_CTL, "list", "-m", minor, env=env).splitlines():
        fields = dict(f.split("=", 1) for f in line.split())
        if "pid" in fields:
            return fields["pid"], minor
    raise RuntimeError(f"minor {minor} not listed")


def sparse(path: Path, size_mib: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    return path


def one_run(work: Path, env: dict[str, str], size_mib: int, secondary: str | None,
            runtime: int, direct: bool) -> dict[str, float]:
    """Create a VBD (mirrored to a ``secondary`` server if given), run fio, destroy it."""
    img = sparse(work / "primary.raw", size_mib)
    flags = [] if direct else ["-D"]
    server_pid: int | None = None
    server: subprocess.Popen[bytes] | None = None
    sec_vbd: tuple[str, str] | None = None
    try:
        if secondary == "qemu-nbd":
            sock = work / "secondary.sock"
            sock.unlink(missing_ok=True)
            server = subprocess.Popen(
                ["qemu-nbd", "-f", "raw", "-t", "-k", str(sock),
                 "--cache=" + ("none" if direct else "writeback"),
                 str(sparse(work / "secondary.raw", size_mib))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server_pid = server.pid
            while not sock.exists():
                time.sleep(0.02)
            flags += ["-2", f"nbd:{sock}"]
        elif secondary == "slow":
            pass
        elif secondary == "tapdisk":
            sec_vbd = create(env, sparse(work / "secondary.raw", size_mib),
                             *([] if direct else ["-D"]))
            server_pid = int(sec_vbd[0])
            flags += ["-2", f"nbd:{env['BLKTAP_RUN_DIR']}/nbd{sec_vbd[0]}.{sec_vbd[1]}"]
        pid, minor = create(env, img, *flags,
                            layer="fault:rate=0:" if secondary == "slow" else "")
        try:
            uri = f"nbd+unix:///?socket={env['BLKTAP_RUN_DIR']}/nbd{pid}.{minor}"
            cmd = ["fio", "--name=mirror", "--ioengine=nbd", f"--uri={uri}",
                   "--rw=randwrite", "--bs=4k", "--iodepth=32", "--time_based",
                   f"--runtime={runtime}", f"--size={size_mib}M", "--output-format=json"]
            cpu0 = cpu_seconds(int(pid))
            scpu0 = cpu_seconds(server_pid) if server_pid else 0.0
            out = sh(*cmd)
            cpu = cpu_seconds(int(pid)) - cpu0
            scpu = (cpu_seconds(server_pid) - scpu0) if server_pid else 0.0
            state = json.loads(sh(TAP_CTL, "stats", "-p", pid, "-m", minor, env=env))
            if secondary not in (None, "slow") and state["mirror"]["state"] != "in_sync":
                raise RuntimeError(f"mirror not in sync: {state.get('mirror')}")
        finally:
            sh(TAP_CTL, "destroy", "-p", pid, "-m", minor, env=env)
        job = json.loads(out[out.index("{"):])["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio error {job['error']}")
        write = job["write"]
        ios = max(1, int(write["total_ios"]))
        return {"iops": float(write["iops"]), "clat_us": float(write["clat_ns"]["mean"]) / 1000,
                "cpu_us": cpu * 1e6 / ios, "server_cpu_us": scpu * 1e6 / ios}
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
        if sec_vbd is not None:
            sh(TAP_CTL, "destroy", "-p", sec_vbd[0], "-m", sec_vbd[1], env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    p.add_argument("--size-mib", type=int, default=1024, help="virtual disk size")
    p.add_argument("--secondary", choices=("qemu-nbd", "tapdisk"), default="qemu-nbd")
    p.add_argument("--direct", action="store_true", help="open the images with O_DIRECT")
    p.add_argument("--dir", default=None, help="where images go (default: a temp dir)")
    p.add_argument("--before", metavar="SRC", help="also mirror with blktap from SRC "
                   "(a directory holding the blktap package)")
    ns = p.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    configs: list[tuple[str, str | None]] = [("plain", None), ("slow", "slow"),
                                             ("mirror", ns.secondary)]
    if ns.before:
        configs.append(("before", ns.secondary))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    with tempfile.TemporaryDirectory(prefix="mirror-bench-", dir=ns.dir) as tmp:
        work = Path(tmp)
        run_dir = Path(tempfile.mkdtemp(prefix="mb-", dir="/tmp"))  # short socket paths
        env = dict(os.environ, BLKTAP_RUN_DIR=str(run_dir),
                   BLKTAP_DEV_DIR=str(run_dir / "dev"), BLKTAP_BLOCKDEV="off")
        old_dir = run_dir / "before"
        old_dir.mkdir()
        old_env = dict(env, BLKTAP_RUN_DIR=str(old_dir), BLKTAP_DEV_DIR=str(old_dir / "dev"),
                       PYTHONPATH=os.path.abspath(ns.before or "."))
        try:
            print(f"# aio, {ns.size_mib} MiB, {'O_DIRECT' if ns.direct else 'no O_DIRECT'}, "
                  f"4 KiB random writes, QD32, {ns.runtime} s x {ns.reps} reps, secondary "
                  f"{ns.secondary}{', before: ' + ns.before if ns.before else ''}; cpus "
                  f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
            for rep in range(ns.reps):
                for name, secondary in configs:
                    r = one_run(work, old_env if name == "before" else env, ns.size_mib,
                                secondary, ns.runtime, ns.direct)
                    results[name].append(r)
                    print(f"rep {rep + 1} {name:>7}: {r['iops']:9.0f} IOPS  clat "
                          f"{r['clat_us']:8.1f} us  tapdisk CPU {r['cpu_us']:6.1f} us/write"
                          f"  secondary server CPU {r['server_cpu_us']:6.1f} us/write",
                          flush=True)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    print()
    print(f"{'config':>7} {'median IOPS':>12} {'median clat us':>15} {'vs plain':>9} "
          f"{'CPU us/write':>13} {'vs plain':>9} {'server CPU us':>14}")
    med = {n: statistics.median(r["iops"] for r in rs) for n, rs in results.items()}
    cpu = {n: statistics.median(r["cpu_us"] for r in rs) for n, rs in results.items()}
    for name, runs in results.items():
        clat = statistics.median(r["clat_us"] for r in runs)
        scpu = statistics.median(r["server_cpu_us"] for r in runs)
        delta = "" if name == "plain" else f"{(med[name] / med['plain'] - 1) * 100:+.1f} %"
        cdelta = "" if name == "plain" else f"{(cpu[name] / cpu['plain'] - 1) * 100:+.1f} %"
        print(f"{name:>7} {med[name]:12.0f} {clat:15.1f} {delta:>9} {cpu[name]:13.1f} "
              f"{cdelta:>9} {scpu:14.1f}")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f} (the numbers are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
