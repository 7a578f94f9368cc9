"""Our block device with FUSE passthrough, without it, and a loop device on the file.

One run, one raw image, fio io_uring O_DIRECT on each device in turn, interleaved per
workload (a changing machine load then hits every device alike):

* ``passthrough``: ``tap-ctl create`` (BLKTAP_BLOCKDEV=on): the kernel reads and writes
  the image file itself;
* ``fallback``: the same with BLKTAP_FUSE_PASSTHROUGH=off: tapdisk serves every request;
* ``loop``: a loop device straight on the image (the limit of this host).

Prints a table (IOPS for 4 KiB workloads, MiB/s for 1 MiB ones) and, with ``--json``,
the numbers. A benchmark, not a test: nothing is asserted. Needs root, fio, losetup.

    .venv/bin/python bench/blockdev_passthrough.py [--size-mib 1024] [--runtime 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blockdevs import WORKLOADS, losetup, tapdev

DEVICES = ("passthrough", "fallback", "loop")


def fio(device: str, rw: str, bs: str, depth: int, runtime: int) -> dict[str, float]:
    proc = subprocess.run(
        ["fio", "--name=b", f"--filename={device}", "--ioengine=io_uring", "--direct=1",
         f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--time_based",
         f"--runtime={runtime}", "--ramp_time=1", "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=runtime + 120)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "MiB/s": side["bw_bytes"] / (1 << 20)}


def stats_of(run_dir: str) -> dict[str, object]:
    env = dict(os.environ, BLKTAP_RUN_DIR=run_dir)
    tap_ctl = str(Path(sys.executable).parent / "tap-ctl")
    doc = json.loads(subprocess.run([tap_ctl, "list", "--json"], capture_output=True,
                                    text=True, env=env, check=True).stdout)
    return {"block_device_io": doc[0].get("block_device_io") if doc else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--dir", default=None, help="where the image goes (default: /var/tmp)")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    # The devices go (ExitStack) before their directory.
    with tempfile.TemporaryDirectory(dir=ns.dir or "/var/tmp") as work, ExitStack() as stack:
        image = os.path.join(work, "disk.raw")
        subprocess.run(["fallocate", "-l", f"{ns.size_mib}M", image], check=True)
        subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M",
                        f"count={ns.size_mib}", "conv=notrunc", "status=none"], check=True)
        devices: dict[str, str] = {}
        saved = os.environ.get("BLKTAP_FUSE_PASSTHROUGH")
        for name, mode in (("passthrough", "auto"), ("fallback", "off")):
            run_dir = os.path.join(work, name)
            os.makedirs(run_dir)
            os.environ["BLKTAP_FUSE_PASSTHROUGH"] = mode
            devices[name] = tapdev(stack, image, run_dir)
            io_path = stats_of(run_dir)["block_device_io"]
            print(f"{name}: {devices[name]} (block_device_io={io_path})", file=sys.stderr)
        if saved is None:
            os.environ.pop("BLKTAP_FUSE_PASSTHROUGH", None)
        else:
            os.environ["BLKTAP_FUSE_PASSTHROUGH"] = saved
        devices["loop"] = losetup(stack, image)
        for wl, rw, bs, depth, unit in WORKLOADS:
            for dev in DEVICES:
                results.setdefault(wl, {})[dev] = fio(devices[dev], rw, bs, depth,
                                                      ns.runtime)[unit]
    load = os.getloadavg()[0]
    print(f"fio io_uring O_DIRECT, {ns.size_mib} MiB raw image, {ns.runtime} s per run, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs (noisy)")
    print(f"{'workload':20} {'passthrough':>12} {'fallback':>10} {'loop':>10} "
          f"{'pt/loop':>8} {'fb/loop':>8}")
    for wl, _rw, _bs, _depth, unit in WORKLOADS:
        r = results[wl]
        print(f"{wl + ' (' + unit + ')':20} {r['passthrough']:12.0f} {r['fallback']:10.0f} "
              f"{r['loop']:10.0f} {r['passthrough'] / r['loop']:8.2f} "
              f"{r['fallback'] / r['loop']:8.2f}")
    if ns.json:
        print(json.dumps({"load": load, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
