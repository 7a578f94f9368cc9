"""Two behaviours toolstacks rely on: ``--debug`` anywhere after the command is removed
before parsing (debug messages on standard error only), and ``check -i`` judges the backup
footer when the primary (trailing) one is invalid, whatever the damage."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path

import pytest

from blktap.cli.vhd_util import main, strip_debug
from blktap.proto.vhd.footer import parse_footer
from tests.helpers import VHD_UTIL

MB = 1 << 20


def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([VHD_UTIL, *argv], capture_output=True, timeout=60)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def make(tmp_path: Path, name: str = "d.vhd") -> str:
    path = str(tmp_path / name)
    assert cli("create", "-n", path, "-s", "16").returncode == 0
    return path


def patch_tail(path: str, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(data)


# -------------------------------------------------------------------------- --debug
def test_strip_debug() -> None:
    assert strip_debug(["-n", "x", "--debug"]) == (["-n", "x"], True)
    assert strip_debug(["--debug", "-vsafp", "--debug", "-n", "x"]) == (["-vsafp", "-n", "x"], True)
    assert strip_debug(["-n", "x"]) == (["-n", "x"], False)
    assert strip_debug(["--debugging"]) == (["--debugging"], False)


@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_debug_accepted_at_any_position(tmp_path: Path, where: int) -> None:
    path = make(tmp_path)
    args = ["-vsafp", "-n", path]
    args.insert(where, "--debug")
    plain = cli("query", "-vsafp", "-n", path)
    debug = cli("query", *args)
    assert plain.returncode == debug.returncode == 0
    assert debug.stdout == plain.stdout == b"16\n3584\n" + f"{path} has no parent\n".encode() + (
        b"hidden: 0\n0\n")
    lines = debug.stderr.decode().splitlines()
    assert lines and all(line.startswith("vhd-util query: debug: ") for line in lines)
    assert plain.stderr == b""


def test_debug_logs_what_the_library_does(tmp_path: Path) -> None:
    base = make(tmp_path, "base.vhd")
    leaf = str(tmp_path / "leaf.vhd")
    proc = cli("snapshot", "-n", leaf, "-p", base, "--debug")
    assert proc.returncode == 0 and proc.stdout == b""
    err = proc.stderr.decode()
    assert "snapshot -n" in err and "dynamic disk, 16777216 bytes" in err
    proc = cli("query", "--debug", "-d", "-n", leaf)
    assert proc.stdout == b"chain depth: 2\n"
    assert f"parent {os.path.realpath(base)}" in proc.stderr.decode()


def test_debug_keeps_raw_output_and_errors(tmp_path: Path) -> None:
    path = make(tmp_path)
    assert cli("read", "--debug", "-B", "-n", path).stdout == cli("read", "-B", "-n", path).stdout
    missing = str(tmp_path / "missing.vhd")
    proc = cli("query", "--debug", "-v", "-n", missing)
    assert proc.returncode == errno.ENOENT and proc.stdout == b""
    # Before the command it is not removed: it is not a command (as the C tool).
    assert cli("--debug", "query", "-v", "-n", path).returncode == errno.EINVAL


def test_in_process_debug_is_stripped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path)
    assert run(capsys, "query", "--debug", "-v", "-n", path)[:2] == (0, "16\n")


# -------------------------------------------------------------------------- check -i
@pytest.mark.parametrize("damage", [bytes(512), b"\xc7" * 512, b"junk" * 128])
def test_check_i_skips_an_invalid_primary_footer(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 damage: bytes) -> None:
    path = make(tmp_path)
    patch_tail(path, damage)
    rc, out, _ = run(capsys, "check", "-n", path)
    assert rc == errno.EINVAL and out.startswith("primary footer invalid")
    assert run(capsys, "check", "-n", path, "-i")[:2] == (0, f"{path} is valid\n")
    assert run(capsys, "check", "-n", path, "-i", "-B")[:2] == (0, f"{path} is valid\n")


def test_check_i_needs_a_valid_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make(tmp_path)
    patch_tail(path, bytes(512))
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    rc, out, _ = run(capsys, "check", "-n", path, "-i")
    assert rc == errno.EINVAL and out.startswith("backup footer invalid: invalid cookie")


def test_check_i_trusts_the_backup_when_the_footers_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path)
    with open(path, "rb") as f:
        foot = parse_footer(f.read(512))
    patch_tail(path, dataclasses.replace(foot, saved=1).with_checksum().encode())
    rc, out, _ = run(capsys, "check", "-n", path)
    assert (rc, out.splitlines()[0]) == (errno.EINVAL, "primary and backup footers do not match")
    assert run(capsys, "check", "-n", path, "-i")[:2] == (0, f"{path} is valid\n")
