"""Run bench/nbd-compare for one group of columns and return its JSON.

A *group* is one nbd-compare invocation: the same fio workloads against several NBD
servers (shell templates with ``{socket}`` and ``{image}``) and/or block devices
(``--file``), interleaved by nbd-compare so that all columns share the machine's state.
Every fio run nbd-compare reports on stderr advances the caller's progress line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NBD_COMPARE = Path(os.environ.get("NBD_COMPARE", ROOT / "bench" / "nbd-compare"))

# nbd-compare's line for one finished fio run: "  NAME  WORKLOAD  rep N: VALUE UNIT ..."
# or "  NAME  WORKLOAD  rep N: FAILED: why".
_RUN_LINE = re.compile(r"^\s+(\S+)\s+(\S+)\s+rep (\d+): (.*)$")


@dataclass
class Group:
    """One nbd-compare invocation. ``ours`` names our column (ratios are against it)."""

    id: str
    section: str
    title: str
    image: str
    workloads: list[str]
    ours: str
    servers: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)
    numjobs: int = 1
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> int:
        return len(self.servers) + len(self.files)

    def fio_runs(self, repeat: int) -> int:
        return self.columns() * len(self.workloads) * repeat


def run_group(group: Group, runtime: float, repeat: int, workdir: str,
              step: Callable[[str], None], fio_timeout: float = 60) -> dict[str, Any]:
    """Run nbd-compare for ``group``; call ``step(label)`` once per finished fio run.

    A fio run still going ``fio_timeout`` seconds after its runtime is killed and
    recorded as failed. Returns the group's description with nbd-compare's whole JSON
    under ``"result"`` (every individual run). Raises RuntimeError if nbd-compare
    produced no JSON. On any exception (KeyboardInterrupt included) nbd-compare is
    stopped with SIGTERM, which makes it stop its server and fio and remove its sockets.
    """
    out = os.path.join(workdir, f"{group.id}.json")
    cmd = [sys.executable, str(NBD_COMPARE), "--runtime", f"{runtime:g}",
           "--repeat", str(repeat), "--numjobs", str(group.numjobs), "--ref", group.ours,
           "--workloads", ",".join(group.workloads), "--json", out,
           "--fio-timeout", f"{fio_timeout:g}", "--start-timeout", "60"]
    for name, path in group.files:
        cmd += ["--file", f"{name}::{path}"]
    cmd.append(group.image)
    cmd += [f"{name}::{template}" for name, template in group.servers]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=workdir)
    assert proc.stderr is not None
    log: list[str] = []  # nbd-compare's other lines: its errors
    try:
        for line in proc.stderr:
            m = _RUN_LINE.match(line)
            if m:
                step(f"{group.id} {m.group(2)} {m.group(1)}: {m.group(4).strip()}")
            else:
                log.append(line.rstrip())
        proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    finally:
        proc.stderr.close()
    if not os.path.exists(out):
        raise RuntimeError(f"nbd-compare failed ({proc.returncode}) for {group.id}: "
                           + " | ".join(log[-5:]))
    with open(out) as f:
        result: dict[str, Any] = json.load(f)
    os.unlink(out)
    return {"id": group.id, "section": group.section, "title": group.title,
            "ours": group.ours, "numjobs": group.numjobs, "note": group.note,
            "params": group.params, "runtime_s": runtime, "repeat": repeat,
            "exit_status": proc.returncode, "log": log[-50:], "result": result}
