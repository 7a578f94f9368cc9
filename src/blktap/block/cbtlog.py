"""An open changed block tracking log (``.cbtlog``): what the ``log`` layer marks.

:class:`CbtLogFile` opens a log made by ``cbt-util create`` (ours or the C tool's) for a
disk of a given size, sets the bits of the 64 KiB blocks a write touches, and makes them
durable on request. The file format is :mod:`blktap.proto.cbt`'s.

Design
------
*Where the bits live.* The header and bitmap are mapped ``MAP_SHARED``, as the C filter
maps them, and bits are set in the map. The map is the page cache itself, so:

- a mark is in the file the moment it is made: a tapdisk killed with -9 right after
  loses nothing (the kernel writes the pages back);
- it stays coherent with ``cbt-util`` working on the same file while it is open (the
  storage manager sets the header's flag, or coalesces a parent log into this one, with
  plain writes): bits it adds are seen, never overwritten with a stale copy. A private
  in-memory copy written back with ``pwrite`` would lose such bits;
- a mark costs no system call. A block already marked is not written again, so its page
  is not dirtied again and the next sync has nothing to do for it.

*Ordering.* The caller marks a write's blocks before it starts the write (the C filter
does the same): if the data reaches the disk, so - in the page cache at least - has its
bit. Setting a bit for a write that then fails is harmless (the block is copied once
more by the next incremental backup); the reverse would silently lose data from it.

*Durability (better than the C filter).* The C filter never syncs the map, so a host
crash can forget the bits of writes that were written and flushed, and a backup from
that log misses them. Here :meth:`CbtLogFile.sync` writes the dirty part of the map back
with ``msync(MS_SYNC)`` (in a thread: the event loop keeps serving) and returns when it
is durable; the ``log`` layer awaits it in every flush, alongside the image's flush, and
with every FUA write. So the bits of every flushed write are durable no later than the
flush, and those of a FUA write no later than the write. A sync with nothing marked since
the last one costs nothing; concurrent syncs share one ``msync``. Writes never flushed
carry no promise, as for the image's data: after a host crash the storage manager's
``consistent`` flag (0 while attached; this class never changes it) says "assume every
block changed".

*Threads.* Marks may come from several threads at once (the NBD lanes' threads mark
the writes they issue, the event loop the rest): setting bits and recording the dirty
range happen under a lock, the range first, so that a thread that finds a bit already
set (and writes without marking) knows its sync will cover it. A mark that finds its
bits set takes no lock. Syncs are serialized by a second lock, held across the
``msync``: a sync that finds nothing left to write back returns only once the syncs
before it, which took the range, are done.

*Failure.* A sync that fails (EIO from the file system) raises and leaves the range
dirty, so that the next flush tries again. The mapped file must not be truncated while
it is open (the kernel would kill the process with SIGBUS on the next mark, as it would
the C tapdisk); ``cbt-util`` only ever grows a log, and a log is grown for a larger disk
only while the disk is closed.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import threading

from blktap.proto import cbt

_PAGE = mmap.PAGESIZE


class CbtLogFile:
    """An open log for a disk of ``disk_size`` bytes. Use :meth:`open`; call
    :meth:`close` (or :meth:`close_now`) when done.

    :meth:`mark`, :meth:`sync_now` and :meth:`sync` may be called from any thread (see
    "Threads" above); open and close from one, while no other uses the log.
    """

    def __init__(self, path: str, fd: int, map_: mmap.mmap, header: cbt.CbtHeader,
                 disk_size: int) -> None:
        self.path = path
        self.header = header
        """The header as read at open (this class never changes the file's header)."""
        self.disk_size = disk_size
        self._fd = fd
        self._map = map_
        self._bits = memoryview(map_)[cbt.HEADER_SIZE:cbt.HEADER_SIZE + header.bitmap_size]
        self._dirty_lo = -1  # byte range of the map marked since the last sync
        self._dirty_hi = -1
        self._generation = 0  # marks that dirtied a page, counted
        self._synced = 0  # the generation the last completed sync covered
        self._sync_lock = asyncio.Lock()  # the event loop's syncs share one msync
        self._mark_lock = threading.Lock()  # bits, dirty range and generation
        self._msync_lock = threading.Lock()  # one msync at a time, any thread
        self._closed = False

    @classmethod
    def open(cls, path: str, disk_size: int) -> CbtLogFile:
        """Open the log at ``path`` for a disk of ``disk_size`` bytes.

        Raises OSError when it cannot be opened or mapped, the
        :class:`blktap.proto.cbt.CbtLogError` subclasses for a file that is not a valid
        log (truncated, foreign, wrong length), and BitmapTooSmallError (EINVAL) when
        the log's bitmap has no bit for some block of the disk. Nothing is written.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            length = os.fstat(fd).st_size
            head = os.pread(fd, cbt.HEADER_SIZE, 0)
            header = cbt.parse_header(head, path=path)
            available = length - cbt.HEADER_SIZE
            if available < header.bitmap_size:  # judge the length before mapping it
                raise cbt.BitmapTooSmallError(header.bitmap_size, available, header.size,
                                              path=path)
            if available > header.bitmap_size:
                raise cbt.SizeMismatchError(header.log_size, length, header.size, path=path)
            cbt.check_covers(header, disk_size, path=path)
            map_ = mmap.mmap(fd, header.log_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, map_, header, disk_size)

    # ---------------------------------------------------------------------- marking
    def mark(self, offset: int, length: int) -> bool:
        """Set the bits of every block that ``length`` (> 0) bytes at ``offset`` touch
        (inside the disk). True when a bit was newly set (the map was written), False
        when all were set already. Synchronous and cheap: call it before starting the
        write. Thread-safe."""
        assert not self._closed
        assert offset >= 0 and length > 0 and offset + length <= self.disk_size
        first = offset // cbt.BLOCK_SIZE
        last = (offset + length - 1) // cbt.BLOCK_SIZE
        lo, hi = first >> 3, last >> 3
        bits = self._bits
        if lo == hi:  # the common case: one or a few blocks in one byte
            mask = ((2 << (last - first)) - 1) << (first & 7)
            if bits[lo] & mask == mask:  # set bits stay set: no lock needed to see it
                return False
            with self._mark_lock:
                # The range before the bits: whoever sees them set sees them pending.
                self._dirtied(cbt.HEADER_SIZE + lo, cbt.HEADER_SIZE + hi + 1)
                bits[lo] |= mask
            return True
        if self._all_set(first, last):
            return False
        with self._mark_lock:
            self._dirtied(cbt.HEADER_SIZE + lo, cbt.HEADER_SIZE + hi + 1)
            cbt.set_range(bits, first, last - first + 1)
        return True

    def _all_set(self, first: int, last: int) -> bool:
        lo, hi = first >> 3, last >> 3
        bits = self._bits
        if bits[lo] | ((1 << (first & 7)) - 1) != 0xFF:
            return False
        if bits[hi] | (0xFF & ~((2 << (last & 7)) - 1)) != 0xFF:
            return False
        inner = bits[lo + 1:hi]
        return inner.tobytes().count(0xFF) == len(inner) if len(inner) else True

    def _dirtied(self, start: int, end: int) -> None:
        # Under _mark_lock.
        if self._dirty_lo < 0:
            self._dirty_lo, self._dirty_hi = start, end
        else:
            self._dirty_lo = min(self._dirty_lo, start)
            self._dirty_hi = max(self._dirty_hi, end)
        self._generation += 1

    def is_marked(self, block: int) -> bool:
        return cbt.is_set(self._bits, block)

    def bits_set(self) -> list[int]:
        """The marked blocks, ascending (as the file holds them now)."""
        return list(cbt.iter_set(self._bits))

    def bitmap(self) -> bytes:
        """A copy of the bitmap as the file holds it now."""
        return self._bits.tobytes()

    def dirty_extents(self, offset: int, length: int,
                      limit: int = 1 << 30) -> list[tuple[int, int]]:
        """The range of ``length`` (> 0) bytes at ``offset`` (inside the disk) as runs
        of (bytes, 1 marked / 0 clean), in order, at most ``limit`` of them: a run ends
        at a block boundary (a multiple of BLOCK_SIZE) or at the range's end. The runs
        cover the whole range unless ``limit`` cut them short. Reads the map as it is
        now, so every mark made before the call is seen (marks precede the writes'
        acknowledgements)."""
        assert not self._closed
        assert offset >= 0 and length > 0 and offset + length <= self.disk_size
        bits = self._bits
        end = offset + length
        block = offset // cbt.BLOCK_SIZE
        last = (end - 1) // cbt.BLOCK_SIZE
        runs: list[tuple[int, int]] = []
        start = offset
        flag = bits[block >> 3] >> (block & 7) & 1
        block += 1
        while block <= last:
            byte = bits[block >> 3]
            if not block & 7 and block + 7 <= last and byte == (0xFF if flag else 0):
                block += 8  # eight blocks alike the run: skip them at once
                continue
            bit = byte >> (block & 7) & 1
            if bit != flag:
                boundary = block * cbt.BLOCK_SIZE
                runs.append((boundary - start, flag))
                if len(runs) == limit:
                    return runs
                start, flag = boundary, bit
            block += 1
        runs.append((end - start, flag))
        return runs

    @property
    def closed(self) -> bool:
        """:meth:`close` (or :meth:`close_now`) was called."""
        return self._closed

    @property
    def pending(self) -> bool:
        """Marks not yet made durable by a sync."""
        return self._generation != self._synced

    # ------------------------------------------------------------------ durability
    async def sync(self) -> None:
        """Return when every bit marked before this call is durable. Does nothing when
        nothing was marked since the last sync; a sync already running for the same
        marks is awaited rather than repeated. Raises OSError from ``msync`` (the range
        stays dirty for the next sync). The ``msync`` runs in a worker thread."""
        target = self._generation
        if self._synced >= target:
            return
        async with self._sync_lock:
            if self._synced >= target:
                return
            await asyncio.to_thread(self._sync_to, target)

    def sync_now(self) -> None:
        """:meth:`sync`, blocking the caller (close, a FUA write on a fast route, a
        thread). Thread-safe."""
        target = self._generation
        if self._synced < target:
            self._sync_to(target)

    def _sync_to(self, target: int) -> None:
        """Make the marks up to generation ``target`` durable (blocking)."""
        with self._msync_lock:
            if self._synced >= target:
                return  # a sync that ended while this one waited covered them
            with self._mark_lock:
                covered, lo, hi = self._generation, self._dirty_lo, self._dirty_hi
                self._dirty_lo = self._dirty_hi = -1
            try:
                self._msync(lo, hi)
            except BaseException:
                if lo >= 0:
                    with self._mark_lock:
                        self._dirtied(lo, hi)
                raise
            self._synced = max(self._synced, covered)

    def _msync(self, lo: int, hi: int) -> None:
        if lo < 0:
            return
        start = lo - lo % _PAGE
        self._map.flush(start, hi - start)

    # ----------------------------------------------------------------------- close
    async def close(self) -> None:
        """Sync what is pending, then unmap and close. Raises OSError from the sync
        after releasing everything (the marks stay in the page cache)."""
        if self._closed:
            return
        try:
            await self.sync()
        finally:
            self._release()

    def close_now(self) -> None:
        """:meth:`close`, blocking."""
        if self._closed:
            return
        try:
            self.sync_now()
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        self._bits.release()
        self._map.close()
        os.close(self._fd)
