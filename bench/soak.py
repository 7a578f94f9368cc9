#!/usr/bin/env python3
"""Soak: N VBDs in one host under verified I/O, pause/unpause and connect/disconnect churn.

    bench/soak.py [--vbds 32] [--seconds 300] [--size-mib 32] [--interval 1]
                  [--pause-every 0.5] [--json OUT]

``tap-ctl create`` makes N VBDs (one tapdisk each, as tap-ctl does; even-numbered ones
on a dynamic VHD, odd ones on a raw file). One thread per VBD connects through NBD
(libnbd), does a random number (20-200) of operations - 4 KiB writes of a page tagged
with (VBD, counter), reads of a page written before that must return exactly its last
tag, a flush now and then - and disconnects; then again, until the time is up. A churn
thread pauses a random VBD (``tap-ctl pause``), waits 20-100 ms and unpauses it, every
``--pause-every`` seconds; I/O sent meanwhile waits. A sampler reads, every
``--interval`` seconds, each tapdisk's RSS (VmRSS) and open descriptors (/proc/PID/fd).
At the end every page written is read back and compared, and the VBDs are destroyed.

The JSON holds the settings, the counts (operations, bytes, connections, pauses, I/O
errors, verify mismatches, tapdisks that died) and the samples. Exit status 0 when no
I/O error, mismatch or death was seen, else 1. Environment: BLKTAP_RUN_DIR /
BLKTAP_DEV_DIR as for tap-ctl (a private run directory is made when unset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd  # type: ignore[import-not-found,import-untyped,unused-ignore]

BIN = Path(sys.executable).parent
TAP_CTL = str(BIN / "tap-ctl")
VHD_UTIL = str(BIN / "vhd-util")
PAGE = 4096


def tapctl(*args: str) -> str:
    proc = subprocess.run([TAP_CTL, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"tap-ctl {' '.join(args)}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return proc.stdout


def page_data(vbd: int, counter: int, page: int) -> bytes:
    head = b"SOAK" + struct.pack("<IQQ", vbd, counter, page)
    return (head * (PAGE // len(head) + 1))[:PAGE]


@dataclass
class Vbd:
    index: int
    image: str
    pid: int = 0
    minor: int = 0
    pages: dict[int, int] = field(default_factory=dict)  # page -> counter of its last write
    ops: int = 0
    bytes: int = 0
    connects: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, run_dir: str, work: str) -> None:
        self.args = args
        self.run_dir = run_dir
        self.work = work
        self.vbds: list[Vbd] = []
        self.stop = threading.Event()
        self.pauses = 0
        self.pause_errors: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.size = args.size_mib << 20

    def uri(self, v: Vbd) -> str:
        return f"nbd+unix:///?socket={self.run_dir}/nbd{v.pid}.{v.minor}"

    def setup(self) -> None:
        for i in range(self.args.vbds):
            if i % 2 == 0:
                image = os.path.join(self.work, f"vbd{i}.vhd")
                subprocess.run([VHD_UTIL, "create", "-n", image, "-s", str(self.args.size_mib)],
                               check=True, capture_output=True, timeout=60)
                spec = f"vhd:{image}"
            else:
                image = os.path.join(self.work, f"vbd{i}.img")
                with open(image, "wb") as f:
                    f.truncate(self.size)
                spec = f"aio:{image}"
            v = Vbd(i, spec)
            device = tapctl("create", "-a", spec).strip()
            match = re.search(r"([0-9]+)$", device)
            assert match is not None, device
            v.minor = int(match.group(1))
            for line in tapctl("list", "-m", str(v.minor)).splitlines():
                fields = dict(f.split("=", 1) for f in line.split())
                if "pid" in fields:
                    v.pid = int(fields["pid"])
            self.vbds.append(v)

    def teardown(self) -> None:
        for v in self.vbds:
            if v.pid:
                try:
                    tapctl("destroy", "-p", str(v.pid), "-m", str(v.minor))
                except RuntimeError as exc:
                    v.errors.append(f"destroy: {exc}")

    # ------------------------------------------------------------------ threads

    def worker(self, v: Vbd, seed: int) -> None:
        rng = random.Random(seed)
        counter = 0
        pages = self.size // PAGE
        while not self.stop.is_set():
            h = nbd.NBD()
            try:
                h.connect_uri(self.uri(v))
                v.connects += 1
                for _ in range(rng.randint(20, 200)):
                    if self.stop.is_set():
                        break
                    roll = rng.random()
                    if roll < 0.45 or not v.pages:
                        page = rng.randrange(pages)
                        counter += 1
                        data = page_data(v.index, counter, page)
                        h.pwrite(data, page * PAGE)
                        v.pages[page] = counter
                    elif roll < 0.95:
                        page = rng.choice(list(v.pages))
                        got = h.pread(PAGE, page * PAGE)
                        if got != page_data(v.index, v.pages[page], page):
                            v.mismatches.append(f"page {page}: {got[:28].hex()}")
                    else:
                        h.flush()
                    v.ops += 1
                    v.bytes += PAGE
                h.shutdown()
            except nbd.Error as exc:
                v.errors.append(f"{time.strftime('%H:%M:%S')} {exc}")
                if len(v.errors) > 20:
                    return
                time.sleep(0.1)

    def churn(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.wait(self.args.pause_every):
            v = rng.choice(self.vbds)
            try:
                tapctl("pause", "-p", str(v.pid), "-m", str(v.minor))
                time.sleep(rng.uniform(0.02, 0.1))
                tapctl("unpause", "-p", str(v.pid), "-m", str(v.minor))
                self.pauses += 1
            except RuntimeError as exc:
                self.pause_errors.append(str(exc))

    def sample(self, started: float) -> None:
        while True:
            row: dict[str, Any] = {"t": round(time.monotonic() - started, 2),
                                   "rss_kib": {}, "fds": {}}
            for v in self.vbds:
                try:
                    with open(f"/proc/{v.pid}/status") as f:
                        rss = next(int(line.split()[1]) for line in f
                                   if line.startswith("VmRSS:"))
                    fds = len(os.listdir(f"/proc/{v.pid}/fd"))
                except (FileNotFoundError, StopIteration):
                    rss, fds = -1, -1
                row["rss_kib"][str(v.index)] = rss
                row["fds"][str(v.index)] = fds
            self.samples.append(row)
            if self.stop.wait(self.args.interval):
                return

    def final_verify(self) -> None:
        for v in self.vbds:
            h = nbd.NBD()
            try:
                h.connect_uri(self.uri(v))
                for page, counter in v.pages.items():
                    if h.pread(PAGE, page * PAGE) != page_data(v.index, counter, page):
                        v.mismatches.append(f"final: page {page}")
                h.shutdown()
            except nbd.Error as exc:
                v.errors.append(f"final verify: {exc}")

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.setup()
        setup_seconds = time.monotonic() - t0
        started = time.monotonic()
        seed = self.args.seed
        threads = [threading.Thread(target=self.worker, args=(v, seed + v.index))
                   for v in self.vbds]
        threads.append(threading.Thread(target=self.churn, args=(seed,)))
        sampler = threading.Thread(target=self.sample, args=(started,))
        sampler.start()
        for t in threads:
            t.start()
        try:
            self.stop.wait(self.args.seconds)
        finally:
            self.stop.set()
            for t in threads:
                t.join()
            sampler.join()
        duration = time.monotonic() - started
        self.final_verify()
        dead = [v.index for v in self.vbds if not os.path.exists(f"/proc/{v.pid}")]
        self.teardown()
        return {
            "settings": {k: v for k, v in vars(self.args).items() if k != "json"},
            "setup_seconds": round(setup_seconds, 2),
            "seconds": round(duration, 2),
            "operations": sum(v.ops for v in self.vbds),
            "bytes": sum(v.bytes for v in self.vbds),
            "connections": sum(v.connects for v in self.vbds),
            "pauses": self.pauses,
            "pause_errors": self.pause_errors[:20],
            "io_errors": sum(len(v.errors) for v in self.vbds),
            "io_error_samples": [e for v in self.vbds for e in v.errors][:20],
            "mismatches": sum(len(v.mismatches) for v in self.vbds),
            "mismatch_samples": [m for v in self.vbds for m in v.mismatches][:20],
            "pages_verified_at_end": sum(len(v.pages) for v in self.vbds),
            "dead_tapdisks": dead,
            "samples": self.samples,
        }


def release_all() -> None:
    """After an aborted run: destroy every VBD of the run directory, free dead minors
    (their sockets, mounts, loop devices and links go with them)."""
    listing = subprocess.run([TAP_CTL, "list"], capture_output=True, text=True, timeout=60)
    for line in listing.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "minor" not in fields:
            continue
        if "pid" in fields:
            subprocess.run([TAP_CTL, "destroy", "-p", fields["pid"], "-m", fields["minor"]],
                           capture_output=True, timeout=60)
        else:
            subprocess.run([TAP_CTL, "free", "-m", fields["minor"]], capture_output=True,
                           timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vbds", type=int, default=32)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--size-mib", type=int, default=32)
    p.add_argument("--interval", type=float, default=1.0, help="sampling period (s)")
    p.add_argument("--pause-every", type=float, default=0.5,
                   help="seconds between two pause/unpause of a random VBD")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    own_run = "BLKTAP_RUN_DIR" not in os.environ
    run_dir = os.environ.get("BLKTAP_RUN_DIR") or tempfile.mkdtemp(prefix="blktap-soak-")
    os.environ["BLKTAP_RUN_DIR"] = run_dir
    os.environ.setdefault("BLKTAP_DEV_DIR", os.path.join(run_dir, "dev"))
    os.environ.setdefault("BLKTAP_BLOCKDEV", "off")
    work = tempfile.mkdtemp(prefix="blktap-soak-img-")
    soak = Soak(args, run_dir, work)
    try:
        result = soak.run()
    finally:
        release_all()
        soak.stop.set()
        shutil.rmtree(work, ignore_errors=True)
        if own_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    failed = result["io_errors"] or result["mismatches"] or result["dead_tapdisks"] \
        or result["pause_errors"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
