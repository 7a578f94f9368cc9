#!/usr/bin/env python3
"""A remote raw image read and written through our ``nbd`` image driver against qemu-nbd's
own NBD client, on nbd-compare's five default workloads.

    .venv/bin/python bench/nbd_driver_compare.py [--runtime 5] [--repeat 3] [--size-mib 1024]
                                                 [--json PATH] [--dir /var/tmp]

One remote server, ``nbdkit -f -U REMOTE file IMAGE`` (a raw file of random bytes, served
through the page cache), stays up for the whole run. Three columns, interleaved by
bench/nbd-compare (repetition, then workload, then column; medians of the repetitions):

- ``tapdisk``: our tapdisk with the image ``nbd:REMOTE`` (bench/serve_tapdisk.py: a real
  ``tapdisk -D``, one VBD opened by control messages), exporting it on its own socket;
- ``qemu-nbd-client``: ``qemu-nbd -f raw 'nbd+unix:///?socket=REMOTE'``, qemu's block
  layer with its NBD client, re-exporting the same remote;
- ``remote``: fio straight on the remote server: the ceiling, no re-export in the path
  (a limit, not a peer).

fio (``--ioengine=nbd``, one connection) drives each column's socket. The table gives the
median IOPS (MiB/s for 1 MiB), the ratio ours / qemu-nbd's client, and the re-exporter's CPU
time per request (user + system of all its processes while fio ran, divided by the
requests fio completed): the remote server's CPU is not in it (the same server for both).
The load average is printed at the start and end: the machine may be shared.

bench/run runs the same group as its ``nbd-driver`` section (see :func:`group` and
:func:`remote_server`), so that docs/performance.md carries it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compare_runner import Group, run_group

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "bench" / "serve_tapdisk.py"
WORKLOADS = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32", "read-1m-qd8",
             "write-1m-qd8"]
REMOTE = "nbdkit -f -U {remote} file {image}"


@contextlib.contextmanager
def remote_server(image: str, workdir: str) -> Iterator[tuple[str, str]]:
    """nbdkit serving ``image`` on a Unix socket in ``workdir``; yields (socket, command).
    Stopped (and the socket removed) on exit."""
    sock = os.path.join(workdir, "remote.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    cmd = REMOTE.format(remote=shlex.quote(sock), image=shlex.quote(image))
    proc = subprocess.Popen(shlex.split(cmd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"remote server did not start: {cmd}: {err.strip()}")
            time.sleep(0.02)
        yield sock, cmd
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def group(image: str, remote: str, remote_cmd: str, workloads: list[str]) -> Group:
    """The nbd-compare group: ours first (ratios are against it), the remote a limit."""
    uri = f"nbd+unix:///?socket={remote}"
    return Group(
        "nbd-driver", "nbd-driver",
        "Remote raw image: our nbd driver against qemu-nbd's NBD client", image, workloads,
        "tapdisk",
        servers=[
            ("tapdisk", f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVE))} "
                        f"--socket {{socket}} nbd:{shlex.quote(remote)}"),
            ("qemu-nbd-client", f"qemu-nbd -t -e 16 -f raw -k {{socket}} {shlex.quote(uri)}"),
            ("remote", f"ln -s {shlex.quote(remote)} {{socket}} && exec sleep 1000000"),
        ],
        params={"limits": ["remote"], "remote_server": remote_cmd},
        note="one remote server (nbdkit's file plugin over a raw file of random bytes, "
             "through the page cache) for all columns; tapdisk = our tapdisk with the image "
             "nbd:REMOTE re-exporting it; qemu-nbd-client = qemu-nbd -f raw "
             "nbd+unix:///?socket=REMOTE (qemu's NBD client) re-exporting it; remote = fio "
             "on the remote server itself (the ceiling, not a peer). Server CPU is the "
             "re-exporter's (the remote's is not counted)")


def cpu_per_request(run: dict[str, Any], bs_bytes: int, runtime: float) -> float | None:
    """Microseconds of the column's CPU per request of one nbd-compare run: its CPU
    seconds over fio's whole wall time, divided by the requests of fio's ``runtime``."""
    if "server_cpu_pct" not in run or not run.get("wall_s"):
        return None
    rate = float(run["bw_bytes"]) / bs_bytes if bs_bytes >= 128 << 10 else float(run["iops"])
    if rate <= 0:
        return None
    cpu_s = float(run["server_cpu_pct"]) / 100 * float(run["wall_s"])
    return cpu_s / (rate * runtime) * 1e6


def summarize(result: dict[str, Any]) -> list[str]:
    """The table this script prints (and its JSON carries)."""
    runs = result["runs"]
    names = [s["name"] for s in result["servers"]]
    lines = [f"{'workload':20}" + "".join(f"{n:>22}" for n in names)
             + f"{'ours/qemu-nbd-client':>22}{'ours/remote':>13}"]
    for wl in result["workloads"]:
        size = wl.split("-")[1]
        bs = int(size[:-1]) << (10 if size.endswith("k") else 20)
        unit = "IOPS" if bs < 128 << 10 else "MiB/s"
        line = f"{wl + ' [' + unit + ']':20}"
        med: dict[str, float] = {}
        for n in names:
            ok = [r for r in runs if r["server"] == n and r["workload"] == wl
                  and "error" not in r]
            if not ok:
                line += f"{'FAILED':>22}"
                continue
            vals = [r["iops"] if unit == "IOPS" else r["bw_bytes"] / 1048576 for r in ok]
            med[n] = statistics.median(vals)
            cpu = [c for r in ok
                   if (c := cpu_per_request(r, bs, result["runtime_s"])) is not None]
            text = f"{med[n]:.0f}"
            if cpu and n != "remote":
                text += f" ({statistics.median(cpu):.1f} us/req)"
            line += f"{text:>22}"
        for other, width in (("qemu-nbd-client", 22), ("remote", 13)):
            ratio = (f"{med['tapdisk'] / med[other]:.2f}x"
                     if "tapdisk" in med and med.get(other) else "-")
            line += f"{ratio:>{width}}"
        lines.append(line)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json", help="write every run here (nbd-compare's JSON and the table)")
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory")
    ns = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    work = tempfile.mkdtemp(prefix="nbd-driver-", dir=ns.dir)
    # Short socket paths (108 bytes at most): the remote in /tmp.
    sockdir = tempfile.mkdtemp(prefix="ndc-", dir="/tmp")
    load0 = os.getloadavg()
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        image = os.path.join(work, "disk.raw")
        with open(image, "wb") as img:
            for _ in range(ns.size_mib):
                img.write(os.urandom(1 << 20))
        print(f"# {date}: {ns.size_mib} MiB raw image, {ns.runtime} s x {ns.repeat}, "
              f"cpus {os.cpu_count()}, load average {load0[0]:.2f} {load0[1]:.2f} "
              f"{load0[2]:.2f}", flush=True)
        with remote_server(image, sockdir) as (remote, remote_cmd):
            g = group(image, remote, remote_cmd, ns.workloads.split(","))

            def step(label: str) -> None:
                print(f"  {label}", file=sys.stderr, flush=True)

            doc = run_group(g, ns.runtime, ns.repeat, work, step)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    load1 = os.getloadavg()
    table = summarize(doc["result"])
    print("\n".join(table))
    print(f"# load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"us/req = the re-exporter's CPU per request (median)")
    if ns.json:
        doc.update(date=date, loadavg_start=list(load0), loadavg_end=list(load1),
                   table=table)
        with open(ns.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return int(doc["exit_status"])


if __name__ == "__main__":
    sys.exit(main())
