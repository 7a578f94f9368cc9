"""``vhd-util read``: dumps of an image's metadata and data, in the C tool's formats.

:func:`dump` yields ``(stream, payload)`` pairs: ``stream`` is ``"out"`` or ``"err"``
(the C tool prints ``-j`` results on standard error), ``payload`` a text line or raw
bytes (bitmaps, BAT bitmap, data).
"""

from __future__ import annotations

import datetime
import uuid as _uuid
from collections.abc import Iterator
from dataclasses import dataclass

from blktap.errors import BlktapError, InvalidArgument
from blktap.proto.vhd.batmap import batmap_checksum, test_block
from blktap.proto.vhd.constants import (
    BAT_UNUSED,
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    SECTOR_SIZE,
    DiskType,
    Platform,
)
from blktap.proto.vhd.footer import Footer
from blktap.proto.vhd.header import DynamicHeader, decode_locator_path
from blktap.vhd.image import VhdFile, pread_exact
from blktap.vhdutil.common import disk_type_name
from blktap.vhdutil.reader import ChainReader

Chunk = tuple[str, str | bytes]

_CODE_NAMES: dict[int, str] = {
    Platform.NONE: "PLAT_CODE_NONE",
    Platform.WI2R: "PLAT_CODE_WI2R",
    Platform.WI2K: "PLAT_CODE_WI2K",
    Platform.W2RU: "PLAT_CODE_W2RU",
    Platform.W2KU: "PLAT_CODE_W2KU",
    Platform.MAC: "PLAT_CODE_MAC",
    Platform.MACX: "PLAT_CODE_MACX",
}


class OutOfRange(BlktapError):
    """A block or sector past the end of the image (the C tool's ERANGE)."""

    errno = 34


@dataclass(frozen=True, slots=True)
class DumpOptions:
    headers: bool = False
    """``-p``"""
    translate: int | None = None
    """``-t sec``"""
    bat: int | None = None
    """``-b blk``"""
    bat_bitmap: bool = False
    """``-B``"""
    bitmap: int | None = None
    """``-m blk``"""
    test_bitmap: int | None = None
    """``-i sec``"""
    extents: int | None = None
    """``-e sec``"""
    batmap: bool = False
    """``-a``"""
    test_batmap: int | None = None
    """``-j blk``"""
    data: int | None = None
    """``-d blk``"""
    read_sectors: int | None = None
    """``-r sec``"""
    read_bytes: int | None = None
    """``-R byte``"""
    count: int = 1
    """``-c num``"""
    hex: bool = False
    """``-x``"""


def vhd_time_string(ts: int) -> str:
    """A VHD timestamp as C ``ctime`` prints it (from 2000-01-01 00:00, no newline)."""
    return (datetime.datetime(2000, 1, 1) + datetime.timedelta(seconds=ts)).ctime()


