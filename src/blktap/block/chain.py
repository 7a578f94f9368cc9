"""A leaf-first chain of images: reads fall through to parents, writes go to the leaf.

The chain is the one place that turns byte-granular requests into the sector-aligned
requests drivers receive: unaligned reads go through a bounce buffer, unaligned writes
read-modify-write their edge sectors (serialised per sector so that two writes sharing a
sector both survive).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from blktap.block.capabilities import Capabilities, Routes
from blktap.block.driver import (
    SECTOR_SIZE,
    Alloc,
    FastIO,
    Image,
    OpenOptions,
    ParentRef,
    opener_for,
)
from blktap.errors import ImageFormatError

log = logging.getLogger(__name__)

# NBD base:allocation bits, produced here because the chain is what knows them.
STATE_HOLE = 1
STATE_ZERO = 2

# The read path remembers, per unit of 2 MiB (the VHD block size blktap writes), which
# level of the chain holds the whole unit, so that a read inside one unit costs one dict
# lookup instead of an allocation lookup per level; in units no single level holds, the
# same per 4 KiB page (a guest's usual write size).
_UNIT_SHIFT = 21
_UNIT = 1 << _UNIT_SHIFT
_MIXED = -1
"""Owner value: no single level holds the whole range (take the general path)."""
_PAGE_SHIFT = 12
_PAGE = 1 << _PAGE_SHIFT
_PAGE_CACHE_MAX = 1 << 12
"""Mixed units whose per-page owners are kept (512 bytes each) before starting over."""
_OWNER_CACHE_MAX = 1 << 16
"""Entries kept before the cache is emptied (bounds memory on huge sparse disks)."""


@dataclass(slots=True)
class ImageStats:
    """Per-image counters in sectors (512 bytes) read and written, and of those failed, as
    the C tapdisk's STATS reports them (``td_sector_count_add`` of each request's sectors)."""

    hits: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])


@dataclass(frozen=True, slots=True)
class StatusExtent:
    """One extent of NBD ``base:allocation`` status: ``flags`` is HOLE/ZERO bits."""

    offset: int
    length: int
    flags: int


def _align_down(n: int) -> int:
    return n - n % SECTOR_SIZE


def _align_up(n: int) -> int:
    return -(-n // SECTOR_SIZE) * SECTOR_SIZE


class Chain:
    """An open image chain. ``images[0]`` is the leaf; each next one is its parent."""

    def __init__(self, images: list[Image]) -> None:
        assert images
        self.images = images
        self.stats = [ImageStats() for _ in images]
        self._sector_locks: dict[int, asyncio.Future[None]] = {}
        self._owner: dict[int, int] = {}
        """unit -> level that holds all of it as DATA, len(images) when it reads as zeros
        (nothing holds it, or a ZERO extent), or _MIXED. Only the leaf changes, so an
        entry is dropped after every leaf write/zeroes/discard that may change it."""
        self._pages: dict[int, bytearray] = {}
        """mixed unit -> per-page owners (see :meth:`_page_owner`), dropped with the unit."""
        self._depth = len(images)
        self._leaf_full = images[0].fully_allocated
        fast = [image.fast_io() for image in images]
        # ``holds(offset, length) -> 1 all DATA / 0 all UNALLOCATED / -1 ask
        # allocation()``, where offered: spares building extent lists per level.
        self._probes: list[Callable[[int, int], int] | None] = [f.holds for f in fast]
        self.fast: FastIO = fast[0]
        """What the leaf offers beyond its coroutines (the VBD's fast routes use it)."""
        self._caps = _capabilities(images[0], self.fast, len(images) == 1)

    # ------------------------------------------------------------------ opening
    @classmethod
    async def open(cls, type_name: str, path: str, options: OpenOptions) -> Chain:
        """Open the leaf with ``options``, then each parent it names, read-only.

        Raises NotFound (unknown type, missing file), ImageFormatError (malformed image,
        looping chain), OSError. On failure every image opened so far is closed again.
        """
        images: list[Image] = []
        seen: set[str] = set()
        ref: ParentRef | None = ParentRef(type_name, path)
        opts = options
        try:
            while ref is not None:
                key = os.path.realpath(ref.path) if ref.type != "ram" else ref.path
                if key in seen:
                    raise ImageFormatError(
                        "parent chain loops", path=images[-1].path, structure="parent chain",
                        value=ref.path,
                    )
                seen.add(key)
                image = await opener_for(ref.type)(ref.path, opts)
                images.append(image)
                ref = image.parent
                opts = OpenOptions(read_only=True, direct=options.direct)
        except BaseException:
            for image in reversed(images):
                try:
                    await image.close()
                except Exception:
                    log.exception("closing %s after a failed open", image.path)
            raise
        return cls(images)

    @property
    def leaf(self) -> Image:
        return self.images[0]

    @property
    def chain(self) -> Chain:
        """The bottom of the stack (blktap.block.layer.Stack): this chain."""
        return self

    def capabilities(self) -> Capabilities:
        """What the chain can do: see :func:`_capabilities`."""
        return self._caps

    @property
    def size(self) -> int:
        return self.leaf.info.size

    @property
    def read_only(self) -> bool:
        return self.leaf.read_only

    async def close(self) -> None:
        """Close every image, leaf first. Raises the first error after closing them all."""
        first: BaseException | None = None
        for image in self.images:
            try:
                await image.close()
            except Exception as exc:
                log.error("closing %s: %s", image.path, exc)
                first = first or exc
        if first is not None:
            raise first

    # -------------------------------------------------------------------- reads
    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from the chain. The range must lie inside the device."""
        length = len(buf)
        if offset % SECTOR_SIZE == 0 and length % SECTOR_SIZE == 0:
            if self._leaf_full:
                await self._image_read(self.images[0], self.stats[0], offset, buf)
                return
            unit = offset >> _UNIT_SHIFT
            if (offset + length - 1) >> _UNIT_SHIFT == unit:
                level = self._owner.get(unit)
                if level is None:
                    level = self._find_owner(unit)
                if level == _MIXED and (offset + length - 1) >> _PAGE_SHIFT == (
                    offset >> _PAGE_SHIFT
                ):
                    level = self._page_owner(unit, offset)
                if level >= 0:
                    if level == self._depth:
                        buf[:] = bytes(length)
                        return
                    stats = self.stats[level]
                    stats.hits[0] += length >> 9
                    try:
                        await self.images[level].read(offset, buf)
                    except BaseException:
                        stats.fail[0] += length >> 9
                        raise
                    return
            await self._read_level(0, offset, buf)
            return
        start = _align_down(offset)
        end = _align_up(offset + length)
        bounce = memoryview(bytearray(end - start))
        await self._read_level(0, start, bounce)
        buf[:] = bounce[offset - start : offset - start + length]

    def _owner_of(self, start: int, length: int) -> int:
        """The level that holds all of ``[start, start + length)`` as DATA, ``_depth`` when
        the range reads as zeros (nothing holds it, or a ZERO extent), else _MIXED."""
        probes = self._probes
        for level, image in enumerate(self.images):
            if image.info.size < start + length:
                return _MIXED  # a smaller parent: zeros past its end, general path
            if image.fully_allocated:
                return level
            probe = probes[level]
            if probe is not None:
                held = probe(start, length)
                if held == 1:
                    return level
                if held == 0:
                    continue
            extents = image.allocation(start, length)
            if len(extents) != 1:
                return _MIXED
            alloc = extents[0].alloc
            if alloc == Alloc.DATA:
                return level
            if alloc == Alloc.ZERO:
                break
        return self._depth

    def _find_owner(self, unit: int) -> int:
        """Which level holds all of ``unit`` (see ``_owner``); computed and remembered."""
        start = unit << _UNIT_SHIFT
        owner = self._owner_of(start, min(_UNIT, self.size - start))
        if len(self._owner) >= _OWNER_CACHE_MAX:
            # Pages only exist under a unit entry (_forget_owners relies on it).
            self._owner.clear()
            self._pages.clear()
        self._owner[unit] = owner
        return owner

    def _page_owner(self, unit: int, offset: int) -> int:
        """Like :meth:`_find_owner` for the 4 KiB page of ``offset`` in a mixed unit; the
        answers for one unit are kept in a bytearray (0 unknown, 255 mixed, level + 1)."""
        if self._depth >= 254:
            return _MIXED
        pages = self._pages.get(unit)
        if pages is None:
            if len(self._pages) >= _PAGE_CACHE_MAX:
                self._pages.clear()
            pages = self._pages[unit] = bytearray(_UNIT >> _PAGE_SHIFT)
        index = (offset >> _PAGE_SHIFT) & ((_UNIT >> _PAGE_SHIFT) - 1)
        code = pages[index]
        if code == 0:
            start = offset >> _PAGE_SHIFT << _PAGE_SHIFT
            level = self._owner_of(start, min(_PAGE, self.size - start))
            code = pages[index] = 255 if level == _MIXED else level + 1
        return _MIXED if code == 255 else code - 1

    async def _read_level(self, level: int, offset: int, buf: memoryview) -> None:
        image = self.images[level]
        stats = self.stats[level]
        if image.fully_allocated:
            await self._image_read(image, stats, offset, buf)
            return
        for ext in image.allocation(offset, len(buf)):
            part = buf[ext.offset - offset : ext.offset - offset + ext.length]
            if ext.alloc == Alloc.DATA:
                await self._image_read(image, stats, ext.offset, part)
            elif ext.alloc == Alloc.ZERO or level + 1 == len(self.images):
                part[:] = bytes(ext.length)
            else:
                await self._read_parent(level + 1, ext.offset, part)

    def _forget_owners(self, offset: int, length: int, keep_leaf: bool) -> None:
        """Drop the owner cache entries of the units the leaf range touches (kept when the
        leaf already held all of the unit and ``keep_leaf``: a write cannot change that)."""
        owner = self._owner
        if not owner or length <= 0:
            return
        first = offset >> _UNIT_SHIFT
        last = (offset + length - 1) >> _UNIT_SHIFT
        pages = self._pages
        for unit in range(first, last + 1):
            level = owner.get(unit)
            if level is not None and not (keep_leaf and level == 0):
                del owner[unit]
                if pages:
                    pages.pop(unit, None)

    async def _read_parent(self, level: int, offset: int, buf: memoryview) -> None:
        # A parent may be smaller than its child (the child was resized): past its end,
        # the chain reads zeros.
        psize = self.images[level].info.size
        inside = max(0, min(len(buf), psize - offset))
        if inside:
            await self._read_level(level, offset, buf[:inside])
        if inside < len(buf):
            buf[inside:] = bytes(len(buf) - inside)

    @staticmethod
    async def _image_read(image: Image, stats: ImageStats, offset: int, buf: memoryview) -> None:
        stats.hits[0] += len(buf) >> 9
        try:
            await image.read(offset, buf)
        except BaseException:
            stats.fail[0] += len(buf) >> 9
            raise

    # ------------------------------------------------------------------- writes
    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write to the leaf. Unaligned edges are read-modify-written under sector locks."""
        length = len(data)
        if offset % SECTOR_SIZE == 0 and length % SECTOR_SIZE == 0:
            await self._leaf_write(offset, data, fua)
            return
        start = _align_down(offset)
        end = _align_up(offset + length)
        edges = sorted({start, end - SECTOR_SIZE})
        await self._lock_sectors(edges)
        try:
            merged = memoryview(bytearray(end - start))
            await self._read_level(0, start, merged[:SECTOR_SIZE])
            if end - SECTOR_SIZE != start:
                await self._read_level(0, end - SECTOR_SIZE, merged[-SECTOR_SIZE:])
            merged[offset - start : offset - start + length] = data
            await self._leaf_write(start, merged, fua)
        finally:
            self._unlock_sectors(edges)

    async def _leaf_write(self, offset: int, data: memoryview, fua: bool) -> None:
        stats = self.stats[0]
        stats.hits[1] += len(data) >> 9
        try:
            await self.leaf.write(offset, data, fua)
        except BaseException:
            stats.fail[1] += len(data) >> 9
            raise
        finally:
            # After the leaf's metadata changed (or failed to): a read that looked the
            # unit up meanwhile may have remembered the old owner.
            if self._owner:
                self._forget_owners(offset, len(data), True)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        """Make the range read as zeros; unaligned edges are written as zero bytes."""
        start = _align_up(offset)
        end = _align_down(offset + length)
        if start >= end:
            await self.write(offset, memoryview(bytes(length)), fua)
            return
        if offset < start:
            await self.write(offset, memoryview(bytes(start - offset)), False)
        if end < offset + length:
            await self.write(end, memoryview(bytes(offset + length - end)), False)
        self.stats[0].hits[1] += (end - start) >> 9
        try:
            await self.leaf.write_zeroes(start, end - start, may_unmap)
            if fua:
                await self.leaf.flush()
        except BaseException:
            self.stats[0].fail[1] += (end - start) >> 9
            raise
        finally:
            self._forget_owners(start, end - start, False)

    async def discard(self, offset: int, length: int) -> None:
        """Advisory trim of the whole sectors inside the range (partial sectors are kept)."""
        start = _align_up(offset)
        end = _align_down(offset + length)
        if start < end:
            try:
                await self.leaf.discard(start, end - start)
            finally:
                self._forget_owners(start, end - start, False)

    async def flush(self) -> None:
        await self.leaf.flush()

    async def _lock_sectors(self, sectors: list[int]) -> None:
        loop = asyncio.get_running_loop()
        for sector in sectors:  # ascending order: no deadlock between two writers
            while (held := self._sector_locks.get(sector)) is not None:
                await asyncio.shield(held)
            self._sector_locks[sector] = loop.create_future()

    def _unlock_sectors(self, sectors: list[int]) -> None:
        for sector in sectors:
            fut = self._sector_locks.pop(sector, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------- block status
    def block_status(self, offset: int, length: int) -> list[StatusExtent]:
        """NBD base:allocation extents covering exactly the range, merged where equal."""
        out: list[StatusExtent] = []
        self._status_level(0, offset, length, out)
        return out

    def _status_level(self, level: int, offset: int, length: int, out: list[StatusExtent]) -> None:
        if level == len(self.images):
            _append_status(out, offset, length, STATE_HOLE | STATE_ZERO)
            return
        image = self.images[level]
        # A parent smaller than its child reads as zeros past its end.
        inside = max(0, min(length, image.info.size - offset))
        if inside:
            for ext in image.block_status(offset, inside):
                if ext.alloc == Alloc.DATA:
                    _append_status(out, ext.offset, ext.length, 0)
                elif ext.alloc == Alloc.ZERO:
                    _append_status(out, ext.offset, ext.length, STATE_HOLE | STATE_ZERO)
                else:
                    self._status_level(level + 1, ext.offset, ext.length, out)
        if inside < length:
            _append_status(out, offset + inside, length - inside, STATE_HOLE | STATE_ZERO)


def _capabilities(leaf: Image, fast: FastIO, alone: bool) -> Capabilities:
    """A chain's capabilities: every command (writes only to a writable leaf: the VBD
    refuses the rest with EPERM); the fast routes
    when the leaf is alone and holds every byte (a request then needs no allocation
    lookup, so the VBD may send it to the leaf itself), each where the leaf offers it;
    and, in any chain, the synchronous and blocking reads of a leaf whose ones serve
    only what it holds (``FastIO.reads_held_only``, vhd): they decline the rest, which
    then takes the chain; and the leaf's read coroutine for a lone leaf whose read serves
    any range (``FastIO.reads_any_range``, a dynamic vhd). (The owner cache stays right:
    reads change nothing.)
    A single VBD serves all its connections, so a flush covers every connection's writes
    (multi-conn)."""
    writable = not leaf.read_only
    one = alone and leaf.fully_allocated
    lend = one and fast.sync_fd is not None
    held = one or fast.reads_held_only
    # A lone leaf that reads its holes as zeros: its read is the chain's (reads change
    # nothing the chain caches; writes keep the chain, which drops the owner cache).
    whole = one or (alone and fast.reads_any_range)
    reads = Routes(direct=whole, sync=held and fast.read_now is not None,
                   thread=held and fast.read_blocking is not None, lent_fd=lend)
    w = one and writable
    writes = Routes(direct=w, sync=w and fast.write_now is not None,
                    thread=w and fast.write_blocking is not None, lent_fd=w and lend)
    return Capabilities(writable=writable, flush=True, trim=True, zero=True,
                        fast_zero=fast.zero_is_fast, multi_conn=True,
                        block_status=True, reads=reads, writes=writes)


def _append_status(out: list[StatusExtent], offset: int, length: int, flags: int) -> None:
    if out and out[-1].flags == flags and out[-1].offset + out[-1].length == offset:
        last = out.pop()
        out.append(StatusExtent(last.offset, last.length + length, flags))
    else:
        out.append(StatusExtent(offset, length, flags))
