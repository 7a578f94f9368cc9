"""``vhd-util resize -n NAME -s MB (-j JOURNAL | -f)``: change a VHD's size.

* Fixed disks: the file grows (zeros, sparse) and the footer moves to the new end.
* Sparse disks within the BAT's capacity (``query -S``; see ``create -S``): only the
  footers change (``-f``, no journal needed).
* Sparse disks beyond it (``-j``): the BAT (and blktap's batmap, and a differencing
  disk's parent locators) grow in place; data blocks in the way are first copied to the
  end of the file. Every byte range rewritten in place is saved to the journal first,
  so ``vhd-util revert -n NAME -j JOURNAL`` undoes an interrupted resize; the journal is
  removed when the resize completes.

Shrinking (journaled) drops a dynamic disk's blocks past the new end; fixed disks are
not shrunk. As the C tool, only images created by blktap ("tap") are resized, a failed
journaled resize is undone from its journal before the error is reported, and ``-f``
rounds the size up to whole blocks.
"""

from __future__ import annotations

import array
import dataclasses
import os
from dataclasses import dataclass

from blktap.errors import InvalidArgument
from blktap.proto.vhd.bat import encode_bat
from blktap.proto.vhd.batmap import batmap_checksum, batmap_sectors
from blktap.proto.vhd.check import batmap_header_offset
from blktap.proto.vhd.constants import (
    BAT_UNUSED,
    BATMAP_HEADER_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_VHD_SIZE,
    SECTOR_SIZE,
    DiskType,
    Platform,
)
from blktap.proto.vhd.footer import Footer, chs_geometry
from blktap.vhd.image import VhdFile, pread_exact, pwrite_all
from blktap.vhdutil.common import (
    allocate_block,
    copy_range,
    footer_position,
    write_footers,
)
from blktap.vhdutil.journal import JournalExists, remove_journal, revert, write_journal


@dataclass(frozen=True, slots=True)
class ResizeResult:
    old_size: int
    new_size: int
    moved_blocks: int
    """Data blocks copied out of the way of the grown BAT."""
    bat_grown: bool


def _validate(image: VhdFile, new_size: int) -> None:
    if new_size <= 0 or new_size % SECTOR_SIZE:
        raise InvalidArgument(f"invalid size {new_size}: not a positive multiple of 512")
    if new_size > MAX_VHD_SIZE:
        raise InvalidArgument(f"invalid size {new_size}: exceeds the VHD limit of 2040 GiB")
    if not image.footer.is_tap:
        # As the C tool: other creators (e.g. qemu, which sizes from CHS) are refused.
        raise InvalidArgument(f"{image.path} not created by xen; resize not supported")


def resize(
    path: str, new_size: int, *, journal: str | None = None, fast: bool = False
) -> ResizeResult:
    """Resize ``path`` to ``new_size`` bytes (see the module docstring).

    ``fast`` (no journal): grow within the BAT's capacity only; the size is rounded up
    to whole blocks, as the C tool does. With ``journal``: grow anything (the BAT grows
    in place), or shrink a dynamic disk (blocks past the new end are dropped). If the
    journaled resize fails, the image is restored from the journal before the error is
    raised; if the process dies, ``revert`` restores it.

    Raises InvalidArgument (bad size, not a "tap" image, fast resize beyond capacity or
    shrinking, shrinking a fixed disk), JournalExists, ImageFormatError, OSError.
    """
    if (journal is None) == (not fast):
        raise InvalidArgument("resize needs exactly one of a journal (-j) or fast mode (-f)")
    failed: BaseException | None = None
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        _validate(image, new_size)
        if fast:
            return _fast(image, new_size)
        assert journal is not None
        try:
            return _journaled(image, new_size, journal)
        except JournalExists:
            raise
        except Exception as exc:
            # Nothing more is written through this handle; the journal restores it.
            image.dirty = False
            failed = exc
    assert failed is not None
    if os.path.exists(journal):
        revert(path, journal)
    raise failed


