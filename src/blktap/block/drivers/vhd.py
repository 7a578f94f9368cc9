"""The ``vhd`` driver: fixed, dynamic and differencing VHD images.

Metadata (BAT, sector bitmaps, batmap) is loaded at open by :class:`blktap.vhd.VhdFile`
and kept in memory, so :meth:`VhdImage.allocation` costs no system call. Data moves with
one ``os.preadv``/``os.pwritev`` per run of contiguous file bytes, straight into or out of
the caller's buffer.

Writes:

* to sectors already allocated in this file: written at once, concurrently with any
  other write (no lock);
* anything that changes metadata (a new block, sector bitmap bits, the batmap) runs
  under one allocation lock, in blktap's crash-safe order: the new bitmap + block are
  zero-filled at the end of the file synchronously (followed by the footer), then the
  data and the BAT entry are written, then the sector bitmap; the write is acknowledged
  only after all of them. A crash at any point leaves an image ``vhd-util check``
  accepts and never exposes stale data for an unacknowledged write.

``fua`` and :meth:`flush` use ``fdatasync``. The trailing footer is rewritten on close if
anything changed; a read-only open writes nothing and leaves even the access time alone.

Data I/O honours :attr:`OpenOptions.direct` (the C tapdisk's default, O_DIRECT):

* **direct** — block data moves through an ``aio`` image opened on the same file with
  ``O_DIRECT`` (Linux AIO, aligned bounce buffers where the caller's buffer cannot go to
  the kernel as it is), while metadata (BAT, bitmaps, batmap, footer, the zero-fill of a
  new block) keeps going through :class:`blktap.vhd.VhdFile`'s buffered descriptor. The
  kernel keeps the two coherent (a direct write or read first writes back the dirty pages
  of its range); ``fdatasync`` on either descriptor syncs the whole file. Falls back to
  buffered when the file system refuses O_DIRECT.
* **buffered** — plain synchronous ``os.preadv``/``os.pwritev`` on the page cache: a
  request completes without waiting.

Every data transfer goes through :meth:`VhdImage._preadv`/``_pwritev`` except the hot
paths (a request inside one block that holds all of it), which inline the same choice.

Fast reads (``read_now``/``read_blocking``, see :meth:`VhdImage.fast_io`): a read inside
one block whose sectors this file all holds is translated to its file offset in memory
and read there at once, by the event loop (``VBD.read_now``) or by an NBD connection's
read lane (``ThreadIO``); anything else is declined and takes the chain. The queue
depth 1 reads of a fully allocated VHD then cost what a raw image's do.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

from blktap.block.driver import (
    SECTOR_SIZE,
    Alloc,
    Extent,
    FastIO,
    ImageInfo,
    OpenOptions,
    ParentRef,
    register,
)
from blktap.block.drivers.aio import AioImage, open_aio
from blktap.block.drivers.nbd import check_export_covers
from blktap.errors import NotFound, ReadOnly
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.constants import BAT_UNUSED, DiskType
from blktap.vhd.image import VhdFile, network_parent

log = logging.getLogger(__name__)

_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def _never(offset: int, buf: memoryview) -> bool:
    return False


class VhdImage:
    """One open VHD. Create it with :func:`open_vhd`."""

    type_name = "vhd"

    def __init__(self, vf: VhdFile, read_only: bool, engine: AioImage | None = None) -> None:
        self.vhd = vf
        self._engine = engine
        """The O_DIRECT data engine (an ``aio`` image of the same file), None when buffered."""
        self.path = vf.path
        self.read_only = read_only
        self.info = ImageInfo(size=vf.size)
        self.fully_allocated = vf.disk_type == DiskType.FIXED
        self._fd = vf.fd
        self._sparse = vf.header is not None
        self._diff = vf.disk_type == DiskType.DIFFERENCING
        self._bs = vf.block_size if self._sparse else 0
        # Hot-path constants: block = offset >> shift, within = offset & mask; a block's
        # data starts bitmap_size bytes after its BAT entry's sector.
        self._shift = self._bs.bit_length() - 1 if self._sparse else 0
        self._mask = self._bs - 1
        self._bm_size = vf.header.bitmap_size if vf.header is not None else 0
        self._bat = vf.bat
        self._full = vf.full_blocks
        self._bitmaps = vf.bitmaps
        self._engine_now: Callable[[int, memoryview], bool] = _never
        self._engine_blocking: Callable[[int, memoryview], bool] = _never
        """The data engine's read_now/read_blocking (set by :meth:`fast_io`)."""
        self._alloc_lock = asyncio.Lock()
        self._unsynced = False
        self._closed = False
        link = vf.parent
        self._parent: ParentRef | None = None
        if link is not None:
            remote = network_parent(link.path) if link.raw else None
            if remote is not None:  # e.g. rbd:pool/image, opened by that driver
                self._parent = ParentRef(*remote)
            else:
                self._parent = ParentRef("aio" if link.raw else "vhd", link.path)

    @property
    def parent(self) -> ParentRef | None:
        """``ParentRef("vhd", abs path)``, ``ParentRef("aio", raw path)``,
        ``ParentRef("rbd", "pool/image...")`` for a raw parent on RBD, or None."""
        return self._parent

    # ------------------------------------------------------------------ lookups
    def _segments(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(block, byte offset in block, virtual offset, length) pieces of a range."""
        bs = self._bs
        out = []
        while length > 0:
            block, within = divmod(offset, bs)
            n = min(bs - within, length)
            out.append((block, within, offset, n))
            offset += n
            length -= n
        return out

    def _held(self, block: int, within: int, length: int) -> int:
        """Whether this file holds the range ``[within, within + length)`` of ``block``:
        1 every sector, 0 none, -1 some. In memory, no list built for whole bytes of the
        bitmap (ranges of multiples of 8 sectors at multiples of 8 sectors)."""
        if block in self._full:
            return 1
        bits = self._bitmaps.get(block)
        if bits is None:
            return 0
        first = within >> 9
        count = length >> 9
        if not (first | count) & 7:
            a = first >> 3
            n = count >> 3
            if bits.count(255, a, a + n) == n:
                return 1
            if bits.count(0, a, a + n) == n:
                return 0
            return -1
        runs = bm.runs(bits, first, count)
        if len(runs) == 1:
            return 1 if runs[0][2] else 0
        return -1

    def fast_io(self) -> FastIO:
        """The owner-cache probe :meth:`holds`, and synchronous (``read_now``) and blocking
        (``read_blocking``) reads of ranges this file holds, offered as
        ``reads_held_only``: each serves a read inside one block whose sectors this file
        all holds (any read of a fixed disk) with one ``preadv`` at the translated file
        offset, and declines everything else (holes, sectors of the parent, partly
        present bitmaps, block boundaries), which then takes the chain. With O_DIRECT the
        data engine's own ``read_now``/``read_blocking`` do the read, with their rules
        (alignment, an idle device for the loop's synchronous reads). Writes go through
        the coroutines."""
        engine = self._engine
        if engine is not None:
            now, blocking = engine.read_now, engine.read_blocking
            if not self._sparse:  # a fixed disk's data lies at the same offsets
                return FastIO(holds=self.holds, read_now=now, read_blocking=blocking,
                              reads_held_only=True, reads_any_range=True)
            self._engine_now = now
            self._engine_blocking = blocking
            return FastIO(holds=self.holds, read_now=self._read_now_direct,
                          read_blocking=self._read_blocking_direct, reads_held_only=True,
                          reads_any_range=True)
        return FastIO(holds=self.holds, read_now=self._read_held, read_blocking=self._read_held,
                      reads_held_only=True, reads_any_range=True)

    def _held_offset(self, offset: int, length: int) -> int:
        """The file offset of the virtual range ``[offset, offset + length)`` when it lies
        inside one block that this file holds every sector of, else -1. Safe from any
        thread: the loop only ever replaces the BAT entry of an unused block, a bitmap
        object, or membership of the full set, each after the data it describes is on
        disk (see :meth:`_write_allocating`), so a reader sees the old state (and
        declines) or the new one."""
        if not self._sparse:
            return offset
        within = offset & self._mask
        if within + length > self._bs:
            return -1
        block = offset >> self._shift
        if block in self._full or self._held(block, within, length) == 1:
            return self._bat[block] * SECTOR_SIZE + self._bm_size + within
        return -1

    def _read_now_direct(self, offset: int, buf: memoryview) -> bool:
        # _held_offset of a sparse disk, inline (a call costs as much as the check).
        length = len(buf)
        within = offset & self._mask
        if within + length > self._bs:
            return False
        block = offset >> self._shift
        if block not in self._full and self._held(block, within, length) != 1:
            return False
        return self._engine_now(self._bat[block] * SECTOR_SIZE + self._bm_size + within, buf)

    def _read_blocking_direct(self, offset: int, buf: memoryview) -> bool:
        # _held_offset of a sparse disk, inline (a call costs as much as the check).
        length = len(buf)
        within = offset & self._mask
        if within + length > self._bs:
            return False
        block = offset >> self._shift
        if block not in self._full and self._held(block, within, length) != 1:
            return False
        return self._engine_blocking(
            self._bat[block] * SECTOR_SIZE + self._bm_size + within, buf)

    def _read_held(self, offset: int, buf: memoryview) -> bool:
        """Buffered ``read_now``/``read_blocking``: one ``preadv`` of a held range."""
        foff = self._held_offset(offset, len(buf))
        if foff < 0:
            return False
        got = os.preadv(self._fd, [buf], foff)
        while got < len(buf):  # short (rare): the rest, to the end
            if got <= 0:
                raise OSError(errno.EIO, f"{self.path}: short read at {foff}")
            buf = buf[got:]
            foff += got
            got = os.preadv(self._fd, [buf], foff)
        return True

    def holds(self, offset: int, length: int) -> int:
        """A cheap form of :meth:`allocation` for the chain's owner lookups: 1 when the
        whole range is DATA here, 0 when it is all UNALLOCATED, -1 when mixed or when the
        range crosses a block boundary (then ask :meth:`allocation`)."""
        if not self._sparse:
            return 1
        within = offset & self._mask
        if within + length > self._bs:
            return -1
        return self._held(offset >> self._shift, within, length)

    def allocation(self, offset: int, length: int) -> list[Extent]:
        """DATA where this file holds the sectors, UNALLOCATED elsewhere (the parent's, or
        zeros at the root), exact per sector from the in-memory BAT and bitmaps."""
        if not self._sparse:
            return [Extent(offset, length, Alloc.DATA)]
        block = offset >> self._shift
        within = offset & self._mask
        if within + length <= self._bs:
            # Inside one block (the common case): one extent when the file holds all or
            # none of the range.
            held = self._held(block, within, length)
            if held == 1:
                return [Extent(offset, length, Alloc.DATA)]
            if held == 0:
                return [Extent(offset, length, Alloc.UNALLOCATED)]
        out: list[Extent] = []
        runs = self.vhd.sector_runs
        for block, within, voff, n in self._segments(offset, length):
            base = voff - within
            for first, count, present in runs(block, within // SECTOR_SIZE, n // SECTOR_SIZE):
                alloc = Alloc.DATA if present else Alloc.UNALLOCATED
                start = base + first * SECTOR_SIZE
                size = count * SECTOR_SIZE
                if out and out[-1].alloc == alloc:
                    last = out.pop()
                    out.append(Extent(last.offset, last.length + size, alloc))
                else:
                    out.append(Extent(start, size, alloc))
        return out

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Same as :meth:`allocation` (no system call)."""
        return self.allocation(offset, length)

    def _file_runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(file offset, or -1 for sectors this file does not hold, buffer offset, length),
        merged where the file bytes are contiguous."""
        if not self._sparse:
            return [(offset, 0, length)]
        out: list[tuple[int, int, int]] = []
        vf = self.vhd
        for block, within, voff, n in self._segments(offset, length):
            base = vf.data_offset_of(block)
            if base is None:
                pieces = [(-1, voff - offset, n)]
            else:
                first = within // SECTOR_SIZE
                pieces = [
                    (
                        base + s * SECTOR_SIZE if present else -1,
                        voff - offset + (s - first) * SECTOR_SIZE,
                        count * SECTOR_SIZE,
                    )
                    for s, count, present in vf.sector_runs(block, first, n // SECTOR_SIZE)
                ]
            for foff, boff, size in pieces:
                if out and (
                    (foff < 0 and out[-1][0] < 0)
                    or (foff >= 0 and out[-1][0] >= 0 and out[-1][0] + out[-1][2] == foff)
                ):
                    last = out.pop()
                    out.append((last[0], last[1], last[2] + size))
                else:
                    out.append((foff, boff, size))
        return out

    def _held_at(self, block: int, within: int, length: int) -> int:
        """The file offset of ``length`` bytes at ``within`` in ``block`` when this file
        holds all of them, else -1 (the fast path of reads and writes)."""
        if block in self._full or self._held(block, within, length) == 1:
            return self._bat[block] * SECTOR_SIZE + self._bm_size + within
        return -1

    # -------------------------------------------------------------------- reads
    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with this image's view of ``offset``: one ``preadv`` per run of
        contiguous file bytes; sectors this file does not hold (UNALLOCATED) read as
        zeros (the chain only asks for DATA ranges)."""
        length = len(buf)
        if self._sparse:
            block = offset >> self._shift
            within = offset & self._mask
            if within + length <= self._bs and (
                    block in self._full or self._held(block, within, length) == 1):
                # The common case: inside one block that holds the range, one call
                # (_held_at, inline: a call per request costs as much as the check).
                foff = self._bat[block] * SECTOR_SIZE + self._bm_size + within
                if self._engine is not None:
                    await self._engine.read(foff, buf)
                    return
                got = os.preadv(self._fd, [buf], foff)
                if got < length:
                    await self._preadv(buf[got:], foff + got)
                return
        else:
            # Fixed disk: the data is at the same offset in the file.
            await self._preadv(buf, offset)
            return
        for foff, boff, n in self._file_runs(offset, length):
            part = buf[boff : boff + n]
            if foff < 0:
                for start in range(0, n, _ZERO_CHUNK):
                    end = min(n, start + _ZERO_CHUNK)
                    part[start:end] = _ZEROS[: end - start]
            else:
                await self._preadv(part, foff)

    async def _preadv(self, buf: memoryview, offset: int) -> None:
        if self._engine is not None:
            await self._engine.read(offset, buf)
            return
        while len(buf):
            got = os.preadv(self._fd, [buf], offset)
            if got <= 0:
                raise OSError(errno.EIO, f"{self.path}: short read at {offset}")
            buf = buf[got:]
            offset += got

    async def _pwritev(self, data: memoryview, offset: int) -> None:
        if self._engine is not None:
            self._unsynced = True
            await self._engine.write(offset, data)
            return
        while len(data):
            done = os.pwritev(self._fd, [data], offset)
            data = data[done:]
            offset += done
        self._unsynced = True

    # ------------------------------------------------------------------- writes
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.path} is open read-only")

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable on return.

        On failure the range is undefined, metadata stays consistent: a block whose
        bitmap was not written reads as before the write."""
        if self.read_only:
            raise ReadOnly(f"{self.path} is open read-only")
        length = len(data)
        if self._sparse:
            block = offset >> self._shift
            within = offset & self._mask
            if within + length <= self._bs and (foff := self._held_at(block, within, length)) >= 0:
                # Sectors this file holds already: no metadata changes, one call, no lock.
                self._unsynced = True
                if self._engine is not None:
                    await self._engine.write(foff, data)
                else:
                    done = os.pwritev(self._fd, [data], foff)
                    if done < length:
                        await self._pwritev(data[done:], foff + done)
            elif within + length <= self._bs:
                await self._write_allocating(block, within, data)
            else:
                await self._write_sparse(offset, data)
        else:
            await self._pwritev(data, offset)
        if fua:
            await self.flush()

    async def _write_sparse(self, offset: int, data: memoryview) -> None:
        vf = self.vhd
        pending: list[tuple[int, int, int]] = []  # fast-path (file offset, data offset, n)
        slow: list[tuple[int, int, int, int]] = []
        for block, within, voff, n in self._segments(offset, len(data)):
            base = vf.data_offset_of(block)
            first = within // SECTOR_SIZE
            count = n // SECTOR_SIZE
            bits = vf.bitmaps.get(block)
            if base is not None and (
                block in vf.full_blocks or (bits is not None and bm.all_set(bits, first, count))
            ):
                foff = base + within
                doff = voff - offset
                if pending and pending[-1][0] + pending[-1][2] == foff:
                    last = pending.pop()
                    pending.append((last[0], last[1], last[2] + n))
                else:
                    pending.append((foff, doff, n))
            else:
                slow.append((block, within, voff - offset, n))
        for foff, doff, n in pending:
            await self._pwritev(data[doff : doff + n], foff)
        for block, within, doff, n in slow:
            await self._write_allocating(block, within, data[doff : doff + n])

    async def _write_allocating(self, block: int, within: int, data: memoryview) -> None:
        vf = self.vhd
        async with self._alloc_lock:
            entry = vf.bat[block]
            if entry == BAT_UNUSED:
                # blktap's order: zero-fill bitmap + block (and footer) synchronously,
                # then data and BAT entry, then the bitmap.
                entry = vf.reserve_block()
                base = vf.data_offset_of_entry(entry)
                await self._pwritev(data, base + within)
                vf.write_bat_entry(block, entry)
            else:
                base = vf.data_offset_of_entry(entry)
                await self._pwritev(data, base + within)
            if block not in vf.full_blocks:
                bits = vf.bitmap_copy(block)
                first = within // SECTOR_SIZE
                count = len(data) // SECTOR_SIZE
                if not (first | count) & 7:  # whole bytes of the bitmap
                    bits[first >> 3 : (first + count) >> 3] = b"\xff" * (count >> 3)
                else:
                    bm.set_range(bits, first, count)
                vf.write_bitmap(block, bits)
            self._unsynced = True

    async def _write_zero_data(self, offset: int, length: int) -> None:
        while length:
            n = min(length, _ZERO_CHUNK)
            if self._sparse:
                await self._write_sparse(offset, _ZEROS[:n])
            else:
                await self._pwritev(_ZEROS[:n], offset)
            offset += n
            length -= n

    async def _unmap(self, offset: int, length: int) -> None:
        """Clear the bitmap bits of the range (dynamic disks: the sectors read as zeros)."""
        vf = self.vhd
        for block, within, _voff, n in self._segments(offset, length):
            if vf.bat[block] == BAT_UNUSED:
                continue
            first, count = within // SECTOR_SIZE, n // SECTOR_SIZE
            if not any(v for _, _, v in vf.sector_runs(block, first, count)):
                continue
            async with self._alloc_lock:
                bits = vf.bitmap_copy(block)
                bm.set_range(bits, first, count, False)
                vf.write_bitmap(block, bits)
                self._unsynced = True

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeros. A differencing disk writes zeros (allocating, so
        the parent is hidden); a dynamic disk clears bitmap bits when ``may_unmap``, else
        writes zeros over sectors it holds (others already read as zeros)."""
        self._check_writable()
        if not self._sparse or self._diff:
            await self._write_zero_data(offset, length)
            return
        if may_unmap:
            await self._unmap(offset, length)
            return
        for ext in self.allocation(offset, length):
            if ext.alloc == Alloc.DATA:
                await self._write_zero_data(ext.offset, ext.length)

    async def discard(self, offset: int, length: int) -> None:
        """Dynamic disks forget the sectors (they read as zeros); differencing and fixed
        disks keep them (a discard is advisory; forgetting would expose the parent)."""
        self._check_writable()
        if self._sparse and not self._diff:
            await self._unmap(offset, length)

    async def flush(self) -> None:
        if self._unsynced and not self.read_only:
            self._unsynced = False
            if self._engine is not None:
                await self._engine.flush()  # an AIO fdatasync: the loop keeps serving
            else:
                os.fdatasync(self._fd)

    async def close(self) -> None:
        """Rewrite the footer if anything changed, sync, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._engine is not None:
                await self._engine.close()
        finally:
            self.vhd.close()


async def open_vhd(path: str, options: OpenOptions) -> VhdImage:
    """Open ``path`` as a VHD. Raises NotFound (no such file), ImageFormatError (malformed
    image, missing or mismatched parent, an NBD parent export smaller than the disk),
    OSError. Writes nothing."""
    try:
        vf = VhdFile.open(path, writable=not options.read_only)
    except FileNotFoundError as exc:
        raise NotFound(f"{path}: {exc.strerror}") from None
    remote = network_parent(vf.parent.path) if vf.parent and vf.parent.raw else None
    if remote is not None and remote[0] == "nbd":
        try:  # the chain would read zeros past a smaller export's end: refuse it here
            await check_export_covers(remote[1], vf.size, path)
        except BaseException:
            vf.close()
            raise
    engine: AioImage | None = None
    if options.direct:
        try:
            engine = await open_aio(path, OpenOptions(read_only=options.read_only, direct=True))
            if not engine.direct:  # O_DIRECT refused here (logged by the aio driver)
                await engine.close()
                engine = None
        except BaseException:
            vf.close()
            raise
    return VhdImage(vf, options.read_only, engine)


register("vhd", open_vhd)
