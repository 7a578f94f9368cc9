#!/usr/bin/env python3
"""Reliability run and report: kill -9 rounds, injected faults, fuzzing, soak.

    bench/reliability.py crash  [--rounds 200] [--seed 18]        -> DIR/crash.json
    bench/reliability.py faults                                  -> DIR/faults.json
    bench/reliability.py fuzz   [--seconds 60] [--runs N]         -> DIR/fuzz.json
    bench/reliability.py soak   [--vbds 32] [--seconds 300]       -> DIR/soak.json
    bench/reliability.py report                                  -> docs/reliability.md
                                                                    + DIR/*.png
    bench/reliability.py all    [the options above]              (each step, then report)

DIR is --dir (default docs/reliability). ``crash`` runs bench/crash.py, ``soak``
bench/soak.py, ``faults`` the fault-injection tests (tests/system/test_fault.py, with
pytest's JUnit XML), ``fuzz`` scripts/fuzz.sh for each target (nbd, control, vhd) and
keeps libFuzzer's ``stat::`` lines and what it found. ``report`` writes docs/reliability.md
from whichever JSON files are there (a missing one gives a section saying how to make
it) and draws the soak's RSS and descriptor curves and the crash rounds with matplotlib.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
AIM_ROUNDS, AIM_EXECUTIONS, AIM_SOAK_S = 1000, 10_000_000, 3600
"""The long run's aim (issue 18): kill rounds, fuzz executions per target, soak seconds."""
TARGETS = ("nbd-proto", "control-proto", "vhd-parse", "nbd", "control", "vhd")
"""In-process codec targets first (fast), then the end-to-end ones (tests/fuzz/targets.py)."""