def _fast(image: VhdFile, new_size: int) -> ResizeResult:
    h = image.header
    old = image.size
    if h is None:
        raise InvalidArgument(f"fast resize of {image.path}: not a dynamic disk")
    size = -(-new_size // h.block_size) * h.block_size
    if size < old:
        raise InvalidArgument(f"{image.path}: size ({size}) < curr size ({old})")
    if size == old:
        return ResizeResult(old, old, 0, False)
    if size // h.block_size > h.max_bat_size:
        raise InvalidArgument(
            f"fast resize of {image.path} is limited to "
            f"{h.max_bat_size * h.block_size >> 20} MB (its BAT's capacity); "
            "use a journal (-j) to grow further"
        )
    write_footers(image, _resized_footer(image.footer, size))
    return ResizeResult(old, size, 0, False)


def _resized_footer(footer: Footer, size: int) -> Footer:
    return dataclasses.replace(
        footer, current_size=size, original_size=size, geometry=chs_geometry(size)
    )


def _journaled(image: VhdFile, new_size: int, journal: str) -> ResizeResult:
    old = image.size
    footer = _resized_footer(image.footer, new_size)
    if image.header is None:
        if new_size < old:
            raise InvalidArgument(f"shrinking the fixed disk {image.path} is not supported")
        write_journal(journal, image.fd, [(old, FOOTER_SIZE)])
        # The new footer first (the file always ends with a valid one), then the old
        # footer's bytes, now part of the disk, become zeros.
        write_footers(image, footer)
        pwrite_all(image.fd, [bytes(FOOTER_SIZE)], old)
        os.fsync(image.fd)
        remove_journal(journal)
        return ResizeResult(old, new_size, 0, False)
    h = image.header
    new_blocks = -(-new_size // h.block_size)
    if new_size < old:
        _shrink(image, new_blocks, footer, journal)
        remove_journal(journal)
        return ResizeResult(old, new_size, 0, False)
    if new_blocks <= h.max_bat_size:
        write_journal(journal, image.fd, [(0, FOOTER_SIZE), (footer_position(image), FOOTER_SIZE)])
        write_footers(image, footer)
        remove_journal(journal)
        return ResizeResult(old, new_size, 0, False)
    moved = _grow_bat(image, new_blocks, footer, journal)
    remove_journal(journal)
    return ResizeResult(old, new_size, moved, True)


def _shrink(image: VhdFile, new_blocks: int, footer: Footer, journal: str) -> None:
    """Drop the blocks past ``new_blocks`` (BAT entries and batmap bits) and set the new
    size. The blocks' bytes stay in the file (the journal can then undo everything)."""
    h = image.header
    assert h is not None
    ranges = [
        (0, FOOTER_SIZE),
        (h.table_offset, h.bat_size),
        (image.file_size - FOOTER_SIZE, FOOTER_SIZE),
    ]
    head = image.batmap_header
    if head is not None:
        ranges += [(batmap_header_offset(h), BATMAP_HEADER_SIZE), (head.batmap_offset,
                                                                 head.map_bytes)]
    write_journal(journal, image.fd, ranges)
    bat = array.array("I", image.bat)
    for i in range(new_blocks, len(bat)):
        bat[i] = BAT_UNUSED
    del bat[new_blocks:]
    full = array.array("I", bat)
    full.extend([BAT_UNUSED] * (h.max_bat_size - len(bat)))
    pwrite_all(image.fd, [encode_bat(full)[: h.max_bat_size * 4]], h.table_offset)
    if head is not None and image.batmap is not None:
        bits = bytearray(image.batmap)
        for i in range(new_blocks, len(bits) * 8):
            bits[i >> 3] &= ~(0x80 >> (i & 7)) & 0xFF
        new_head = head.with_map_checksum(bits)
        pwrite_all(image.fd, [bytes(bits)], head.batmap_offset)
        pwrite_all(image.fd, [new_head.encode()], batmap_header_offset(h))
        image.batmap_header, image.batmap = new_head, bits
    image.bat = bat
    os.fsync(image.fd)
    write_footers(image, footer, in_place=True)


def _grow_bat(image: VhdFile, new_blocks: int, footer: Footer, journal: str) -> int:
    """Grow the BAT (and batmap, locators) in place for ``new_blocks`` blocks, moving the
    blocks in the way; returns how many moved. Journals first (see module docstring)."""
    h = image.header
    assert h is not None
    if h.table_offset < footer.data_offset + HEADER_SIZE:
        raise InvalidArgument(f"{image.path}: BAT lies before the header; cannot grow it")
    new_bat_bytes = -(-new_blocks * 4 // SECTOR_SIZE) * SECTOR_SIZE
    cursor = h.table_offset + new_bat_bytes
    head = image.batmap_header
    bm_head_off = cursor
    bm_off = 0
    bm_bytes = 0
    if head is not None:
        bm_off = cursor + BATMAP_HEADER_SIZE
        bm_bytes = batmap_sectors(new_blocks) * SECTOR_SIZE
        cursor = bm_off + bm_bytes
    locators = list(h.locators)
    loc_data: list[tuple[int, bytes]] = []
    if footer.disk_type == DiskType.DIFFERENCING:
        for i, loc in enumerate(locators):
            if loc.code == Platform.NONE:
                continue
            data = pread_exact(image.fd, loc.space_bytes, loc.data_offset)
            locators[i] = dataclasses.replace(loc, data_offset=cursor)
            loc_data.append((cursor, data))
            cursor += loc.space_bytes
    new_eoh = cursor
    # 1. Journal every byte the in-place rewrite touches, and the trailing footer.
    write_journal(journal, image.fd, [(0, new_eoh), (footer_position(image), FOOTER_SIZE)])
    # 2. Copy the blocks in the way to the end of the file (new space only).
    span = h.bitmap_size + h.block_size
    in_way = sorted(
        (entry, i) for i, entry in enumerate(image.bat)
        if entry != BAT_UNUSED and entry * SECTOR_SIZE < new_eoh
    )
    bat = array.array("I", image.bat)
    for entry, i in in_way:
        new_entry = allocate_block(image, zero=False)
        copy_range(image.fd, entry * SECTOR_SIZE, image.fd, new_entry * SECTOR_SIZE, span)
        bat[i] = new_entry
    os.fsync(image.fd)
    # 3. New metadata, in place.
    bat.extend([BAT_UNUSED] * (new_blocks - len(bat)))
    new_header = dataclasses.replace(
        h, max_bat_size=new_blocks, locators=tuple(locators)
    ).with_checksum()
    writes: list[tuple[int, bytes]] = [
        (footer.data_offset, new_header.encode()),
        (h.table_offset, encode_bat(bat)),
    ]
    if head is not None:
        assert image.batmap is not None
        bits = bytearray(bm_bytes)
        bits[: len(image.batmap)] = image.batmap[:bm_bytes]
        new_head = dataclasses.replace(
            head, batmap_offset=bm_off, batmap_size=bm_bytes // SECTOR_SIZE,
            checksum=batmap_checksum(bits),
        )
        assert bm_head_off == batmap_header_offset(new_header)
        writes += [(bm_head_off, new_head.encode()), (bm_off, bytes(bits))]
    writes += loc_data
    for off, data in writes:
        pwrite_all(image.fd, [data], off)
    image.header = new_header
    image.bat = bat
    write_footers(image, footer)
    return len(in_way)
