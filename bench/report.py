"""Render a bench/run JSON as a Markdown report with PNG plots; compare two runs.

Everything in the report is computed from the JSON (medians over repetitions of nbd-compare's
individual fio runs), so a report can always be made again from its JSON. Ratios are
``ours / peer`` for throughput (above 1.0: ours is faster) and are stated against a named
peer; every case where ours is below a peer is listed in its own section.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

GUIDE = Path(__file__).with_name("report_guide.md")
MARK_START = "<!-- bench-headline:start -->"
MARK_END = "<!-- bench-headline:end -->"
OURS_COLOR = "#d62728"
PEER_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22"]
CHANGE_THRESHOLD = 0.10  # --compare flags changes of at least 10 %
_WORKLOAD = re.compile(r"([a-z]+)-(\d+)([kmg]?)-qd(\d+)")


# --------------------------------------------------------------------------- numbers
@dataclass
class Cell:
    """Medians over the repetitions of one (workload, column) of a group."""

    value: float
    unit: str
    n: int
    values: list[float]
    p50_us: float | None
    p99_us: float | None
    cpu_pct: float | None
    rss_mib: float | None


def workload_bs(workload: str) -> int:
    """The request size in bytes (4096 when the name does not say)."""
    m = _WORKLOAD.fullmatch(workload)
    if not m:
        return 4096
    return int(m.group(2)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(3)]


def workload_unit(workload: str) -> str:
    """IOPS for requests under 128 KiB, MiB/s from 128 KiB up (as nbd-compare)."""
    if not _WORKLOAD.fullmatch(workload):
        return "IOPS"
    return "IOPS" if workload_bs(workload) < (128 << 10) else "MiB/s"


def workload_qd(workload: str) -> int:
    m = _WORKLOAD.fullmatch(workload)
    return int(m.group(4)) if m else 0


def workload_rw(workload: str) -> str:
    m = _WORKLOAD.fullmatch(workload)
    return m.group(1) if m else workload


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def columns(group: dict[str, Any]) -> list[str]:
    return [s["name"] for s in group["result"]["servers"]]


def peers(group: dict[str, Any]) -> list[str]:
    """The columns ours is compared to: every column but ours and the host's limits."""
    limits = set(group.get("params", {}).get("limits", []))
    return [c for c in columns(group) if c != group["ours"] and c not in limits]


def cells(group: dict[str, Any]) -> dict[tuple[str, str], Cell]:
    out: dict[tuple[str, str], Cell] = {}
    runs = group["result"]["runs"]
    for wl in group["result"]["workloads"]:
        unit = workload_unit(wl)
        for col in columns(group):
            ok = [r for r in runs
                  if r["server"] == col and r["workload"] == wl and "error" not in r]
            if not ok:
                continue
            vals = [r["iops"] if unit == "IOPS" else r["bw_bytes"] / 1048576 for r in ok]
            ddir = "write" if "write" in workload_rw(wl) else "read"
            p50 = [r[f"{ddir}_clat_p50_us"] for r in ok if f"{ddir}_clat_p50_us" in r]
            p99 = [r[f"{ddir}_clat_p99_us"] for r in ok if f"{ddir}_clat_p99_us" in r]
            cpu = [r["server_cpu_pct"] for r in ok if "server_cpu_pct" in r]
            rss = [r["rss_kib"] / 1024 for r in ok if "rss_kib" in r]
            med = _median(vals)
            assert med is not None
            out[wl, col] = Cell(med, unit, len(ok), vals, _median(p50), _median(p99),
                                _median(cpu), max(rss) if rss else None)
    return out


@dataclass
class Row:
    """One headline row: ours against the best peer on one workload of one group."""

    group: str
    title: str
    workload: str
    unit: str
    ours: float
    peer: str | None
    peer_value: float | None

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer_value if self.peer_value else None


def headline_rows(doc: dict[str, Any], sections: tuple[str, ...] = ("nbd", "blockdev")
                  ) -> list[Row]:
    rows = []
    for g in doc.get("groups", []):
        if g["section"] not in sections:
            continue
        cs = cells(g)
        for wl in g["result"]["workloads"]:
            ours = cs.get((wl, g["ours"]))
            if ours is None:
                continue
            found = [(cs[wl, p].value, p) for p in peers(g) if (wl, p) in cs]
            best = max(found) if found else None
            rows.append(Row(g["id"], g["title"], wl, ours.unit, ours.value,
                            best[1] if best else None, best[0] if best else None))
    return rows