def host() -> dict[str, Any]:
    """Where and when: the figures depend on the machine and its load."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    if not commit and (REPO / ".commit").exists():
        # A `git archive` export (a snapshot the long run uses while the tree changes)
        # names its commit there.
        commit = (REPO / ".commit").read_text().strip()
    return {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "epoch": round(time.time()),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "kernel": platform.release(), "python": platform.python_version()}


def save(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


def env_without_run_dir() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("BLKTAP_RUN_DIR", "BLKTAP_DEV_DIR"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------- steps


def step_crash(args: argparse.Namespace, out: Path) -> None:
    """bench/crash.py into DIR/crash.json; with --queue-depth N > 1, NBD rounds with N
    writes in flight into DIR/crash-qdN.json (a section of its own)."""
    before = host()
    depth = args.queue_depth
    name = (f"crash-qd{depth}.json" if depth > 1 else
            f"crash-part{args.part}.json" if args.part else "crash.json")
    extra = ["--queue-depth", str(depth), "--frontends", "nbd"] if depth > 1 else []
    cmd = [PY, str(REPO / "bench/crash.py"), "--rounds", str(args.rounds), "--seed",
           str(args.seed), "--json", str(out / name), "-q", "--keep-failures",
           f"/tmp/blktap-crash-kept/{Path(name).stem}", *extra]
    subprocess.run(cmd, env=env_without_run_dir(), timeout=None)
    doc = json.loads((out / name).read_text())
    doc["host"] = before
    doc["commit"] = before["commit"]
    doc["command"] = (f"bench/crash.py --rounds {args.rounds} --seed {args.seed} "
                      f"{' '.join(extra) + ' ' if extra else ''}"
                      f"--json {os.path.relpath(out / name, REPO)}")
    save(out / name, doc)


def step_faults(args: argparse.Namespace, out: Path) -> None:
    xml = out / "faults.xml"
    started = time.monotonic()
    subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/system/test_fault.py", f"--junitxml={xml}"], cwd=REPO,
                   env=env_without_run_dir(), timeout=3600)
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        cases.append({"name": case.get("name"), "seconds": float(case.get("time", 0)),
                      "outcome": outcome})
    xml.unlink()
    save(out / "faults.json", {"host": host(), "seconds": round(time.monotonic() - started, 1),
                               "command": "pytest tests/system/test_fault.py",
                               "cases": cases})


def parse_fuzz_log(text: str) -> dict[str, Any]:
    stats = {m.group(1): int(m.group(2))
             for m in re.finditer(r"^stat::(\w+):\s+(\d+)", text, re.M)}
    found = sorted(set(re.findall(r"(?:crash|timeout|oom|leak)-[0-9a-f]{40}", text)))
    return {"executions": stats.get("number_of_executed_units", 0),
            "exec_per_sec": stats.get("average_exec_per_sec", 0),
            "new_units": stats.get("new_units_added", 0),
            "peak_rss_mb": stats.get("peak_rss_mb", 0), "found": found}


def step_fuzz(args: argparse.Namespace, out: Path) -> None:
    """Each of ``--targets`` in turn; its entry replaces the one fuzz.json held, so
    several invocations (say one per target, with their own budgets) fill one file."""
    path = out / "fuzz.json"
    doc = load(path) or {"targets": {}}
    names = args.targets.split(",") if args.targets else list(TARGETS)
    for target in names:
        if target not in TARGETS:
            raise SystemExit(f"unknown fuzz target {target!r} (one of {', '.join(TARGETS)})")
        work = Path(f"/tmp/blktap-fuzz-reliability/{target}")
        cmd = ["scripts/fuzz.sh", target, str(args.fuzz_seconds), "--work", str(work)]
        if args.fuzz_runs:
            cmd += ["--runs", str(args.fuzz_runs)]
        before = host()
        started = time.monotonic()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env=env_without_run_dir())
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        (work / "fuzz.log").write_text(proc.stdout + proc.stderr)
        entry = parse_fuzz_log(proc.stdout + proc.stderr)
        entry.update(seconds=round(time.monotonic() - started, 1), exit=proc.returncode,
                     cpu_seconds=round(cpu, 1),
                     command=" ".join(cmd), host=before,
                     loadavg_end=os.getloadavg())
        # Read again: another invocation (another target, side by side) may have
        # saved its entry meanwhile.
        doc = load(path) or doc
        doc["targets"][target] = entry
        doc.setdefault("host", before)
        print(target, entry, flush=True)
        save(path, doc)  # after each target: a long run keeps what it has


def step_soak(args: argparse.Namespace, out: Path) -> None:
    before = host()
    cmd = [PY, str(REPO / "bench/soak.py"), "--vbds", str(args.vbds), "--seconds",
           str(args.soak_seconds), "--interval", str(args.soak_interval), "--json",
           str(out / "soak.json")]
    subprocess.run(cmd, env=env_without_run_dir(), timeout=None)
    doc = json.loads((out / "soak.json").read_text())
    doc["host"] = before
    doc["commit"] = before["commit"]
    doc["command"] = (f"bench/soak.py --vbds {args.vbds} --seconds {args.soak_seconds} "
                      f"--interval {args.soak_interval} "
                      f"--json {os.path.relpath(out / 'soak.json', REPO)}")
    save(out / "soak.json", doc)


def step_loadlog(args: argparse.Namespace, out: Path) -> None:
    """Sample the 1-minute load average every --load-interval seconds for
    --load-seconds into DIR/load.json (rewritten after each sample): the report gives
    each run's load from it, for runs that share the machine with others."""
    path = out / "load.json"
    doc = load(path) or {"interval": args.load_interval, "samples": []}
    end = time.time() + args.load_seconds
    while True:
        doc["samples"].append([round(time.time()), os.getloadavg()[0]])
        path.write_text(json.dumps(doc) + "\n")
        if time.time() + args.load_interval > end:
            return
        time.sleep(args.load_interval)


