#!/usr/bin/env python3
"""The project's benchmark: our tapdisk against qemu-nbd, nbdkit, qemu-storage-daemon and
the kernel's loop device, in one run; a JSON of every number and a Markdown report with
PNG plots rendered from it.

    bench/run --quick                 # about 3 minutes: short runs, a subset of the cases
    bench/run                         # full mode: every case, 10 s x 3 repetitions (~1 h)
    bench/run --render RUN.json       # the report again from a JSON (never hand-edited)
    bench/run --render RUN.json --compare OLD.json   # what changed since an earlier run
    bench/run --quick --compare OLD.json             # run, then compare

Sections (see docs/performance.md for what each measures):
  nbd       the NBD export on raw buffered, raw O_DIRECT, an allocated dynamic VHD and
            first writes into an empty dynamic VHD (nbd-compare's five workloads);
  nbd-driver  a remote raw image (nbdkit) re-exported by our tapdisk with the image
            nbd:SOCKET against qemu-nbd's own NBD client (bench/nbd_driver_compare.py);
  scaling   4 KiB random reads/writes at queue depth 1..128 and 1..8 connections;
  blockdev  fio (io_uring, O_DIRECT) on our tapdev, on qemu-storage-daemon's FUSE export
            under a loop device, and on a loop device straight on the image;
  control   tap-ctl create + destroy latency, devices created in parallel;
  memory    tapdisk RSS idle, with one VBD, with 32 NBD connections;
  vhd       vhd-util coalesce against a plain copy; reads through chains of depth 1..32.

Everything the run makes (servers, tapdisks, loop devices, FUSE mounts, images in the
scratch directory) is removed at the end, also when interrupted (Ctrl-C, SIGTERM): the
JSON then holds what was measured so far. Exit status: 0, 1 if some case failed, 130 if
interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import blockdevs
import memory
import nbd_driver_compare
import report
import tapctl_create
import vhd_chain_depth
import vhd_coalesce
from compare_runner import NBD_COMPARE, Group, run_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVE = ROOT / "bench" / "serve_tapdisk.py"
DEFAULT_WORKLOADS = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32",
                     "read-1m-qd8", "write-1m-qd8"]
SECTIONS = ("nbd", "nbd-driver", "scaling", "blockdev", "control", "memory", "vhd")
MiB = 1 << 20


@dataclass
class Plan:
    """What one mode runs. Quick mode keeps every section, with fewer cases and short runs."""

    mode: str
    runtime: float
    repeat: int
    image_mib: int
    fio_timeout: float
    direct_workloads: list[str]
    vhd_workloads: list[str]
    first_write_workloads: list[str]
    scaling_rw: list[str]
    scaling_qd: list[int]
    scaling_conns: list[int]
    conns_qd: int
    blockdev_workloads: list[str]
    control_rounds: int
    control_parallel: int
    memory_kinds: list[str]
    coalesce_mib: int
    coalesce_rounds: int
    chain_layouts: list[str]
    chain_depths: list[int]
    chain_mib: int
    chain_seconds: float
    chain_repeat: int
    chain_fio: bool
    buffered_workloads: list[str] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))


QUICK = Plan(
    mode="quick", runtime=1.0, repeat=1, image_mib=128, fio_timeout=30,
    direct_workloads=["randread-4k-qd32", "write-1m-qd8"],
    vhd_workloads=["randread-4k-qd32", "randwrite-4k-qd32"],
    first_write_workloads=["randwrite-4k-qd32"],
    scaling_rw=["randread"], scaling_qd=[1, 128], scaling_conns=[1, 4], conns_qd=16,
    blockdev_workloads=["randread-4k-qd32", "randwrite-4k-qd32"],
    control_rounds=5, control_parallel=20, memory_kinds=["aio"],
    coalesce_mib=64, coalesce_rounds=1,
    chain_layouts=["spread"], chain_depths=[1, 4, 16, 32], chain_mib=32, chain_seconds=0.3,
    chain_repeat=1, chain_fio=False,
)

FULL = Plan(
    mode="full", runtime=10.0, repeat=3, image_mib=1024, fio_timeout=60,
    direct_workloads=list(DEFAULT_WORKLOADS), vhd_workloads=list(DEFAULT_WORKLOADS),
    first_write_workloads=["randwrite-4k-qd32", "write-1m-qd8"],
    scaling_rw=["randread", "randwrite"], scaling_qd=[1, 4, 16, 64, 128],
    scaling_conns=[1, 2, 4, 8], conns_qd=16,
    blockdev_workloads=list(DEFAULT_WORKLOADS),
    control_rounds=20, control_parallel=100, memory_kinds=["aio", "vhd"],
    coalesce_mib=1024, coalesce_rounds=3,
    chain_layouts=["base", "spread", "scatter"], chain_depths=[1, 4, 16, 32], chain_mib=256,
    chain_seconds=3.0, chain_repeat=3, chain_fio=True,
)


class Progress:
    """One stderr line per finished case: ``[done/total] elapsed  what``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        left = self.total - self.done
        print(f"[{self.done:3d}/{self.total}] {time.monotonic() - self.start:6.1f}s  "
              f"{left:3d} left  {label}", file=sys.stderr, flush=True)

    def note(self, label: str) -> None:
        print(f"[{self.done:3d}/{self.total}] {time.monotonic() - self.start:6.1f}s  "
              f"          {label}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ the machine
def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(workdir: str) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    fs = _first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", workdir])
    return {"hostname": platform.node(), "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(), "mem_gib": round(mem_kib / 1024 / 1024, 1),
            "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
            "scratch_dir": workdir, "scratch_fs": fs, "loadavg_start": list(os.getloadavg())}


def versions() -> dict[str, str]:
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed"
    return {"blktap": commit + (" (src modified)" if dirty else ""),
            "python": platform.python_version(), "uvloop": uv,
            "fio": _first_line(["fio", "--version"]),
            "qemu-nbd": _first_line(["qemu-nbd", "--version"]),
            "nbdkit": _first_line(["nbdkit", "--version"]),
            "qemu-storage-daemon": _first_line(["qemu-storage-daemon", "--version"]),
            "libnbd": _first_line(["nbdinfo", "--version"])}


# ---------------------------------------------------------------------------- images
def make_random(path: str, mib: int) -> None:
    """``mib`` MiB of random bytes: nothing sparse, nothing compressible."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))


def warm(*paths: str) -> None:
    """Drop the files from the page cache and read them back 4 KiB at a time, readahead off.

    A file read with readahead (e.g. by ``cat``) sits in large folios, into which a buffered
    4 KiB pwrite costs several times more than into 4 KiB pages: every server then starts
    from the same page-cache state, whatever made the file.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            buf = bytearray(4096)
            offset = 0
            while (n := os.preadv(fd, [buf], offset)) > 0:
                offset += n
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- groups
def _tapdisk(options: str, image: str = "aio:{image}") -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVE))} {options} " \
           f"--socket {{socket}} {image}"


