#!/usr/bin/env python3
"""tap-ctl create/destroy latency and CPU, and tapdisk memory, variants interleaved in one run.

    .venv/bin/python bench/startup.py [--rounds 20] [--counts 1,10,100]
        [--before /tmp/before/src] [--after /tmp/after/src]
        [--variants after,no-forkserver,before] [--json OUT.json] [--markdown OUT.md]
    .venv/bin/python bench/startup.py --render OUT.json --markdown OUT.md

Variants: ``after`` is this tree's tap-ctl as installed (bin/tap-ctl), or with --after
the src/ of a checkout (e.g. ``git worktree add /tmp/after HEAD``: a snapshot that other
people's edits of this tree do not make stale mid-run); ``no-forkserver`` the same with
BLKTAP_FORKSERVER=off (every tapdisk and tap-ctl a fresh interpreter); ``before`` runs
the src/ given by --before (a checkout of an older commit) through the script pip wrote
for it. Each variant runs with PYTHONPATH set to its tree, through a script with the
installed tap-ctl's interpreter; the tapdisks it spawns are that tree's too.

Each round runs one create + destroy of every variant in turn (the order rotates each
round), so load on a shared machine hits all alike; medians and quartiles are printed,
wall clock and, where the cgroup v1 cpuacct controller is writable, CPU time: each
variant runs in a cpuacct cgroup of its own, so its tap-ctl and tapdisk fork servers,
workers and tapdisks (all started here) are counted, whatever process does the work.
Then, per variant and per count N: N VBDs created at once (one tapdisk each, as tap-ctl
create does), the wall time, the sum of the tapdisks' RSS and PSS
(/proc/PID/smaps_rollup) plus that of the variant's fork servers (the run directory's
tapdisk server and the variant's tap-ctl server), and the time to destroy them all.
Runs in private run directories; removes everything, servers included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tapctl_create import TAP_CTL, TapCtl, quartiles

SERVER_COMMS = ("tapdisk-forksrv", "tap-ctl-forksrv")
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


def interpreter() -> str:
    """The interpreter of the installed tap-ctl (its #! line)."""
    with open(TAP_CTL) as f:
        first = f.readline()
    return first[2:].strip() if first.startswith("#!") else sys.executable


class Variant:
    """One way of running tap-ctl: its program, environment and cgroup."""

    def __init__(self, name: str, src: str | None, scratch: str) -> None:
        self.name = name
        self.src = src
        self.dirs: list[str] = []
        self.scratch = scratch
        self.cgroup: Path | None = None

    def tapctl(self, run_dir: str) -> TapCtl:
        program = TAP_CTL
        if self.src is not None:
            # A tree of its own: the script pip would write (an older tree's with its
            # entry-point wrapper and import re), PYTHONPATH first on the path.
            script = os.path.join(self.scratch, f"tap-ctl-{self.name}")
            server = Path(self.src, "blktap", "cli", "tapctl_server.py").exists()
            module = "blktap.cli.tapctl_server" if server else "blktap.cli.tap_ctl"
            wrapper = "import re\n" if (self.name == "before" and server) else ""
            with open(script, "w") as f:
                f.write(f"#!{interpreter()}\n{wrapper}import sys\nfrom {module} import main\n"
                        "sys.exit(main())\n")
            os.chmod(script, 0o755)
            program = script
        tc = TapCtl(run_dir, "off", program=program)
        tc.env.pop("PYTHONPATH", None)
        if self.src is not None:
            tc.env["PYTHONPATH"] = self.src
        if self.name == "no-forkserver":
            tc.env["BLKTAP_FORKSERVER"] = "off"
        tc.env["BLKTAP_BENCH_VARIANT"] = f"{self.name}-{os.getpid()}"  # finds its servers
        return tc

    # CPU accounting (cgroup v1 cpuacct), optional
    def open_cgroup(self) -> None:
        path = CPUACCT / f"blktap-startup-{os.getpid()}-{self.name}"
        try:
            path.mkdir()
        except OSError:
            return
        self.cgroup = path

    def cpu_ms(self) -> float:
        assert self.cgroup is not None
        return int((self.cgroup / "cpuacct.usage").read_text()) / 1e6

    @contextlib.contextmanager
    def inside(self) -> Any:
        """Run this process (and what it starts) in the variant's cgroup."""
        if self.cgroup is None:
            yield
            return
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))

    def close_cgroup(self) -> None:
        if self.cgroup is None:
            return
        for _ in range(50):
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
                return
            time.sleep(0.1)


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


