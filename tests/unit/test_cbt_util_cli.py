"""cbt-util's command line: usage errors, help, exit codes and error messages for files
that are not valid logs, run in-process (the console script is exercised by
tests/interop/test_cbt_util_fixtures.py and tests/compat/test_sm_cbtutil.py)."""

from __future__ import annotations

import base64
import errno
import shutil
from pathlib import Path

import pytest

from blktap.cbtutil.setfield import set_fields
from blktap.cli.cbt_util import COMMANDS, main
from blktap.proto import cbt
from tests.reference_data import reference_dir

REF = reference_dir("cbt")
MiB = 1 << 20
Capture = pytest.CaptureFixture[bytes]


def run(capsysbinary: Capture, *argv: str) -> tuple[int, bytes, str]:
    rc = main(list(argv))
    out, err = capsysbinary.readouterr()
    return rc, out, err.decode()


def copy(tmp_path: Path, name: str) -> str:
    dst = tmp_path / name
    shutil.copyfile(REF / name, dst)
    return str(dst)


# ------------------------------------------------------------------- usage and help
def test_no_arguments_is_a_usage_error(capsysbinary: Capture) -> None:
    rc, out, err = run(capsysbinary)
    assert rc == errno.EINVAL
    assert out == b""
    assert "COMMAND := { create | set | get | coalesce }" in err


def test_unknown_command(capsysbinary: Capture) -> None:
    rc, _out, err = run(capsysbinary, "frobnicate")
    assert rc == errno.EINVAL
    assert "Invalid COMMAND frobnicate" in err


def test_top_level_help(capsysbinary: Capture) -> None:
    rc, out, _err = run(capsysbinary, "--help")
    assert rc == 0
    text = out.decode()
    for word in ("create", "get", "set", "coalesce", "exit status", "64 KiB", "EINVAL"):
        assert word in text


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_command_has_help(cmd: str, capsysbinary: Capture) -> None:
    rc, out, _err = run(capsysbinary, cmd, "-h")
    assert rc == 0
    text = out.decode()
    assert f"cbt-util {cmd}" in text
    assert "example" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "-n", "x"],
        ["create", "-s", "100"],
        ["create", "-n", "x", "-s", "0"],
        ["create", "-n", "x", "-s", "-1"],
        ["create", "-n", "x", "-s", "64M"],
        ["create", "-n", "x", "-s", str(1 << 64)],
        ["get", "-n", "x"],
        ["get", "-n", "x", "-p", "-c"],
        ["get", "-n", "x", "-s", "-b"],
        ["get", "-n", "x", "-p", "-E"],
        ["get", "-p"],
        ["set", "-n", "x"],
        ["set", "-n", "x", "-f", "2"],
        ["set", "-n", "x", "-f", "yes"],
        ["set", "-n", "x", "-p", "not-a-uuid"],
        ["set", "-n", "x", "-c", "{11111111-2222-3333-4444-555555555555}"],
        ["set", "-n", "x", "-s", "0"],
        ["coalesce", "-p", "x"],
        ["coalesce", "-c", "x"],
        ["get", "-n", "x", "-p", "extra"],
    ],
)
def test_usage_errors_exit_22(
    argv: list[str], capsysbinary: Capture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsysbinary, *argv)
    assert rc == errno.EINVAL
    assert out == b""
    assert "usage: cbt-util" in err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------- errors and files
def test_missing_file_is_enoent(capsysbinary: Capture, tmp_path: Path) -> None:
    missing = str(tmp_path / "none.cbtlog")
    for argv in (["get", "-n", missing, "-s"], ["set", "-n", missing, "-f", "1"],
                 ["coalesce", "-p", missing, "-c", missing]):
        rc, out, err = run(capsysbinary, *argv)
        assert rc == errno.ENOENT
        assert out == b""
        assert f"Failed to open log file {missing}. No such file or directory" in err