def nbd_groups(plan: Plan, raw: str, vhd: str, empty: str, fresh: str) -> list[Group]:
    """The four NBD comparisons: ours first in each (the column ratios are computed to)."""
    # Each run: no dirty pages left by the previous server, then a new copy of the empty
    # VHD under a new name (truncating the last run's file would cost the next server).
    seed = f"sync && f={{image}}.$$ && cp --sparse=always {shlex.quote(empty)} \"$f\" && exec"
    return [
        Group("raw-buffered", "nbd", "Raw image, buffered (page cache)", raw,
              plan.buffered_workloads, "tapdisk",
              servers=[("tapdisk", _tapdisk("--no-direct")),
                       ("qemu-nbd", "qemu-nbd -t -e 16 -f raw -k {socket} {image}"),
                       ("nbdkit", "nbdkit -f -U {socket} file {image}")],
              note="ours with NO_O_DIRECT; qemu-nbd and nbdkit with their default caching"),
        Group("raw-direct", "nbd", "Raw image, O_DIRECT", raw, plan.direct_workloads,
              "tapdisk",
              servers=[("tapdisk", _tapdisk("")),
                       ("qemu-nbd", "qemu-nbd -t -e 16 -f raw --cache=none --aio=native "
                                    "-k {socket} {image}")],
              note="nbdkit has no O_DIRECT mode for its file plugin: not in this group"),
        Group("vhd-allocated", "nbd", "Fully allocated dynamic VHD, buffered", vhd,
              plan.vhd_workloads, "tapdisk",
              servers=[("tapdisk", _tapdisk("--no-direct", "vhd:{image}")),
                       ("qemu-nbd", "qemu-nbd -t -e 16 -f vpc -k {socket} {image}")],
              note="every block allocated (vhd-util create + fill, random data); "
                   "nbdkit reads no VHD"),
        Group("vhd-first-writes", "nbd", "First writes into an empty dynamic VHD, buffered",
              fresh, plan.first_write_workloads, "tapdisk",
              servers=[("tapdisk", f"{seed} " + _tapdisk("--no-direct", 'vhd:"$f"')),
                       ("qemu-nbd", f'{seed} qemu-nbd -t -e 16 -f vpc -k {{socket}} "$f"')],
              note="each fio run starts on a fresh empty 8 GiB dynamic VHD: writes allocate "
                   "blocks (2 MiB each) as they go"),
    ]


