"""A sans-IO validator that judges a VHD as blktap's ``vhd-util check`` does.

The caller supplies the bytes (a ``read(offset, length)`` callable and the file size) and,
for differencing disks, a probe that looks at a parent file. :func:`check_vhd` returns the
faults in ``vhd-util check``'s words; the first one is the line the C tool prints (its
verdict), later ones are what further checking found. Stages that later stages depend on
(footers, header) stop the check when they fail, as in the C tool.
"""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from blktap.errors import ImageFormatError
from blktap.proto.vhd.bat import parse_bat
from blktap.proto.vhd.batmap import parse_batmap_header, test_block
from blktap.proto.vhd.constants import (
    BAT_UNUSED,
    BATMAP_COOKIE,
    BATMAP_HEADER_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    TIMESTAMP_MAX_SLACK,
    DiskType,
    Platform,
)
from blktap.proto.vhd.footer import Footer, parse_footer
from blktap.proto.vhd.header import (
    DynamicHeader,
    ParentLocator,
    decode_locator_path,
    parse_header,
)

Reader = Callable[[int, int], bytes]
"""``read(offset, length)``: the file's bytes there (fewer at the end of the file)."""


@dataclass(frozen=True, slots=True)
class ParentProbe:
    """What a probe found at a parent location."""

    exists: bool
    footer: Footer | None = None
    """The parent's trailing footer, None when it could not be read as a VHD."""


Prober = Callable[[str], ParentProbe]


