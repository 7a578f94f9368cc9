"""Damaged images: check names the precise fault, repair restores what can be restored,
and what cannot be repaired is refused without touching the file."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest

from blktap.cli.vhd_util import main
from blktap.proto.vhd.footer import parse_footer
from blktap.vhdutil.reader import ChainReader
from tests.helpers import FIXTURES

DYN_SHA = "ebe9c3aa36e73215837b44a03352a06bfac3954a9777cc2a401d337f0803a811"
BAT = 1536


def copy(tmp_path: Path, *names: str, into: str = "") -> list[str]:
    d = tmp_path / into if into else tmp_path
    d.mkdir(exist_ok=True)
    out = []
    for name in names:
        shutil.copyfile(FIXTURES / name, d / name)
        out.append(str(d / name))
    return out


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        if offset < 0:
            f.seek(offset, os.SEEK_END)
        else:
            f.seek(offset)
        f.write(data)


def check(capsys: pytest.CaptureFixture[str], path: str, *flags: str) -> tuple[int, list[str]]:
    """(exit status, the lines before the metadata dump that follows a fault)."""
    rc = main(["check", "-n", path, *flags])
    lines = capsys.readouterr().out.splitlines()
    if rc:
        # As the C tool: the fault, then "<file> appears invalid; dumping metadata".
        cut = next(i for i, line in enumerate(lines) if "appears invalid" in line)
        assert lines[cut].endswith("appears invalid; dumping metadata")
        assert "VHD Footer Summary:" in lines[cut:]
        lines = lines[:cut]
    return rc, lines


def sha(path: str) -> str:
    with ChainReader.open(path) as chain:
        return hashlib.sha256(chain.read(0, chain.size)).hexdigest()


def test_lost_trailing_footer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    os.truncate(path, os.path.getsize(path) - 512)
    assert check(capsys, path) == (22, ["primary footer invalid: invalid cookie"])
    assert main(["repair", "-n", path]) == 0
    assert check(capsys, path) == (0, [f"{path} is valid"])
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()


def test_footer_overwritten_by_a_new_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash after tapdisk zero-filled a new block at the end (over the footer) but
    before it linked the block: the file ends with zeros."""
    (path,) = copy(tmp_path, "dyn-data.vhd")
    with open(path, "ab") as f:
        f.write(bytes(2 << 20))
    patch(path, os.path.getsize(path) - (2 << 20) - 512, bytes(512))
    assert check(capsys, path)[0] == 22
    assert main(["repair", "-n", path]) == 0
    assert check(capsys, path)[0] == 0
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()


def test_bad_footer_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    patch(path, -512 + 64, b"\0\0\0\0")
    assert check(capsys, path) == (22, ["primary footer invalid: invalid checksum"])
    assert main(["repair", "-n", path]) == 0
    assert check(capsys, path)[0] == 0
    assert sha(path) == DYN_SHA


def test_bad_backup_footer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    patch(path, 0, b"X")
    assert check(capsys, path) == (22, ["backup footer invalid: invalid cookie"])
    assert main(["repair", "-n", path]) == 0
    assert check(capsys, path)[0] == 0
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()


def test_repair_b_uses_the_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    assert main(["set", "-n", path, "-f", "hidden", "-v", "1"]) == 0
    patch(path, 85, b"\0")  # the backup says hidden 0 (checksum now off there)
    patch(path, 64, struct.pack(">I", struct.unpack(">I", Path(path).read_bytes()[64:68])[0] + 1))
    assert check(capsys, path) == (22, ["primary and backup footers do not match"])
    assert main(["repair", "-n", path, "-b"]) == 0
    assert check(capsys, path)[0] == 0
    assert main(["query", "-n", path, "-f"]) == 0
    assert capsys.readouterr().out == "hidden: 0\n"


def test_repair_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["repair", "-n", str(tmp_path / "nope.vhd")]) == errno.ENOENT


def test_bat_entry_past_end_is_reported_not_repaired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    patch(path, BAT + 4 * 5, struct.pack(">I", 0x100000))
    assert check(capsys, path) == (22, ["block 5 (offset 0x100000) clobbers footer"])
    before = Path(path).read_bytes()
    assert main(["repair", "-n", path]) == errno.EINVAL
    assert "block 5 lies past the end of the file" in capsys.readouterr().err
    assert Path(path).read_bytes() == before


