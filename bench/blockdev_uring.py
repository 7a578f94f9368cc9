"""Our block device served through /dev/fuse against FUSE over io_uring, with peers.

One run, fio io_uring O_DIRECT on each device in turn, interleaved per workload and
repetition (a changing machine load then hits every device alike), FUSE passthrough off:

* ``raw-dev`` / ``raw-uring``: ``tap-ctl create -a aio:RAW`` (BLKTAP_BLOCKDEV=on),
  BLKTAP_FUSE_URING=off / on;
* ``vhd-dev`` / ``vhd-uring``: the same on a fully allocated dynamic VHD (``vhd:``) of
  the same bytes;
* ``qsd-fuse``: qemu-storage-daemon's FUSE export of RAW (cache.direct, aio=native) with
  a loop device on it;
* ``loop``: a loop device straight on RAW (the host's limit).

Prints medians (IOPS for 4 KiB workloads, MiB/s for 1 MiB ones), and the server's CPU
time per request (user+system of the tapdisk or qemu-storage-daemon process over the fio
run divided by the requests fio completed; the kernel's own work in the loop and FUSE
layers is not in it). A benchmark, not a test: nothing is asserted. Needs root, fio,
losetup, qemu-img, qemu-storage-daemon, and the fuse module parameter enable_uring=Y
(this script turns it on for its run and puts the old value back).

    .venv/bin/python bench/blockdev_uring.py [--size-mib 1024] [--runtime 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blockdevs import WORKLOADS, losetup, qsd_fuse, tapdev

URING_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
TICK = os.sysconf("SC_CLK_TCK")


def fio(device: str, rw: str, bs: str, depth: int, runtime: int) -> dict[str, float]:
    proc = subprocess.run(
        ["fio", "--name=b", f"--filename={device}", "--ioengine=io_uring", "--direct=1",
         f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--time_based",
         f"--runtime={runtime}", "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=runtime + 120)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "MiB/s": side["bw_bytes"] / (1 << 20),
            "ios": side["total_ios"]}


def cpu_seconds(pid: int) -> float:
    """User + system time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tapdisk_pid(run_dir: str) -> int:
    env = dict(os.environ, BLKTAP_RUN_DIR=run_dir)
    tap_ctl = str(Path(sys.executable).parent / "tap-ctl")
    doc = json.loads(subprocess.run([tap_ctl, "list", "--json"], capture_output=True,
                                    text=True, env=env, check=True).stdout)
    return int(doc[0]["pid"])


def blockdev_stats(run_dir: str) -> dict[str, object]:
    env = dict(os.environ, BLKTAP_RUN_DIR=run_dir)
    tap_ctl = str(Path(sys.executable).parent / "tap-ctl")
    pid = tapdisk_pid(run_dir)
    doc = json.loads(subprocess.run([tap_ctl, "stats", "-p", str(pid), "-m", "0"],
                                    capture_output=True, text=True, env=env,
                                    check=True).stdout)
    info: dict[str, object] = doc["blockdev"]
    return info


def qsd_pid(mountpoint: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"qemu-storage-daemon") and mountpoint.encode() in cmd:
                return int(entry)
    raise RuntimeError("qemu-storage-daemon's process not found")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the images go (default: /var/tmp)")
    ap.add_argument("--devices", default="raw-dev,raw-uring,vhd-dev,vhd-uring,qsd-fuse,loop")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    names = ns.devices.split(",")
    runs: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    saved = Path(URING_PARAMETER).read_text().strip()
    with tempfile.TemporaryDirectory(dir=ns.dir or "/var/tmp") as work, ExitStack() as stack:
        Path(URING_PARAMETER).write_text("Y")
        stack.callback(Path(URING_PARAMETER).write_text, saved)
        raw = os.path.join(work, "disk.raw")
        vhd = os.path.join(work, "disk.vhd")
        subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                        f"count={ns.size_mib}", "status=none"], check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                        "subformat=dynamic,force_size=on", raw, vhd], check=True)
        devices: dict[str, str] = {}
        pids: dict[str, int] = {}
        run_dirs: dict[str, str] = {}
        for name in names:
            if name in ("qsd-fuse", "loop"):
                continue
            kind, path = name.split("-")
            run_dir = os.path.join(work, name)
            os.makedirs(run_dir)
            env = {"BLKTAP_FUSE_PASSTHROUGH": "off",
                   "BLKTAP_FUSE_URING": "on" if path == "uring" else "off"}
            devices[name] = tapdev(stack, raw if kind == "raw" else vhd, run_dir,
                                   "aio" if kind == "raw" else "vhd", env)
            pids[name] = tapdisk_pid(run_dir)
            run_dirs[name] = run_dir
            info = blockdev_stats(run_dir)
            print(f"{name}: {devices[name]} io_path={info['io_path']} "
                  f"uring_reason={info.get('uring_reason')!r}", file=sys.stderr)
        if "qsd-fuse" in names:
            export, _cmd = qsd_fuse(stack, raw, work)
            pids["qsd-fuse"] = qsd_pid(export)
            devices["qsd-fuse"] = losetup(stack, export)
        if "loop" in names:
            devices["loop"] = losetup(stack, raw)
        for _rep in range(ns.reps):
            for wl, rw, bs, depth, unit in WORKLOADS:
                for dev in names:
                    before = cpu_seconds(pids[dev]) if dev in pids else 0.0
                    res = fio(devices[dev], rw, bs, depth, ns.runtime)
                    runs.setdefault(wl, {}).setdefault(dev, []).append(res[unit])
                    if dev in pids and res["ios"]:
                        used = cpu_seconds(pids[dev]) - before
                        cpu.setdefault(wl, {}).setdefault(dev, []).append(
                            used / res["ios"] * 1e6)
        stats = {name: blockdev_stats(d) for name, d in run_dirs.items()}
    load = os.getloadavg()
    print(f"fio io_uring O_DIRECT, {ns.size_mib} MiB image, {ns.runtime} s per run, "
          f"median of {ns.reps}, passthrough off; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'workload':22}" + "".join(f"{n:>11}" for n in names))
    med = {wl: {d: statistics.median(v) for d, v in r.items()} for wl, r in runs.items()}
    for wl, _rw, _bs, _depth, unit in WORKLOADS:
        print(f"{wl + ' (' + unit + ')':22}" + "".join(f"{med[wl][n]:11.0f}" for n in names))
    print("server CPU time per request (µs, median):")
    cmed = {wl: {d: statistics.median(v) for d, v in r.items()} for wl, r in cpu.items()}
    for wl, *_ in WORKLOADS:
        print(f"{wl:22}" + "".join(f"{cmed[wl].get(n, float('nan')):11.1f}" for n in names))
    for pair in (("raw-uring", "raw-dev"), ("vhd-uring", "vhd-dev")):
        if all(p in names for p in pair):
            print(f"{pair[0]} / {pair[1]}: " + ", ".join(
                f"{wl} {med[wl][pair[0]] / med[wl][pair[1]]:.2f}x" for wl, *_ in WORKLOADS))
    for name, info in stats.items():
        print(f"{name}: {json.dumps(info)}", file=sys.stderr)
    if ns.json:
        print(json.dumps({"load": load, "median": med, "cpu_us_per_request": cmed,
                          "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