def servers_of(tc: TapCtl) -> list[int]:
    """The fork servers a variant's commands started (their environment is the first
    client's, which names the variant)."""
    wanted = f"BLKTAP_BENCH_VARIANT={tc.env['BLKTAP_BENCH_VARIANT']}".encode()
    return _processes_with(wanted, "comm", lambda comm: comm.strip().decode() in SERVER_COMMS)


def make_images(run_dir: str, count: int, size: int) -> list[str]:
    paths = []
    for i in range(count):
        path = os.path.join(run_dir, f"img{i}.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        paths.append(path)
    return paths


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


def latency(variants: list[Variant], rounds: int) -> dict[str, Any]:
    names = [v.name for v in variants]
    dirs = {v.name: tempfile.mkdtemp(prefix=f"su-{v.name[:6]}-", dir="/tmp") for v in variants}
    tcs = {v.name: v.tapctl(dirs[v.name]) for v in variants}
    images = {n: make_images(dirs[n], 1, 64 << 20)[0] for n in names}
    keys = ("create_ms", "destroy_ms", "create_cpu_ms", "destroy_cpu_ms")
    res: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
    by_name = {v.name: v for v in variants}
    load = [os.getloadavg()[0]]
    try:
        for v in variants:  # warm-up: starts each variant's fork servers, fills caches
            with v.inside():
                tcs[v.name].run("create", "-a", f"aio:{images[v.name]}")
                tcs[v.name].destroy_all()
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                tc, out = tcs[v.name], res[v.name]
                with v.inside():
                    c0 = v.cpu_ms() if v.cgroup else 0.0
                    out["create_ms"].append(tc.timed("create", "-a", f"aio:{images[v.name]}"))
                    c1 = v.cpu_ms() if v.cgroup else 0.0
                    ((pid, minor),) = tc.vbds()
                    c2 = v.cpu_ms() if v.cgroup else 0.0
                    out["destroy_ms"].append(tc.timed("destroy", "-p", str(pid),
                                                      "-m", str(minor)))
                    c3 = v.cpu_ms() if v.cgroup else 0.0
                if v.cgroup:
                    out["create_cpu_ms"].append(c1 - c0)
                    out["destroy_cpu_ms"].append(c3 - c2)
    finally:
        for v in variants:
            with by_name[v.name].inside():
                tcs[v.name].destroy_all()
            stop_servers(tcs[v.name])
            shutil.rmtree(dirs[v.name], ignore_errors=True)
    load.append(os.getloadavg()[0])
    print(f"== create/destroy, {rounds} interleaved rounds (ms); load {load[0]:.1f} at the "
          f"start, {load[1]:.1f} at the end")
    for n in names:
        for what in ("create", "destroy"):
            line = f"{n:14s} {what:7s} {quartiles(res[n][f'{what}_ms'])}"
            cpu = res[n][f"{what}_cpu_ms"]
            if cpu:
                line += f"   CPU median {statistics.median(cpu):6.1f} ms"
            print(line, flush=True)
    return {"rounds": rounds, "loadavg": load,
            "variants": {n: {k: summary(v) for k, v in res[n].items() if v} for n in names}}


def stop_servers(tc: TapCtl) -> None:
    for pid in servers_of(tc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def tapdisks_of(run_dir: str) -> list[int]:
    """Tapdisk processes whose environment names ``run_dir`` (one still starting when a
    create failed is not listed yet)."""
    wanted = f"BLKTAP_RUN_DIR={run_dir}".encode()
    return _processes_with(wanted, "cmdline", lambda cmdline: any(
        a.endswith(b"tapdisk") for a in cmdline.split(b"\0")[:2]))


def _processes_with(variable: bytes, proc_file: str, candidate: Callable[[bytes], bool]
                    ) -> list[int]:
    """PIDs whose /proc/PID/``proc_file`` passes ``candidate`` and whose environment
    holds ``variable`` (``NAME=value``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/{proc_file}", "rb") as f:
                if not candidate(f.read()):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if variable in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def memory(variant: Variant, count: int) -> dict[str, Any]:
    """One memory case; a failure (a create timing out on a loaded machine) is reported
    in the result, and whatever it started is stopped."""
    run_dir = tempfile.mkdtemp(prefix=f"sm-{variant.name[:6]}-", dir="/tmp")
    try:
        return _memory(variant, count, run_dir)
    except RuntimeError as exc:
        print(f"{variant.name:14s} N={count:<4d} failed: {exc}", flush=True)
        return {"variant": variant.name, "count": count, "error": str(exc)}
    finally:
        for pid in tapdisks_of(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)


def _memory(variant: Variant, count: int, run_dir: str) -> dict[str, Any]:
    tc = variant.tapctl(run_dir)
    images = make_images(run_dir, count, 16 << 20)
    try:
        with variant.inside():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(min(count, 100)) as pool:
                list(pool.map(lambda p: tc.run("create", "-a", f"aio:{p}"), images))
            created = time.perf_counter() - t0
            found = tc.vbds()
            if len(found) != count:
                raise RuntimeError(f"{count} creates left {len(found)} devices")
            time.sleep(1.0)  # let start-up garbage settle
            per = [memory_kib(pid) for pid, _ in found]
            server_pids = servers_of(tc)
            servers = [memory_kib(pid) for pid in server_pids]
            rss = sum(m[0] for m in per + servers)
            pss = sum(m[1] for m in per + servers)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(min(count, 100)) as pool:
                list(pool.map(lambda pm: tc.run("destroy", "-p", str(pm[0]), "-m", str(pm[1])),
                              found))
            destroyed = time.perf_counter() - t0
    finally:
        with variant.inside():
            tc.destroy_all()
        stop_servers(tc)
    print(f"{variant.name:14s} N={count:<4d} create {created:6.2f} s  destroy {destroyed:6.2f} s"
          f"  RSS {rss / 1024:7.1f} MiB  PSS {pss / 1024:7.1f} MiB  "
          f"({pss / 1024 / count:.2f} MiB PSS/VBD; with {len(servers)} servers)", flush=True)
    return {"variant": variant.name, "count": count, "create_s": created,
            "destroy_s": destroyed, "rss_mib": rss / 1024, "pss_mib": pss / 1024,
            "servers": len(servers), "server_pss_mib": sum(m[1] for m in servers) / 1024}


def commit(src: str | None) -> str:
    """``, commit ABC`` of the checkout holding ``src`` (or of this tree)."""
    import subprocess

    where = os.path.dirname(os.path.abspath(src)) if src else str(Path(__file__).parent)
    proc = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    return f", commit {proc.stdout.strip()}" if proc.returncode == 0 else ""


def markdown(doc: dict[str, Any], numbers: str | None = None) -> str:
    """The comparison as a Markdown section (generated; see --markdown); ``numbers``:
    a link to the JSON it was rendered from."""
    lat = doc.get("latency")
    load = doc["loadavg"] + doc["loadavg"][-1:]
    lines = [f"## tap-ctl start-up and memory per VBD ({doc['date']})", "",
             f"Generated by `{doc['command']}`; do not edit by hand. Machine: "
             f"{os.cpu_count()} CPUs, shared; load average {load[0]:.1f} at the "
             f"start, {load[1]:.1f} at the end. Variants: "
             + "; ".join(f"`{n}` {d}" for n, d in doc["describe"].items()) + "."
             + (f" Numbers: {numbers}." if numbers else ""), ""]
    if lat:
        lines += [f"{lat['rounds']} rounds of `tap-ctl create` + `tap-ctl destroy` of a raw "
                  "image (BLKTAP_BLOCKDEV=off), variants interleaved; median (quartiles) of "
                  "wall clock and of the CPU time of every process involved "
                  "(client, fork servers, workers, tapdisk):", "",
                  "| variant | create | create CPU | destroy | destroy CPU |",
                  "|---|---:|---:|---:|---:|"]
        for name, v in lat["variants"].items():
            def cell(key: str, v: dict[str, Any] = v) -> str:
                s = v.get(key)
                if not s:
                    return "-"
                return f"{s['median']:.1f} ms ({s['q1']:.0f}-{s['q3']:.0f})"
            lines.append(f"| {name} | {cell('create_ms')} | {cell('create_cpu_ms')} | "
                         f"{cell('destroy_ms')} | {cell('destroy_cpu_ms')} |")
        lines.append("")
    if doc.get("memory"):
        lines += ["N VBDs created at once, one tapdisk each, in a new run directory: total "
                  "time (the first creates also start the variant's fork servers: a cold "
                  "start), and the RSS and PSS of all their tapdisks plus the variant's fork "
                  "servers (`no-forkserver` only up to --max-plain):", "",
                  "| variant | N | create | destroy | RSS | PSS | PSS per VBD |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in doc["memory"]:
            if "error" in m:
                lines.append(f"| {m['variant']} | {m['count']} | failed: {m['error'][:80]} "
                             "| | | | |")
                continue
            lines.append(f"| {m['variant']} | {m['count']} | {m['create_s']:.2f} s | "
                         f"{m['destroy_s']:.2f} s | {m['rss_mib']:.0f} MiB | "
                         f"{m['pss_mib']:.0f} MiB | {m['pss_mib'] / m['count']:.2f} MiB |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--counts", default="1,10,100")
    ap.add_argument("--before", help="src/ of an older checkout (variant 'before')")
    ap.add_argument("--after", help="src/ of a checkout to run as 'after' (default: "
                                    "this tree as installed)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated: after, no-forkserver, before "
                         "(default: all that apply)")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--markdown", help="write the comparison here as a Markdown section")
    ap.add_argument("--no-cpu", action="store_true", help="no cpuacct cgroups")
    ap.add_argument("--max-plain", type=int, default=10,
                    help="largest N for no-forkserver (N interpreters start at once; "
                         "on a loaded machine their creates time out; default 10)")
    ap.add_argument("--render", metavar="JSON",
                    help="write --markdown from an earlier run's --json; run nothing")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            earlier = json.load(f)
        link = None
        if args.markdown:
            rel = os.path.relpath(args.render, os.path.dirname(os.path.abspath(args.markdown)))
            link = f"[{os.path.basename(args.render)}]({rel})"
        rendered = markdown(earlier, link) + "\n"
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(rendered)
        else:
            sys.stdout.write(rendered)
        return 0
    names = (args.variants.split(",") if args.variants else
             ["after", "no-forkserver"] + (["before"] if args.before else []))
    if "before" in names and not args.before:
        raise SystemExit("variant 'before' needs --before SRC")
    scratch = tempfile.mkdtemp(prefix="su-bench-", dir="/tmp")
    src = {"after": args.after, "no-forkserver": args.after, "before": args.before}
    variants = [Variant(n, src[n], scratch) for n in names]
    describe = {"after": f"this tree ({args.after or 'as installed'}{commit(args.after)})",
                "no-forkserver": "after with BLKTAP_FORKSERVER=off",
                "before": f"{args.before}{commit(args.before)}"}
    counts = [int(c) for c in args.counts.split(",") if c]
    doc: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "command": " ".join(["bench/startup.py", *sys.argv[1:]]),
        "describe": {n: describe[n] for n in names}, "loadavg": [os.getloadavg()[0]],
    }
    try:
        if not args.no_cpu and os.access(CPUACCT, os.W_OK):
            for v in variants:
                v.open_cgroup()
        if args.rounds:
            doc["latency"] = latency(variants, args.rounds)
        if counts:
            print(f"== N VBDs created at once (load {os.getloadavg()[0]:.1f})")
            doc["memory"] = []
            for count in counts:
                for v in variants:
                    if v.name == "no-forkserver" and count > args.max_plain:
                        print(f"{v.name:14s} N={count:<4d} skipped (--max-plain "
                              f"{args.max_plain})")
                        continue
                    doc["memory"].append(memory(v, count))
    finally:
        for v in variants:
            v.close_cgroup()
        shutil.rmtree(scratch, ignore_errors=True)
        doc["loadavg"].append(os.getloadavg()[0])
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(doc) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
