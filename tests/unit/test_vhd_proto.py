"""The sans-IO VHD codecs: every structure of every reference image round-trips byte for
byte; the check validator gives the reference verdicts; proto/ does no I/O."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import blktap.proto.vhd as pv
from blktap.errors import ImageFormatError
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.bat import encode_bat, encode_bat_sector, parse_bat
from blktap.proto.vhd.batmap import parse_batmap_header
from blktap.proto.vhd.check import batmap_header_offset, check_vhd, has_batmap
from blktap.proto.vhd.constants import VHD_EPOCH, DiskType, Platform
from blktap.proto.vhd.footer import chs_geometry, parse_footer
from blktap.proto.vhd.header import (
    decode_locator_path,
    decode_parent_name,
    encode_locator_path,
    encode_parent_name,
    parse_header,
)
from tests.vhd_helpers import FIXTURES, MANIFEST, VHD_FILES


def data_of(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize("name", VHD_FILES)
def test_every_structure_round_trips(name: str) -> None:
    data = data_of(name)
    footer = parse_footer(data[-512:])
    assert footer.encode() == data[-512:]
    assert footer.computed_checksum() == footer.checksum
    assert footer.with_checksum() == footer
    if footer.disk_type == DiskType.FIXED:
        return
    backup = parse_footer(data[:512])
    assert backup.encode() == data[:512]
    raw_header = data[footer.data_offset : footer.data_offset + 1024]
    header = parse_header(raw_header)
    assert header.encode() == raw_header
    assert header.with_checksum() == header
    bat_raw = data[header.table_offset : header.table_offset + header.bat_size]
    bat = parse_bat(bat_raw, header.max_bat_size)
    pad = bat_raw[header.max_bat_size * 4 :]
    assert encode_bat(bat, pad) == bat_raw
    for index in range(header.max_bat_size):
        rel, sector = encode_bat_sector(bat, index, pad)
        assert sector == bat_raw[rel : rel + 512]
    for loc in header.locators:
        if loc.code in (Platform.MACX, Platform.W2KU, Platform.W2RU):
            stored = data[loc.data_offset : loc.data_offset + loc.data_length]
            path = decode_locator_path(loc.code, stored)
            assert path == "./" + header.parent_name
            assert encode_locator_path(loc.code, path) == stored
    assert encode_parent_name(header.parent_name) == header.parent_name_raw
    if has_batmap(footer):
        off = batmap_header_offset(header)
        head = parse_batmap_header(data[off : off + 512])
        assert head.encode() == data[off : off + 512]
        bits = data[head.batmap_offset : head.batmap_offset + head.map_bytes]
        assert head.with_map_checksum(bits) == head
    for block, entry in enumerate(bat[: -(-footer.current_size // header.block_size)]):
        if entry == pv.BAT_UNUSED:
            continue
        raw = data[entry * 512 : entry * 512 + header.bitmap_size]
        assert bm.to_disk(bm.from_disk(raw)) == raw, block


@pytest.mark.parametrize("name", VHD_FILES)
def test_tap_geometry_is_chs_of_size(name: str) -> None:
    footer = parse_footer(data_of(name)[-512:])
    if footer.is_tap:
        assert footer.geometry == chs_geometry(footer.current_size)


def test_old_511_byte_footer_parses() -> None:
    raw = data_of("dyn-empty.vhd")[-512:]
    assert parse_footer(raw[:511]) == parse_footer(raw)
    with pytest.raises(ImageFormatError) as err:
        parse_footer(raw[:100])
    assert err.value.structure == "footer"


def test_short_header_and_bat_are_format_errors() -> None:
    with pytest.raises(ImageFormatError) as err:
        parse_header(bytes(1000))
    assert err.value.structure == "dynamic header"
    with pytest.raises(ImageFormatError) as err:
        parse_bat(bytes(10), 4)
    assert err.value.structure == "BAT"


def _probe(location: str) -> pv.ParentProbe:
    path = Path(location)
    if not path.exists():
        return pv.ParentProbe(exists=False)
    return pv.ParentProbe(exists=True, footer=parse_footer(path.read_bytes()[-512:]))


@pytest.mark.parametrize("entry", MANIFEST, ids=VHD_FILES)
def test_validator_gives_the_reference_verdict(entry: dict[str, str]) -> None:
    data = data_of(entry["file"])
    result = check_vhd(
        str(FIXTURES / entry["file"]),
        lambda off, n: data[off : off + n],
        len(data),
        now_vhd=int(time.time()) - VHD_EPOCH,
        probe=_probe,
    )
    expected = entry["reference_check"]
    if expected.startswith("valid (fixed"):
        assert result.valid and result.verdict == ""
    elif expected.endswith(" is valid"):
        assert result.valid, result.faults
        assert result.verdict == str(FIXTURES / entry["file"]) + " is valid"
    else:
        assert result.verdict == expected


def test_validator_reports_faults_in_c_words() -> None:
    data = bytearray(data_of("child.vhd"))
    now = int(time.time()) - VHD_EPOCH

    def verdict(buf: bytes | bytearray) -> str:
        return check_vhd("x", lambda o, n: bytes(buf[o : o + n]), len(buf), now_vhd=now).verdict

    bad = bytearray(data)
    bad[-512 + 64] ^= 0xFF
    assert verdict(bad) == "primary footer invalid: invalid checksum"
    bad = bytearray(data)
    bad[0 + 64] ^= 0xFF
    assert verdict(bad) == "backup footer invalid: invalid checksum"
    bad = bytearray(data)
    bad[512 + 36] ^= 0xFF
    assert verdict(bad) == "header is invalid: invalid checksum"
    # Two BAT entries pointing at the same block.
    header = parse_header(data[512:1536])
    bat = parse_bat(data[1536:], header.max_bat_size)
    bad = bytearray(data)
    bad[1536 + 4 * 5 : 1536 + 4 * 6] = bat[0].to_bytes(4, "big")
    assert verdict(bad) == "block 0 (offset 0xf) clobbers block 5 (offset 0xf)"
    bad = bytearray(data)
    bad[1536 + 4 * 5 : 1536 + 4 * 6] = (0x00100000).to_bytes(4, "big")
    assert verdict(bad) == "block 5 (offset 0x100000) clobbers footer"
    bad = bytearray(data)
    bad[1536 + 4 * 5 : 1536 + 4 * 6] = (2).to_bytes(4, "big")
    assert verdict(bad) == "block 5 (offset 0x2) clobbers headers"
    # The batmap: its checksum covers the map.
    bad = bytearray(data)
    bad[2560] ^= 0x40
    assert verdict(bad) == "batmap is invalid: invalid checksum"


def test_parent_name_and_locator_codecs() -> None:
    raw = encode_parent_name("ünïcode.vhd")
    assert len(raw) == 512 and decode_parent_name(raw) == "ünïcode.vhd"
    with pytest.raises(ImageFormatError) as err:
        encode_parent_name("x" * 300)
    assert err.value.field == "parent_name"
    assert encode_locator_path(Platform.MACX, "./a.vhd") == b"file://./a.vhd"
    assert encode_locator_path(Platform.W2KU, "./a.vhd") == ".\\a.vhd".encode("utf-16-le")
    assert decode_locator_path(Platform.W2RU, ".\\d\\a.vhd".encode("utf-16-le") + b"\0\0") == (
        "./d/a.vhd"
    )
    with pytest.raises(ImageFormatError) as err:
        decode_locator_path(Platform.WI2K, b"x")
    assert err.value.field == "code"
    with pytest.raises(ImageFormatError):
        decode_locator_path(Platform.MACX, b"\xff\xfe")


def _naive_runs(bits: bytes, first: int, count: int) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for s in range(first, first + count):
        v = bm.test(bits, s)
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], out[-1][1] + 1, v)
        else:
            out.append((s, 1, v))
    return out


@given(st.binary(min_size=1, max_size=64), st.data())
def test_bitmap_runs_match_a_naive_scan(bits: bytes, data: st.DataObject) -> None:
    nbits = len(bits) * 8
    first = data.draw(st.integers(0, nbits - 1))
    count = data.draw(st.integers(1, nbits - first))
    assert bm.runs(bits, first, count) == _naive_runs(bits, first, count)
    cleared = bytearray(bits)
    bm.set_range(cleared, first, count, False)
    assert bm.runs(cleared, first, count) == [(first, count, False)]
    setb = bytearray(bits)
    bm.set_range(setb, first, count)
    assert bm.all_set(setb, first, count)
    for s in range(nbits):
        if not first <= s < first + count:
            assert bm.test(setb, s) == bm.test(bits, s) == bm.test(cleared, s)


def test_old_tap_bitmaps_are_lsb_first() -> None:
    disk = bytes([0b00000001, 0, 0, 0])
    mem = bm.from_disk(disk, lsb_first=True)
    assert bm.test(mem, 0) and not bm.test(mem, 7)
    assert bm.to_disk(mem, lsb_first=True) == disk


def test_chs_geometry_matches_the_spec_examples() -> None:
    assert chs_geometry(64 * 1024 * 1024) == (963 << 16) | (8 << 8) | 17
    big = chs_geometry(2040 * 1024**3)
    assert big == (65535 << 16) | (16 << 8) | 255


IO_MODULES = {"os", "socket", "asyncio", "io", "subprocess", "selectors", "mmap", "shutil"}


def test_proto_vhd_imports_no_io_module() -> None:
    root = Path(pv.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in IO_MODULES, f"{path.name} imports {name}"