@dataclass(frozen=True, slots=True)
class CheckOptions:
    ignore_missing_primary: bool = False
    """``-i``: an invalid primary (trailing) footer, or one that differs from the backup,
    is replaced by the backup copy at offset 0 (which must be valid)."""
    ignore_timestamps: bool = False
    """``-t``: do not reject timestamps in the future."""
    ignore_bat_overlap: bool = False
    """``-B``: do not reject blocks that overlap each other."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    faults: list[str] = field(default_factory=list)
    disk_type: int = 0

    @property
    def valid(self) -> bool:
        return not self.faults

    @property
    def verdict(self) -> str:
        """The line ``vhd-util check`` prints: ``<name> is valid``, the first fault, or ''
        for a valid fixed disk (the C tool prints nothing for one)."""
        if self.faults:
            return self.faults[0]
        if self.disk_type == DiskType.FIXED:
            return ""
        return f"{self.name} is valid"


def check_vhd(
    name: str,
    read: Reader,
    file_size: int,
    *,
    now_vhd: int,
    probe: Prober | None = None,
    options: CheckOptions = CheckOptions(),
) -> CheckResult:
    """Judge the VHD ``name`` whose bytes ``read`` gives.

    ``now_vhd`` is the current time in VHD seconds; ``probe`` looks at a parent (resolved
    against ``name``'s directory), None to skip parent files. Never raises for a malformed
    image: every problem is a fault in the result.
    """
    faults: list[str] = []
    now = None if options.ignore_timestamps else now_vhd
    if file_size < FOOTER_SIZE - 1:
        return CheckResult(name, [f"invalid file size: {file_size:#x}"])
    size = FOOTER_SIZE - 1 if file_size % SECTOR_SIZE else FOOTER_SIZE
    raw_primary = read(file_size - size, size)
    primary = parse_footer(raw_primary)
    msgs = primary.faults(now)
    replaced = False
    if msgs:
        # -i: any invalid primary footer (zeroed, torn, never written) is skipped and
        # the backup copy at offset 0 judged instead, as the current C tool does.
        if not options.ignore_missing_primary:
            return CheckResult(name, [f"primary footer invalid: {msgs[0]}"], primary.disk_type)
        replaced = True
    elif primary.disk_type == DiskType.FIXED:
        return CheckResult(name, [], primary.disk_type)

    backup = parse_footer(read(0, FOOTER_SIZE).ljust(FOOTER_SIZE, b"\x00"))
    msgs = backup.faults(now)
    if msgs:
        return CheckResult(name, [f"backup footer invalid: {msgs[0]}"], primary.disk_type)
    if replaced or (options.ignore_missing_primary and primary.encode() != backup.encode()):
        # -i trusts the backup wherever the two differ (the C tool's memcpy of backup).
        primary = backup
    elif primary.encode() != backup.encode():
        old_tap = backup.hidden and backup.is_tap and backup.creator_version in (1, 0x00010001)
        if not (old_tap and replace(backup, hidden=0).encode() == primary.encode()):
            return CheckResult(name, ["primary and backup footers do not match"], primary.disk_type)
    footer = primary
    if footer.disk_type not in (DiskType.DYNAMIC, DiskType.DIFFERENCING):
        return CheckResult(name, [], footer.disk_type)

    header_raw = read(footer.data_offset, HEADER_SIZE)
    if len(header_raw) < HEADER_SIZE:
        return CheckResult(name, ["error reading header: -5"], footer.disk_type)
    header = parse_header(header_raw)
    msgs = header.faults(file_size)
    if msgs:
        return CheckResult(name, [f"header is invalid: {msgs[0]}"], footer.disk_type)

    msg = _differencing_faults(footer, header, now)
    if msg:
        return CheckResult(name, [f"differencing header is invalid: {msg}"], footer.disk_type)

    eof = file_size
    if eof % SECTOR_SIZE:
        if eof % SECTOR_SIZE != SECTOR_SIZE - 1:
            return CheckResult(name, [f"invalid file size: {eof:#x}"], footer.disk_type)
        eof += 1
    bat_raw = read(header.table_offset, header.max_bat_size * 4)
    bat = parse_bat(bat_raw, header.max_bat_size)
    batmap_ok = has_batmap(
        footer, read(batmap_header_offset(header), BATMAP_HEADER_SIZE)
    )
    eoh = end_of_headers(footer, header, read if batmap_ok else None)
    faults.extend(_bat_faults(footer, header, list(bat), eoh, eof, options.ignore_bat_overlap))
    if batmap_ok:
        faults.extend(_batmap_faults(footer, header, list(bat), read, file_size))
    if footer.disk_type == DiskType.DIFFERENCING:
        faults.extend(_locator_faults(name, header, read, file_size, probe))
    return CheckResult(name, faults, footer.disk_type)


def has_batmap(footer: Footer, batmap_header: bytes | None = None) -> bool:
    """Whether blktap keeps a batmap in this image: always for "tap" creator 1.2 and
    later, never for 0.1; for 1.1 only when a batmap header is there (``batmap_header``:
    the 512 bytes after the BAT, as libvhd decides)."""
    if not footer.is_tap or footer.creator_version <= 0x00000001:
        return False
    if footer.creator_version >= 0x00010002:
        return True
    return batmap_header is not None and batmap_header[:8] == BATMAP_COOKIE


def batmap_header_offset(header: DynamicHeader) -> int:
    """Where blktap puts the batmap header: right after the (sector-padded) BAT."""
    return header.table_offset + header.bat_size


def end_of_headers(footer: Footer, header: DynamicHeader, read: Reader | None) -> int:
    """The first byte after all metadata (backup footer, header, BAT, batmap, locators);
    ``read`` is used to find the batmap, None when the image has none."""
    end = max(FOOTER_SIZE, footer.data_offset + HEADER_SIZE)
    end = max(end, header.table_offset + header.bat_size)
    if read is not None:
        bm = parse_batmap_header(
            read(batmap_header_offset(header), BATMAP_HEADER_SIZE).ljust(
                BATMAP_HEADER_SIZE, b"\x00"
            )
        )
        end = max(end, batmap_header_offset(header) + BATMAP_HEADER_SIZE)
        if bm.batmap_offset and bm.batmap_size < 1 << 24:
            end = max(end, bm.batmap_offset + bm.map_bytes)
    if footer.disk_type == DiskType.DIFFERENCING:
        for loc in header.locators:
            if loc.code != Platform.NONE:
                end = max(end, loc.data_offset + loc.space_bytes)
    return end


def _differencing_faults(footer: Footer, header: DynamicHeader, now: int | None) -> str | None:
    if footer.disk_type == DiskType.DIFFERENCING:
        if now is not None and header.parent_timestamp > now + TIMESTAMP_MAX_SLACK:
            return "parent creation time in future"
        try:
            header.parent_name  # noqa: B018 - decoding is the check
        except ImageFormatError:
            return "invalid parent name"
        return None
    if any(header.parent_name_raw):
        return "invalid non-null parent name"
    if any(not loc.is_empty() for loc in header.locators):
        return "invalid non-null parent locators"
    if any(header.parent_uuid):
        return "invalid non-null parent uuid"
    if header.parent_timestamp:
        return "invalid non-zero parent timestamp"
    return None


def blocks_of(footer: Footer, header: DynamicHeader) -> int:
    """How many blocks the virtual size spans."""
    return -(-footer.current_size // header.block_size) if header.block_size else 0


def _bat_faults(
    footer: Footer, header: DynamicHeader, bat: list[int], eoh: int, eof: int, no_overlap: bool
) -> list[str]:
    blocks = blocks_of(footer, header)
    if blocks > header.max_bat_size:
        return [f"VHD size ({blocks} blocks) exceeds BAT size ({header.max_bat_size})"]
    span = (header.bitmap_size + header.block_size) // SECTOR_SIZE
    data_end = (eof - FOOTER_SIZE) // SECTOR_SIZE
    eoh_sectors = eoh // SECTOR_SIZE
    out: list[str] = []
    used: list[tuple[int, int]] = []
    for i in range(blocks):
        off = bat[i]
        if off == BAT_UNUSED:
            continue
        if off < eoh_sectors:
            out.append(f"block {i} (offset {off:#x}) clobbers headers")
        elif off + span > data_end:
            out.append(f"block {i} (offset {off:#x}) clobbers footer")
        used.append((off, i))
    if not no_overlap:
        # vhd-util reports the lower-numbered block of a clashing pair first.
        used.sort()
        clashes: list[tuple[int, int, int, int]] = []
        for (a_off, a), (b_off, b) in itertools.pairwise(used):
            if b_off < a_off + span:
                lo, hi = sorted(((a, a_off), (b, b_off)))
                clashes.append((lo[0], lo[1], hi[0], hi[1]))
        for i, i_off, j, j_off in sorted(clashes):
            out.append(f"block {i} (offset {i_off:#x}) clobbers block {j} (offset {j_off:#x})")
    return out


def _batmap_faults(
    footer: Footer, header: DynamicHeader, bat: list[int], read: Reader, file_size: int
) -> list[str]:
    raw = read(batmap_header_offset(header), BATMAP_HEADER_SIZE)
    if len(raw) < BATMAP_HEADER_SIZE:
        return ["error reading batmap: -22"]
    bm = parse_batmap_header(raw)
    if bm.batmap_size > file_size // SECTOR_SIZE:
        return ["batmap is invalid: invalid batmap size"]
    bits = read(bm.batmap_offset, bm.map_bytes) if bm.batmap_offset else b""
    msgs = bm.faults(bits, header.max_bat_size, file_size)
    if msgs:
        return [f"batmap is invalid: {msgs[0]}"]
    for i in range(min(blocks_of(footer, header), len(bits) * 8)):
        if test_block(bits, i) and bat[i] == BAT_UNUSED:
            return [f"batmap shows unallocated block {i} full"]
    return []


def locator_fault(loc: ParentLocator, file_size: int) -> str | None:
    """What vhd-util check objects to in one parent locator entry (None when valid)."""
    if loc.code not in tuple(Platform):
        return "invalid platform code"
    if loc.code == Platform.NONE:
        return None if loc.is_empty() else "non-zero locator"
    if not loc.data_offset:
        return "invalid data offset"
    if not loc.data_space:
        return "invalid data space"
    if not loc.data_length:
        return "invalid data length"
    if loc.data_offset + loc.space_bytes > file_size - FOOTER_SIZE:
        return "invalid size"
    if loc.reserved:
        return "invalid reserved bits"
    return None


def _locator_faults(
    name: str, header: DynamicHeader, read: Reader, file_size: int, probe: Prober | None
) -> list[str]:
    pname = header.parent_name
    seen: set[int] = set()
    found = 0
    for i, loc in enumerate(header.locators):
        msg = locator_fault(loc, file_size)
        if msg:
            return [f"invalid parent locator {i}: {msg}"]
        if loc.code == Platform.NONE:
            continue
        if loc.code in seen:
            return [f"duplicate platform code in locator {i}: {loc.code:#x}"]
        seen.add(loc.code)
        if loc.code not in (Platform.MACX, Platform.W2KU, Platform.W2RU):
            continue
        try:
            ppath = decode_locator_path(loc.code, read(loc.data_offset, loc.data_length))
        except ImageFormatError:
            return [f"error reading parent locator {i}: -22"]
        if posixpath.basename(ppath) != pname:
            return [
                f"parent locator {i} name ({posixpath.basename(ppath)}) does not match "
                f"header name ({pname})"
            ]
        location = resolve_parent_path(name, ppath)
        if probe is not None:
            found_parent = probe(location)
            if not found_parent.exists:
                if loc.code == Platform.MACX:
                    return [
                        f"parent locator {i} points to missing file {ppath} "
                        f"(resolved to {location})"
                    ]
                continue
            if any(header.parent_uuid):
                if found_parent.footer is None:
                    return [f"invalid parent {location}: error opening parent"]
                if found_parent.footer.uuid != header.parent_uuid:
                    return [f"invalid parent {location}: invalid parent uuid"]
        found += 1
    if not found:
        return [f"could not find parent {pname}"]
    return []


def resolve_parent_path(child: str, locator_path: str) -> str:
    """Where a locator's path points: absolute paths as they are, relative ones against
    the child's directory (normalised)."""
    if posixpath.isabs(locator_path):
        return posixpath.normpath(locator_path)
    return posixpath.normpath(posixpath.join(posixpath.dirname(child) or ".", locator_path))
