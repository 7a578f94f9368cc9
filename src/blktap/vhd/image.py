"""A VHD file's metadata, opened and validated: footer, backup footer, dynamic header, BAT,
batmap, sector bitmaps and the parent it names; plus the synchronous metadata updates a
writer needs (block allocation with blktap's crash-safe ordering, BAT entry, bitmap,
batmap, footer).

Not sans-IO: this module reads and writes the file with ``os.preadv``/``os.pwritev``.
Everything is kept in memory after :meth:`VhdFile.open`, so lookups cost no system call.

Open never writes. Every malformed image raises :class:`ImageFormatError` naming the
file, structure, field and value.
"""

from __future__ import annotations

import array
import errno
import itertools
import logging
import os
import posixpath
import stat
from dataclasses import dataclass, replace

from blktap.errors import ImageFormatError, NoSpace
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.bat import encode_bat_sector, parse_bat
from blktap.proto.vhd.batmap import (
    BatmapHeader,
    batmap_checksum,
    parse_batmap_header,
    set_block,
    test_block,
)
from blktap.proto.vhd.check import (
    batmap_header_offset,
    blocks_of,
    end_of_headers,
    has_batmap,
    resolve_parent_path,
)
from blktap.proto.vhd.constants import (
    BAT_UNUSED,
    BATMAP_COOKIE,
    BATMAP_HEADER_SIZE,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_COOKIE,
    HEADER_SIZE,
    MAX_VHD_SIZE,
    SECTOR_SIZE,
    TAP_OLD_LE_BITMAP_VERSION,
    DiskType,
    Platform,
)
from blktap.proto.vhd.footer import Footer, parse_footer
from blktap.proto.vhd.header import DynamicHeader, decode_locator_path, parse_header

log = logging.getLogger(__name__)

DATA_ALIGN = 4096
"""blktap places each block's bitmap so that the block's data starts on a 4 KiB boundary."""
MAX_BLOCK_SIZE = 1 << 30
"""Largest block size accepted (blktap writes 2 MiB; anything huge is a corrupt header)."""
_ZEROS = bytes(1 << 20)


NETWORK_PARENT_TYPES = ("rbd", "nbd")
"""Driver types whose images a raw parent locator may name as ``type:path`` instead of a
file (``rbd:pool/image``, see blktap.block.drivers.rbd; ``nbd:`` and a socket path,
``HOST:PORT`` or an NBD URI, see blktap.block.drivers.nbd): stored verbatim, never
resolved against the child's directory nor checked for existence here."""


def network_parent(path: str) -> tuple[str, str] | None:
    """``(type, path)`` when ``path`` names a network image (``rbd:pool/image``), else None."""
    kind, sep, rest = path.partition(":")
    if sep and rest and kind in NETWORK_PARENT_TYPES:
        return kind, rest
    return None


@dataclass(frozen=True, slots=True)
class ParentLink:
    """The parent a differencing VHD names, resolved to a file that exists."""

    path: str
    """Absolute, normalised path of the parent file (or a raw network parent's
    ``type:path``, see :func:`network_parent`)."""
    raw: bool
    """True for a raw parent (``vhd-util snapshot -m``; the child's parent uuid is null)."""
    locator: int
    """The platform code of the locator that found it."""