def _cstr(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("latin-1")


def _n(value: int, hexa: bool) -> str:
    return f"{value:#x}" if hexa else str(value)


def footer_lines(f: Footer, hexa: bool = False) -> list[str]:
    c, hds, s = f.cylinders, f.heads, f.sectors_per_track
    chs = c * hds * s
    flags = ("<TEMP>" if f.features & FEATURE_TEMPORARY else "") + (
        "<RESV>" if f.features & FEATURE_RESERVED else ""
    )
    creator = _cstr(f.creator_app)
    os_name = {0x5769326B: "Windows", 0x4D616320: "Macintosh"}.get(f.creator_os, "Unknown!")
    cks = f.computed_checksum()
    return [
        "VHD Footer Summary:",
        "-------------------",
        f"Cookie              : {_cstr(f.cookie)}",
        f"Features            : (0x{f.features:08x}) {flags}",
        f"File format version : Major: {f.version >> 16}, Minor: {f.version & 0xFFFF}",
        f"Data offset         : {_n(f.data_offset, hexa)}",
        f"Timestamp           : {vhd_time_string(f.timestamp)}",
        f"Creator Application : '{creator}'",
        f"Creator version     : Major: {f.creator_version >> 16}, "
        f"Minor: {f.creator_version & 0xFFFF}",
        f"Creator OS          : {os_name}",
        f"Original disk size  : {_n(f.original_size >> 20, hexa)} MB "
        f"({_n(f.original_size, hexa)} Bytes)",
        f"Current disk size   : {_n(f.current_size >> 20, hexa)} MB "
        f"({_n(f.current_size, hexa)} Bytes)",
        f"Geometry            : Cyl: {_n(c, hexa)}, Hds: {_n(hds, hexa)}, Sctrs: {_n(s, hexa)}",
        f"                    : = {_n(chs >> 11, hexa)} MB ({_n(chs << 9, hexa)} Bytes)",
        f"Disk type           : {disk_type_name(f.disk_type)}",
        f"Checksum            : 0x{f.checksum:x}|0x{cks:x} "
        f"({'Good!' if cks == f.checksum else 'Bad!'})",
        f"UUID                : {_uuid.UUID(bytes=f.uuid)}",
        f"Saved state         : {'No' if f.saved == 0 else 'Yes'}",
        f"Hidden              : {f.hidden}",
        "",
    ]


def header_lines(h: DynamicHeader, hexa: bool = False) -> list[str]:
    try:
        name = h.parent_name
    except BlktapError:
        name = "failed to read name"
    cks = h.computed_checksum()
    return [
        "VHD Header Summary:",
        "-------------------",
        f"Cookie              : {_cstr(h.cookie)}",
        f"Data offset (unusd) : {_n(h.data_offset, hexa)}",
        f"Table offset        : {_n(h.table_offset, hexa)}",
        f"Header version      : 0x{h.version:08x}",
        f"Max BAT size        : {_n(h.max_bat_size, hexa)}",
        f"Block size          : {_n(h.block_size, hexa)} ({_n(h.block_size >> 20, hexa)} MB)",
        f"Parent name         : {name}",
        f"Parent UUID         : {_uuid.UUID(bytes=h.parent_uuid)}",
        f"Parent timestamp    : {vhd_time_string(h.parent_timestamp)}",
        f"Checksum            : 0x{h.checksum:x}|0x{cks:x} "
        f"({'Good!' if cks == h.checksum else 'Bad!'})",
        "",
    ]


def _locator_lines(image: VhdFile, hexa: bool) -> list[str]:
    assert image.header is not None
    out = ["VHD Parent Locators:", "--------------------"]
    for i, loc in enumerate(image.header.locators):
        if loc.code == Platform.NONE:
            continue
        out += [
            f"locator:            : {i}",
            f"       code         : {_CODE_NAMES.get(loc.code, 'UNKOWN')}",  # sic, as C
            f"       data_space   : {_n(loc.data_space, hexa)}",
            f"       data_length  : {_n(loc.data_length, hexa)}",
            f"       data_offset  : {_n(loc.data_offset, hexa)}",
        ]
        try:
            raw = pread_exact(image.fd, loc.data_length, loc.data_offset)
            out.append(f"       decoded name : {decode_locator_path(loc.code, raw)}")
        except BlktapError:
            out.append("failed to read parent name")
        out.append("")
    return out


def _batmap_lines(image: VhdFile, hexa: bool) -> list[str]:
    head, bits = image.batmap_header, image.batmap
    assert head is not None and bits is not None
    cks = batmap_checksum(bits)
    return [
        "VHD Batmap Summary:",
        "-------------------",
        f"Batmap offset       : {_n(head.batmap_offset, hexa)}",
        f"Batmap size (secs)  : {_n(head.batmap_size, hexa)}",
        f"Batmap version      : 0x{head.version:08x}",
        f"Checksum            : 0x{head.checksum:x}|0x{cks:x} "
        f"({'Good!' if cks == head.checksum else 'Bad!'})",
        "",
    ]


def _bitmap_raw(image: VhdFile, block: int) -> bytes:
    assert image.header is not None
    return pread_exact(image.fd, image.header.bitmap_size, image.bat[block] * SECTOR_SIZE)


def _sector_bit(image: VhdFile, sector: int) -> tuple[int, int, int]:
    spb = image.sectors_per_block
    blk, sec = divmod(sector, spb)
    if blk >= len(image.bat) or image.bat[blk] == BAT_UNUSED:
        return blk, sec, 0
    runs = image.sector_runs(blk, sec, 1)
    return blk, sec, int(runs[0][2])


def dump(path: str, opts: DumpOptions) -> Iterator[Chunk]:
    """The dumps ``opts`` asks for, in the C tool's order (headers, translate, BAT,
    BAT bitmap, bitmap, bitmap test, extents, batmap, batmap test, data, reads).

    Raises ImageFormatError/OSError when the image cannot be opened, OutOfRange (ERANGE)
    for a block or sector past the end, InvalidArgument for dumps a fixed disk lacks.
    """
    hexa = opts.hex
    count = opts.count
    with VhdFile.open(path, resolve_parent=False) as image:
        sparse = image.header is not None
        needs_sparse = (
            opts.translate,
            opts.bat,
            opts.bitmap,
            opts.test_bitmap,
            opts.extents,
            opts.test_batmap,
            opts.data,
        )
        if not sparse and (
            any(v is not None for v in needs_sparse) or opts.bat_bitmap or opts.batmap
        ):
            raise InvalidArgument(f"{path}: not a dynamic or differencing VHD")
        if opts.headers:
            for line in footer_lines(image.footer, hexa):
                yield ("out", line)
            if image.header is not None:
                for line in header_lines(image.header, hexa):
                    yield ("out", line)
                if image.footer.disk_type == DiskType.DIFFERENCING:
                    for line in _locator_lines(image, hexa):
                        yield ("out", line)
                if image.batmap_header is not None:
                    for line in _batmap_lines(image, hexa):
                        yield ("out", line)
        if not sparse:
            yield from _reads(path, image.size, opts)
            return
        h = image.header
        assert h is not None
        spb = h.sectors_per_block
        nblocks = len(image.bat)

        def check_blocks(first: int) -> None:
            if first + count > h.max_bat_size or first + count > nblocks:
                raise OutOfRange(f"block {_n(first + count, hexa)} past end of file")

        def check_sectors(first: int) -> None:
            if (first + count) * SECTOR_SIZE > image.size:
                raise OutOfRange(f"sector {_n(first + count, hexa)} past end of file")

        if opts.translate is not None:
            check_sectors(opts.translate)
            for cur in range(opts.translate, opts.translate + count):
                blk, lsec = divmod(cur, spb)
                entry = image.bat[blk]
                where = (
                    "not allocated"
                    if entry == BAT_UNUSED
                    else _n((entry + h.bitmap_size // SECTOR_SIZE + lsec) * SECTOR_SIZE, hexa)
                )
                yield (
                    "out",
                    f"logical sector {_n(cur, hexa)}: block number: {_n(blk, hexa)}, "
                    f"sector offset: {_n(lsec, hexa)}, file offset: {where}",
                )
        if opts.bat is not None:
            check_blocks(opts.bat)
            for cur in range(opts.bat, opts.bat + count):
                entry = image.bat[cur]
                where = "not allocated" if entry == BAT_UNUSED else _n(entry * SECTOR_SIZE, hexa)
                yield ("out", f"block: {_n(cur, hexa)}: offset: {where}")
        if opts.bat_bitmap:
            total = image.size // h.block_size
            bits = bytearray(-(-total // 8))
            for i in range(total):
                if image.bat[i] != BAT_UNUSED:
                    bits[i >> 3] |= 0x80 >> (i & 7)
            yield ("out", bytes(bits))
        if opts.bitmap is not None:
            check_blocks(opts.bitmap)
            for cur in range(opts.bitmap, opts.bitmap + count):
                if image.bat[cur] == BAT_UNUSED:
                    yield ("out", f"block {_n(cur, hexa)} not allocated")
                else:
                    yield ("out", _bitmap_raw(image, cur))
        if opts.test_bitmap is not None:
            check_sectors(opts.test_bitmap)
            for cur in range(opts.test_bitmap, opts.test_bitmap + count):
                blk, sec, bit = _sector_bit(image, cur)
                yield ("out", f"block {_n(blk, hexa)}: sec: {_n(sec, hexa)}: {bit}")
        if opts.extents is not None:
            check_sectors(opts.extents)
            start = -1
            run = 0
            for cur in range(opts.extents, opts.extents + count):
                if _sector_bit(image, cur)[2]:
                    if run == 0:
                        start = cur
                    run += 1
                else:
                    if run:
                        yield ("out", f"{_n(start, hexa)} {_n(run, hexa)}")
                    run = 0
            if run:
                yield ("out", f"{_n(start, hexa)} {_n(run, hexa)}")
        if opts.batmap:
            if image.batmap is None:
                raise InvalidArgument(f"{path}: failed to read batmap: no valid batmap")
            yield ("out", bytes(image.batmap))
        if opts.test_batmap is not None:
            check_blocks(opts.test_batmap)
            if image.batmap is None:
                raise InvalidArgument(f"{path}: failed to get batmap")
            for cur in range(opts.test_batmap, opts.test_batmap + count):
                yield ("err", f"batmap for block {_n(cur, hexa)}: "
                              f"{int(test_block(image.batmap, cur))}")
        if opts.data is not None:
            check_blocks(opts.data)
            for cur in range(opts.data, opts.data + count):
                off = image.data_offset_of(cur)
                if off is None:
                    yield ("out", f"block {_n(cur, hexa)} not allocated")
                else:
                    yield ("out", pread_exact(image.fd, h.block_size, off))
        yield from _reads(path, image.size, opts)


def _reads(path: str, size: int, opts: DumpOptions) -> Iterator[Chunk]:
    if opts.read_sectors is None and opts.read_bytes is None:
        return
    ranges: list[tuple[int, int]] = []
    if opts.read_sectors is not None:
        ranges.append((opts.read_sectors * SECTOR_SIZE, opts.count * SECTOR_SIZE))
    if opts.read_bytes is not None:
        ranges.append((opts.read_bytes, opts.count))
    for offset, length in ranges:
        if offset + length > size:
            raise OutOfRange(f"read of {length} bytes at {offset} past end of disk")
    with ChainReader.open(path) as chain:
        for offset, length in ranges:
            pos = 0
            while pos < length:
                n = min(length - pos, 2 << 20)
                yield ("out", chain.read(offset + pos, n))
                pos += n


__all__ = ["DumpOptions", "OutOfRange", "dump", "footer_lines", "header_lines"]
