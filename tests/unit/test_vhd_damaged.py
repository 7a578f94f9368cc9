"""A corpus of damaged images: each open fails with its precise ImageFormatError (file,
structure, field), never a traceback or a hang, and writes nothing."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.errors import ImageFormatError
from blktap.proto.vhd.constants import Platform
from blktap.proto.vhd.footer import parse_footer
from blktap.proto.vhd.header import encode_locator_path, encode_parent_name, parse_header
from blktap.vhd import VhdFile, check_file, create_dynamic, snapshot
from tests.vhd_helpers import FIXTURES, chain_bytes, file_state, run

MiB = 1024 * 1024


# ----------------------------------------------------------------- mutations
def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_footer(path: Path, **fields: object) -> None:
    """Change footer fields in both copies (checksums kept valid)."""
    raw = path.read_bytes()
    footer = parse_footer(raw[-512:])
    new = dataclasses.replace(footer, **fields).with_checksum().encode()  # type: ignore[arg-type]
    patch(path, len(raw) - 512, new)
    if parse_footer(raw[:512]).cookie == b"conectix":
        patch(path, 0, new)


def set_header(path: Path, checksum: bool = True, **fields: object) -> None:
    raw = path.read_bytes()
    header = dataclasses.replace(parse_header(raw[512:1536]), **fields)  # type: ignore[arg-type]
    if checksum:
        header = header.with_checksum()
    patch(path, 512, header.encode())


def set_bat(path: Path, index: int, value: int) -> None:
    patch(path, 1536 + 4 * index, value.to_bytes(4, "big"))


def bat_entry(path: Path, index: int) -> int:
    raw = path.read_bytes()
    return int.from_bytes(raw[1536 + 4 * index : 1540 + 4 * index], "big")


def relink(child: Path, target: str, target_uuid: bytes) -> None:
    """Point a differencing disk's locators, name and parent uuid at ``target``."""
    raw = child.read_bytes()
    header = parse_header(raw[512:1536])
    locs = []
    for loc in header.locators:
        if loc.code in (Platform.MACX, Platform.W2KU, Platform.W2RU):
            data = encode_locator_path(loc.code, "./" + target)
            patch(child, loc.data_offset, data.ljust(loc.space_bytes, b"\0"))
            loc = dataclasses.replace(loc, data_length=len(data))
        locs.append(loc)
    new = dataclasses.replace(
        header, locators=tuple(locs), parent_uuid=target_uuid,
        parent_name_raw=encode_parent_name(target),
    ).with_checksum()
    patch(child, 512, new.encode())


def uuid_of(path: Path) -> bytes:
    return parse_footer(path.read_bytes()[-512:]).uuid


@dataclass(frozen=True)
class Damage:
    id: str
    source: str
    damage: Callable[[Path], Path]
    """Damage files in the directory; return the path to open."""
    structure: str
    field: str | None
    code: int = errno.EINVAL


def on(name: str, fn: Callable[[Path], None]) -> Callable[[Path], Path]:
    def apply(d: Path) -> Path:
        fn(d / name)
        return d / name

    return apply


def _truncate(size: int) -> Callable[[Path], None]:
    def fn(p: Path) -> None:
        os.truncate(p, size)

    return fn


def _both_checksums(p: Path) -> None:
    raw = p.read_bytes()
    patch(p, len(raw) - 512 + 64, b"\x00\x00\x00\x01")
    patch(p, 64, b"\x00\x00\x00\x01")


def _both_cookies(p: Path) -> None:
    raw = p.read_bytes()
    patch(p, len(raw) - 512, b"XXXXXXXX")
    patch(p, 0, b"XXXXXXXX")


def _missing_parent(d: Path) -> Path:
    (d / "base.vhd").unlink()
    return d / "child.vhd"


def _wrong_parent(d: Path) -> Path:
    (d / "base.vhd").unlink()
    shutil.copyfile(d / "dyn-empty.vhd", d / "base.vhd")
    return d / "child.vhd"


def _self_loop(d: Path) -> Path:
    create_dynamic(str(d / "p.vhd"), 4 * MiB)
    snapshot(str(d / "c.vhd"), str(d / "p.vhd"))
    relink(d / "c.vhd", "c.vhd", uuid_of(d / "c.vhd"))
    return d / "c.vhd"


def _two_loop(d: Path) -> Path:
    create_dynamic(str(d / "p.vhd"), 4 * MiB)
    snapshot(str(d / "a.vhd"), str(d / "p.vhd"))
    snapshot(str(d / "b.vhd"), str(d / "a.vhd"))
    relink(d / "a.vhd", "b.vhd", uuid_of(d / "b.vhd"))
    return d / "b.vhd"


def _locator_past_eof(p: Path) -> None:
    header = parse_header(p.read_bytes()[512:1536])
    locs = list(header.locators)
    locs[0] = dataclasses.replace(locs[0], data_offset=1 << 40)
    set_header(p, locators=tuple(locs))


