"""vhd-util's command line: usage errors, help, exit codes, and the output formats of
create/query/set/snapshot/scan/read, run in-process (and once through the console
script)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blktap.cli.vhd_util import COMMANDS, main
from blktap.vhdutil.reader import ChainReader
from tests.helpers import FIXTURES, VHD_UTIL

MB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fixture(tmp_path: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        dst = tmp_path / name
        shutil.copyfile(FIXTURES / name, dst)
        out.append(str(dst))
    return out


# ------------------------------------------------------------------- usage and help
def test_no_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = run(capsys)
    assert rc == errno.EINVAL
    assert "usage:" in err and "coalesce" in err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == errno.EINVAL
    assert "unknown command" in capsys.readouterr().err


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"  {cmd} " in out
    assert "exit status" in out


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_command_has_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, cmd, "-h")
    assert rc == 0
    assert out.startswith(f"usage: vhd-util {cmd}")
    assert "-n NAME" in out or cmd == "scan"
    assert len(out.splitlines()) > 5


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "-s", "10"],
        ["create", "-n", "x.vhd"],
        ["create", "-n", "x.vhd", "-s", "0"],
        ["create", "-n", "x.vhd", "-s", "ten"],
        ["query", "-n", "x", "-Q"],
        ["set", "-n", "x", "-f", "color", "-v", "1"],
        ["set", "-n", "x", "-f", "hidden", "-v", "300"],
        ["resize", "-n", "x", "-s", "10"],
        ["resize", "-n", "x", "-s", "10", "-f", "-j", "j"],
        ["scan"],
        ["modify", "-n", "x"],
        ["read", "-n", "x", "-c", "0"],
        ["check"],
        ["revert", "-n", "x"],
    ],
)
def test_usage_errors_exit_22(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == errno.EINVAL
    assert "usage:" in err


def test_console_script_exit_codes(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.vhd")
    proc = subprocess.run([VHD_UTIL, "query", "-n", missing, "-v"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == errno.ENOENT
    assert "missing.vhd" in proc.stderr
    proc = subprocess.run([VHD_UTIL], capture_output=True, text=True, timeout=30)
    assert proc.returncode == errno.EINVAL


# ------------------------------------------------------------------- create and query
def test_create_dynamic_and_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = str(tmp_path / "d.vhd")
    assert run(capsys, "create", "-n", name, "-s", "100")[0] == 0
    assert os.path.getsize(name) == 3584  # reference/vhd.md: 100 MB dynamic disk
    rc, out, _ = run(capsys, "query", "-n", name, "-v", "-s", "-p", "-f", "-m", "-d", "-S", "-a")
    assert rc == 0
    assert out.splitlines() == [
        "100", "3584", f"{name} has no parent", "hidden: 0", "marker: 0", "chain depth: 1",
        "0", "100",
    ]


def test_create_refuses_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = str(tmp_path / "d.vhd")
    assert run(capsys, "create", "-n", name, "-s", "8")[0] == 0
    rc, _, err = run(capsys, "create", "-n", name, "-s", "8")
    assert rc == errno.EEXIST
    assert "exists" in err


def test_create_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = str(tmp_path / "f.vhd")
    assert run(capsys, "create", "-n", name, "-s", "4", "-r")[0] == 0
    assert os.path.getsize(name) == 4 * MB + 512
    rc, out, _ = run(capsys, "query", "-n", name, "-v", "-s")
    assert out.splitlines() == ["4", str(4 * MB + 512)]
    rc, out, _ = run(capsys, "check", "-n", name)
    assert (rc, out) == (0, "")  # a valid fixed disk prints nothing


def test_create_metadata_prealloc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = str(tmp_path / "p.vhd")
    assert run(capsys, "create", "-n", name, "-s", "10", "-S", "1000")[0] == 0
    assert run(capsys, "query", "-n", name, "-v", "-S")[1].splitlines() == ["10", "1000"]
    assert run(capsys, "check", "-n", name)[1] == f"{name} is valid\n"


def test_create_prealloc_smaller_than_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = str(tmp_path / "p.vhd")
    rc, _, err = run(capsys, "create", "-n", name, "-s", "100", "-S", "50")
    assert rc == errno.EINVAL
    assert "<-S size> must be greater than <-s size>" in err
    assert not os.path.exists(name)


def test_query_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, child, grand = fixture(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")
    rc, out, _ = run(capsys, "query", "-n", grand, "-p", "-d", "-a")
    assert rc == 0
    assert out.splitlines() == [child, "chain depth: 3", "2"]
    rc, out, _ = run(capsys, "query", "-n", base, "-p")
    assert out == f"{base} has no parent\n"


def test_query_unresolved_parent_and_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (child,) = fixture(tmp_path, "child.vhd")  # its parent is not there
    rc, out, _ = run(capsys, "query", "-n", child, "-p", "-u")
    assert (rc, out) == (0, "./base.vhd\n")
    (dyn,) = fixture(tmp_path, "dyn-data.vhd")
    assert run(capsys, "set", "-n", dyn, "-f", "hidden", "-v", "1")[0] == 0
    with open(dyn, "r+b") as f:  # the backup copy says hidden 0 (checksum kept valid)
        raw = bytearray(f.read(512))
        raw[85] = 0
        raw[64:68] = (int.from_bytes(raw[64:68], "big") + 1).to_bytes(4, "big")
        f.seek(0)
        f.write(raw)
    assert run(capsys, "query", "-n", dyn, "-f")[1] == "hidden: 1\n"
    assert run(capsys, "query", "-n", dyn, "-f", "-b")[1] == "hidden: 0\n"


def test_query_missing_parent_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (child,) = fixture(tmp_path, "child.vhd")
    rc, _out, err = run(capsys, "query", "-n", child, "-p")
    assert rc == errno.ENOENT
    assert "base.vhd" in err
    # Without -p the parent is not needed.
    assert run(capsys, "query", "-n", child, "-v")[1] == "64\n"


# ------------------------------------------------------------------------------- set
def test_set_hidden_and_marker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (name,) = fixture(tmp_path, "dyn-data.vhd")
    assert run(capsys, "set", "-n", name, "-f", "hidden", "-v", "1")[0] == 0
    assert run(capsys, "set", "-n", name, "-f", "marker", "-v", "1")[0] == 0
    _rc, out, _ = run(capsys, "query", "-n", name, "-f", "-m")
    assert out.splitlines() == ["hidden: 1", "marker: 1"]
    assert run(capsys, "check", "-n", name)[0] == 0
    assert run(capsys, "scan", "-M", name)[1] == (
        "vhd=dyn-data.vhd capacity=67108864 size=10506752 hidden=1 marker=1 parent=none\n"
    )
    with ChainReader.open(name) as chain:  # contents untouched
        assert chain.read(0, 4096) != bytes(4096)


def test_set_marker_needs_batmap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (name,) = fixture(tmp_path, "qemu-dyn.vhd")
    rc, _, err = run(capsys, "set", "-n", name, "-f", "marker", "-v", "1")
    assert rc == errno.EINVAL
    assert "batmap" in err


# -------------------------------------------------------------------------- snapshot
def test_snapshot_skips_empty_parents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (base,) = fixture(tmp_path, "base.vhd")
    s1 = str(tmp_path / "s1.vhd")
    s2 = str(tmp_path / "s2.vhd")
    s3 = str(tmp_path / "s3.vhd")
    assert run(capsys, "snapshot", "-n", s1, "-p", base)[0] == 0
    assert run(capsys, "snapshot", "-n", s2, "-p", s1)[0] == 0  # s1 is empty: skipped
    assert run(capsys, "query", "-n", s2, "-p", "-d")[1].splitlines() == [base, "chain depth: 2"]
    assert run(capsys, "snapshot", "-n", s3, "-p", s1, "-e")[0] == 0  # linked exactly
    assert run(capsys, "query", "-n", s3, "-p", "-d")[1].splitlines() == [s1, "chain depth: 3"]
    for name in (s1, s2, s3):
        assert run(capsys, "check", "-n", name, "-p")[0] == 0


def test_snapshot_metadata_prealloc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (base,) = fixture(tmp_path, "base.vhd")
    snap = str(tmp_path / "snap.vhd")
    assert run(capsys, "snapshot", "-n", snap, "-p", base, "-S", "512")[0] == 0
    assert run(capsys, "query", "-n", snap, "-v", "-S", "-p")[1].splitlines() == [
        "64", base, "512",  # the C tool's order: -v, -s, -p, -f, -m, -d, -S
    ]
    assert run(capsys, "check", "-n", snap, "-p")[0] == 0
    with ChainReader.open(snap) as chain, ChainReader.open(base) as parent:
        assert chain.read(0, chain.size) == parent.read(0, parent.size)


def test_snapshot_depth_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _base, child = fixture(tmp_path, "base.vhd", "child.vhd")
    snap = str(tmp_path / "snap.vhd")
    rc, _, err = run(capsys, "snapshot", "-n", snap, "-p", child, "-l", "2")
    assert rc == errno.ENOSPC
    assert "depth" in err
    assert not os.path.exists(snap)
    assert run(capsys, "snapshot", "-n", snap, "-p", child, "-l", "3")[0] == 0


def test_snapshot_raw_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (raw,) = fixture(tmp_path, "raw-parent.img")
    snap = str(tmp_path / "snap.vhd")
    assert run(capsys, "snapshot", "-n", snap, "-p", raw, "-m")[0] == 0
    assert run(capsys, "query", "-n", snap, "-v", "-p")[1].splitlines() == ["16", raw]
    assert run(capsys, "check", "-n", snap)[0] == 0
    with ChainReader.open(snap) as chain, open(raw, "rb") as f:
        assert chain.read(0, chain.size) == f.read()


def test_snapshot_skips_empty_disks_down_to_a_raw_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (raw,) = fixture(tmp_path, "raw-parent.img")
    a = str(tmp_path / "a.vhd")
    b = str(tmp_path / "b.vhd")
    assert run(capsys, "snapshot", "-n", a, "-p", raw, "-m")[0] == 0
    # a is empty: b links to the raw image itself (and no depth limit applies to it).
    assert run(capsys, "snapshot", "-n", b, "-p", a, "-l", "1")[0] == 0
    assert run(capsys, "query", "-n", b, "-p", "-d")[1].splitlines() == [raw, "chain depth: 2"]
    assert run(capsys, "check", "-n", b)[0] == 0


def test_snapshot_missing_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = run(capsys, "snapshot", "-n", str(tmp_path / "s.vhd"), "-p",
                   str(tmp_path / "nope.vhd"))
    assert rc == errno.ENOENT
    assert not os.path.exists(tmp_path / "s.vhd")


def test_fill_bat_only_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = fixture(tmp_path, "dyn-data.vhd")
    before = os.path.getsize(path)
    # Sectors 4096*8 .. 4096*10: blocks 8, 9 and 10 (unallocated so far).
    assert run(capsys, "fill", "-n", path, "-b", "-f", str(4096 * 8), "-t", str(4096 * 10))[0] == 0
    assert run(capsys, "query", "-n", path, "-a")[1] == "8\n"
    assert run(capsys, "check", "-n", path, "-b")[0] == 0
    assert os.path.getsize(path) == before + 3 * ((2 << 20) + 4096)
    with ChainReader.open(path) as chain:
        assert not any(chain.read(8 * (2 << 20), 3 * (2 << 20)))
    assert run(capsys, "fill", "-n", path, "-f", "0")[0] == errno.EINVAL  # needs -b
    assert run(capsys, "fill", "-n", path, "-b", "-f", "9", "-t", "1")[0] == errno.EINVAL


def test_coalesce_progress_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture(tmp_path, "base.vhd")
    (child,) = fixture(tmp_path, "child.vhd")
    rc, out, err = run(capsys, "coalesce", "-n", child, "-p")
    assert (rc, out) == (0, "Coalesced 4225 sectors\n")
    assert f"coalesce {child} [" in err and err.endswith("100%\n")


# ------------------------------------------------------------------------------ scan
def test_scan_lines_and_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, child, grand = fixture(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")
    rc, out, _ = run(capsys, "scan", grand, child)
    assert rc == 0
    assert out.splitlines() == [
        "vhd=grandchild.vhd capacity=67108864 size=4207104 hidden=0 parent=child.vhd",
        "vhd=child.vhd capacity=67108864 size=6308352 hidden=0 parent=base.vhd",
    ]
    rc, out, _ = run(capsys, "scan", "-p", "-a", grand)
    assert out.splitlines() == [
        "vhd=base.vhd capacity=67108864 size=10506752 hidden=0 parent=none",
        "   vhd=child.vhd capacity=67108864 size=6308352 hidden=0 parent=base.vhd",
        "      vhd=grandchild.vhd capacity=67108864 size=4207104 hidden=0 parent=child.vhd",
    ]
    rc, out, _ = run(capsys, "scan", "-v", "-m", str(tmp_path / "b*.vhd"))
    assert out == f"vhd={base} capacity=67108864 size=10506752 hidden=0 parent=none\n"


def test_scan_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(b"not a vhd" * 100)
    (good,) = fixture(tmp_path, "dyn-empty.vhd")
    rc, out, _ = run(capsys, "scan", str(bad), good)
    assert rc == errno.EINVAL
    assert out.splitlines() == [f"vhd={bad} scan-error=-22 error-message='opening file'"]
    rc, out, _ = run(capsys, "scan", "-c", str(bad), good)
    assert rc == 0
    assert len(out.splitlines()) == 2
    assert run(capsys, "scan", "-l", "VG", good)[0] == errno.ENOSYS