def scaling_groups(plan: Plan, raw: str) -> list[Group]:
    servers = [("tapdisk", _tapdisk("--no-direct")),
               ("qemu-nbd", "qemu-nbd -t -e 16 -f raw -k {socket} {image}"),
               ("nbdkit", "nbdkit -f -U {socket} file {image}")]
    groups = [Group("scaling-qd", "scaling", "4 KiB random I/O by queue depth (1 connection)",
                    raw, [f"{rw}-4k-qd{qd}" for rw in plan.scaling_rw for qd in plan.scaling_qd],
                    "tapdisk", servers=servers, params={"axis": "qd"},
                    note="raw image, buffered, one NBD connection")]
    for n in plan.scaling_conns:
        groups.append(Group(f"scaling-conns-{n}", "scaling",
                            f"4 KiB random I/O, {n} connection(s) at QD{plan.conns_qd} each",
                            raw, [f"{rw}-4k-qd{plan.conns_qd}" for rw in plan.scaling_rw],
                            "tapdisk", servers=servers, numjobs=n,
                            params={"axis": "conns", "connections": n},
                            note="fio numjobs = NBD connections (multi-conn)"))
    return groups


def blockdev_group(plan: Plan, raw: str, devices: dict[str, str]) -> Group:
    return Group("blockdev", "blockdev", "Kernel block device: fio io_uring O_DIRECT", raw,
                 plan.blockdev_workloads, "tapdev",
                 files=list(devices.items()),
                 params={"limits": ["loop"]},
                 note="tapdev = our FUSE file + loop device; qsd-fuse+loop = "
                      "qemu-storage-daemon's FUSE export + loop device; loop = loop device "
                      "straight on the image file (the host's limit, not a peer)")


