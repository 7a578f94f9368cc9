"""modify (-z, -s, -p), resize journals and revert."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from blktap.cli.vhd_util import main
from blktap.vhdutil import journal as jmod
from blktap.vhdutil import resize as rmod
from blktap.vhdutil.reader import ChainReader
from tests.helpers import FIXTURES

MANIFEST = {
    i["file"]: i for i in json.loads((FIXTURES / "manifest.json").read_text())["images"]
}


def copy(tmp_path: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        shutil.copyfile(FIXTURES / name, tmp_path / name)
        out.append(str(tmp_path / name))
    return out


def sha(path: str) -> str:
    with ChainReader.open(path) as chain:
        return hashlib.sha256(chain.read(0, chain.size)).hexdigest()


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, (argv, out, err)
    return out


# ----------------------------------------------------------------------------- modify
def test_zero_dynamic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    ok(capsys, "modify", "-n", path, "-z")
    assert ok(capsys, "check", "-n", path) == f"{path} is valid\n"
    assert sha(path) == MANIFEST["dyn-empty.vhd"]["virtual_sha256"]
    assert os.path.getsize(path) == 3584
    assert ok(capsys, "query", "-n", path, "-a") == "0\n"


def test_zero_child_reads_as_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, child = copy(tmp_path, "base.vhd", "child.vhd")
    ok(capsys, "modify", "-n", child, "-z")
    ok(capsys, "check", "-n", child, "-p")
    assert sha(child) == MANIFEST["base.vhd"]["virtual_sha256"]


def test_zero_fixed_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "fixed.vhd")
    assert main(["modify", "-n", path, "-z"]) == 38  # ENOSYS, as the C tool
    assert sha(path) == MANIFEST["fixed.vhd"]["virtual_sha256"]


def test_set_physical_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    size = os.path.getsize(path)
    ok(capsys, "modify", "-n", path, "-s", str(size + (1 << 20)))
    assert os.path.getsize(path) == size + (1 << 20)
    ok(capsys, "check", "-n", path)
    assert sha(path) == MANIFEST["dyn-data.vhd"]["virtual_sha256"]
    ok(capsys, "repair", "-n", path)  # back to the end of the data
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()
    assert main(["modify", "-n", path, "-s", str(size - 1024)]) == 22
    assert "smaller" in capsys.readouterr().err
    assert os.path.getsize(path) == size


def test_reparent_after_coalesce(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The usual leaf-coalesce workflow: merge child into base, point grandchild at base,
    drop child. The grandchild reads as before."""
    base, child, grand = copy(tmp_path, "base.vhd", "child.vhd", "grandchild.vhd")
    ok(capsys, "coalesce", "-n", child)
    ok(capsys, "modify", "-n", grand, "-p", base)
    os.unlink(child)
    assert ok(capsys, "query", "-n", grand, "-p", "-d") == f"{base}\nchain depth: 2\n"
    assert ok(capsys, "check", "-n", grand, "-p").splitlines()[0] == f"{grand} is valid"
    assert sha(grand) == MANIFEST["grandchild.vhd"]["virtual_sha256"]


def test_reparent_to_raw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, child = copy(tmp_path, "raw-parent.img", "raw-child.vhd")
    other = tmp_path / "other.img"
    shutil.copyfile(raw, other)
    ok(capsys, "modify", "-n", child, "-p", str(other), "-m")
    os.unlink(raw)
    ok(capsys, "check", "-n", child)
    assert sha(child) == MANIFEST["raw-child.vhd"]["virtual_sha256"]
    assert main(["modify", "-n", child, "-p", str(tmp_path / "none.img"), "-m"]) == 2


def test_reparent_refuses_non_vhd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, child = copy(tmp_path, "raw-parent.img", "child.vhd")
    before = Path(child).read_bytes()
    assert main(["modify", "-n", child, "-p", raw]) == 22
    assert Path(child).read_bytes() == before


