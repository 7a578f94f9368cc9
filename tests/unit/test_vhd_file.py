"""The file-level library's metadata updates that vhd-util builds on: hidden, marker,
repair, footers of files longer than their data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blktap.errors import ImageFormatError
from blktap.proto.vhd.footer import parse_footer
from blktap.vhd import VhdFile, check_file, create_dynamic
from tests.vhd_helpers import FIXTURES, chain_bytes, file_state, run


def test_set_hidden_writes_both_footers(tmp_path: Path) -> None:
    path = tmp_path / "child.vhd"
    for name in ("base.vhd", "child.vhd"):
        shutil.copyfile(FIXTURES / name, tmp_path / name)
    before = run(chain_bytes(str(path)))
    with VhdFile.open(str(path), writable=True) as vf:
        vf.set_hidden(1)
    raw = path.read_bytes()
    assert raw[:512] == raw[-512:]
    assert parse_footer(raw[-512:]).hidden == 1
    assert check_file(str(path), check_parents=True)[0].valid
    assert run(chain_bytes(str(path))) == before
    with VhdFile.open(str(path)) as vf:
        assert vf.footer.hidden == 1


def test_set_marker_keeps_the_batmap_valid(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 8 << 20)
    with VhdFile.open(str(path), writable=True) as vf:
        vf.set_marker(1)
    with VhdFile.open(str(path)) as vf:
        assert vf.batmap_header is not None and vf.batmap_header.marker == 1
    assert check_file(str(path))[0].valid
    shutil.copyfile(FIXTURES / "qemu-dyn.vhd", tmp_path / "q.vhd")
    before = file_state(tmp_path / "q.vhd")
    with VhdFile.open(str(tmp_path / "q.vhd"), writable=True) as vf, pytest.raises(
        ImageFormatError
    ) as err:
        vf.set_marker(1)
    assert err.value.structure == "batmap header"
    assert file_state(tmp_path / "q.vhd") == before


def test_repair_restores_the_primary_footer(tmp_path: Path) -> None:
    path = tmp_path / "dyn-data.vhd"
    shutil.copyfile(FIXTURES / "dyn-data.vhd", path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(b"garbage!" * 64)
    assert not check_file(str(path))[0].valid
    with VhdFile.open(str(path), writable=True) as vf:
        assert vf.repair()
    assert check_file(str(path))[0].valid
    assert path.read_bytes()[-512:] == (FIXTURES / "dyn-data.vhd").read_bytes()[-512:]
    with VhdFile.open(str(path), writable=True) as vf:
        assert not vf.repair()


def test_footer_goes_to_the_real_end_of_a_longer_file(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_dynamic(str(path), 8 << 20)
    raw = path.read_bytes()
    # Preallocated tail: the footer sits 64 KiB past the end of the metadata.
    path.write_bytes(raw[:-512] + bytes(65536) + raw[-512:])
    with VhdFile.open(str(path), writable=True) as vf:
        vf.set_hidden(1)
    data = path.read_bytes()
    assert parse_footer(data[-512:]).hidden == 1
    assert check_file(str(path))[0].valid


def test_creator_0_1_images_have_lsb_first_bitmaps(tmp_path: Path) -> None:
    """An image written by "tap" creator 0.1 (no batmap, little-endian sector bitmaps)
    reads the same as its modern twin."""
    import dataclasses

    from blktap.proto.vhd import bitmap as bm
    from blktap.proto.vhd.bat import parse_bat
    from blktap.proto.vhd.header import parse_header

    path = tmp_path / "old.vhd"
    shutil.copyfile(FIXTURES / "dyn-data.vhd", path)
    raw = bytearray(path.read_bytes())
    footer = dataclasses.replace(parse_footer(raw[-512:]), creator_version=0x00000001)
    new = footer.with_checksum().encode()
    raw[:512] = new
    raw[-512:] = new
    header = parse_header(raw[512:1536])
    for entry in parse_bat(raw[header.table_offset :], header.max_bat_size):
        if entry != 0xFFFFFFFF:
            at = entry * 512
            raw[at : at + 512] = bm.to_disk(bytearray(raw[at : at + 512]), lsb_first=True)
    path.write_bytes(raw)
    with VhdFile.open(str(path)) as vf:
        assert vf.lsb_bitmaps and vf.batmap is None
    assert run(chain_bytes(str(path))) == run(chain_bytes(str(FIXTURES / "dyn-data.vhd")))


def test_relative_parent_resolves_against_the_childs_real_directory(tmp_path: Path) -> None:
    """As libvhd: a child reached through a symlink elsewhere still finds its parent."""
    store = tmp_path / "store"
    store.mkdir()
    for name in ("base.vhd", "child.vhd"):
        shutil.copyfile(FIXTURES / name, store / name)
    links = tmp_path / "links"
    links.mkdir()
    (links / "vm.vhd").symlink_to(store / "child.vhd")
    with VhdFile.open(str(links / "vm.vhd")) as vf:
        assert vf.parent is not None and vf.parent.path == str((store / "base.vhd").resolve())
    assert run(chain_bytes(str(links / "vm.vhd"))) == run(chain_bytes(str(FIXTURES / "child.vhd")))