# --------------------------------------------------------------------------- sections
class Runner:
    """Runs the sections of one plan into ``self.doc``; a failed case is recorded in
    ``doc["errors"]`` and the run goes on."""

    def __init__(self, plan: Plan, sections: list[str], workdir: str, runtime: float,
                 repeat: int) -> None:
        self.plan = plan
        self.sections = sections
        self.workdir = workdir
        self.runtime = runtime
        self.repeat = repeat
        self.doc: dict[str, Any] = {"groups": [], "errors": []}
        self.progress = Progress(self.count())

    def needs_images(self) -> bool:
        return bool({"nbd", "nbd-driver", "scaling", "blockdev"} & set(self.sections))

    def count(self) -> int:
        p = self.plan
        n = 1 if self.needs_images() else 0
        dummy = "x"
        if "nbd" in self.sections:
            n += sum(g.fio_runs(self.repeat) for g in nbd_groups(p, dummy, dummy, dummy, dummy))
        if "nbd-driver" in self.sections:
            n += nbd_driver_compare.group(dummy, dummy, dummy,
                                          p.buffered_workloads).fio_runs(self.repeat)
        if "scaling" in self.sections:
            n += sum(g.fio_runs(self.repeat) for g in scaling_groups(p, dummy))
        if "blockdev" in self.sections:
            n += 3 * len(p.blockdev_workloads) * self.repeat + 1
        if "control" in self.sections:
            n += 1
        if "memory" in self.sections:
            n += len(p.memory_kinds)
        if "vhd" in self.sections:
            n += 1 + p.coalesce_rounds
            chains = len(p.chain_layouts) * len(p.chain_depths)
            n += chains + chains * p.chain_repeat
        return n

    def guarded(self, section: str, fn: Callable[[], None]) -> None:
        if not section.startswith(("raw-", "vhd-", "scaling-")):  # groups say it themselves
            self.progress.note(f"running {section}")
        try:
            fn()
        except Exception as e:  # one broken case must not lose the others' numbers
            msg = f"{type(e).__name__}: {e}"
            self.doc["errors"].append({"section": section, "error": msg})
            self.progress.note(f"{section}: FAILED: {msg}")

    def group(self, g: Group) -> None:
        # Every group starts with no dirty pages (an earlier group's buffered writes would
        # otherwise be written back under this one) and its image's pages in the same state.
        self.progress.note(f"running {g.id}: {len(g.workloads)} workload(s) x {g.columns()} "
                           f"column(s) x {self.repeat}, {self.runtime:g} s each")
        os.sync()
        warm(g.image)
        load = os.getloadavg()[0]
        date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        done = run_group(g, self.runtime, self.repeat, self.workdir, self.progress.step,
                         self.plan.fio_timeout)
        done.update(date=date.replace("+00:00", "Z"), loadavg=[load, os.getloadavg()[0]])
        self.doc["groups"].append(done)

    def run(self) -> None:
        p = self.plan
        w = self.workdir
        raw = os.path.join(w, "disk.raw")
        vhd = os.path.join(w, "disk.vhd")
        empty = os.path.join(w, "empty.vhd")
        fresh = os.path.join(w, "fresh.vhd")
        if self.needs_images():
            make_random(raw, p.image_mib)
            subprocess.run([sys.executable, str(ROOT / "bench" / "vhd_make.py"), raw, vhd],
                           check=True)
            subprocess.run([str(BIN / "vhd-util"), "create", "-n", empty, "-s", "8192"],
                           check=True)
            shutil.copyfile(empty, fresh)
            self.doc["images"] = {"raw_mib": p.image_mib, "empty_vhd_mib": 8192}
            self.progress.step(f"images: {p.image_mib} MiB raw (random data), the same as "
                               "an allocated dynamic VHD, an empty 8 GiB dynamic VHD")
        if "nbd" in self.sections:
            for g in nbd_groups(p, raw, vhd, empty, fresh):
                self.guarded(g.id, partial(self.group, g))
        if "nbd-driver" in self.sections:
            self.guarded("nbd-driver", lambda: self.nbd_driver(raw))
        if "scaling" in self.sections:
            for g in scaling_groups(p, raw):
                self.guarded(g.id, partial(self.group, g))
        if "blockdev" in self.sections:
            self.guarded("blockdev", lambda: self.blockdev(raw))
        if "control" in self.sections:
            self.guarded("control", self.control)
        if "memory" in self.sections:
            self.guarded("memory", self.memory)
        if "vhd" in self.sections:
            self.guarded("coalesce", self.coalesce)
            self.guarded("chain-depth", self.chain_depth)

    def nbd_driver(self, raw: str) -> None:
        sockdir = tempfile.mkdtemp(prefix="ndc-", dir="/tmp")  # short socket paths
        try:
            with nbd_driver_compare.remote_server(raw, sockdir) as (remote, cmd):
                self.group(nbd_driver_compare.group(raw, remote, cmd,
                                                    self.plan.buffered_workloads))
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)

    def blockdev(self, raw: str) -> None:
        with ExitStack() as stack:
            run_dir = tempfile.mkdtemp(prefix="td-", dir=self.workdir)
            devices = {"tapdev": blockdevs.tapdev(stack, raw, run_dir)}
            export, qsd_cmd = blockdevs.qsd_fuse(stack, raw, self.workdir)
            devices["qsd-fuse+loop"] = blockdevs.losetup(stack, export)
            devices["loop"] = blockdevs.losetup(stack, raw)
            dio = {name: blockdevs.loop_dio(dev) for name, dev in devices.items()}
            self.progress.step("blockdev: devices up (" + ", ".join(
                f"{n} {d} dio={dio[n]}" for n, d in devices.items()) + ")")
            g = blockdev_group(self.plan, raw, devices)
            g.params.update(devices=devices, loop_direct_io=dio, qsd_command=qsd_cmd)
            self.group(g)

    def control(self) -> None:
        p = self.plan
        r = tapctl_create.measure(p.control_rounds, p.control_parallel, "off")
        self.doc["control"] = r
        self.progress.step(
            f"control: create median {statistics.median(r['create_ms']):.0f} ms, "
            f"{p.control_parallel} in parallel {r['parallel_create_s']:.1f} s")

    def memory(self) -> None:
        self.doc["memory"] = []
        for kind in self.plan.memory_kinds:
            m: dict[str, Any] = {**memory.measure(32, kind), "kind": kind}
            self.doc["memory"].append(m)
            self.progress.step(f"memory {kind}: idle {m['idle_kib'] / 1024:.1f} MiB, "
                               f"32 connections {m['busy_kib'] / 1024:.1f} MiB")

    def coalesce(self) -> None:
        p = self.plan
        work = tempfile.mkdtemp(prefix="coalesce-", dir=self.workdir)
        try:
            base, child, raw = vhd_coalesce.build(work, p.coalesce_mib * MiB)
            self.progress.step(f"coalesce: built a {p.coalesce_mib} MiB child")
            co: list[float] = []
            cp: list[float] = []
            for r in range(p.coalesce_rounds):
                co.append(vhd_coalesce.time_coalesce(work, base, child))
                cp.append(vhd_coalesce.time_copy(work, raw))
                self.progress.step(f"coalesce round {r + 1}: coalesce {co[-1]:.2f} s, "
                                   f"copy {cp[-1]:.2f} s")
            self.doc["coalesce"] = {"size_mib": p.coalesce_mib, "coalesce_s": co, "copy_s": cp}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def chain_depth(self) -> None:
        p = self.plan
        work = tempfile.mkdtemp(prefix="chain-", dir=self.workdir)
        size = p.chain_mib * MiB
        results: list[dict[str, Any]] = []
        self.doc["chain_depth"] = {"size_mib": p.chain_mib, "seconds": p.chain_seconds,
                                   "repeat": p.chain_repeat, "results": results}
        try:
            leaves = {}
            for layout in p.chain_layouts:
                for depth in p.chain_depths:
                    leaves[layout, depth] = vhd_chain_depth.build_chain(work, depth, layout,
                                                                        size, 1)
                    self.progress.step(f"chain: built {layout} depth {depth}")
            for rep in range(p.chain_repeat):
                for layout in p.chain_layouts:
                    for depth in p.chain_depths:
                        leaf = leaves[layout, depth]
                        first, warm_iops = vhd_chain_depth.run_inproc(leaf, p.chain_seconds,
                                                                      1 + rep)
                        row = {"layout": layout, "depth": depth, "repeat": rep,
                               "first": first, "warm": warm_iops}
                        if p.chain_fio:
                            row["fio"] = vhd_chain_depth.run_fio(leaf, p.chain_seconds)
                        results.append(row)
                        self.progress.step(f"chain {layout} depth {depth}: warm "
                                           f"{warm_iops:.0f} IOPS")
        finally:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------ main