# --------------------------------------------------------------------- resize/revert
def test_revert_after_a_completed_resize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the resize but before its journal was removed: revert restores the
    image byte for byte."""
    (path,) = copy(tmp_path, "child.vhd")
    copy(tmp_path, "base.vhd")
    journal = str(tmp_path / "j")
    monkeypatch.setattr(rmod, "remove_journal", lambda _path: None)
    ok(capsys, "resize", "-n", path, "-s", "2048", "-j", journal)
    assert ok(capsys, "query", "-n", path, "-v") == "2048\n"
    ok(capsys, "check", "-n", path, "-p")  # the locators moved with the grown BAT
    with ChainReader.open(path) as chain:
        assert hashlib.sha256(chain.read(0, 64 << 20)).hexdigest() == (
            MANIFEST["child.vhd"]["virtual_sha256"]
        )
    ok(capsys, "revert", "-n", path, "-j", journal)
    assert not os.path.exists(journal)
    assert Path(path).read_bytes() == (FIXTURES / "child.vhd").read_bytes()


def test_failed_resize_is_undone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error half-way (blocks already moved): the journal restores the image before
    the error is reported, as the C tool does; the journal is gone."""
    (path,) = copy(tmp_path, "dyn-data.vhd")
    journal = str(tmp_path / "j")

    def fail(*_: object) -> bytes:
        raise OSError(5, "simulated I/O error while writing the new BAT")

    monkeypatch.setattr(rmod, "encode_bat", fail)
    assert main(["resize", "-n", path, "-s", "2048", "-j", journal]) == 5
    assert "simulated" in capsys.readouterr().err
    assert not os.path.exists(journal)
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()


def test_revert_after_an_interrupted_resize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies half-way: the journal stays, revert restores the image."""
    (path,) = copy(tmp_path, "dyn-data.vhd")
    journal = str(tmp_path / "j")

    def die(*_: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(rmod, "encode_bat", die)
    assert main(["resize", "-n", path, "-s", "2048", "-j", journal]) == 4  # EINTR
    capsys.readouterr()
    assert os.path.exists(journal)
    assert os.path.getsize(path) > os.path.getsize(FIXTURES / "dyn-data.vhd")  # blocks moved
    ok(capsys, "revert", "-n", path, "-j", journal)
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()


def test_revert_of_an_uncommitted_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    journal = str(tmp_path / "j")
    fd = os.open(path, os.O_RDONLY)
    try:
        jmod.write_journal(journal, fd, [(0, 4096)])
    finally:
        os.close(fd)
    data = Path(journal).read_bytes()
    Path(journal).write_bytes(data[:-16])  # no commit trailer
    # The image now differs from what the journal holds for bytes 0-4095: an uncommitted
    # journal (the operation never started) must not be applied, only removed.
    changed = bytearray(Path(path).read_bytes())
    changed[100:104] = bytes(255 - b for b in changed[100:104])
    Path(path).write_bytes(changed)
    info = jmod.read_journal(journal)
    assert info.committed is False
    assert info.records and info.records[0][1][100:104] != changed[100:104]
    ok(capsys, "revert", "-n", path, "-j", journal)
    assert Path(path).read_bytes() == bytes(changed)
    assert not os.path.exists(journal)


def test_revert_refuses_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    bogus = tmp_path / "j"
    bogus.write_bytes(b"hello" * 20)
    assert main(["revert", "-n", path, "-j", str(bogus)]) == 22
    assert "not a vhd-util journal" in capsys.readouterr().err


def test_resize_refuses_existing_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = copy(tmp_path, "dyn-data.vhd")
    (tmp_path / "j").write_bytes(b"x")
    assert main(["resize", "-n", path, "-s", "512", "-j", str(tmp_path / "j")]) == 17
    assert Path(path).read_bytes() == (FIXTURES / "dyn-data.vhd").read_bytes()
