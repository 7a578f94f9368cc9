#!/usr/bin/env python3
"""What the changed-block log costs: 4 KiB random writes at QD32 with and without it.

    .venv/bin/python bench/cbt_log.py [--reps 5] [--runtime 5] [--size-mib 4096]
                                      [--kind aio|vhd] [--direct] [--flush-every 32]
                                      [--before SRC] [--after SRC]

fio (``--ioengine=nbd``, one job, ``--iodepth=32``, ``--rw=randwrite --bs=4k``) writes
through the VBD's NBD socket for ``--runtime`` seconds. Configurations, run in turn in
each repetition (so that noise from other load on the machine spreads over all of them):

- ``plain``: ``tap-ctl create -a KIND:IMG`` (no log);
- ``log``: ``tap-ctl create -a KIND:IMG -C LOG`` with a fresh ``cbt-util create`` log;
- the same two with a flush after every ``--flush-every`` writes (fio ``--fsync``), where
  the log's durability (its pages written back before the flush is answered) costs;
- with ``--before SRC`` (the ``src/`` of an older checkout, e.g. from ``git worktree add
  /tmp/before COMMIT``), ``log (before)`` and ``log+flush (before)``: the log
  configurations run by that tree's tap-ctl and tapdisk (PYTHONPATH=SRC, their own run
  directory, no fork server), to compare two versions of the layer in one run;
  ``--after SRC`` runs the other configurations with the tree at SRC in the same way
  (default: the installed tree), so that both sides stay fixed while the work tree
  changes.

Each run gets a fresh sparse image and log and its own tapdisk. Prints every run, then the
median IOPS, mean completion latency and tapdisk CPU time per write (user + system of
all its threads, from /proc: less sensitive to other load than IOPS) of each
configuration, and the log's cost in percent of the plain median. By default the image
is opened without O_DIRECT (``-D``): the writes then cost the least, which shows the
layer's own cost at its largest; ``--direct`` measures with O_DIRECT, where the disk
dominates. fio and tapdisk share the
machine's CPUs with whatever else runs: read the numbers as noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
TAP_CTL = str(BIN / "tap-ctl")
CBT_UTIL = str(BIN / "cbt-util")
VHD_UTIL = str(BIN / "vhd-util")


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


def tree_env(work: Path, env: dict[str, str], name: str, src: str
             ) -> tuple[str, dict[str, str]]:
    """The tap-ctl program and environment that run the tree at ``src``: the console
    script's plain form (an older tree may lack the tap-ctl server), its own run
    directory, no fork server, PYTHONPATH first (the tapdisks it spawns inherit it)."""
    run_dir = work / f"run-{name}"
    run_dir.mkdir()
    script = work / f"tap-ctl-{name}"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom blktap.cli.tap_ctl import main\n"
                      "sys.exit(main())\n")
    script.chmod(0o755)
    return str(script), dict(env, BLKTAP_RUN_DIR=str(run_dir),
                             BLKTAP_DEV_DIR=str(run_dir / "dev"), BLKTAP_FORKSERVER="off",
                             PYTHONPATH=os.path.abspath(src))


def one_run(work: Path, env: dict[str, str], kind: str, size_mib: int, log: bool,
            flush_every: int, runtime: int, direct: bool,
            tap_ctl: str = TAP_CTL) -> dict[str, float]:
    """Create a VBD (with a log if ``log``) with ``tap_ctl``, run fio against it,
    destroy it."""
    img = work / f"disk.{kind}"
    for stale in (img, work / "disk.cbtlog"):
        stale.unlink(missing_ok=True)
    if kind == "vhd":
        sh(VHD_UTIL, "create", "-n", str(img), "-s", str(size_mib))
    else:
        with open(img, "wb") as f:
            f.truncate(size_mib << 20)
    args = ["create", "-a", f"{kind}:{img}"]
    if not direct:
        args.append("-D")
    if log:
        logpath = work / "disk.cbtlog"
        sh(CBT_UTIL, "create", "-n", str(logpath), "-s", str(size_mib << 20))
        args += ["-C", str(logpath)]
    sh(tap_ctl, *args, env=env)
    (line,) = sh(tap_ctl, "list", env=env).splitlines()
    fields = dict(f.split("=", 1) for f in line.split())
    pid, minor = fields["pid"], fields["minor"]
    try:
        uri = f"nbd+unix:///?socket={env['BLKTAP_RUN_DIR']}/nbd{pid}.{minor}"
        cmd = ["fio", "--name=cbt", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
               "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={runtime}",
               f"--size={size_mib}M", "--output-format=json"]
        if flush_every:
            cmd.append(f"--fsync={flush_every}")
        cpu0 = cpu_seconds(int(pid))
        out = sh(*cmd)
        cpu = cpu_seconds(int(pid)) - cpu0
        job = json.loads(out[out.index("{"):])["jobs"][0]
        if job["error"]:
            raise RuntimeError(f"fio error {job['error']}")
        write = job["write"]
        return {"iops": float(write["iops"]), "clat_us": float(write["clat_ns"]["mean"]) / 1000,
                "cpu_us": cpu * 1e6 / max(1, int(write["total_ios"]))}
    finally:
        sh(tap_ctl, "destroy", "-p", pid, "-m", minor, env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    p.add_argument("--size-mib", type=int, default=4096, help="virtual disk size")
    p.add_argument("--kind", choices=("aio", "vhd"), default="aio")
    p.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    p.add_argument("--flush-every", type=int, default=32,
                   help="writes between flushes in the flushing configurations (0: none)")
    p.add_argument("--dir", default=None, help="where images go (default: a temp dir)")
    p.add_argument("--before", metavar="SRC", default=None,
                   help="also run the log configurations with the tree at SRC (its src/)")
    p.add_argument("--after", metavar="SRC", default=None,
                   help="run the other configurations with the tree at SRC (its src/)")
    ns = p.parse_args()
    if shutil.which("fio") is None:
        print("fio is not installed", file=sys.stderr)
        return 1

    configs = [("plain", False, 0), ("log", True, 0)]
    if ns.before:
        configs.append(("log (before)", True, 0))
    if ns.flush_every:
        configs += [(f"plain+flush/{ns.flush_every}", False, ns.flush_every),
                    (f"log+flush/{ns.flush_every}", True, ns.flush_every)]
        if ns.before:
            configs.append((f"log+flush/{ns.flush_every} (before)", True, ns.flush_every))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="cbt-bench-", dir=ns.dir) as tmp:
        work = Path(tmp)
        run_dir = work / "run"
        run_dir.mkdir()
        env = dict(os.environ, BLKTAP_RUN_DIR=str(run_dir),
                   BLKTAP_DEV_DIR=str(run_dir / "dev"), BLKTAP_BLOCKDEV="off")
        env.pop("PYTHONPATH", None)
        before = tree_env(work, env, "before", ns.before) if ns.before else None
        after = tree_env(work, env, "after", ns.after) if ns.after else (TAP_CTL, env)
        print(f"# {ns.kind}, {ns.size_mib} MiB, {'O_DIRECT' if ns.direct else 'no O_DIRECT'}, "
              f"4 KiB random writes, QD32, {ns.runtime} s x {ns.reps} reps; cpus "
              f"{os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        print(f"# trees: after {ns.after or 'installed'}"
              + (f", before {ns.before}" if ns.before else ""))
        for rep in range(ns.reps):
            for name, log, flush_every in configs:
                tap_ctl, run_env = (before if before is not None and name.endswith("(before)")
                                    else after)
                r = one_run(work, run_env, ns.kind, ns.size_mib, log, flush_every,
                            ns.runtime, ns.direct, tap_ctl)
                results[name].append(r)
                print(f"rep {rep + 1} {name:>25}: {r['iops']:9.0f} IOPS  "
                      f"clat {r['clat_us']:8.1f} us  tapdisk CPU {r['cpu_us']:6.1f} us/write",
                      flush=True)
    print()
    print(f"{'config':>25} {'median IOPS':>12} {'median clat us':>15} {'vs plain':>9} "
          f"{'CPU us/write':>13} {'vs plain':>9}")
    medians = {name: statistics.median(r["iops"] for r in runs)
               for name, runs in results.items()}
    cpus = {name: statistics.median(r["cpu_us"] for r in runs) for name, runs in results.items()}
    for name, runs in results.items():
        base = ("plain" if not name.startswith("log+")
                else name.replace("log+", "plain+").removesuffix(" (before)"))
        plain = name.startswith("plain")
        delta = "" if plain else f"{(medians[name] / medians[base] - 1) * 100:+.1f} %"
        cdelta = "" if plain else f"{(cpus[name] / cpus[base] - 1) * 100:+.1f} %"
        clat = statistics.median(r["clat_us"] for r in runs)
        print(f"{name:>25} {medians[name]:12.0f} {clat:15.1f} {delta:>9} "
              f"{cpus[name]:13.1f} {cdelta:>9}")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f} (the numbers are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