def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def benchmark(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    plan = QUICK if args.quick else FULL
    sections = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s): {', '.join(sorted(unknown))}")
    if not NBD_COMPARE.exists():
        raise SystemExit(f"{NBD_COMPARE} is missing")
    runtime = args.runtime if args.runtime is not None else plan.runtime
    if runtime < 1:
        raise SystemExit("--runtime must be at least 1 (whole seconds)")
    repeat = args.repeat if args.repeat is not None else plan.repeat
    os.makedirs(args.dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="blktap-bench-", dir=args.dir)
    started = datetime.datetime.now(datetime.UTC)
    doc: dict[str, Any] = {
        "schema": 1, "mode": plan.mode,
        "date": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "command": "bench/run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "runtime_s": runtime, "repeat": repeat, "sections": sections,
        "plan": {k: v for k, v in vars(plan).items()},
        "machine": machine_info(workdir), "versions": versions(),
    }
    runner = Runner(plan, sections, workdir, runtime, repeat)
    print(f"bench: {plan.mode} mode, {runner.progress.total} cases, scratch {workdir}",
          file=sys.stderr)
    status = 0
    t0 = time.monotonic()
    try:
        runner.run()
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        doc["interrupted"] = True
        status = 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc.update(runner.doc)
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    if doc["errors"] and not status:
        status = 1
    return doc, status