def _fail(
    path: str,
    message: str,
    structure: str,
    field: str | None = None,
    value: object = None,
    code: int | None = None,
) -> ImageFormatError:
    return ImageFormatError(
        message, path=path, structure=structure, field=field, value=value, errno=code
    )


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, fewer only at the end of the file."""
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def pwrite_all(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
    """Write every buffer, in order, from ``offset`` (retrying short writes)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        done = os.pwritev(fd, views, offset)
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def read_footer_of(path: str) -> Footer | None:
    """The valid footer of the file at ``path`` (trailing one, else the copy at 0), or None
    when it holds no valid VHD footer. Raises OSError when it cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return _find_footer(fd, size)[0]
    finally:
        os.close(fd)


def _find_footer(fd: int, size: int) -> tuple[Footer | None, Footer | None, bool]:
    """(usable footer, primary as parsed, primary_ok)."""
    primary: Footer | None = None
    if size >= FOOTER_SIZE - 1:
        length = FOOTER_SIZE - 1 if size % SECTOR_SIZE == FOOTER_SIZE - 1 else FOOTER_SIZE
        primary = parse_footer(pread_exact(fd, length, size - length))
        if primary.cookie == FOOTER_COOKIE and primary.checksum_ok():
            return primary, primary, True
    if size >= 2 * FOOTER_SIZE:
        backup = parse_footer(pread_exact(fd, FOOTER_SIZE, 0))
        if (
            backup.cookie == FOOTER_COOKIE
            and backup.checksum_ok()
            and backup.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING)
        ):
            return backup, primary, False
    return None, primary, False


class VhdFile:
    """An open VHD file (fixed, dynamic or differencing) and its metadata in memory.

    Attributes after :meth:`open`: ``footer``; for sparse disks ``header``, ``bat`` (an
    ``array('I')`` of sector offsets), ``batmap``/``batmap_header`` (None when absent or
    invalid), per-block sector bitmaps (see :meth:`sector_runs`); ``parent`` for
    differencing disks.
    """

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.writable = writable
        self.footer: Footer
        self.header: DynamicHeader | None = None
        self.bat: array.array[int] = array.array("I")
        self.batmap_header: BatmapHeader | None = None
        self.batmap: bytearray | None = None
        self.parent: ParentLink | None = None
        self.file_size = 0
        self.lsb_bitmaps = False
        self.bitmaps: dict[int, bytearray] = {}
        """Sector bitmaps (MSB first) of allocated blocks that are not known to be full."""
        self.full_blocks: set[int] = set()
        """Allocated blocks whose every sector is in this file."""
        self.data_end = 0
        """Byte offset where the next block may go (end of metadata and of every block)."""
        self.footer_repaired = False
        """The trailing footer was invalid and the backup at offset 0 is in use."""
        self.dirty = False
        self._closed = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str, *, writable: bool = False, resolve_parent: bool = True) -> VhdFile:
        """Open and validate ``path``.

        Raises FileNotFoundError/OSError, or ImageFormatError for a malformed image (and,
        with ``resolve_parent``, for a differencing disk whose parent is missing, has the
        wrong uuid, or cannot be located). Never writes; on failure the file is closed.
        """
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if writable:
            fd = os.open(path, flags)
        else:
            # A read-only open leaves even the access time alone where we may ask that.
            try:
                fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
            except PermissionError:
                fd = os.open(path, flags)
        self = cls(path, fd, writable)
        try:
            self._load(resolve_parent)
        except BaseException:
            os.close(fd)
            self._closed = True
            raise
        return self

    def _load(self, resolve_parent: bool) -> None:
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise _fail(self.path, "not a regular file or block device", "file")
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
        self.file_size = size
        if size < FOOTER_SIZE - 1:
            raise _fail(self.path, "file too small to hold a VHD footer", "file", "size", size)
        footer, primary, primary_ok = _find_footer(self.fd, size)
        if footer is None:
            assert primary is not None
            if primary.cookie != FOOTER_COOKIE:
                raise _fail(self.path, "bad cookie", "footer", "cookie", primary.cookie)
            raise _fail(self.path, "bad checksum", "footer", "checksum", primary.checksum)
        if not primary_ok:
            log.warning(
                "%s: trailing footer invalid, using the backup footer at offset 0", self.path
            )
            self.footer_repaired = True
        self.footer = footer
        self._check_footer()
        if footer.disk_type == DiskType.FIXED:
            if size < footer.current_size + FOOTER_SIZE - 1:
                raise _fail(
                    self.path, "file shorter than the fixed disk's size", "file", "size", size
                )
            log.debug("%s: fixed disk, %d bytes", self.path, footer.current_size)
            return
        self._load_sparse()
        if footer.disk_type == DiskType.DIFFERENCING and resolve_parent:
            self.parent = self._resolve_parent()
        if log.isEnabledFor(logging.DEBUG):
            self._log_opened()

    def _log_opened(self) -> None:
        h = self.header
        assert h is not None
        used = sum(1 for e in self.bat if e != BAT_UNUSED)
        log.debug(
            "%s: %s disk, %d bytes, block size %d, %d of %d blocks allocated, %s%s",
            self.path,
            DiskType(self.footer.disk_type).name.lower(),
            self.footer.current_size,
            h.block_size,
            used,
            len(self.bat),
            "batmap" if self.batmap_header is not None else "no batmap",
            "" if self.parent is None else
            f", parent {self.parent.path}{' (raw)' if self.parent.raw else ''}",
        )

    def _check_footer(self) -> None:
        f = self.footer
        if f.disk_type not in (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFFERENCING):
            raise _fail(self.path, "unsupported disk type", "footer", "disk_type", f.disk_type)
        if f.current_size % SECTOR_SIZE or f.current_size == 0:
            raise _fail(
                self.path,
                "size is not a positive multiple of 512",
                "footer",
                "current_size",
                f.current_size,
            )
        if f.current_size > MAX_VHD_SIZE:
            raise _fail(
                self.path,
                "size exceeds the VHD limit of 2040 GiB",
                "footer",
                "current_size",
                f.current_size,
                errno.EFBIG,
            )
        if f.disk_type != DiskType.FIXED and f.data_offset % SECTOR_SIZE:
            raise _fail(
                self.path,
                "dynamic header offset not sector aligned",
                "footer",
                "data_offset",
                f.data_offset,
            )
        self.lsb_bitmaps = f.is_tap and f.creator_version == TAP_OLD_LE_BITMAP_VERSION

    def _load_sparse(self) -> None:
        f = self.footer
        size = self.file_size
        if f.data_offset + HEADER_SIZE > size:
            raise _fail(
                self.path,
                "dynamic header lies past the end of the file",
                "footer",
                "data_offset",
                f.data_offset,
            )
        h = parse_header(pread_exact(self.fd, HEADER_SIZE, f.data_offset), self.path)
        if h.cookie != HEADER_COOKIE:
            raise _fail(self.path, "bad cookie", "dynamic header", "cookie", h.cookie)
        if h.computed_checksum() != h.checksum:
            raise _fail(self.path, "bad checksum", "dynamic header", "checksum", h.checksum)
        bs = h.block_size
        if bs < SECTOR_SIZE or bs & (bs - 1) or bs > MAX_BLOCK_SIZE:
            raise _fail(
                self.path,
                "block size is not a power of two from 512 B to 1 GiB",
                "dynamic header",
                "block_size",
                bs,
            )
        blocks = blocks_of(f, h)
        if h.max_bat_size < blocks:
            raise _fail(
                self.path,
                f"BAT too small for the disk size ({blocks} blocks)",
                "dynamic header",
                "max_bat_size",
                h.max_bat_size,
            )
        if h.table_offset % SECTOR_SIZE or h.table_offset < FOOTER_SIZE:
            raise _fail(
                self.path, "BAT offset invalid", "dynamic header", "table_offset", h.table_offset
            )
        if h.table_offset + h.max_bat_size * 4 > size:
            raise _fail(
                self.path,
                "BAT lies past the end of the file",
                "dynamic header",
                "max_bat_size" if h.table_offset < size else "table_offset",
                h.max_bat_size if h.table_offset < size else h.table_offset,
            )
        self.header = h
        self.bat = parse_bat(pread_exact(self.fd, blocks * 4, h.table_offset), blocks, self.path)
        self._load_batmap(blocks)
        eoh = end_of_headers(f, h, None)
        if self.batmap_header is not None:
            eoh = max(
                eoh,
                batmap_header_offset(h) + BATMAP_HEADER_SIZE,
                self.batmap_header.batmap_offset + self.batmap_header.map_bytes,
            )
        self._check_locators(h)
        span = h.bitmap_size + bs
        end = eoh
        # Only allocated entries are looked at one by one (a 2 TiB BAT has 1M entries).
        used = [(entry, i) for i, entry in enumerate(self.bat) if entry != BAT_UNUSED]
        for entry, i in used:
            start = entry * SECTOR_SIZE
            if start < eoh:
                raise _fail(
                    self.path, f"block {i} overlaps the metadata", "BAT", f"entry[{i}]", entry
                )
            if start + span > size:
                raise _fail(
                    self.path,
                    f"block {i} lies past the end of the file",
                    "BAT",
                    f"entry[{i}]",
                    entry,
                )
            if start + span > end:
                end = start + span
        used.sort()
        for (a_off, a), (b_off, b) in itertools.pairwise(used):
            if b_off * SECTOR_SIZE < a_off * SECTOR_SIZE + span:
                raise _fail(self.path, f"block {b} overlaps block {a}", "BAT", f"entry[{b}]", b_off)
        self.data_end = -(-end // SECTOR_SIZE) * SECTOR_SIZE
        self._load_bitmaps(used)

    def _load_batmap(self, blocks: int) -> None:
        h = self.header
        assert h is not None
        off = batmap_header_offset(h)
        raw = pread_exact(self.fd, BATMAP_HEADER_SIZE, off)
        if not has_batmap(self.footer, raw):
            return
        if len(raw) < BATMAP_HEADER_SIZE:
            log.warning("%s: batmap header missing; ignoring the batmap", self.path)
            return
        head = parse_batmap_header(raw, self.path)
        problem = None
        if head.cookie != BATMAP_COOKIE:
            problem = "bad cookie"
        elif head.batmap_size * SECTOR_SIZE * 8 < blocks or head.batmap_size > (1 << 24):
            problem = "size does not match the BAT"
        elif head.batmap_offset % SECTOR_SIZE or head.batmap_offset < off + BATMAP_HEADER_SIZE:
            problem = "bad offset"
        elif head.batmap_offset + head.map_bytes > self.file_size:
            problem = "lies past the end of the file"
        if problem is None:
            bits = bytearray(pread_exact(self.fd, head.map_bytes, head.batmap_offset))
            if batmap_checksum(bits) != head.checksum:
                problem = "bad checksum"
        if problem is not None:
            # The batmap is only a shortcut; the sector bitmaps stay authoritative.
            log.warning("%s: batmap %s; ignoring it", self.path, problem)
            return
        self.batmap_header = head
        self.batmap = bits

    def _load_bitmaps(self, used: list[tuple[int, int]]) -> None:
        h = self.header
        assert h is not None
        spb = h.sectors_per_block
        bm_bytes = -(-spb // 8)
        full = bytes([0xFF]) * (spb // 8) + (
            bytes([(0xFF00 >> (spb % 8)) & 0xFF]) if spb % 8 else b""
        )
        size = h.bitmap_size
        fd = self.fd
        batmap = self.batmap
        lsb = self.lsb_bitmaps
        full_blocks = self.full_blocks
        bitmaps = self.bitmaps
        for entry, block in used:
            if batmap is not None and batmap[block >> 3] & (0x80 >> (block & 7)):
                full_blocks.add(block)
                continue
            raw = os.pread(fd, size, entry * SECTOR_SIZE)
            if len(raw) < size:
                raw = pread_exact(fd, size, entry * SECTOR_SIZE)
            if not lsb and raw[:bm_bytes] == full:
                full_blocks.add(block)
                continue
            bits = bm.from_disk(raw, lsb)
            if bits[:bm_bytes] == full:
                full_blocks.add(block)
            else:
                bitmaps[block] = bits

    def _check_locators(self, h: DynamicHeader) -> None:
        if self.footer.disk_type != DiskType.DIFFERENCING:
            return
        for i, loc in enumerate(h.locators):
            if loc.code == Platform.NONE:
                continue
            if loc.data_offset + loc.data_length > self.file_size or (
                loc.data_length > loc.space_bytes
            ):
                raise _fail(
                    self.path,
                    f"parent locator {i} lies past the end of the file",
                    "parent locator",
                    f"locator[{i}].data_offset",
                    loc.data_offset,
                )

    def locator_paths(self) -> list[tuple[int, str]]:
        """(platform code, path as stored) of each MACX/W2KU/W2RU locator, in header order.

        Raises ImageFormatError for an undecodable path."""
        h = self.header
        assert h is not None
        out: list[tuple[int, str]] = []
        for loc in h.locators:
            if loc.code not in (Platform.MACX, Platform.W2KU, Platform.W2RU):
                continue
            data = pread_exact(self.fd, loc.data_length, loc.data_offset)
            try:
                out.append((loc.code, decode_locator_path(loc.code, data)))
            except ImageFormatError as exc:
                raise _fail(
                    self.path, "undecodable parent locator", "parent locator", "data", exc.value
                ) from None
        return out

    def _resolve_parent(self) -> ParentLink:
        h = self.header
        assert h is not None
        # As libvhd: relative locators resolve against the child's real directory.
        me = os.path.realpath(self.path)
        tried: list[str] = []
        for code, stored in self.locator_paths():
            if not any(h.parent_uuid) and network_parent(stored) is not None:
                return ParentLink(path=stored, raw=True, locator=code)
            location = resolve_parent_path(me, stored)
            tried.append(location)
            if not os.path.exists(location):
                continue
            raw = not any(h.parent_uuid)
            if not raw:
                try:
                    pfoot = read_footer_of(location)
                except OSError as exc:
                    raise _fail(
                        self.path,
                        f"cannot read parent {location}: {exc}",
                        "parent locator",
                        "path",
                        location,
                        exc.errno,
                    ) from None
                if pfoot is None:
                    raise _fail(
                        self.path,
                        f"parent {location} is not a VHD",
                        "parent locator",
                        "path",
                        location,
                    )
                if pfoot.uuid != h.parent_uuid:
                    raise _fail(
                        self.path,
                        f"parent {location} has uuid {pfoot.uuid_obj}",
                        "dynamic header",
                        "parent_uuid",
                        h.parent_uuid.hex(),
                    )
            return ParentLink(path=os.path.realpath(location), raw=raw, locator=code)
        if not tried:
            raise _fail(
                self.path,
                "differencing disk has no usable parent locator",
                "parent locator",
                "code",
                None,
            )
        raise _fail(
            self.path,
            f"parent {h.parent_name!r} not found",
            "parent locator",
            "path",
            tried,
            errno.ENOENT,
        )

    # --------------------------------------------------------------- properties
    @property
    def disk_type(self) -> DiskType:
        return DiskType(self.footer.disk_type)

    @property
    def size(self) -> int:
        """Virtual size in bytes (the footer's current_size, as blktap reads it)."""
        return self.footer.current_size

    @property
    def block_size(self) -> int:
        assert self.header is not None
        return self.header.block_size

    @property
    def sectors_per_block(self) -> int:
        assert self.header is not None
        return self.header.sectors_per_block

    def data_offset_of(self, block: int) -> int | None:
        """Byte offset in the file of ``block``'s data, None when it is not allocated."""
        assert self.header is not None
        entry = self.bat[block]
        if entry == BAT_UNUSED:
            return None
        return entry * SECTOR_SIZE + self.header.bitmap_size

    def data_offset_of_entry(self, entry: int) -> int:
        """Byte offset of the data of a block whose BAT entry is ``entry``."""
        assert self.header is not None
        return entry * SECTOR_SIZE + self.header.bitmap_size

    def sector_runs(self, block: int, first: int, count: int) -> list[tuple[int, int, bool]]:
        """Runs (first sector, count, in this file) of sectors ``[first, first + count)`` of
        ``block``, from the in-memory BAT and bitmaps."""
        if block in self.full_blocks:
            return [(first, count, True)]
        bits = self.bitmaps.get(block)
        if bits is None:
            return [(first, count, False)]
        return bm.runs(bits, first, count)

    def allocated_bytes(self) -> int:
        """Bytes of virtual disk whose data is in this file."""
        if self.header is None:
            return self.size
        spb = self.sectors_per_block
        total = len(self.full_blocks) * spb
        for bits in self.bitmaps.values():
            total += sum(n for _, n, v in bm.runs(bits, 0, spb) if v)
        return total * SECTOR_SIZE

    # ------------------------------------------------------- metadata updates
    def _require_writable(self) -> None:
        if not self.writable:
            raise ImageFormatError("image is open read-only", path=self.path, errno=errno.EROFS)

    def reserve_block(self, zero: bool = True) -> int:
        """Place a new block at the end of the data area and zero-fill its bitmap and data
        synchronously (blktap's first step of an allocating write).

        The footer is first written at the new end of the file, then the zeros: a process
        killed at any instant (even within the zero-fill, which a fatal signal may cut
        short) leaves a file that ends with a valid footer and whose BAT does not yet
        reference the new space. (blktap's tapdisk leaves the footer overwritten until
        close and relies on the backup copy at offset 0.)

        Only bytes that lay inside the file need zeroing (the old footer, any trailing
        junk): past its old end the new space is a hole that reads as zeros (a block device
        has no such end, so all of it is zeroed). With ``zero=False`` nothing is zeroed:
        the caller writes the whole bitmap and data before linking the block.

        Returns the block's BAT entry (sector offset). The BAT is not updated: the caller
        writes the data and :meth:`write_bat_entry`, then :meth:`write_bitmap`. Raises
        NoSpace when the block would lie past 2^32 sectors; on OSError (e.g. ENOSPC) the
        file is cut back to where it was and the image is unchanged.
        """
        self._require_writable()
        h = self.header
        assert h is not None
        bm_size = h.bitmap_size
        old_end = self.data_end
        start = old_end
        # Put the bitmap just below a 4 KiB boundary so the data starts on one.
        start += (-(start + bm_size)) % DATA_ALIGN
        span = bm_size + h.block_size
        new_end = start + span
        if new_end // SECTOR_SIZE > 0xFFFFFFFF:
            raise NoSpace(f"{self.path}: no room for another block below 2^32 sectors")
        stop = min(self.file_size, new_end) if zero else old_end
        try:
            pwrite_all(self.fd, [self.footer.encode()], new_end)
            pos = old_end
            while pos < stop:
                n = min(stop - pos, len(_ZEROS))
                pwrite_all(self.fd, [memoryview(_ZEROS)[:n]], pos)
                pos += n
        except OSError:
            self._cut_back(old_end)
            raise
        self.data_end = new_end
        self.file_size = max(self.file_size, new_end + FOOTER_SIZE)
        self.dirty = True
        return start // SECTOR_SIZE

    def _cut_back(self, end: int) -> None:
        """After a failed reservation: footer back at ``end``, file cut after it."""
        try:
            pwrite_all(self.fd, [self.footer.encode()], end)
            os.ftruncate(self.fd, end + FOOTER_SIZE)
            self.file_size = end + FOOTER_SIZE
        except OSError as exc:
            log.error("%s: cannot restore the footer after a failed allocation: %s", self.path, exc)

    def write_bat_entry(self, block: int, entry: int) -> None:
        """Set BAT[block] = entry in memory and on disk (the one sector that holds it)."""
        self._require_writable()
        h = self.header
        assert h is not None
        self.bat[block] = entry
        rel, sector = encode_bat_sector(self.bat, block, max_entries=h.max_bat_size)
        pwrite_all(self.fd, [sector], h.table_offset + rel)
        self.dirty = True

    def write_bitmap(self, block: int, bits: bytearray) -> None:
        """Make ``bits`` (MSB first) block ``block``'s sector bitmap, on disk and in memory;
        keeps the batmap's full bit in step (cleared before, set after the bitmap)."""
        self._require_writable()
        h = self.header
        assert h is not None
        entry = self.bat[block]
        assert entry != BAT_UNUSED
        spb = h.sectors_per_block
        # Whole bytes (always, in practice) are counted in C, without a run list.
        is_full = (
            bits.count(255, 0, spb >> 3) == spb >> 3 if not spb & 7 else bm.all_set(bits, 0, spb)
        )
        if not is_full and self.batmap is not None and test_block(self.batmap, block):
            self._write_batmap_bit(block, False)
        pwrite_all(self.fd, [bm.to_disk(bits, self.lsb_bitmaps)], entry * SECTOR_SIZE)
        if is_full:
            self.full_blocks.add(block)
            self.bitmaps.pop(block, None)
            if (
                self.batmap is not None
                and not test_block(self.batmap, block)
                and self._batmap_bit_in_header_page(block)
            ):
                self._write_batmap_bit(block, True)
        else:
            self.full_blocks.discard(block)
            self.bitmaps[block] = bits
        self.dirty = True

    def bitmap_copy(self, block: int) -> bytearray:
        """A copy of ``block``'s bitmap (MSB first, on-disk length) to modify."""
        h = self.header
        assert h is not None
        if block in self.full_blocks:
            bits = bytearray(h.bitmap_size)
            bm.set_range(bits, 0, h.sectors_per_block)
            return bits
        cur = self.bitmaps.get(block)
        return bytearray(cur) if cur is not None else bytearray(h.bitmap_size)

    def _batmap_bit_in_header_page(self, block: int) -> bool:
        """True when ``block``'s batmap bit lies in the same 4 KiB page as the batmap
        header, so that one ``pwritev`` updates both atomically even against SIGKILL
        (which can cut a write short between pages). Only such bits are *set* (setting
        is an optimisation); bits are always cleared when a block stops being full."""
        head = self.batmap_header
        assert head is not None and self.header is not None
        header_off = batmap_header_offset(self.header)
        if head.batmap_offset != header_off + BATMAP_HEADER_SIZE:
            return False
        byte = head.batmap_offset + (block >> 3)
        return byte // DATA_ALIGN == header_off // DATA_ALIGN

    def _write_batmap_bit(self, block: int, value: bool) -> None:
        """Update one batmap bit and the header checksum. In blktap's layout the map
        directly follows its header, so both go out in one ``pwritev`` (a killed process
        never leaves a checksum that does not match the map)."""
        head = self.batmap_header
        bits = self.batmap
        assert head is not None and bits is not None and self.header is not None
        set_block(bits, block, value)
        head = head.with_map_checksum(bits)
        self.batmap_header = head
        header_off = batmap_header_offset(self.header)
        sector = (block >> 3) // SECTOR_SIZE * SECTOR_SIZE
        if head.batmap_offset == header_off + BATMAP_HEADER_SIZE:
            pwrite_all(self.fd, [head.encode(), bits[: sector + SECTOR_SIZE]], header_off)
        else:
            pwrite_all(self.fd, [bits[sector : sector + SECTOR_SIZE]], head.batmap_offset + sector)
            pwrite_all(self.fd, [head.encode()], header_off)

    def write_footer(self) -> None:
        """Write the footer at the end of the data, and again at the file's real end if
        the file is longer (so the last 512 bytes are always the current footer); for
        sparse disks also the backup copy at offset 0 when it differs or had to be used.
        """
        self._require_writable()
        raw = self.footer.encode()
        end = self.footer.current_size if self.header is None else self.data_end
        pwrite_all(self.fd, [raw], end)
        size = os.fstat(self.fd).st_size
        if size > end + FOOTER_SIZE:
            pwrite_all(self.fd, [raw], size - FOOTER_SIZE)
        self.file_size = max(size, end + FOOTER_SIZE)
        if self.header is not None and (
            self.footer_repaired or pread_exact(self.fd, FOOTER_SIZE, 0) != raw
        ):
            pwrite_all(self.fd, [raw], 0)
        self.footer_repaired = False

    def set_footer(self, footer: Footer) -> None:
        """Replace the footer (checksum recomputed) and write it everywhere it lives."""
        self._require_writable()
        self.footer = footer.with_checksum()
        self.write_footer()
        self.dirty = True

    def set_hidden(self, hidden: int) -> None:
        """blktap's ``hidden`` flag (footer byte 85), as ``vhd-util set -f hidden``."""
        self.set_footer(replace(self.footer, hidden=hidden))

    def set_marker(self, marker: int) -> None:
        """blktap's batmap ``marker`` flag, as ``vhd-util set -f marker``.

        Raises ImageFormatError when the image has no (valid) batmap."""
        self._require_writable()
        head = self.batmap_header
        if head is None or self.header is None:
            raise ImageFormatError(
                "image has no batmap",
                path=self.path,
                structure="batmap header",
                field="marker",
            )
        self.batmap_header = head = replace(head, marker=marker)
        pwrite_all(self.fd, [head.encode()], batmap_header_offset(self.header))
        self.dirty = True

    def repair(self) -> bool:
        """Restore a damaged trailing footer from the backup copy (``vhd-util repair``).

        Returns True when something was rewritten."""
        self._require_writable()
        if not self.footer_repaired:
            return False
        self.write_footer()
        self.sync()
        return True

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        """Rewrite the footer if anything was written, make it durable, close the file.

        The file is closed even when writing the footer fails (the error is raised)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable and self.dirty:
                self.write_footer()
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)

    def __enter__(self) -> VhdFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parent_display_name(path: str) -> str:
    """The name vhd-util stores as a child's ``parent_name``: the parent's base name."""
    return posixpath.basename(path)
