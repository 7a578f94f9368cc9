"""``tap-ctl create -a null:TYPE:PATH``: the pass-through layer serves, lists and counts
as the bare image does (fio with crc32c verify over the VBD's NBD socket)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import VHD_UTIL
from tests.system.test_tap_ctl import assert_clean, nbd_uri, ok, parse_list

needs_fio = pytest.mark.skipif(shutil.which("fio") is None,
                               reason="fio is not installed (scripts/setup.sh installs it)")
SIZE_MB = 32


def make_image(kind: str, path: Path) -> str:
    if kind == "vhd":
        subprocess.run([VHD_UTIL, "create", "-n", str(path), "-s", str(SIZE_MB)], check=True,
                       capture_output=True, timeout=60)
    else:
        with open(path, "wb") as f:
            f.truncate(SIZE_MB << 20)
    return str(path)


def fio_verify(uri: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["fio", "--output-format=json", "--name=layers", "--ioengine=nbd", f"--uri={uri}",
         "--bs=4k", "--rw=randrw", "--iodepth=16", "--size=8M", "--verify=crc32c",
         "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{"):])
    for job in result["jobs"]:
        assert job["error"] == 0, job
    return result


def serve_once(run_dir: str, spec: str,
               flags: list[str]) -> tuple[dict[str, str], dict[str, Any], int]:
    """Create a VBD for ``spec``, run fio against it, return its list entry, its stats and
    the bytes fio wrote; destroy it."""
    ok("create", "-a", spec, *flags)
    (entry,) = [e for e in parse_list(ok("list")) if e.get("args") == spec]
    pid, minor = entry["pid"], entry["minor"]
    try:
        result = fio_verify(nbd_uri(run_dir, int(pid), int(minor)))
        stats = json.loads(ok("stats", "-p", pid, "-m", minor))
    finally:
        ok("destroy", "-p", pid, "-m", minor)
    return entry, stats, result["jobs"][0]["write"]["io_bytes"]


@needs_fio
@pytest.mark.parametrize(("kind", "flags"), [("aio", []), ("aio", ["-D"]), ("vhd", [])],
                         ids=["aio", "aio-D", "vhd"])
def test_null_layer_serves_lists_and_counts_as_the_bare_image(
        run_dir: str, tmp_path: Path, kind: str, flags: list[str]) -> None:
    seen = {}
    for prefix in ("", "null:"):
        path = make_image(kind, tmp_path / f"{prefix.strip(':') or 'bare'}.{kind}")
        spec = f"{prefix}{kind}:{path}"
        entry, stats, written = serve_once(run_dir, spec, flags)
        assert entry["state"] == "0"
        assert stats["name"] == spec
        assert [i["name"] for i in stats["images"]] == [path]
        assert stats["errors"] == [0, 0] and not stats["read_only"]
        assert stats["secs"][1] * 512 >= written > 0
        seen[prefix] = stats
    bare, null = seen[""], seen["null:"]
    assert null.keys() == bare.keys()
    assert null["secs"] == bare["secs"]  # the same fio job (randrepeat): the same I/O
    for b, n in zip(bare["images"], null["images"], strict=True):
        assert (n["driver"], n["fail"]) == (b["driver"], b["fail"])
    assert_clean(run_dir)