# --------------------------------------------------------------------------- report


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def plot_soak(soak: dict[str, Any], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = soak["samples"]
    t = [s["t"] for s in samples]
    names = []
    for key, label, scale, fname in (("rss_kib", "RSS (MiB)", 1024, "soak-rss.png"),
                                     ("fds", "open descriptors", 1, "soak-fds.png")):
        fig, ax = plt.subplots(figsize=(8, 4))
        if key == "rss_kib":
            for vbd in samples[0][key]:
                ys = [s[key][vbd] / scale if s[key][vbd] >= 0 else float("nan")
                      for s in samples]
                ax.plot(t, ys, linewidth=0.7, alpha=0.6)
        else:
            # one line per tapdisk is unreadable for small integers: min/median/max
            rows = [sorted(v for v in s[key].values() if v >= 0) for s in samples]
            for where, name in ((0.0, "min"), (0.5, "median"), (1.0, "max")):
                ax.plot(t, [r[int(where * (len(r) - 1))] if r else float("nan")
                            for r in rows], label=name, linewidth=0.9)
            ax.legend(fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel(label + " per tapdisk")
        ax.set_title(f"{label} of {len(samples[0][key])} tapdisks during the soak")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        names.append(fname)
    return names


def plot_crash(crash: dict[str, Any], out: Path, name: str = "crash-rounds.png") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in crash["rounds"] if r["frontend"] != "vhd-util"]
    fig, ax = plt.subplots(figsize=(8, 4))
    groups = sorted({f"{r['kind']}/{r['frontend']}" for r in rounds})
    for g in groups:
        rs = [r for r in rounds if f"{r['kind']}/{r['frontend']}" == g]
        ax.scatter([r["kill_delay"] * 1000 for r in rs], [r["writes_durable"] for r in rs],
                   s=10, label=g)
    ax.set_xlabel("kill instant after the writer started (ms)")
    ax.set_ylabel("flushed writes verified")
    ax.set_title("kill -9 rounds: every flushed write read back")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def rss_trend(samples: list[dict[str, Any]]) -> str:
    """The median RSS per quarter of the run, and the descriptors' range: whether
    memory levels off and descriptors stay flat, in numbers."""
    quarters = []
    for q in range(1, 5):
        sample = samples[min(len(samples) - 1, q * len(samples) // 4)]
        rss = [v / 1024 for v in sample["rss_kib"].values() if v > 0]
        quarters.append(f"{stats(rss)[1]:.1f}")
    fds = [v for sm in samples[len(samples) // 2:] for v in sm["fds"].values() if v >= 0]
    return (f"median RSS at the end of each quarter: {' / '.join(quarters)} MiB. "
            f"Descriptors over the second half: {min(fds)} to {max(fds)} per tapdisk.")


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), sorted(values)[len(values) // 2], max(values)


def at(doc: dict[str, Any]) -> str:
    return f" at commit {doc['commit']}" if doc.get("commit") else ""


def host_line(h: dict[str, Any] | None) -> str:
    if not h:
        return ""
    load = ", ".join(f"{x:.1f}" for x in h["loadavg"])
    when = h.get("load_when", "at the start")
    return (f"Run {h['date']} on {h['cpus']} CPUs (load average {when}: {load}), Linux "
            f"{h['kernel']}, Python {h['python']}.")


def started_at(h: dict[str, Any] | None) -> float | None:
    """When the run whose host() this is started (epoch seconds)."""
    if not h:
        return None
    if "epoch" in h:
        return float(h["epoch"])
    return calendar.timegm(time.strptime(h["date"], "%Y-%m-%d %H:%M UTC"))


def load_during(loadlog: dict[str, Any] | None, h: dict[str, Any] | None,
                seconds: float) -> str:
    """The 1-minute load average sampled while a run went (min / median / max), from
    DIR/load.json; "" when it holds no sample of that window."""
    start = started_at(h)
    if loadlog is None or start is None:
        return ""
    values = [v for t, v in loadlog["samples"] if start <= t <= start + seconds + 60]
    if not values:
        return ""
    lo, mid, hi = stats(values)
    return f"{lo:.1f} / {mid:.1f} / {hi:.1f}"


def load_sentence(loadlog: dict[str, Any] | None, h: dict[str, Any] | None,
                  seconds: float) -> list[str]:
    during = load_during(loadlog, h, seconds)
    if not during:
        return []
    return [f"Load average (1 min) sampled every {loadlog['interval'] if loadlog else 0} s "
            f"during the run, min / median / max: {during} (2 CPUs).", ""]


def aim_table(crash: dict[str, Any] | None, fuzz: dict[str, Any] | None,
              soak: dict[str, Any] | None) -> list[str]:
    """What the long run reached against its aim, one row per figure."""
    rows = ["| figure | aim | reached | clean |", "|---|---|---|---|"]
    if crash is not None:
        s = crash["summary"]
        harness = len(s.get("harness_errors", []))
        clean = "yes" if not s["violations"] and not s["invalid_images"] else "**no**"
        if harness:
            clean += f" ({harness} harness errors, listed below)"
        reached = "reached" if s["kill_rounds"] >= AIM_ROUNDS else "not reached"
        rows.append(f"| kill -9 rounds | {AIM_ROUNDS} | {s['kill_rounds']} ({reached}) "
                    f"| {clean} |")
    if fuzz is not None:
        for name, t in fuzz["targets"].items():
            reached = ("reached" if t["executions"] >= AIM_EXECUTIONS
                       else f"not reached: {t['seconds']:.0f} s at {t['exec_per_sec']}/s")
            if len(t.get("runs", [])) > 1:
                reached += f"; {len(t['runs'])} runs on one corpus"
            clean = "yes" if not t["found"] and t["exit"] == 0 else "**no**"
            rows.append(f"| fuzz executions, {name} | 10 M | {t['executions']:,} "
                        f"({reached}) | {clean} |")
    if soak is not None:
        bad = (soak["io_errors"] or soak["mismatches"] or soak["dead_tapdisks"]
               or soak["pause_errors"])
        reached = "reached" if soak["seconds"] >= AIM_SOAK_S - 1 else "not reached"
        rows.append(f"| soak, {soak['settings']['vbds']} VBDs | {AIM_SOAK_S} s | "
                    f"{soak['seconds']:.0f} s ({reached}) | {'**no**' if bad else 'yes'} |")
    return [*rows, ""]


def merge_crash(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several bench/crash.py runs (parts run side by side) as one: counts added up,
    rounds renumbered one after the other, the commands and seeds of each kept."""
    if len(docs) == 1:
        return docs[0]
    summary: dict[str, Any] = {}
    for doc in docs:
        for key, value in doc["summary"].items():
            if isinstance(value, dict):
                into = summary.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            elif isinstance(value, list):
                summary[key] = summary.get(key, []) + value
            elif key == "seconds":
                summary[key] = max(summary.get(key, 0), value)  # side by side
            elif key == "seed":
                summary["seed"] = "/".join(str(d["summary"]["seed"]) for d in docs)
            else:
                summary[key] = summary.get(key, 0) + value
    rounds: list[dict[str, Any]] = []
    for doc in docs:
        base = len(rounds)
        rounds += [dict(r, index=base + r["index"]) for r in doc["rounds"]]
    first = docs[0]
    return {"summary": summary, "rounds": rounds, "host": first.get("host"),
            "commit": "/".join(sorted({d.get("commit", "") for d in docs})),
            "command": "`, `".join(d.get("command", "") for d in docs)}


def crash_section(crash: dict[str, Any], fig_name: str, out: Path, rel: str,
                  loadlog: dict[str, Any] | None) -> list[str]:
    """The report's lines for one bench/crash.py run."""
    lines: list[str] = []
    s = crash["summary"]
    tools = [r for r in crash["rounds"] if r["frontend"] == "vhd-util"]
    killed = [r for r in tools if not r["killed_during"].startswith("after")]
    reverted = [r for r in tools if "journal left" in r["killed_during"]]
    valid_before = [r for r in reverted if "before revert: exit 0" in r["killed_during"]]
    lines += [host_line(crash.get("host")), ""]
    lines += load_sentence(loadlog, crash.get("host"), s["seconds"])
    lines += [f"Command: `{crash.get('command', 'bench/crash.py')}`{at(crash)} "
              f"({s['seconds']:.0f} s). How a round works: `bench/crash.py --help`.", "",
              "| | |", "|---|---|",
              f"| tapdisk kill -9 rounds | {s['kill_rounds']} |",
              f"| of which inside an allocating VHD write | {s['kills_in_allocation']} |",
              f"| kills during a write / a flush / between | "
              f"{s['kills_during'].get('write', 0)} / {s['kills_during'].get('flush', 0)}"
              f" / {s['kills_during'].get('idle', 0)} |",
              f"| writes issued / acknowledged | {s['writes_issued']} / "
              f"{s['writes_acked']} |",
              f"| flushes completed | {s['flushes_completed']} |",
              f"| acknowledged-and-flushed writes verified | "
              f"{s['writes_durable_verified']} |",
              f"| sectors read back and checked | {s['sectors_verified']} |",
              f"| `vhd-util resize`/`coalesce` runs killed (of run) | {len(killed)} "
              f"(of {len(tools)}) |",
              f"| of which left a resize journal (undone by `vhd-util revert`) | "
              f"{len(reverted)} |",
              f"| of those, accepted by `vhd-util check` before the revert | "
              f"{len(valid_before)} |",
              f"| **lost or foreign sectors** | **{s['violations']}** |",
              f"| **images `vhd-util check` refused** | **{s['invalid_images']}** |",
              f"| harness errors (a tap-ctl step failed; group skipped) | "
              f"{len(s.get('harness_errors', []))} |", "",
              "Rounds per image kind and frontend: " + ", ".join(
                  f"{k} {v}" for k, v in sorted(s["by_group"].items())) + ".", ""]
    for e in s.get("harness_errors", []):
        last = e["error"].strip().splitlines()[-1] if e["error"].strip() else ""
        lines += [f"- harness error in group `{e['group']}`: `{last[:300]}`"]
    if s.get("harness_errors"):
        lines += [""]
    bad = [r for r in crash["rounds"] if r["violations"]]
    for r in bad[:5]:
        lines += [f"- round {r['index']} (`{r['group']}`, killed during "
                  f"{r['killed_during']}): {len(r['violations'])} violations, first: "
                  f"`{r['violations'][0]}`"]
    if bad:
        lines += [""]
    depth = max(r.get("queue_depth", 1) for r in crash["rounds"])
    option = f" --queue-depth {depth}" if depth > 1 else ""
    fig = plot_crash(crash, out, fig_name)
    lines += [f"![crash rounds]({rel}/{fig})", "",
              f"Figure: `bench/reliability.py crash --rounds {s['kill_rounds']} "
              f"--seed {s['seed']}{option} && bench/reliability.py report`"
              + (" (each part: `bench/reliability.py crash --part N --seed S --rounds R`)."
                 if "/" in str(s["seed"]) else "."), ""]
    queued = [r for r in crash["rounds"] if r.get("queue_depth", 1) > 1]
    if queued:
        many = sum(r["inflight_at_kill"] >= 2 for r in queued)
        lines.insert(lines.index("| | |") + 3,
                     f"| kills with 2 or more writes in flight (of {len(queued)}) | {many} |")
    return lines


def report(out: Path, doc_path: Path) -> None:
    rel = os.path.relpath(out, doc_path.parent)
    parts = [d for d in [load(out / "crash.json")] + [load(p) for p in
                                                       sorted(out.glob("crash-part*.json"))]
             if d is not None]
    crash = merge_crash(parts) if parts else None
    faults = load(out / "faults.json")
    fuzz, soak = load(out / "fuzz.json"), load(out / "soak.json")
    loadlog = load(out / "load.json")
    lines = ["# Reliability", "",
             "Generated by `bench/reliability.py report` from the JSON files in "
             f"`{os.path.relpath(out, REPO)}/`; do not edit by hand. Each section says "
             "the command that made its data; `bench/reliability.py all` runs them all.",
             "", "The runs below shared a **2-core machine with other jobs** (the load "
             "average during each is given): they show that the checks pass, not how fast "
             "the stack is. The aim for the long run is 1000 kill rounds, 10 million fuzz "
             "executions per target and a one-hour soak, all clean:", "",
             "```",
             "bench/reliability.py all --rounds 1000 --fuzz-seconds 100000 "
             "--fuzz-runs 10000000 --soak-seconds 3600 --soak-interval 10",
             "```", "",
             "A step that names a commit ran a `git archive` export of it (`PYTHONPATH` "
             "pointing at its `src/`), so that the work tree changing meanwhile did not "
             "change the code under test.",
             "", "What this run reached:", ""]
    lines += aim_table(crash, fuzz, soak)

    lines += ["## kill -9 rounds", ""]
    if crash is None:
        lines += ["No data: run `bench/reliability.py crash`.", ""]
    else:
        lines += crash_section(crash, "crash-rounds.png", out, rel, loadlog)
    for path in sorted(out.glob("crash-qd*.json")):
        queued = load(path)
        assert queued is not None
        depth = max(r.get("queue_depth", 1) for r in queued["rounds"])
        lines += [f"### With up to {depth} writes in flight", "",
                  f"The same rounds through NBD with `--queue-depth {depth}`: libnbd's "
                  "asynchronous writes, never two overlapping in flight, a flush covering "
                  "the writes acknowledged when it was sent; the kill lands with several "
                  "writes sent and not acknowledged.", ""]
        lines += crash_section(queued, f"{path.stem}-rounds.png", out, rel, loadlog)

    lines += ["## Injected faults", ""]
    if faults is None:
        lines += ["No data: run `bench/reliability.py faults` (tests/system/test_fault.py "
                  "with the `fault:` layer: EIO, ENOSPC, EAGAIN, latency).", ""]
    else:
        passed = sum(c["outcome"] == "passed" for c in faults["cases"])
        lines += [host_line(faults.get("host")), "",
                  f"Command: `{faults['command']}` ({faults['seconds']:.0f} s): "
                  f"{passed} of {len(faults['cases'])} cases passed. Each case injects "
                  "faults through the `fault:` layer and asserts the outcome a client sees "
                  "(see the test's docstrings).", "", "| case | outcome | s |",
                  "|---|---|---|"]
        lines += [f"| `{c['name']}` | {c['outcome']} | {c['seconds']:.1f} |"
                  for c in faults["cases"]]
        lines += [""]

    lines += ["## Fuzzing", ""]
    if fuzz is None:
        lines += ["No data: run `bench/reliability.py fuzz`.", ""]
    else:
        lines += [host_line(fuzz.get("host")), "",
                  "Coverage-guided (atheris/libFuzzer) through `scripts/fuzz.sh`, one "
                  "target at a time, seeded from the committed corpora in "
                  "tests/fuzz/corpus/. `nbd-proto`, `control-proto` and `vhd-parse` run "
                  "the NBD codec, the control protocol codec and the VHD parsers "
                  "in-process (tests/fuzz/codec_targets.py says what each asserts); "
                  "`nbd`, `control` and `vhd` go end to end (a real server on a Unix "
                  "socket, the vhd driver's open of a file: tests/fuzz/targets.py), "
                  "hundreds of times slower.", "",
                  "| target | executions | exec/s | new inputs | seconds | started (UTC), commit "
                  "| load during (min/med/max) | found | command |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, t in fuzz["targets"].items():
            found = ", ".join(t["found"]) or "nothing"
            if t.get("exit"):
                found += f" (exit {t['exit']})"
            h = t.get("host") or fuzz.get("host")
            during = " ; ".join(load_during(loadlog, r.get("host"), r["seconds"])
                                for r in t["runs"]) if t.get("runs") else ""
            during = during or load_during(loadlog, h, t["seconds"]) or (
                ", ".join(f"{x:.1f}" for x in h["loadavg"]) + " at the start" if h else "")
            when = h["date"].split(" ", 1)[1].removesuffix(" UTC") if h else ""
            if h and h.get("commit"):
                when += f", {h['commit']}"
            lines.append(f"| {name} | {t['executions']:,} | {t['exec_per_sec']} | "
                         f"{t['new_units']} | {t['seconds']:.0f} | {when} | {during} | "
                         f"{found} | `{t['command']}` |")
        probe = load(out / "fuzz-cpu.json")
        for doc, how in ((fuzz, "in the runs above"),
                         (probe, "in a short run of each target on its own "
                                 "(`bench/reliability.py fuzz --fuzz-seconds 60`, "
                                 "DIR/fuzz-cpu.json)")):
            per_cpu = [f"{name} {t['executions'] / t['cpu_seconds']:,.0f}"
                       for name, t in (doc or {}).get("targets", {}).items()
                       if t.get("cpu_seconds")]
            if per_cpu:
                lines += ["", f"Executions per CPU second {how}, the fuzzer's own CPU "
                          "time (which the load average does not inflate): "
                          + ", ".join(per_cpu) + "."]
        rates = ", ".join(f"{name} {1e7 / max(t['exec_per_sec'], 1) / 3600:.1f} h"
                          for name, t in fuzz["targets"].items())
        lines += ["", f"At these rates (on this loaded machine) 10 million executions "
                  f"take: {rates} per target (one core each; libFuzzer's -fork/-jobs, "
                  "passed through `--libfuzzer`, would spread them).",
                  "", "A crash or hang found becomes a regression input in "
                  "tests/fuzz/corpus/TARGET/ (`regress-*`), replayed by tests/fuzz/test_fuzz.py.",
                  ""]

    lines += ["## Soak", ""]
    if soak is None:
        lines += ["No data: run `bench/reliability.py soak`.", ""]
    else:
        samples = soak["samples"]
        first, last = samples[0], samples[-1]
        rss0 = [v / 1024 for v in first["rss_kib"].values() if v > 0]
        rss1 = [v / 1024 for v in last["rss_kib"].values() if v > 0]
        fd0 = [v for v in first["fds"].values() if v >= 0]
        fd1 = [v for v in last["fds"].values() if v >= 0]
        st = soak["settings"]
        mid = samples[len(samples) // 2]
        rss_mid = [v / 1024 for v in mid["rss_kib"].values() if v > 0]
        growth = stats(rss1)[1] - stats(rss_mid)[1]
        lines += [host_line(soak.get("host")), ""]
        lines += load_sentence(loadlog, soak.get("host"), soak["seconds"])
        lines += [f"Command: `{soak.get('command', 'bench/soak.py')}`{at(soak)}. "
                  f"{st['vbds']} VBDs "
                  f"(one tapdisk each, half dynamic VHD, half raw, {st['size_mib']} MiB), "
                  f"{soak['seconds']:.0f} s of verified NBD I/O with a random VBD paused "
                  f"and unpaused every {st['pause_every']} s and each client reconnecting "
                  "after 20-200 operations.", "",
                  "| | |", "|---|---|",
                  f"| operations (4 KiB writes, verified reads, flushes) | "
                  f"{soak['operations']} |",
                  f"| NBD connections | {soak['connections']} |",
                  f"| pause/unpause cycles | {soak['pauses']} |",
                  f"| pages verified at the end | {soak['pages_verified_at_end']} |",
                  f"| **I/O errors / mismatches / dead tapdisks / failed pauses** | "
                  f"**{soak['io_errors']} / {soak['mismatches']} / "
                  f"{len(soak['dead_tapdisks'])} / {len(soak['pause_errors'])}** |",
                  "| RSS per tapdisk, first sample (min/median/max MiB) | "
                  "{:.1f} / {:.1f} / {:.1f} |".format(*stats(rss0)),
                  "| RSS per tapdisk, last sample (min/median/max MiB) | "
                  "{:.1f} / {:.1f} / {:.1f} |".format(*stats(rss1)),
                  "| open descriptors, first sample (min/median/max) | "
                  "{} / {} / {} |".format(*stats(fd0)),
                  "| open descriptors, last sample (min/median/max) | "
                  "{} / {} / {} |".format(*stats(fd1)), "",
                  f"The median RSS grew {growth:.1f} MiB over the second half of the run "
                  f"(from {mid['t']:.0f} s to {last['t']:.0f} s); "
                  f"{rss_trend(samples)}", ""]
        for fig in plot_soak(soak, out):
            lines += [f"![{fig}]({rel}/{fig})", ""]
        lines += [f"Figures: `bench/reliability.py soak --vbds {st['vbds']} --soak-seconds "
                  f"{st['seconds']:.0f} --soak-interval {st.get('interval', 1):g} && "
                  "bench/reliability.py report`.", ""]
    doc_path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {doc_path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/reliability.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["crash", "faults", "fuzz", "soak", "loadlog", "report",
                                    "all"])
    p.add_argument("--dir", default=str(REPO / "docs/reliability"))
    p.add_argument("--doc", default=str(REPO / "docs/reliability.md"))
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--part", type=int, default=0,
                   help="crash: write DIR/crash-partN.json, one of several runs (say with "
                        "other seeds, in parallel) the report adds up")
    p.add_argument("--queue-depth", type=int, default=1,
                   help="crash: writes in flight (NBD only when > 1; DIR/crash-qdN.json)")
    p.add_argument("--fuzz-seconds", type=int, default=60)
    p.add_argument("--fuzz-runs", type=int, default=0, help="stop each target after N")
    p.add_argument("--targets", default="",
                   help=f"fuzz only these (comma-separated; default all: {','.join(TARGETS)})")
    p.add_argument("--vbds", type=int, default=32)
    p.add_argument("--soak-seconds", type=int, default=300)
    p.add_argument("--soak-interval", type=float, default=1.0,
                   help="seconds between RSS/descriptor samples (10 keeps an hour's JSON small)")
    p.add_argument("--load-seconds", type=int, default=3600, help="loadlog: for how long")
    p.add_argument("--load-interval", type=int, default=30, help="loadlog: sampling period")
    args = p.parse_args(argv)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = {"crash": step_crash, "faults": step_faults, "fuzz": step_fuzz,
             "soak": step_soak}
    for name, step in steps.items():
        if args.step in (name, "all"):
            step(args, out)
    if args.step == "loadlog":
        step_loadlog(args, out)
    if args.step in ("report", "all"):
        report(out, Path(args.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