def test_overlapping_bat_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    patch(path, BAT + 4, struct.pack(">I", 7))  # block 1 at block 0's place
    assert check(capsys, path) == (22, ["block 0 (offset 0x7) clobbers block 1 (offset 0x7)"])
    assert check(capsys, path, "-B")[0] == 0  # -B ignores overlaps


def test_bat_entry_over_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    patch(path, BAT + 4 * 6, struct.pack(">I", 2))
    rc, lines = check(capsys, path)
    assert (rc, lines[0]) == (22, "block 6 (offset 0x2) clobbers headers")


def test_missing_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (child,) = copy(tmp_path, "child.vhd")
    rc, lines = check(capsys, child)
    assert rc == 22
    assert lines[0] == (
        f"parent locator 0 points to missing file ./base.vhd (resolved to {tmp_path}/base.vhd)"
    )


def test_parent_uuid_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (child,) = copy(tmp_path, "child.vhd")
    shutil.copyfile(FIXTURES / "dyn-data.vhd", tmp_path / "base.vhd")
    rc, lines = check(capsys, child)
    assert (rc, lines) == (22, [f"invalid parent {tmp_path}/base.vhd: invalid parent uuid"])
    assert check(capsys, child, "-I")[0] == 0


def test_check_parents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, _, grand = copy(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")
    assert check(capsys, grand, "-p") == (0, [
        f"{grand} is valid", f"{tmp_path}/child.vhd is valid", f"{tmp_path}/base.vhd is valid",
    ])
    patch(base, -512 + 64, b"\0\0\0\0")
    rc = main(["check", "-n", grand, "-p"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 22
    assert lines[:3] == [
        f"{grand} is valid", f"{tmp_path}/child.vhd is valid",
        "primary footer invalid: invalid checksum",
    ]
    assert lines[-1] == "error checking parents: -22"
    assert check(capsys, grand)[0] == 0  # without -p the parents' own faults are not seen


def test_check_data_where_bitmap_is_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    # Block 0 holds sectors 0-7 (data at 4096); put bytes in sectors 8 and 10.
    patch(path, 4096 + 8 * 512 + 100, b"x")
    patch(path, 4096 + 10 * 512, b"y")
    assert check(capsys, path)[0] == 0
    assert check(capsys, path, "-b") == (22, [
        "sector 0x8 of block 0x0 has data where bitmap is clear",
        "sector 0xa of block 0x0 has data where bitmap is clear",
    ])
    assert main(["check", "-n", path, "-b", "-B"]) == 22  # -B precludes -b
    assert "precludes" in capsys.readouterr().err


def test_check_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-s prints statistics instead of "is valid", root first."""
    assert check(capsys, str(FIXTURES / "dyn-data.vhd"), "-s") == (0, [
        "dyn-data.vhd: secs allocated: 0x5000 secs written: 0x100b (20.05%)",
    ])
    grand = copy(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")[2]
    assert check(capsys, grand, "-s", "-p") == (0, [
        "base.vhd: secs allocated: 0x5000 secs written: 0x4800 (90.00%)",
        "child.vhd: secs allocated: 0x3000 secs written: 0x1081 (34.38%) "
        "secs not in parent: 0x1000 (96.95%) secs not in ancestors: 0x1000 (96.95%)",
        "grandchild.vhd: secs allocated: 0x2000 secs written: 0x10 (0.20%) "
        "secs not in parent: 0x7 (43.75%) secs not in ancestors: 0x0 (0.00%)",
    ])


def test_null_uuid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-empty.vhd")
    f = parse_footer(Path(path).read_bytes()[:512])
    f = dataclasses.replace(f, uuid=bytes(16)).with_checksum()
    patch(path, 0, f.encode())
    patch(path, -512, f.encode())
    assert check(capsys, path) == (22, ["primary footer invalid: invalid (NULL) uuid"])
    assert main(["repair", "-n", path]) == 0  # a new uuid, as the C tool
    assert check(capsys, path)[0] == 0


def test_future_timestamp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-empty.vhd")
    raw = Path(path).read_bytes()
    f = parse_footer(raw[-512:])
    f = dataclasses.replace(f, timestamp=f.timestamp + 10 * 365 * 86400).with_checksum()
    patch(path, 0, f.encode())
    patch(path, -512, f.encode())
    assert check(capsys, path) == (22, ["primary footer invalid: creation time in future"])
    assert check(capsys, path, "-t")[0] == 0


def test_never_written_primary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-empty.vhd")
    patch(path, -512, b"\xc7" * 512)
    assert check(capsys, path)[0] == 22
    assert check(capsys, path, "-i")[0] == 0