def below(doc: dict[str, Any]) -> list[tuple[str, str, str, Cell, Cell]]:
    """Every (group, workload, peer, ours, peer's) where ours is below that peer."""
    out = []
    for g in doc.get("groups", []):
        cs = cells(g)
        for wl in g["result"]["workloads"]:
            ours = cs.get((wl, g["ours"]))
            if ours is None:
                continue
            for p in peers(g):
                theirs = cs.get((wl, p))
                if theirs is not None and ours.value < theirs.value:
                    out.append((g["id"], wl, p, ours, theirs))
    return out


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" + (" **below**" if r < 1.0 else "")


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[8] if len(values) > 1 else values[0]


# ---------------------------------------------------------------------------- metrics
@dataclass
class Metric:
    value: float
    unit: str
    higher_is_better: bool


def metrics(doc: dict[str, Any]) -> dict[str, Metric]:
    """Every headline number of a run by a stable name (for --compare)."""
    out: dict[str, Metric] = {}
    for g in doc.get("groups", []):
        for (wl, col), c in cells(g).items():
            out[f"{g['id']}/{wl}/{col}"] = Metric(c.value, c.unit, True)
            if c.p99_us is not None:
                out[f"{g['id']}/{wl}/{col}/p99"] = Metric(c.p99_us, "us", False)
    ctl = doc.get("control")
    if ctl:
        for op in ("create", "destroy"):
            out[f"control/{op}/median"] = Metric(statistics.median(ctl[f"{op}_ms"]), "ms", False)
            out[f"control/{op}/p90"] = Metric(_p90(ctl[f"{op}_ms"]), "ms", False)
        if "parallel_create_s" in ctl:
            n = ctl["parallel"]
            out[f"control/parallel-{n}/create"] = Metric(ctl["parallel_create_s"], "s", False)
            out[f"control/parallel-{n}/rss-sum"] = Metric(
                sum(ctl["parallel_rss_kib"]) / 1024, "MiB", False)
    for m in doc.get("memory", []):
        for key, label in (("no_vbd_kib", "no-vbd"), ("idle_kib", "one-vbd-idle"),
                           ("busy_kib", f"{m['connections']}-connections")):
            out[f"memory/{m['kind']}/{label}"] = Metric(m[key] / 1024, "MiB", False)
    co = doc.get("coalesce")
    if co:
        out["vhd/coalesce"] = Metric(co["size_mib"] / statistics.median(co["coalesce_s"]),
                                     "MiB/s", True)
        out["vhd/plain-copy"] = Metric(co["size_mib"] / statistics.median(co["copy_s"]),
                                       "MiB/s", True)
    ch = doc.get("chain_depth")
    if ch:
        for (layout, mode, depth), vals in _chain_table(ch).items():
            out[f"vhd/chain/{layout}/{mode}/depth-{depth}"] = Metric(
                statistics.median(vals), "IOPS", True)
    return out


def _chain_table(ch: dict[str, Any]) -> dict[tuple[str, str, int], list[float]]:
    table: dict[tuple[str, str, int], list[float]] = {}
    for r in ch["results"]:
        for mode in ("first", "warm", "fio"):
            if mode in r:
                table.setdefault((r["layout"], mode, r["depth"]), []).append(r[mode])
    return table


def _load(doc: dict[str, Any]) -> str:
    start = doc.get("machine", {}).get("loadavg_start")
    return f"{start[0]:.1f}" if start else "?"


def compare_text(old: dict[str, Any], new: dict[str, Any], old_name: str) -> str:
    """What changed between two runs: every metric both have, flagged where it moved by
    CHANGE_THRESHOLD or more; metrics only one of them has are listed as such."""
    a, b = metrics(old), metrics(new)
    lines = [f"Changes since {old_name} ({old.get('mode', '?')} run of {old.get('date', '?')}) "
             f"to the {new.get('mode', '?')} run of {new.get('date', '?')}; load average at "
             f"the start {_load(old)} then {_load(new)} (a busy machine moves every column):"]
    if old.get("mode") != new.get("mode"):
        lines.append("note: the two runs are of different modes; short quick runs are noisy")
    width = max((len(k) for k in {**a, **b}), default=10)
    better = worse = 0
    for key in sorted(set(a) & set(b)):
        o, n = a[key], b[key]
        change = (n.value - o.value) / o.value if o.value else 0.0
        flag = ""
        if abs(change) >= CHANGE_THRESHOLD:
            good = (change > 0) == n.higher_is_better
            flag = "better" if good else "WORSE"
            better += good
            worse += not good
        lines.append(f"{key:<{width}}  {fmt(o.value):>10} -> {fmt(n.value):>10} {n.unit:<6}"
                     f" {change:+7.1%}  {flag}")
    for key in sorted(set(a) - set(b)):
        lines.append(f"{key:<{width}}  only in the old run")
    for key in sorted(set(b) - set(a)):
        lines.append(f"{key:<{width}}  only in the new run")
    lines.append(f"{better} better, {worse} worse by {CHANGE_THRESHOLD:.0%} or more; "
                 f"{len(set(a) & set(b))} metrics in both runs")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def _colors(names: list[str], ours: str) -> list[str]:
    out = []
    i = 0
    for n in names:
        if n == ours:
            out.append(OURS_COLOR)
        else:
            out.append(PEER_COLORS[i % len(PEER_COLORS)])
            i += 1
    return out


