"""``vhd-util coalesce -n CHILD [-s] [-p]``: merge a differencing disk into its parent.

Every sector the child holds is written to the same place of the parent's virtual
disk, so that the parent afterwards reads as the child did. The child is left as it is
(callers usually delete or re-parent it).

Data moves with ``copy_file_range`` (in the kernel, no copy through Python), a whole
block at a time where the child holds whole blocks, so coalesce runs at nearly the speed
of a plain sequential copy. Per parent block:

* parent block allocated: the child's sector runs are copied into it, then its sector
  bitmap gains their bits;
* parent block not allocated, and the child covers it fully: a new block is placed at
  the end of the parent (bitmap and data written), then linked in the BAT;
* otherwise the new block is zero-filled first, so sectors the child lacks read as
  zeros (a dynamic parent) or fall through (a differencing parent).

``-s`` (sparse): child data that is all zeros is not copied into unallocated blocks of
a dynamic parent (they read as zeros already). A fixed or raw parent gets plain writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from blktap.errors import InvalidArgument
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.constants import BAT_UNUSED, SECTOR_SIZE, DiskType
from blktap.vhd.image import VhdFile, pread_exact, pwrite_all
from blktap.vhdutil.common import allocate_block, copy_range, full_bitmap
from blktap.vhdutil.progress import Progress


@dataclass(frozen=True, slots=True)
class CoalesceResult:
    child: str
    parent: str
    bytes_copied: int
    blocks_allocated: int
    """Parent blocks newly allocated."""


Run = tuple[int, int, int]
"""(virtual offset, length, offset in the child file) of data the child holds."""


def _child_runs(child: VhdFile, offset: int, length: int) -> list[Run]:
    """The child's data runs inside ``[offset, offset + length)``, in order, merged."""
    assert child.header is not None
    bs = child.header.block_size
    out: list[Run] = []
    pos = offset
    end = min(offset + length, child.size)
    while pos < end:
        block = pos // bs
        bstart = block * bs
        n = min(end, bstart + bs) - pos
        data_off = child.data_offset_of(block) if block < len(child.bat) else None
        if data_off is not None:
            first = (pos - bstart) // SECTOR_SIZE
            count = n // SECTOR_SIZE
            for s, c, here in child.sector_runs(block, first, count):
                if not here:
                    continue
                voff = bstart + s * SECTOR_SIZE
                foff = data_off + s * SECTOR_SIZE
                ln = c * SECTOR_SIZE
                if out and out[-1][0] + out[-1][1] == voff and out[-1][2] + out[-1][1] == foff:
                    v, l0, f = out[-1]
                    out[-1] = (v, l0 + ln, f)
                else:
                    out.append((voff, ln, foff))
        pos += n
    return out


def _all_zero(fd: int, runs: list[Run]) -> bool:
    for _, length, foff in runs:
        pos = 0
        while pos < length:
            n = min(length - pos, 1 << 20)
            if any(pread_exact(fd, n, foff + pos)):
                return False
            pos += n
    return True


