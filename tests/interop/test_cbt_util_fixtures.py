"""cbt-util against the reference logs made by the C cbt-util and tapdisk: every field and
the bitmap read with our ``cbt-util get`` as the manifest says, and the logs our commands
make identical byte for byte to the C tool's for the same commands (reference/cbt.md,
"Fixtures"). Runs the installed console script, as a toolstack would."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.reference_data import reference_dir

CBT_UTIL = str(Path(sys.executable).parent / "cbt-util")
REF = reference_dir("cbt")
MANIFEST: dict[str, dict[str, Any]] = {
    e["file"]: e for e in json.loads((REF / "manifest.json").read_text())["logs"]
}
MiB = 1 << 20


def cbt_util(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CBT_UTIL, *argv], capture_output=True, timeout=60, check=False)


def ok(*argv: str) -> bytes:
    proc = cbt_util(*argv)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    return proc.stdout


def copy(tmp_path: Path, name: str) -> str:
    dst = tmp_path / name
    shutil.copyfile(REF / name, dst)
    return str(dst)


def bits_of(bitmap: bytes) -> list[int]:
    """The set bits, computed here without the project's codec."""
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def test_manifest_lists_every_log() -> None:
    assert sorted(MANIFEST) == sorted(p.name for p in REF.glob("*.cbtlog"))
    for name, entry in MANIFEST.items():
        data = (REF / name).read_bytes()
        assert len(data) == entry["file_size"]
        assert hashlib.sha256(data).hexdigest() == entry["file_sha256"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_get_reads_every_field_as_the_manifest_says(name: str) -> None:
    want = MANIFEST[name]
    log = str(REF / name)
    assert ok("get", "-n", log, "-p") == f"{want['parent']}\n".encode()
    assert ok("get", "-n", log, "-c") == f"{want['child']}\n".encode()
    assert ok("get", "-n", log, "-f") == f"{want['consistent']}\n".encode()
    assert ok("get", "-n", log, "-s") == f"{want['size']}\n".encode()
    bitmap = ok("get", "-n", log, "-b")
    assert len(bitmap) == want["bitmap_bytes"]
    assert bits_of(bitmap) == want["bits_set"]
    assert bitmap == (REF / name).read_bytes()[48:]
    encoded = ok("get", "-n", log, "-b", "-E")
    assert encoded.endswith(b"\n")
    assert base64.b64decode(encoded.strip(), validate=True) == bitmap


def test_get_leaves_the_log_untouched(tmp_path: Path) -> None:
    log = copy(tmp_path, "fields.cbtlog")
    for flag in ("-p", "-c", "-f", "-s", "-b"):
        ok("get", "-n", log, flag)
    assert Path(log).read_bytes() == (REF / "fields.cbtlog").read_bytes()


@pytest.mark.parametrize(
    ("name", "size"), [("empty-64m.cbtlog", 64 * MiB), ("empty-odd.cbtlog", 10489856)]
)
def test_create_writes_the_c_tools_bytes(tmp_path: Path, name: str, size: int) -> None:
    log = tmp_path / name
    ok("create", "-n", str(log), "-s", str(size))
    assert log.read_bytes() == (REF / name).read_bytes()


def test_create_overwrites_an_existing_file_as_the_c_tool(tmp_path: Path) -> None:
    log = copy(tmp_path, "raw-writes.cbtlog")
    ok("create", "-n", log, "-s", str(64 * MiB))
    assert Path(log).read_bytes() == (REF / "empty-64m.cbtlog").read_bytes()


def test_set_fields_writes_the_c_tools_bytes(tmp_path: Path) -> None:
    log = str(tmp_path / "fields.cbtlog")
    ok("create", "-n", log, "-s", str(16 * MiB))
    ok("set", "-n", log, "-p", "11111111-2222-3333-4444-555555555555")
    ok("set", "-n", log, "-c", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
    ok("set", "-n", log, "-f", "1")
    assert Path(log).read_bytes() == (REF / "fields.cbtlog").read_bytes()


def test_set_fields_at_once(tmp_path: Path) -> None:
    log = str(tmp_path / "fields.cbtlog")
    ok("create", "-n", log, "-s", str(16 * MiB))
    ok("set", "-n", log, "-p", "11111111-2222-3333-4444-555555555555",
       "-c", "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE", "-f", "1")
    assert Path(log).read_bytes() == (REF / "fields.cbtlog").read_bytes()


def test_set_size_grows_as_the_c_tool(tmp_path: Path) -> None:
    log = str(tmp_path / "grown.cbtlog")
    ok("create", "-n", log, "-s", str(8 * MiB))
    ok("set", "-n", log, "-s", str(40 * MiB))
    assert Path(log).read_bytes() == (REF / "grown.cbtlog").read_bytes()


def test_set_size_keeps_marked_blocks(tmp_path: Path) -> None:
    log = copy(tmp_path, "raw-writes.cbtlog")
    ok("set", "-n", log, "-s", str(100 * MiB))
    assert ok("get", "-n", log, "-s") == f"{100 * MiB}\n".encode()
    bitmap = ok("get", "-n", log, "-b")
    assert len(bitmap) == 200
    assert bits_of(bitmap) == MANIFEST["raw-writes.cbtlog"]["bits_set"]
    assert Path(log).stat().st_size == 48 + 200


def test_coalesce_writes_the_c_tools_bytes(tmp_path: Path) -> None:
    parent = copy(tmp_path, "raw-writes.cbtlog")
    child = copy(tmp_path, "vhd-writes.cbtlog")
    ok("coalesce", "-p", parent, "-c", child)
    assert Path(child).read_bytes() == (REF / "co-child.cbtlog").read_bytes()
    assert Path(parent).read_bytes() == (REF / "co-parent.cbtlog").read_bytes()
    ok("coalesce", "-p", parent, "-c", child)  # idempotent
    assert Path(child).read_bytes() == (REF / "co-child.cbtlog").read_bytes()


def test_coalesce_into_a_grown_child(tmp_path: Path) -> None:
    parent = copy(tmp_path, "vhd-writes.cbtlog")
    child = copy(tmp_path, "grown.cbtlog")  # 40 MiB: its bitmap is smaller than 64 MiB's
    proc = cbt_util("coalesce", "-p", parent, "-c", child)
    assert proc.returncode == 22
    assert b"Parent bitmap larger than child bitmap" in proc.stderr
    assert Path(child).read_bytes() == (REF / "grown.cbtlog").read_bytes()
    ok("set", "-n", child, "-s", str(64 * MiB))
    ok("coalesce", "-p", parent, "-c", child)
    assert bits_of(ok("get", "-n", child, "-b")) == MANIFEST["vhd-writes.cbtlog"]["bits_set"]
