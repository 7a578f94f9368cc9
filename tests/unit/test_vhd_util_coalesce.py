"""coalesce: interrupted runs leave a valid parent and can be finished by running again;
parents of every kind (dynamic, differencing, fixed, raw)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from blktap.cli.vhd_util import main
from blktap.vhd.image import VhdFile
from blktap.vhdutil import coalesce as cmod
from blktap.vhdutil import common
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


@pytest.mark.parametrize("after", [0, 1, 2])  # child.vhd needs 3 copies
def test_interrupted_coalesce_leaves_a_valid_parent(
    after: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, child = copy(tmp_path, "base.vhd", "child.vhd")
    real = common.copy_range
    calls = 0

    def flaky(*args: int) -> None:
        nonlocal calls
        calls += 1
        if calls > after:
            raise OSError(5, "simulated I/O error")
        real(*args)

    monkeypatch.setattr(cmod, "copy_range", flaky)
    assert main(["coalesce", "-n", child]) == 5
    assert calls == after + 1
    capsys.readouterr()
    rc = main(["check", "-n", base])
    out = capsys.readouterr().out
    assert rc == 0, out  # never a broken parent
    monkeypatch.setattr(cmod, "copy_range", real)
    assert main(["coalesce", "-n", child]) == 0  # running again finishes the job
    assert main(["check", "-n", base]) == 0
    assert sha(base) == MANIFEST["child.vhd"]["virtual_sha256"]


def test_coalesce_into_fixed_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fixed,) = copy(tmp_path, "fixed.vhd")
    child = str(tmp_path / "child.vhd")
    assert main(["snapshot", "-n", child, "-p", fixed]) == 0
    assert main(["fill", "-n", child]) == 0  # the child now holds everything
    with VhdFile.open(child) as image:
        data = image.data_offset_of(0)
    assert data is not None
    with open(child, "r+b") as f:  # and something new in block 0's data
        f.seek(data + 3 * 512)
        f.write(b"\x5a" * 512)
    want = sha(child)
    assert want != MANIFEST["fixed.vhd"]["virtual_sha256"]
    assert main(["coalesce", "-n", child]) == 0
    assert main(["check", "-n", fixed]) == 0
    assert sha(fixed) == want