def _save(fig: Figure, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_group_bars(group: dict[str, Any], path: str) -> None:
    """One panel per workload, one bar per column, the median value written on each bar."""
    cs = cells(group)
    wls = group["result"]["workloads"]
    cols = columns(group)
    ncols = min(len(wls), 3)
    nrows = math.ceil(len(wls) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.2 * ncols, 8.0), 3.4 * nrows),
                             squeeze=False)
    for i, wl in enumerate(wls):
        ax: Axes = axes[i // ncols][i % ncols]
        present = [c for c in cols if (wl, c) in cs]
        values = [cs[wl, c].value for c in present]
        limits = set(group.get("params", {}).get("limits", []))
        colors = ["#bbbbbb" if c in limits else c_ for c, c_ in
                  zip(present, _colors(present, group["ours"]), strict=True)]
        bars = ax.bar([f"{c}\n(limit)" if c in limits else c for c in present], values,
                      color=colors, hatch=["//" if c in limits else "" for c in present])
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
        ax.set_title(wl, fontsize=10)
        ax.set_ylabel(workload_unit(wl) + " (median, higher is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.margins(y=0.15)
    for j in range(len(wls), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    fig.suptitle(f"{group['title']}  (ours: {group['ours']}, red)", fontsize=11)
    _save(fig, path)


def plot_scaling(doc: dict[str, Any], path_qd: str, path_conns: str) -> list[str]:
    """IOPS by queue depth and by connection count, one line per server; returns the paths
    written."""
    groups = [g for g in doc.get("groups", []) if g["section"] == "scaling"]
    written = []
    qd = [g for g in groups if g.get("params", {}).get("axis") == "qd"]
    if qd:
        g = qd[0]
        cs = cells(g)
        rws = sorted({workload_rw(w) for w in g["result"]["workloads"]})
        fig, axes = plt.subplots(1, len(rws), figsize=(5.5 * len(rws), 4), squeeze=False)
        for ax, rw in zip(axes[0], rws, strict=True):
            wls = sorted((w for w in g["result"]["workloads"] if workload_rw(w) == rw),
                         key=workload_qd)
            cols = columns(g)
            for col, color in zip(cols, _colors(cols, g["ours"]), strict=True):
                pts = [(workload_qd(w), cs[w, col].value) for w in wls if (w, col) in cs]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=col)
            ax.set_xscale("log", base=2)
            ax.set_xticks([workload_qd(w) for w in wls], [str(workload_qd(w)) for w in wls])
            ax.set_xlabel("queue depth (requests in flight, one connection)")
            ax.set_ylabel("IOPS (median)")
            ax.set_title(f"4 KiB {rw}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Scaling with queue depth (raw image, buffered)", fontsize=11)
        _save(fig, path_qd)
        written.append(path_qd)
    conns = sorted((g for g in groups if g.get("params", {}).get("axis") == "conns"),
                   key=lambda g: g["numjobs"])
    if conns:
        wls = conns[0]["result"]["workloads"]
        fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 4), squeeze=False)
        cols = columns(conns[0])
        for ax, wl in zip(axes[0], wls, strict=True):
            for col, color in zip(cols, _colors(cols, conns[0]["ours"]), strict=True):
                pts = []
                for g in conns:
                    c = cells(g).get((wl, col))
                    if c is not None:
                        pts.append((g["numjobs"], c.value))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=col)
            ns = [g["numjobs"] for g in conns]
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel(f"NBD connections (QD{workload_qd(wl)} each)")
            ax.set_ylabel("IOPS (median, all connections)")
            ax.set_title(f"4 KiB {workload_rw(wl)}")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Scaling with connections (multi-conn; raw image, buffered)", fontsize=11)
        _save(fig, path_conns)
        written.append(path_conns)
    return written


