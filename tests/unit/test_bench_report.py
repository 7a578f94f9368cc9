"""bench/run's renderer and --compare on a small synthetic run (no benchmark runs here)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _runs(values: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """One fio run per (server, workload): ``value`` as IOPS and as MiB/s (the report
    picks by block size), with clat percentiles."""
    out = []
    for (server, workload), value in values.items():
        ddir = "write" if "write" in workload else "read"
        out.append({"server": server, "workload": workload, "repeat": 0,
                    "iops": value, "bw_bytes": value * (1 << 20),
                    f"{ddir}_clat_p50_us": 100.0, f"{ddir}_clat_p99_us": 900.0,
                    "server_cpu_pct": 50.0, "rss_kib": 30000,
                    "fio_command": f"fio --rw={workload}"})
    return out


def _group(gid: str, section: str, ours: str, servers: list[str], workloads: list[str],
           values: dict[tuple[str, str], float], **extra: Any) -> dict[str, Any]:
    return {"id": gid, "section": section, "title": gid.replace("-", " "), "ours": ours,
            "numjobs": extra.pop("numjobs", 1), "note": "", "params": extra.pop("params", {}),
            "runtime_s": 1, "repeat": 1, "exit_status": 0,
            "result": {"servers": [{"name": s, "kind": "nbd", "template": f"{s} {{socket}}"}
                                   for s in servers],
                       "workloads": workloads, "runs": _runs(values)}}


def synthetic_run() -> dict[str, Any]:
    peers = ["tapdisk", "qemu-nbd", "nbdkit"]
    wls = ["randread-4k-qd32", "write-1m-qd8"]
    groups = [
        # ours below nbdkit on 4 KiB reads, above everyone on 1 MiB writes
        _group("raw-buffered", "nbd", "tapdisk", peers, wls,
               {("tapdisk", wls[0]): 90000, ("qemu-nbd", wls[0]): 40000,
                ("nbdkit", wls[0]): 100000, ("tapdisk", wls[1]): 1500,
                ("qemu-nbd", wls[1]): 1000, ("nbdkit", wls[1]): 400}),
        _group("scaling-qd", "scaling", "tapdisk", peers,
               ["randread-4k-qd1", "randread-4k-qd128"],
               {(s, w): v for s in peers for w, v in
                (("randread-4k-qd1", 20000), ("randread-4k-qd128", 60000))},
               params={"axis": "qd"}),
        *[_group(f"scaling-conns-{n}", "scaling", "tapdisk", peers, ["randread-4k-qd16"],
                 {(s, "randread-4k-qd16"): 30000.0 * n for s in peers},
                 numjobs=n, params={"axis": "conns", "connections": n}) for n in (1, 4)],
        _group("blockdev", "blockdev", "tapdev", ["tapdev", "qsd-fuse+loop", "loop"],
               ["randread-4k-qd32"],
               {("tapdev", "randread-4k-qd32"): 15000, ("qsd-fuse+loop", "randread-4k-qd32"): 14000,
                ("loop", "randread-4k-qd32"): 50000},
               params={"limits": ["loop"]}),
    ]
    return {
        "schema": 1, "mode": "quick", "date": "2026-12-03T15:00:00Z",
        "command": "bench/run --quick", "runtime_s": 1.0, "repeat": 1, "duration_s": 170.0,
        "machine": {"hostname": "h", "kernel": "6.1", "cpu": "test CPU", "cpus": 2,
                    "mem_gib": 4.0, "os": "Debian", "scratch_dir": "/var/tmp",
                    "scratch_fs": "ext4 /dev/vda", "loadavg_start": [1.0, 1.0, 1.0],
                    "loadavg_end": [1.5, 1.0, 1.0]},
        "versions": {"blktap": "abc", "fio": "fio-3.33"},
        "groups": groups, "errors": [],
        "control": {"rounds": 3, "parallel": 2, "blockdev": "off",
                    "create_ms": [250.0, 260.0, 300.0], "destroy_ms": [180.0, 190.0, 200.0],
                    "parallel_create_s": 1.5, "parallel_rss_kib": [25000, 26000],
                    "parallel_destroy_s": 0.8},
        "memory": [{"kind": "aio", "connections": 32, "no_vbd_kib": 25000,
                    "idle_kib": 28000, "busy_kib": 37000}],
        "coalesce": {"size_mib": 64, "coalesce_s": [0.2], "copy_s": [0.4]},
        "chain_depth": {"size_mib": 32, "seconds": 0.3, "repeat": 1,
                        "results": [{"layout": "spread", "depth": d, "repeat": 0,
                                     "first": 100000.0 / d, "warm": 200000.0 / d}
                                    for d in (1, 4)]},
    }


def render(tmp: Path, doc: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp / "run.json"
    path.write_text(json.dumps(doc))
    return subprocess.run([sys.executable, str(RUN), "--render", str(path),
                           "--report", str(tmp / "report.md"), "--plots", str(tmp / "plots"),
                           *extra], capture_output=True, text=True, check=True, timeout=120)


def test_render_writes_report_and_plots(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench-headline:start -->\nold\n<!-- bench-headline:end -->\n")
    proc = render(tmp_path, synthetic_run(), "--headline-into", str(readme))
    md = (tmp_path / "report.md").read_text()
    # The headline's ratio is against the best peer, and the slower case is named plainly.
    assert "| raw-buffered | randread-4k-qd32 | 90,000 IOPS | nbdkit | 100,000 IOPS | 0.90x" in md
    assert "`raw-buffered` randread-4k-qd32: ours 90,000 IOPS is 0.90x nbdkit's" in md
    # The host's limit (loop) is not a peer: the block device's best peer is qemu's.
    assert "| blockdev | randread-4k-qd32 | 15,000 IOPS | qsd-fuse+loop |" in md
    assert "2026-12-03T15:00:00Z (quick mode" in md
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert {"raw-buffered.png", "blockdev.png", "scaling-qd.png", "scaling-conns.png",
            "latency.png", "control-memory.png", "vhd.png"} <= set(pngs)
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"plots/{name})" in md
    text = readme.read_text()
    assert "old" not in text and "0.90x **below**" in text and "(report.md)" in text
    assert "| raw-buffered | write-1m-qd8 | 1,500 MiB/s | qemu-nbd |" in proc.stdout


def test_compare_flags_what_changed(tmp_path: Path) -> None:
    new = synthetic_run()
    old = copy.deepcopy(new)
    old["date"] = "2026-12-01T10:00:00Z"
    for run in old["groups"][0]["result"]["runs"]:
        if run["server"] == "tapdisk" and run["workload"] == "randread-4k-qd32":
            run["iops"] = 120000.0  # ours was faster before: a regression now
    old["control"]["create_ms"] = [500.0, 520.0, 540.0]  # create was slower before
    (tmp_path / "old.json").write_text(json.dumps(old))
    out = render(tmp_path, new, "--compare", str(tmp_path / "old.json")).stdout
    lines = {line.split()[0]: line.rstrip() for line in out.splitlines() if line.strip()}
    assert lines["raw-buffered/randread-4k-qd32/tapdisk"].endswith("WORSE")
    assert "-25.0%" in lines["raw-buffered/randread-4k-qd32/tapdisk"]
    assert lines["control/create/median"].endswith("better")
    assert lines["raw-buffered/write-1m-qd8/tapdisk"].endswith("+0.0%")
    assert "2 better, 1 worse" in out


def test_history_studies_render_as_focused_comparisons(tmp_path: Path) -> None:
    """An nbd-compare JSON in the history directory that carries a ``study`` gets its own
    table (medians, ratios to its reference column) and measures; one without stays a
    history row only."""
    history = tmp_path / "history"
    history.mkdir()
    study = {"date": "2026-12-03T18:00:00+0000", "reference": "new", "repeat": 3,
             "runtime_s": 10.0, "workloads": ["randread-4k-qd1", "read-1m-qd8"],
             "servers": [{"name": "new"}, {"name": "old"}],
             "summary": {"randread-4k-qd1": {"new": {"iops_median": 8000.0, "ratio_to_ref": 1.0},
                                             "old": {"iops_median": 5000.0,
                                                     "ratio_to_ref": 0.625}},
                         "read-1m-qd8": {"new": {"mibps_median": 600.0, "ratio_to_ref": 1.0}}},
             "study": {"title": "A change", "text": ["Load average 3."],
                       "measures": [["instructions per request, new", "21,000"]]},
             "runs": [{"server": "new", "workload": "randread-4k-qd1", "iops": 8000.0,
                       "server_cpu_pct": 40.0},
                      {"server": "new", "workload": "randread-4k-qd1", "iops": 10000.0,
                       "server_cpu_pct": 40.0},
                      {"server": "old", "workload": "randread-4k-qd1", "iops": 5000.0,
                       "server_cpu_pct": 50.0}]}
    (history / "study.json").write_text(json.dumps(study))
    plain = dict(study, date="2026-12-02T00:00:00+0000")
    del plain["study"]
    (history / "plain.json").write_text(json.dumps(plain))
    render(tmp_path, synthetic_run(), "--history", str(history))
    md = (tmp_path / "report.md").read_text()
    assert md.count("## Focused comparisons") == 1 and md.count("### A change") == 1
    assert "### A change (2026-12-03T18:00:00+0000)" in md and "Load average 3." in md
    assert "| randread-4k-qd1 [IOPS] | 8,000 (1.00x) | 5,000 (0.62x) |" in md
    assert "| read-1m-qd8 [MiB/s] | 600 (1.00x) | - |" in md
    assert "| instructions per request, new | 21,000 |" in md
    # CPU per request: 40% of a CPU at 8,000 and 10,000 IOPS -> 50 and 40 us, median 45.
    assert "| randread-4k-qd1 | 45.0 | 100.0 |" in md
    assert "| read-1m-qd8 | - | - |" in md
    assert md.index("## Focused comparisons") < md.index("## History")
    assert "[plain.json]" in md and "[study.json]" in md  # both in the history table