def coalesce(
    child_path: str, *, sparse: bool = False, progress: bool | None = None
) -> CoalesceResult:
    """Merge ``child_path`` into its parent (see the module docstring).

    Raises InvalidArgument (not a differencing disk; child data past the parent's end),
    ImageFormatError (malformed child or parent, missing parent), OSError. An
    interrupted coalesce leaves the parent valid (blocks are linked only after their
    data and bitmap are written; at worst the trailing footer must be restored with
    ``repair``), holding a mix of old and merged data: run it again to finish.
    """
    with VhdFile.open(child_path) as child:
        if child.footer.disk_type != DiskType.DIFFERENCING or child.parent is None:
            raise InvalidArgument(
                f"{child_path}: coalescing of non-differencing disks is not supported"
            )
        link = child.parent
        if link.raw:
            fd = os.open(link.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                psize = os.lseek(fd, 0, os.SEEK_END)
                copied = _into_flat(child, fd, 0, psize, progress)
                os.fsync(fd)
            finally:
                os.close(fd)
            return CoalesceResult(child_path, link.path, copied, 0)
        with VhdFile.open(link.path, writable=True, resolve_parent=False) as parent:
            if parent.header is None:
                copied = _into_flat(child, parent.fd, 0, parent.size, progress)
                parent.dirty = False
                os.fsync(parent.fd)
                return CoalesceResult(child_path, link.path, copied, 0)
            copied, allocated = _into_sparse(child, parent, sparse, progress)
            # close() rewrites the trailing footer and syncs.
        return CoalesceResult(child_path, link.path, copied, allocated)


def _check_fits(child: VhdFile, runs: list[Run], psize: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] > psize:
        raise InvalidArgument(
            f"{child.path} holds data past its parent's size ({psize} bytes)"
        )


def _into_flat(
    child: VhdFile, fd: int, base: int, psize: int, progress: bool | None
) -> int:
    assert child.header is not None
    bs = child.header.block_size
    bar = Progress(f"coalesce {child.path}", child.size, enabled=progress)
    copied = 0
    for block in range(len(child.bat)):
        if child.bat[block] == BAT_UNUSED:
            continue
        runs = _child_runs(child, block * bs, bs)
        _check_fits(child, runs, psize)
        for voff, length, foff in runs:
            copy_range(child.fd, foff, fd, base + voff, length)
            copied += length
        bar.update(block * bs)
    bar.finish()
    return copied


def _into_sparse(
    child: VhdFile, parent: VhdFile, sparse: bool, progress: bool | None
) -> tuple[int, int]:
    ph = parent.header
    assert ph is not None and child.header is not None
    pbs = ph.block_size
    parent_dynamic = parent.footer.disk_type == DiskType.DYNAMIC
    full = full_bitmap(parent)
    # Parent blocks the child touches, from the child's allocated blocks.
    cbs = child.header.block_size
    touched: list[int] = []
    seen: set[int] = set()
    for cblock, entry in enumerate(child.bat):
        if entry == BAT_UNUSED:
            continue
        first = cblock * cbs // pbs
        last = (min((cblock + 1) * cbs, child.size) - 1) // pbs
        for pb in range(first, last + 1):
            if pb not in seen:
                seen.add(pb)
                touched.append(pb)
    touched.sort()
    bar = Progress(f"coalesce {child.path}", len(touched), enabled=progress)
    copied = allocated = 0
    for n, pb in enumerate(touched):
        bar.update(n)
        pstart = pb * pbs
        runs = _child_runs(child, pstart, pbs)
        if not runs:
            continue
        _check_fits(child, runs, parent.size)
        if pb >= len(parent.bat):
            raise InvalidArgument(f"{child.path} holds data past its parent's BAT")
        entry = parent.bat[pb]
        if entry == BAT_UNUSED:
            if sparse and parent_dynamic and _all_zero(child.fd, runs):
                continue
            covered = sum(r[1] for r in runs) == pbs
            new = allocate_block(parent, zero=not covered)
            data_off = new * SECTOR_SIZE + ph.bitmap_size
            bits = full if covered else bytearray(ph.bitmap_size)
            for voff, length, foff in runs:
                copy_range(child.fd, foff, parent.fd, data_off + voff - pstart, length)
                copied += length
                if not covered:
                    bm.set_range(bits, (voff - pstart) // SECTOR_SIZE, length // SECTOR_SIZE)
            # Bitmap before the BAT entry: the block is complete once it is linked.
            pwrite_all(parent.fd, [bm.to_disk(bits, parent.lsb_bitmaps)], new * SECTOR_SIZE)
            parent.write_bat_entry(pb, new)
            parent.write_bitmap(pb, bytearray(bits))
            allocated += 1
            continue
        pdata = parent.data_offset_of(pb)
        assert pdata is not None
        for voff, length, foff in runs:
            copy_range(child.fd, foff, parent.fd, pdata + voff - pstart, length)
            copied += length
        if pb not in parent.full_blocks:
            bits = parent.bitmap_copy(pb)
            for voff, length, _ in runs:
                bm.set_range(bits, (voff - pstart) // SECTOR_SIZE, length // SECTOR_SIZE)
            if bits != parent.bitmap_copy(pb):
                parent.write_bitmap(pb, bits)
    bar.finish()
    if copied == 0 and not allocated:
        parent.dirty = False
    return copied, allocated