def merge(old_path: str, new: dict[str, Any]) -> dict[str, Any]:
    """``old_path``'s run with the groups of ``new``'s sections replaced by ``new``'s (and
    its other results of those sections), recorded under ``refreshed``."""
    with open(old_path) as f:
        old: dict[str, Any] = json.load(f)
    sections = new["sections"]
    old["groups"] = [g for g in old.get("groups", []) if g["section"] not in sections]
    old["groups"] += new.get("groups", [])
    for key in ("control", "memory", "coalesce", "chain_depth"):
        if key in new:
            old[key] = new[key]
    old.setdefault("errors", []).extend(new.get("errors", []))
    old.setdefault("refreshed", []).append({
        "sections": sections, "date": new["date"], "command": new["command"],
        "runtime_s": new["runtime_s"], "repeat": new["repeat"],
        "loadavg_start": new["machine"]["loadavg_start"][0],
        "loadavg_end": new["machine"]["loadavg_end"][0],
        "blktap": new["versions"]["blktap"], "from": os.path.basename(old_path)})
    return old


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the ~3 minute subset")
    ap.add_argument("--render", metavar="JSON", help="render the report of an earlier run")
    ap.add_argument("--compare", metavar="OLD_JSON", help="print what changed since OLD_JSON")
    ap.add_argument("--out", default=str(ROOT / "bench-results"),
                    help="where a run writes RUN.json, RUN.md and RUN-plots/ "
                         "(default bench-results/)")
    ap.add_argument("--report", metavar="MD", help="Markdown path (default: next to the JSON)")
    ap.add_argument("--plots", metavar="DIR", help="PNG directory (default: MD-plots/)")
    ap.add_argument("--headline-into", metavar="FILE", action="append", default=[],
                    help="replace the headline table between the bench markers in FILE")
    ap.add_argument("--history", metavar="DIR", help="list earlier runs' JSON files of DIR")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    # Whole seconds: fio reads a runtime of 0.5 as 0, which means no time limit at all.
    ap.add_argument("--runtime", type=int, help="seconds per fio run, a whole number "
                    "(overrides the mode)")
    ap.add_argument("--repeat", type=int, help="repetitions of each fio run")
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory (default /var/tmp)")
    ap.add_argument("--merge-into", metavar="OLD_JSON",
                    help="with --sections: run those sections and write OLD_JSON's run with "
                         "their groups replaced by the new ones (the page then says which "
                         "sections were refreshed, when, and at what load)")
    args = ap.parse_args()
    if args.merge_into and not args.sections:
        ap.error("--merge-into needs --sections")

    status = 0
    if args.render:
        json_path = args.render
        with open(json_path) as f:
            doc = json.load(f)
    else:
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGHUP, _interrupt)
        doc, status = benchmark(args)
        os.makedirs(args.out, exist_ok=True)
        stamp = doc["date"].replace(":", "").replace("-", "")
        json_path = os.path.join(args.out, f"bench-{doc['mode']}-{stamp}.json")
        if args.merge_into:
            doc = merge(args.merge_into, doc)
            fresh = "+".join(doc["refreshed"][-1]["sections"])
            json_path = os.path.join(args.out,
                                     f"{Path(args.merge_into).stem}+{fresh}-{stamp}.json")
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"bench: JSON {json_path} ({doc['duration_s']:.0f} s)", file=sys.stderr)
    md = args.report or str(Path(json_path).with_suffix(".md"))
    plots = args.plots or str(Path(md).with_name(Path(md).stem + "-plots"))
    report.render(doc, json_path, md, plots, history=args.history)
    print(f"bench: report {md}, plots in {plots}", file=sys.stderr)
    for path in args.headline_into:
        report.headline_into(doc, path, md)
    print(report.headline_text(doc))
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        print(report.compare_text(old, doc, args.compare))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
