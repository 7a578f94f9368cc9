"""``vhd-util fill -n NAME``: allocate every block of a sparse VHD.

Each block ends up allocated with every sector present: a dynamic disk's missing
sectors become explicit zeros, a differencing disk's missing sectors are copied from its
parents (so the virtual contents are unchanged, as with the C tool's read-then-write of
every block). New zero blocks get their space reserved with ``posix_fallocate`` instead
of 2 MiB of written zeros each. Fixed disks are already full.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from blktap.errors import InvalidArgument
from blktap.proto.vhd.constants import BAT_UNUSED, SECTOR_SIZE, DiskType
from blktap.vhd.image import VhdFile, pwrite_all
from blktap.vhdutil.common import allocate_block, full_bitmap
from blktap.vhdutil.progress import Progress
from blktap.vhdutil.reader import ChainReader


@dataclass(frozen=True, slots=True)
class FillResult:
    blocks: int
    allocated: int
    """Blocks newly allocated."""
    completed: int
    """Partly present blocks made complete."""


def fill(
    path: str,
    *,
    progress: bool | None = None,
    bat_only: bool = False,
    first_sector: int | None = None,
    last_sector: int | None = None,
) -> FillResult:
    """Allocate and complete every block of ``path``.

    ``bat_only`` (the C tool's ``-b``): only allocate the blocks not yet allocated and
    set their bitmaps full, writing no data (they read as zeros, even over a parent),
    optionally for the blocks holding sectors ``first_sector``..``last_sector``
    (inclusive; ``-f``/``-t``). ``progress``: show a bar on standard error (None: only
    on a terminal).

    Raises InvalidArgument (a range without ``bat_only``, an empty range),
    ImageFormatError, NoSpace (past 2^32 sectors), OSError. Blocks are linked into the
    BAT only after their data and bitmap are written, so an interrupted fill leaves a
    valid image with the same contents.
    """
    if not bat_only and (first_sector is not None or last_sector is not None):
        raise InvalidArgument("-f/-t can only be used with -b")
    with VhdFile.open(path, writable=True) as image:
        if image.header is None:
            return FillResult(0, 0, 0)
        spb = image.sectors_per_block
        first = 0 if first_sector is None else first_sector // spb
        last = len(image.bat) - 1 if last_sector is None else last_sector // spb
        last = min(last, len(image.bat) - 1)
        if first > last:
            raise InvalidArgument(f"invalid sector range {first_sector}-{last_sector}")
        differencing = image.footer.disk_type == DiskType.DIFFERENCING
        below = None
        if differencing and not bat_only:
            below = ChainReader.open(path, start_at_parent=True)
        try:
            return _fill(image, below, progress, bat_only, range(first, last + 1))
        finally:
            if below is not None:
                below.close()


def _fill(
    image: VhdFile,
    below: ChainReader | None,
    progress: bool | None,
    bat_only: bool,
    blocks: range,
) -> FillResult:
    h = image.header
    assert h is not None
    bs = h.block_size
    spb = h.sectors_per_block
    full = full_bitmap(image)
    bar = Progress(f"fill {image.path}", len(blocks), enabled=progress)
    allocated = completed = 0
    buf = bytearray(bs)
    for n, block in enumerate(blocks):
        bar.update(n)
        if bat_only:
            if image.bat[block] == BAT_UNUSED:
                _link(image, block, allocate_block(image, zero=True), full)
                allocated += 1
            continue
        entry = image.bat[block]
        if entry != BAT_UNUSED and block in image.full_blocks:
            continue
        if entry == BAT_UNUSED:
            if below is None or not below.has_data(block * bs, bs):
                new = allocate_block(image, zero=True)
                _reserve(image, new)
            else:
                new = allocate_block(image, zero=False)
                below.read_into(block * bs, memoryview(buf))
                pwrite_all(image.fd, [full, buf], new * SECTOR_SIZE)
            _link(image, block, new, full)
            allocated += 1
            continue
        data_off = image.data_offset_of(block)
        assert data_off is not None
        for s, c, here in image.sector_runs(block, 0, spb):
            if here:
                continue
            view = memoryview(buf)[: c * SECTOR_SIZE]
            if below is None:
                view[:] = bytes(len(view))
            else:
                below.read_into(block * bs + s * SECTOR_SIZE, view)
            pwrite_all(image.fd, [view], data_off + s * SECTOR_SIZE)
        image.write_bitmap(block, bytearray(full))
        completed += 1
    bar.finish()
    return FillResult(len(blocks), allocated, completed)


def _reserve(image: VhdFile, entry: int) -> None:
    """Make the file system reserve a zero-filled block's space (it may be a hole after
    :func:`allocate_block`), as the C tool's writing of zeros does; best effort."""
    assert image.header is not None
    span = image.header.bitmap_size + image.header.block_size
    try:
        os.posix_fallocate(image.fd, entry * SECTOR_SIZE, span)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _link(image: VhdFile, block: int, entry: int, full: bytearray) -> None:
    """Point the BAT at a block whose bitmap and data are written, then set its bitmap
    (and the batmap bit) through the library."""
    assert image.header is not None
    if image.bat[block] == BAT_UNUSED:
        # The one-sector BAT write is what makes the block visible.
        image.write_bat_entry(block, entry)
    image.write_bitmap(block, bytearray(full))
