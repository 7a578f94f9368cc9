#!/usr/bin/env python3
"""tap-ctl create/destroy latency and tapdisk memory, variants interleaved in one run.

    .venv/bin/python bench/startup.py [--rounds 20] [--counts 1,10,100]
        [--before /tmp/before/src] [--variants after,no-forkserver,before]

Variants: ``after`` is this tree as installed; ``no-forkserver`` the same with
BLKTAP_FORKSERVER=off (every tapdisk a fresh interpreter); ``before`` runs the tap-ctl
console script with PYTHONPATH=--before (a checkout of an older commit's src/, e.g. from
``git worktree add /tmp/before COMMIT``), so tap-ctl and the tapdisks it spawns are that
commit's. Each round runs one create + destroy of every variant in turn (the order
rotates each round), so load on a shared machine hits all alike; medians and quartiles
are printed. Then, per variant and per count N: N VBDs created at once (one tapdisk
each, as tap-ctl create does), the wall time, the sum of the tapdisks' RSS and PSS
(/proc/PID/smaps_rollup) plus that of the variant's fork servers (the run directory's
tapdisk server and, for ``after``, the tap-ctl server), and the time to
destroy them all. Runs in private run directories; removes everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tapctl_create import TapCtl, quartiles

SERVER_COMM = "tapdisk-forksrv"


def variant_tapctl(name: str, run_dir: str, before: str | None) -> TapCtl:
    if name != "before":
        tc = TapCtl(run_dir, "off")
        tc.env.pop("PYTHONPATH", None)
        if name == "no-forkserver":
            tc.env["BLKTAP_FORKSERVER"] = "off"
        return tc
    if not before:
        raise SystemExit("variant 'before' needs --before SRC")
    # The console script as pip wrote it before the tap-ctl server (whose module the
    # older tree lacks); the tapdisk it spawns is the venv's script, with the old tree.
    script = os.path.join(run_dir, "tap-ctl-before")
    with open(script, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nfrom blktap.cli.tap_ctl import main\n"
                "sys.exit(main())\n")
    os.chmod(script, 0o755)
    tc = TapCtl(run_dir, "off", program=script)
    tc.env["PYTHONPATH"] = before
    return tc


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup; (0, 0) when gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def fork_servers(run_dir: str) -> list[int]:
    """Fork server processes whose environment names ``run_dir``."""
    wanted = f"BLKTAP_RUN_DIR={run_dir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != SERVER_COMM:
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def tapctl_servers() -> list[int]:
    """tap-ctl fork servers (one per installation and uid)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if entry.isdigit() and f.read().strip() == "tap-ctl-forksrv":
                    found.append(int(entry))
        except OSError:
            continue
    return found


def make_images(run_dir: str, count: int, size: int) -> list[str]:
    paths = []
    for i in range(count):
        path = os.path.join(run_dir, f"img{i}.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        paths.append(path)
    return paths


def latency(variants: list[str], rounds: int, before: str | None) -> None:
    dirs = {v: tempfile.mkdtemp(prefix=f"su-{v[:6]}-", dir="/tmp") for v in variants}
    tcs = {v: variant_tapctl(v, dirs[v], before) for v in variants}
    images = {v: make_images(dirs[v], 1, 64 << 20)[0] for v in variants}
    creates: dict[str, list[float]] = {v: [] for v in variants}
    destroys: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for v in variants:  # warm-up: starts each variant's fork server, fills caches
            tcs[v].run("create", "-a", f"aio:{images[v]}")
            tcs[v].destroy_all()
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                creates[v].append(tcs[v].timed("create", "-a", f"aio:{images[v]}"))
                ((pid, minor),) = tcs[v].vbds()
                destroys[v].append(tcs[v].timed("destroy", "-p", str(pid), "-m", str(minor)))
    finally:
        for v in variants:
            tcs[v].destroy_all()
            shutil.rmtree(dirs[v], ignore_errors=True)
    print(f"== create/destroy, {rounds} interleaved rounds (ms) load "
          f"{os.getloadavg()[0]:.1f}")
    for v in variants:
        print(f"{v:14s} create  {quartiles(creates[v])}")
        print(f"{v:14s} destroy {quartiles(destroys[v])}")


def memory(variant: str, count: int, before: str | None) -> str:
    run_dir = tempfile.mkdtemp(prefix=f"sm-{variant[:6]}-", dir="/tmp")
    tc = variant_tapctl(variant, run_dir, before)
    images = make_images(run_dir, count, 16 << 20)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(count, 100)) as pool:
            list(pool.map(lambda p: tc.run("create", "-a", f"aio:{p}"), images))
        created = time.perf_counter() - t0
        found = tc.vbds()
        if len(found) != count:
            raise RuntimeError(f"{count} creates left {len(found)} devices")
        time.sleep(1.0)  # let start-up garbage settle
        per = [memory_kib(pid) for pid, _ in found]
        server_pids = fork_servers(run_dir)
        if variant == "after":
            server_pids += tapctl_servers()
        servers = [memory_kib(pid) for pid in server_pids]
        rss = sum(m[0] for m in per + servers)
        pss = sum(m[1] for m in per + servers)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(count, 100)) as pool:
            list(pool.map(lambda pm: tc.run("destroy", "-p", str(pm[0]), "-m", str(pm[1])),
                          found))
        destroyed = time.perf_counter() - t0
    finally:
        tc.destroy_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    return (f"{variant:14s} N={count:<4d} create {created:6.2f} s  destroy {destroyed:6.2f} s  "
            f"RSS {rss / 1024:7.1f} MiB  PSS {pss / 1024:7.1f} MiB  "
            f"({pss / 1024 / count:.2f} MiB PSS/VBD; with {len(servers)} servers)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--counts", default="1,10,100")
    ap.add_argument("--before", help="src/ of an older checkout (variant 'before')")
    ap.add_argument("--variants", default=None,
                    help="comma-separated: after, no-forkserver, before "
                         "(default: all that apply)")
    args = ap.parse_args()
    variants = (args.variants.split(",") if args.variants else
                ["after", "no-forkserver"] + (["before"] if args.before else []))
    counts = [int(c) for c in args.counts.split(",") if c]
    if args.rounds:
        latency(variants, args.rounds, args.before)
    if counts:
        print(f"== N VBDs created at once (load {os.getloadavg()[0]:.1f})")
        for count in counts:
            for v in variants:
                print(memory(v, count, args.before), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