def test_create_in_a_missing_directory(capsysbinary: Capture, tmp_path: Path) -> None:
    rc, _out, err = run(capsysbinary, "create", "-n", str(tmp_path / "no" / "x"), "-s", "1")
    assert rc == errno.ENOENT
    assert "Failed to open log file" in err


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"", errno.EIO, "truncated: 0 bytes"),
        (bytes(47), errno.EIO, "truncated: 47 bytes"),
        (bytes(48), errno.EINVAL, "not a CBT log: the disk size is 0"),
        (b"#!/bin/sh\n" * 10, errno.EINVAL, "not a CBT log"),
        (cbt.CbtHeader(size=64 * MiB).encode() + bytes(100), errno.EIO,
         "bitmap smaller than the disk: 100 bytes, a disk of 67108864 bytes needs 128"),
        (cbt.CbtHeader(size=64 * MiB).encode() + bytes(129), errno.EINVAL,
         "size mismatch: the file is 177 bytes, a log for a disk of 67108864 bytes is 176"),
    ],
)
@pytest.mark.parametrize("field", ["-p", "-c", "-f", "-s", "-b"])
def test_invalid_logs_are_refused_precisely(
    capsysbinary: Capture, tmp_path: Path, data: bytes, code: int, words: str, field: str
) -> None:
    log = tmp_path / "bad.cbtlog"
    log.write_bytes(data)
    rc, out, err = run(capsysbinary, "get", "-n", str(log), field)
    assert rc == code
    assert out == b""
    assert err.startswith("cbt-util get: ")
    assert words in err


@pytest.mark.parametrize(
    "argv",
    [["set", "-n", "{log}", "-f", "1"], ["set", "-n", "{log}", "-p", str(cbt.NULL_UUID)],
     ["coalesce", "-p", "{log}", "-c", "{good}"], ["coalesce", "-p", "{good}", "-c", "{log}"]],
)
def test_writes_refuse_invalid_logs_and_change_nothing(
    capsysbinary: Capture, tmp_path: Path, argv: list[str]
) -> None:
    log = tmp_path / "bad.cbtlog"
    bad = cbt.CbtHeader(size=64 * MiB).encode() + bytes(100)
    log.write_bytes(bad)
    good = copy(tmp_path, "raw-writes.cbtlog")
    rc, _out, err = run(capsysbinary, *(a.format(log=log, good=good) for a in argv))
    assert rc == errno.EIO
    assert "bitmap smaller than the disk" in err
    assert log.read_bytes() == bad
    assert Path(good).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()


def test_set_size_smaller_is_refused(capsysbinary: Capture, tmp_path: Path) -> None:
    log = copy(tmp_path, "grown.cbtlog")
    rc, _out, err = run(capsysbinary, "set", "-n", log, "-s", str(40 * MiB - 1), "-f", "1")
    assert rc == errno.EINVAL
    assert "Size smaller than current file size (41943040)" in err
    assert Path(log).read_bytes() == (REF / "grown.cbtlog").read_bytes()


def test_set_same_size_changes_nothing(capsysbinary: Capture, tmp_path: Path) -> None:
    log = copy(tmp_path, "raw-writes.cbtlog")
    rc, _out, _err = run(capsysbinary, "set", "-n", log, "-s", str(64 * MiB))
    assert rc == 0
    assert Path(log).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()


def test_set_size_within_the_last_byte_keeps_the_file_length(
    capsysbinary: Capture, tmp_path: Path
) -> None:
    log = copy(tmp_path, "empty-odd.cbtlog")  # 161 blocks in 21 bytes: room for 168
    rc, _out, _err = run(capsysbinary, "set", "-n", log, "-s", str(168 * 65536))
    assert rc == 0
    assert Path(log).stat().st_size == 69
    assert cbt.parse_log(Path(log).read_bytes()).header.size == 168 * 65536