def plot_latency(doc: dict[str, Any], path: str) -> bool:
    """fio completion latency p50 (solid) and p99 (light) of the 4 KiB workloads, per group
    and column, log scale."""
    groups = [g for g in doc.get("groups", []) if g["section"] in ("nbd", "blockdev")
              and any(c.unit == "IOPS" and c.p99_us for c in cells(g).values())]
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.9 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups, strict=True):
        cs = cells(g)
        wls = [w for w in g["result"]["workloads"] if workload_unit(w) == "IOPS"]
        cols = columns(g)
        width = 0.8 / len(cols)
        for j, (col, color) in enumerate(zip(cols, _colors(cols, g["ours"]), strict=True)):
            xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(wls))]
            p99 = [(cs[w, col].p99_us or 0) if (w, col) in cs else 0 for w in wls]
            p50 = [(cs[w, col].p50_us or 0) if (w, col) in cs else 0 for w in wls]
            ax.bar(xs, p99, width * 0.9, color=color, alpha=0.35)
            ax.bar(xs, p50, width * 0.9, color=color, label=col)
        ax.set_xticks(range(len(wls)), wls, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1)  # bars from 1 µs in every panel: lengths compare across panels
        ax.set_ylabel("completion latency, µs\n(solid p50, light p99)", fontsize=8)
        ax.set_title(g["title"], fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("fio completion latency percentiles (lower is better)", fontsize=11)
    _save(fig, path)
    return True


def plot_control_memory(doc: dict[str, Any], path: str) -> bool:
    ctl = doc.get("control")
    mem = doc.get("memory", [])
    if not ctl and not mem:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    if ctl:
        ax.boxplot([ctl["create_ms"], ctl["destroy_ms"]], whis=(10, 90))
        ax.set_xticks([1, 2], ["tap-ctl create", "tap-ctl destroy"])
        ax.set_ylabel("wall clock, ms (lower is better)")
        ax.set_title(f"Control plane, {len(ctl['create_ms'])} sequential rounds\n"
                     "(box: quartiles, whiskers: p10/p90)", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.axis("off")
    ax = axes[0][1]
    if mem:
        labels = ["no VBD", "one VBD, idle", f"{mem[0]['connections']} NBD connections"]
        keys = ["no_vbd_kib", "idle_kib", "busy_kib"]
        width = 0.8 / len(mem)
        for j, m in enumerate(mem):
            xs = [i + (j - (len(mem) - 1) / 2) * width for i in range(3)]
            bars = ax.bar(xs, [m[k] / 1024 for k in keys], width * 0.9,
                          color=PEER_COLORS[j], label=f"{m['kind']} image")
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(3), labels)
        ax.set_ylabel("tapdisk RSS, MiB (lower is better)")
        ax.set_title("Memory of one tapdisk", fontsize=10)
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
    else:
        ax.axis("off")
    _save(fig, path)
    return True


def plot_vhd(doc: dict[str, Any], path: str) -> bool:
    co = doc.get("coalesce")
    ch = doc.get("chain_depth")
    if not co and not ch:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0][0]
    if co:
        rates = [co["size_mib"] / statistics.median(co["coalesce_s"]),
                 co["size_mib"] / statistics.median(co["copy_s"])]
        bars = ax.bar(["vhd-util coalesce", "dd copy\n(bs=4M, fsync)"], rates,
                      color=[OURS_COLOR, PEER_COLORS[0]])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_ylabel("MiB/s (higher is better)")
        ax.set_title(f"Coalesce of a {co['size_mib']} MiB child vs a plain copy", fontsize=10)
        ax.margins(y=0.15)
    else:
        ax.axis("off")
    ax = axes[0][1]
    if ch:
        table = _chain_table(ch)
        ax.set_xscale("log", base=2)
        series = sorted({(layout, mode) for layout, mode, _ in table})
        layouts = sorted({layout for layout, _ in series})
        styles = {"warm": "-", "first": "--", "fio": ":"}
        for layout, mode in series:
            depths = sorted(d for lo, mo, d in table if (lo, mo) == (layout, mode))
            ys = [statistics.median(table[layout, mode, d]) for d in depths]
            ax.plot(depths, ys, marker="o", label=f"{layout}, {mode}",
                    color=PEER_COLORS[layouts.index(layout) % len(PEER_COLORS)],
                    linestyle=styles.get(mode, "-"))
            ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("chain depth (VHDs from leaf to base)")
        ax.set_ylabel("4 KiB random reads, IOPS")
        ax.set_title(f"Reads through VHD chains ({ch['size_mib']} MiB disk)", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  title="layout, path", title_fontsize=8)
    else:
        ax.axis("off")
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------- Markdown
def _rel(path: str, start_file: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.abspath(start_file)) or ".")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; columns whose cells all start with a digit (or are "-") align
    right."""
    def numeric(i: int) -> bool:
        return bool(rows) and all(r[i][:1].isdigit() or r[i] == "-" for r in rows)
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if numeric(i) else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def headline_table(doc: dict[str, Any]) -> list[str]:
    rows = [[f"{r.group}", r.workload, fmt(r.ours, r.unit), r.peer or "-",
             fmt(r.peer_value, r.unit), fmt_ratio(r.ratio)] for r in headline_rows(doc)]
    return _table(["case", "workload", "ours", "best peer", "peer's", "ours / best peer"], rows)


def others_table(doc: dict[str, Any]) -> list[str]:
    m = metrics(doc)
    keys = [k for k in m if k.startswith(("control/", "memory/", "vhd/coalesce", "vhd/plain"))]
    return _table(["measure", "value"], [[k, fmt(m[k].value, m[k].unit)] for k in keys])


def run_summary(doc: dict[str, Any]) -> list[str]:
    mc = doc["machine"]
    quick = doc["mode"] == "quick"
    v = doc["versions"]
    return [
        f"- **Date:** {doc['date']} ({doc['mode']} mode"
        + (": short runs, one repetition each - indicative numbers, not a measurement to "
           "quote; the full mode repeats 10 s runs 3 times" if quick else "") + ")",
        f"- **Command:** `{doc['command']}` ({doc.get('duration_s', 0):.0f} s; "
        f"{doc['runtime_s']:g} s per fio run, {doc['repeat']} repetition(s))",
        f"- **Machine:** {mc['cpus']} x {mc['cpu']}, {mc['mem_gib']} GiB, {mc['os']}, "
        f"kernel {mc['kernel']}; scratch {' '.join(mc['scratch_fs'].split())}; load average "
        f"{mc['loadavg_start'][0]:.1f} at the start, "
        f"{mc.get('loadavg_end', [float('nan')])[0]:.1f} at the end",
        "- **Versions:** " + "; ".join(f"{k} {val}" for k, val in v.items()),
    ] + [
        f"- **Refreshed:** section(s) {', '.join(r['sections'])} run again on {r['date']} "
        f"(`{r['command']}`, {r['runtime_s']:g} s per fio run, {r['repeat']} repetition(s), "
        f"blktap {r['blktap']}; load average {r['loadavg_start']:.1f} at the start, "
        f"{r['loadavg_end']:.1f} at the end) into the run of {r['from']}"
        for r in doc.get("refreshed", [])
    ]


def cpu_per_request(g: dict[str, Any], wl: str, col: str) -> float | None:
    """Median over the runs of the column's CPU microseconds per request: its CPU
    seconds over fio's whole wall time, divided by the requests of fio's runtime."""
    bs = workload_bs(wl)
    values = []
    for r in g["result"]["runs"]:
        if r["server"] != col or r["workload"] != wl or "error" in r:
            continue
        rate = r["iops"] if bs < (128 << 10) else r["bw_bytes"] / bs
        if "server_cpu_pct" in r and r.get("wall_s") and rate > 0:
            values.append(r["server_cpu_pct"] / 100 * r["wall_s"] / (rate * g["runtime_s"])
                          * 1e6)
    return _median(values)


def _group_section(g: dict[str, Any], plot: str | None, md: str) -> list[str]:
    cs = cells(g)
    cols = columns(g)
    ours = g["ours"]
    out = [f"### {g['title']} (`{g['id']}`)", ""]
    if g.get("date"):
        out += [f"Run {g['date']}, {g['runtime_s']:g} s per fio run x {g['repeat']}, medians; "
                f"load average {g['loadavg'][0]:.1f} at the start, {g['loadavg'][1]:.1f} at "
                "the end.", ""]
    if g.get("note"):
        out += [g["note"] + ".", ""]
    if plot:
        out += [f"![{g['title']}]({_rel(plot, md)})", ""]
    others = [c for c in cols if c != ours]
    header = ["workload", *cols, *[f"ours / {c}" for c in others]]
    rows = []
    for wl in g["result"]["workloads"]:
        mine = cs.get((wl, ours))
        row = [f"{wl} [{workload_unit(wl)}]"]
        row += [fmt(cs[wl, c].value) if (wl, c) in cs else "FAILED" for c in cols]
        for c in others:
            theirs = cs.get((wl, c))
            row.append(fmt_ratio(mine.value / theirs.value)
                       if mine and theirs and theirs.value else "-")
        rows.append(row)
    out += [*_table(header, rows), ""]
    lat_rows = []
    for wl in g["result"]["workloads"]:
        row = [wl]
        for c in cols:
            cell = cs.get((wl, c))
            if cell is None:
                row.append("-")
                continue
            text = f"{fmt(cell.p50_us)} / {fmt(cell.p99_us)}"
            limit = c in g.get("params", {}).get("limits", [])
            if cell.cpu_pct is not None and not limit:
                text += f"; {cell.cpu_pct:.0f} % CPU, {fmt(cell.rss_mib)} MiB"
                per_request = cpu_per_request(g, wl, c)
                if g["section"] == "nbd-driver" and per_request is not None:
                    # CPU time per request: steadier than IOPS on a shared machine.
                    text += f", {per_request:.1f} µs CPU/request"
            row.append(text)
        lat_rows.append(row)
    out += ["fio completion latency p50 / p99 (µs)"
            + ("; server CPU (all its processes) and peak RSS" if g["section"] != "blockdev"
               else "") + ":", ""]
    out += [*_table(["workload", *cols], lat_rows), ""]
    commands = [(s["name"], s["template"]) for s in g["result"]["servers"]]
    out += ["<details><summary>commands</summary>", "", "```"]
    out += [f"{n}: {t}" for n, t in commands]
    for key, val in g.get("params", {}).items():
        out.append(f"{key}: {val}")
    fio = next((r.get("fio_command") for r in g["result"]["runs"] if r.get("fio_command")), None)
    if fio:
        out.append(f"fio (first run): {fio}")
    out += ["```", "", "</details>", ""]
    failed = [r for r in g["result"]["runs"] if "error" in r]
    if failed:
        out += [f"**{len(failed)} fio run(s) failed** in this group:", ""]
        out += [f"- {r['server']} {r['workload']}: {r['error'].strip().splitlines()[-1]}"
                for r in failed if r["error"].strip()] + [""]
    return out


def history_table(directory: str, md: str) -> list[str]:
    rows = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "schema" in d:
            what = f"bench/run, {d['mode']} mode"
            cols = ", ".join(sorted({c for g in d.get("groups", []) for c in columns(g)}))
        else:
            what = (f"nbd-compare, {', '.join(d.get('workloads', []))}; "
                    f"{d.get('runtime_s', '?')} s x {d.get('repeat', '?')}, "
                    f"{d.get('numjobs', 1)} job(s)")
            cols = ", ".join(s["name"] for s in d.get("servers", []))
        rows.append([str(d.get("date", "?")), f"[{path.name}]({_rel(str(path), md)})", what,
                     cols])
    rows.sort()
    return _table(["date", "file", "what", "columns"], rows)


def studies_section(directory: str, md: str) -> list[str]:
    """A subsection per nbd-compare JSON of ``directory`` that carries a ``study`` (a
    side-by-side run of one change or one case, newest first): its title and date, its
    ``text`` (what was compared, the load), the median of each workload per column with
    the ratio to nbd-compare's reference column, and its ``measures`` ([label, value]
    pairs, e.g. instruction counts) as a table."""
    found = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("study"), dict) and "summary" in d:
            found.append((str(d.get("date", "?")), path, d))
    out: list[str] = []
    for date, path, d in sorted(found, key=lambda f: f[0], reverse=True):
        study = d["study"]
        names = [s["name"] for s in d.get("servers", [])]
        ref = d.get("reference") or (names[0] if names else "")
        out += [f"### {study.get('title', path.stem)} ({date})", ""]
        out += [*[str(line) for line in study.get("text", [])], ""]
        out += [f"From [{path.name}]({_rel(str(path), md)}): median of "
                f"{d.get('repeat', '?')} run(s) of {d.get('runtime_s', '?')} s; in "
                f"parentheses the ratio to `{ref}`.", ""]
        rows = []
        for wl in d.get("workloads", []):
            unit = workload_unit(wl)
            key = "iops_median" if unit == "IOPS" else "mibps_median"
            row = [f"{wl} [{unit}]"]
            for name in names:
                cell = d["summary"].get(wl, {}).get(name)
                value = cell.get(key) if cell else None
                ratio = cell.get("ratio_to_ref") if cell else None
                text = "-" if value is None else fmt(value)
                row.append(text if ratio is None else f"{text} ({ratio:.2f}x)")
            rows.append(row)
        out += [*_table(["workload", *names], rows), ""]
        # CPU time per request: what the load of a shared machine changes least.
        per: dict[tuple[str, str], list[float]] = {}
        for r in d.get("runs", []):
            if r.get("iops") and r.get("server_cpu_pct") is not None:
                per.setdefault((r["workload"], r["server"]), []).append(
                    r["server_cpu_pct"] * 1e4 / r["iops"])
        if per:
            out += ["Server CPU time per request, microseconds (user + system of every server "
                    "process; median of the runs):", ""]
            out += [*_table(["workload", *names],
                            [[wl, *[f"{statistics.median(per[wl, n]):.1f}"
                                    if (wl, n) in per else "-" for n in names]]
                             for wl in d.get("workloads", [])]), ""]
        measures = study.get("measures", [])
        if measures:
            out += [*_table(["measure", "value"], [[str(k), str(v)] for k, v in measures]), ""]
    return out


def render(doc: dict[str, Any], json_path: str, md: str, plots: str,
           history: str | None = None) -> None:
    """Write the Markdown report ``md`` and its PNGs in ``plots`` from ``doc``."""
    os.makedirs(plots, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    group_plots: dict[str, str] = {}
    for g in doc.get("groups", []):
        if g["section"] in ("nbd", "nbd-driver", "blockdev") and cells(g):
            path = os.path.join(plots, f"{g['id']}.png")
            plot_group_bars(g, path)
            group_plots[g["id"]] = path
    scaling = plot_scaling(doc, os.path.join(plots, "scaling-qd.png"),
                           os.path.join(plots, "scaling-conns.png"))
    latency = os.path.join(plots, "latency.png")
    has_latency = plot_latency(doc, latency)
    ctlmem = os.path.join(plots, "control-memory.png")
    has_ctlmem = plot_control_memory(doc, ctlmem)
    vhd = os.path.join(plots, "vhd.png")
    has_vhd = plot_vhd(doc, vhd)

    out = ["# Performance", "",
           f"Generated by `bench/run` from [{os.path.basename(json_path)}]"
           f"({_rel(json_path, md)}); do not edit by hand: run the benchmark again, or "
           f"`bench/run --render {json_path}`. What each benchmark measures "
           "and how to read it is at the end.", "", "## Latest run", ""]
    out += [*run_summary(doc), ""]
    if doc.get("interrupted"):
        out += ["**This run was interrupted: some sections are missing.**", ""]
    out += ["## Headline", "",
            "Median of the repetitions; \"ours / best peer\" divides our number by the best "
            "peer's on the same workload (above 1.00x: ours is faster; **below** marks "
            "where ours is slower). Peers: qemu-nbd and nbdkit for the NBD cases, "
            "qemu-storage-daemon's FUSE export + loop for the block device (`loop`, the "
            "image under a bare loop device, is the host's limit and not counted as a peer).",
            ""]
    out += [*headline_table(doc), ""]
    out += [*others_table(doc), ""]
    out += ["### Where ours is below a peer", ""]
    slow = below(doc)
    if slow:
        out += [f"Ours is below a peer in {len(slow)} case(s) of this run:", ""]
        out += [f"- `{gid}` {wl}: ours {fmt(o.value, o.unit)} is {o.value / t.value:.2f}x "
                f"{peer}'s {fmt(t.value, t.unit)}" for gid, wl, peer, o, t in slow]
    else:
        out.append("Nowhere in this run: ours is at or above every peer on every workload.")
    out += [""]
    failures = [f"- {e['section']}: {e['error']}" for e in doc.get("errors", [])]
    for g in doc.get("groups", []):
        runs = g["result"]["runs"]
        bad = [r for r in runs if "error" in r]
        if bad or g.get("exit_status"):
            why = [line for line in g.get("log", []) if line.strip()]
            failures.append(f"- `{g['id']}`: {len(bad)} of {len(runs)} fio run(s) failed"
                            + (f"; nbd-compare exited with status {g['exit_status']}"
                               if g.get("exit_status") else "")
                            + (f": {why[-1].strip()}" if why else ""))
    if failures:
        out += ["### Cases that failed", "", *failures, ""]

    sections = [("nbd", "NBD export against qemu-nbd and nbdkit"),
                ("nbd-driver", "Remote images: the nbd image driver against qemu-nbd's client"),
                ("scaling", "Scaling: queue depth and connections"),
                ("blockdev", "Kernel block device")]
    for key, title in sections:
        groups = [g for g in doc.get("groups", []) if g["section"] == key]
        if not groups:
            continue
        out += [f"## {title}", ""]
        if key == "scaling":
            out += [f"![scaling]({_rel(p, md)})" for p in scaling] + [""]
        for g in groups:
            out += _group_section(g, group_plots.get(g["id"]), md)
    if has_latency:
        out += ["## Latency percentiles", "", f"![latency]({_rel(latency, md)})", ""]
    if has_ctlmem:
        out += ["## Control plane and memory", "", f"![control and memory]({_rel(ctlmem, md)})",
                ""]
        ctl = doc.get("control")
        if ctl:
            rss = ctl.get("parallel_rss_kib", [])
            out += [f"`tap-ctl create`: median {statistics.median(ctl['create_ms']):.0f} ms, "
                    f"p90 {_p90(ctl['create_ms']):.0f} ms; `tap-ctl destroy`: median "
                    f"{statistics.median(ctl['destroy_ms']):.0f} ms, p90 "
                    f"{_p90(ctl['destroy_ms']):.0f} ms ({ctl['rounds']} rounds, "
                    f"BLKTAP_BLOCKDEV={ctl['blockdev']}).", ""]
            if rss:
                out += [f"{ctl['parallel']} devices created in parallel: "
                        f"{ctl['parallel_create_s']:.1f} s; RSS of their tapdisks "
                        f"{sum(rss) / 1024:.0f} MiB in all ({sum(rss) / 1024 / len(rss):.1f} "
                        f"MiB each); destroyed in parallel in "
                        f"{ctl['parallel_destroy_s']:.1f} s.", ""]
    if has_vhd:
        out += ["## VHD: coalesce and chain depth", "", f"![vhd]({_rel(vhd, md)})", ""]
        co = doc.get("coalesce")
        if co:
            c_rate = co["size_mib"] / statistics.median(co["coalesce_s"])
            p_rate = co["size_mib"] / statistics.median(co["copy_s"])
            out += [f"Coalesce of a fully written {co['size_mib']} MiB child: {c_rate:.0f} "
                    f"MiB/s against {p_rate:.0f} MiB/s for a plain copy of the same bytes "
                    f"({c_rate / p_rate:.2f}x; median of {len(co['coalesce_s'])}).", ""]
        ch = doc.get("chain_depth")
        if ch:
            table = _chain_table(ch)
            depths = sorted({d for _, _, d in table})
            rows = []
            for layout, mode in sorted({(lo, mo) for lo, mo, _ in table}):
                base = statistics.median(table[layout, mode, depths[0]])
                row = [layout, mode]
                for d in depths:
                    if (layout, mode, d) in table:
                        v = statistics.median(table[layout, mode, d])
                        row.append(f"{fmt(v)} ({v / base - 1:+.0%})")
                    else:
                        row.append("-")
                rows.append(row)
            out += [f"4 KiB random reads, IOPS (change against depth {depths[0]}):", ""]
            out += [*_table(["layout", "path", *[f"depth {d}" for d in depths]], rows), ""]
    if GUIDE.exists():
        out += [GUIDE.read_text().rstrip(), ""]
    if history:
        studies = studies_section(history, md)
        if studies:
            out += ["## Focused comparisons", "",
                    "Side-by-side runs of one change or one case, made apart from `bench/run` "
                    "(bench/nbd-compare JSONs in the history directory that carry a "
                    "`study`), newest first.", "", *studies]
        out += ["## History", "",
                "Earlier runs, as their JSON files (the numbers of each run, with its "
                "machine and commands where recorded):", ""]
        out += [*history_table(history, md), ""]
    Path(md).write_text("\n".join(out))


def headline_text(doc: dict[str, Any]) -> str:
    return "\n".join(headline_table(doc))


def headline_into(doc: dict[str, Any], path: str, md: str) -> None:
    """Replace what stands between the bench markers of ``path`` with the headline table,
    the run's date and mode and a link to the report ``md``."""
    text = Path(path).read_text()
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {MARK_START} ... {MARK_END} markers")
    block = [MARK_START,
             f"From the {doc['mode']} run of {doc['date']} on {doc['machine']['cpus']} x "
             f"{doc['machine']['cpu']}, load average {_load(doc)} "
             f"([full report]({_rel(md, path)}))"
             + (", one short run per case: indicative only" if doc["mode"] == "quick"
                else "")
             + "; ratios are ours / the best peer, **below** marks where ours is slower:", ""]
    block += [*headline_table(doc), ""]
    Path(path).write_text(text[:start] + "\n".join(block) + text[end:])