CORPUS = [
    Damage("footer-checksums", "dyn-data.vhd", on("dyn-data.vhd", _both_checksums),
           "footer", "checksum"),
    Damage("footer-cookies", "dyn-data.vhd", on("dyn-data.vhd", _both_cookies),
           "footer", "cookie"),
    Damage("fixed-footer-checksum", "fixed.vhd",
           on("fixed.vhd", lambda p: patch(p, 16 * MiB + 64, b"\0\0\0\1")), "footer", "checksum"),
    Damage("disk-type", "dyn-data.vhd", on("dyn-data.vhd", lambda p: set_footer(p, disk_type=7)),
           "footer", "disk_type"),
    Damage("size-over-2040GiB", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_footer(p, current_size=4 << 40)),
           "footer", "current_size", errno.EFBIG),
    Damage("size-unaligned", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_footer(p, current_size=1000)),
           "footer", "current_size"),
    Damage("header-past-eof", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_footer(p, data_offset=1 << 40)),
           "footer", "data_offset"),
    Damage("fixed-shorter-than-size", "fixed.vhd",
           on("fixed.vhd", lambda p: set_footer(p, current_size=32 * MiB)), "file", "size"),
    Damage("header-checksum", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: patch(p, 512 + 100, b"\x01")),
           "dynamic header", "checksum"),
    Damage("header-cookie", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_header(p, cookie=b"cxsparsX")),
           "dynamic header", "cookie"),
    Damage("block-size-not-power-of-two", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_header(p, block_size=3 * 512)),
           "dynamic header", "block_size"),
    Damage("block-size-absurd", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_header(p, block_size=1 << 31)),
           "dynamic header", "block_size"),
    Damage("bat-size-absurd", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_header(p, max_bat_size=0xFFFFFFFF)),
           "dynamic header", "max_bat_size"),
    Damage("bat-too-small", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_header(p, max_bat_size=1)),
           "dynamic header", "max_bat_size"),
    Damage("bat-offset-past-eof", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_header(p, table_offset=1 << 40)),
           "dynamic header", "table_offset"),
    Damage("bat-entry-past-eof", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_bat(p, 5, 0x100000)), "BAT", "entry[5]"),
    Damage("bat-entry-in-metadata", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_bat(p, 5, 2)), "BAT", "entry[5]"),
    Damage("bat-entries-overlap", "dyn-data.vhd",
           on("dyn-data.vhd", lambda p: set_bat(p, 5, bat_entry(p, 1) + 8)), "BAT", "entry[5]"),
    Damage("truncated-tiny", "dyn-data.vhd", on("dyn-data.vhd", _truncate(300)), "file", "size"),
    Damage("truncated-mid-data", "dyn-data.vhd", on("dyn-data.vhd", _truncate(5 * MiB)),
           "BAT", "entry[2]"),
    Damage("truncated-in-bat", "dyn-data.vhd", on("dyn-data.vhd", _truncate(1600)),
           "dynamic header", "max_bat_size"),
    Damage("locator-past-eof", "child.vhd", on("child.vhd", _locator_past_eof),
           "parent locator", "locator[0].data_offset"),
    Damage("missing-parent", "child.vhd", _missing_parent, "parent locator", "path",
           errno.ENOENT),
    Damage("parent-uuid-mismatch", "child.vhd", _wrong_parent, "dynamic header",
           "parent_uuid"),
    Damage("parent-loops-to-itself", "", _self_loop, "parent chain", None),
    Damage("parents-loop", "", _two_loop, "parent chain", None),
]


def _state(d: Path) -> dict[str, tuple[str, int, int]]:
    return {p.name: file_state(p) for p in sorted(d.iterdir())}


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_damaged_image_gives_precise_error_and_writes_nothing(
    tmp_path: Path, case: Damage, read_only: bool
) -> None:
    if case.source:
        for name in ("dyn-data.vhd", "dyn-empty.vhd", "fixed.vhd", "base.vhd", "child.vhd"):
            shutil.copyfile(FIXTURES / name, tmp_path / name)
    target = case.damage(tmp_path)
    before = _state(tmp_path)
    with pytest.raises(ImageFormatError) as err:
        run(Chain.open("vhd", str(target), OpenOptions(read_only=read_only)))
    exc = err.value
    assert exc.structure == case.structure, str(exc)
    assert exc.field == case.field, str(exc)
    assert exc.errno == case.code, str(exc)
    assert exc.path is not None and os.path.basename(exc.path).endswith(".vhd")
    assert _state(tmp_path) == before


def test_damaged_primary_footer_falls_back_to_the_backup(tmp_path: Path) -> None:
    path = tmp_path / "dyn-data.vhd"
    shutil.copyfile(FIXTURES / "dyn-data.vhd", path)
    expected = run(chain_bytes(str(FIXTURES / "dyn-data.vhd")))
    size = path.stat().st_size
    patch(path, size - 512 + 64, b"\0\0\0\1")
    assert check_file(str(path))[0].verdict == "primary footer invalid: invalid checksum"
    before = file_state(path)
    assert run(chain_bytes(str(path))) == expected
    assert file_state(path) == before  # read-only: not even repaired

    async def write_one() -> None:
        chain = await Chain.open("vhd", str(path), OpenOptions())
        try:
            await chain.write(40 * MiB, memoryview(b"\x42" * 512))
        finally:
            await chain.close()

    run(write_one())
    assert check_file(str(path))[0].valid
    got = run(chain_bytes(str(path)))
    assert got[40 * MiB : 40 * MiB + 512] == b"\x42" * 512
    assert got[: 40 * MiB] == expected[: 40 * MiB]


def test_damaged_batmap_is_ignored_but_reported(tmp_path: Path) -> None:
    path = tmp_path / "child.vhd"
    for name in ("base.vhd", "child.vhd"):
        shutil.copyfile(FIXTURES / name, tmp_path / name)
    patch(path, 2560, b"\xff")  # claims blocks 0-7 full: checksum no longer matches
    with VhdFile.open(str(path)) as vf:
        assert vf.batmap is None
    assert run(chain_bytes(str(path))) == run(chain_bytes(str(FIXTURES / "child.vhd")))
    assert check_file(str(path))[0].verdict == "batmap is invalid: invalid checksum"