def test_interrupted_grow_is_completed_by_the_same_set(
    capsysbinary: Capture, tmp_path: Path
) -> None:
    """A crash between extending the bitmap and rewriting the header leaves the old
    header over a longer file: get reports it, the same set -s finishes the job."""
    log = copy(tmp_path, "raw-writes.cbtlog")
    with open(log, "r+b") as f:
        f.truncate(48 + 256)  # as set -s 128 MiB leaves it before its header write
    rc, _out, err = run(capsysbinary, "get", "-n", log, "-s")
    assert rc == errno.EINVAL
    assert "size mismatch" in err
    rc, _out, _err = run(capsysbinary, "set", "-n", log, "-s", str(128 * MiB))
    assert rc == 0
    grown = cbt.parse_log(Path(log).read_bytes())
    assert grown.header.size == 128 * MiB
    assert grown.bits_set() == cbt.parse_log((REF / "raw-writes.cbtlog").read_bytes()).bits_set()


def test_grow_zeroes_stale_bytes_past_the_bitmap(tmp_path: Path) -> None:
    log = copy(tmp_path, "empty-64m.cbtlog")
    with open(log, "ab") as f:
        f.write(b"\xff" * 300)  # garbage past the bitmap, then an interrupted grow's length
    header = set_fields(log, size=100 * MiB)
    data = Path(log).read_bytes()
    assert len(data) == header.log_size == 48 + 200
    assert data[48:] == bytes(200)


def test_get_bitmap_writes_only_the_bytes(capsysbinary: Capture) -> None:
    rc, out, err = run(capsysbinary, "get", "-n", str(REF / "vhd-writes.cbtlog"), "-b")
    assert (rc, err) == (0, "")
    assert out == (REF / "vhd-writes.cbtlog").read_bytes()[48:]


def test_get_fields_of_a_made_log(capsysbinary: Capture, tmp_path: Path) -> None:
    log = str(tmp_path / "a.cbtlog")
    assert run(capsysbinary, "create", "-n", log, "-s", "1")[0] == 0
    assert run(capsysbinary, "get", "-n", log, "-s")[1] == b"1\n"
    assert run(capsysbinary, "get", "-n", log, "-b")[1] == b"\0"
    assert run(capsysbinary, "set", "-n", log, "-c", "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE")[0] == 0
    assert run(capsysbinary, "get", "-n", log, "-c")[1] == b"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\n"


def test_create_for_the_largest_size_fails_cleanly(capsysbinary: Capture, tmp_path: Path) -> None:
    """2**64-1 bytes need a 32 TiB bitmap: the file system refuses it (EFBIG, or ENOSPC
    where the file may be that large), nothing is held in memory, no file is left."""
    log = tmp_path / "huge.cbtlog"
    rc, out, err = run(capsysbinary, "create", "-n", str(log), "-s", str((1 << 64) - 1))
    assert rc in (errno.EFBIG, errno.ENOSPC)
    assert out == b""
    assert str(log) in err
    assert not log.exists()


def test_set_size_too_large_leaves_the_log_as_it_was(
    capsysbinary: Capture, tmp_path: Path
) -> None:
    log = copy(tmp_path, "raw-writes.cbtlog")
    rc, _out, err = run(capsysbinary, "set", "-n", log, "-s", str((1 << 64) - 1), "-f", "1")
    assert rc in (errno.EFBIG, errno.ENOSPC)
    assert log in err
    assert Path(log).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()


def test_get_bitmap_of_a_large_log_in_chunks(capsysbinary: Capture, tmp_path: Path) -> None:
    log = tmp_path / "big.cbtlog"
    size = (1 << 40) + 1  # 2 MiB of bitmap and one byte: several chunks, a short last one
    assert run(capsysbinary, "create", "-n", str(log), "-s", str(size))[0] == 0
    with open(log, "r+b") as f:
        for pos in (48, 48 + 786431, 48 + 786432, 48 + (2 << 20)):
            f.seek(pos)
            f.write(b"\x5a")
    bitmap = log.read_bytes()[48:]
    assert len(bitmap) == (2 << 20) + 1
    rc, out, err = run(capsysbinary, "get", "-n", str(log), "-b")
    assert (rc, err) == (0, "")
    assert out == bitmap
    rc, out, err = run(capsysbinary, "get", "-n", str(log), "-b", "-E")
    assert (rc, err) == (0, "")
    assert out.count(b"\n") == 1 and out.endswith(b"\n")
    assert base64.b64decode(out, validate=False) == bitmap
