"""The changed block tracking log (``.cbtlog``), as the C blktap's ``cbt-util`` and
tapdisk ``log`` filter read and write it. Sans-IO: bytes in, typed values out.

Layout (the C ``struct cbt_log_metadata`` on x86-64, little-endian), then the bitmap and
nothing else::

    offset  size  field
         0    16  parent log UUID, binary (all zero: none)
        16    16  child log UUID, binary (all zero: none)
        32     4  consistent, int32 (1: the bitmap is complete; 0: not known to be)
        36     4  padding (zero; kept as found)
        40     8  disk size in bytes, uint64
        48     *  bitmap, ceil(ceil(size / 65536) / 8) bytes

One bit per 64 KiB block of the virtual disk: block ``n`` is byte ``n // 8``, bit ``n % 8``
counted from the least significant (the C filter sets bits in native ``unsigned long``
words, which on a little-endian host is this order).

:func:`parse_header` and :func:`parse_log` judge a file and raise one of the
:class:`CbtLogError` subclasses with the numbers that are wrong; :meth:`CbtHeader.encode`
and :meth:`CbtLog.encode` give the bytes back, padding included, so that a parsed log
re-encodes to the same bytes. The bit helpers work on a ``bytearray`` bitmap in place.
"""

from __future__ import annotations

import errno as _errno
import re
import struct
import uuid as _uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from blktap.errors import ImageFormatError, InvalidArgument

HEADER_SIZE = 48
BLOCK_SIZE = 65536  # bytes of virtual disk per bit (the C CBT_BLOCK_SIZE)
MAX_DISK_SIZE = (1 << 64) - 1  # the size field is a uint64
NULL_UUID = _uuid.UUID(int=0)

# parent, child, consistent (int32), padding, size (uint64)
_HEADER = struct.Struct("<16s16siIQ")
assert _HEADER.size == HEADER_SIZE

_NONZERO = re.compile(rb"[^\x00]+")


def block_count(disk_size: int) -> int:
    """The number of 64 KiB blocks (bits) that cover ``disk_size`` bytes."""
    return -(-disk_size // BLOCK_SIZE)


def bitmap_size(disk_size: int) -> int:
    """The bitmap's length in bytes for a disk of ``disk_size`` bytes (the C ``bitmap_size``)."""
    return -(-block_count(disk_size) // 8)


def log_size(disk_size: int) -> int:
    """The length of a log file for a disk of ``disk_size`` bytes: header plus bitmap."""
    return HEADER_SIZE + bitmap_size(disk_size)


# ------------------------------------------------------------------------------ errors
class CbtLogError(ImageFormatError):
    """A file is not a usable CBT log. Subclasses name the cause and carry the numbers."""


class TruncatedLogError(CbtLogError):
    """The file is shorter than the 48-byte header (EIO, as the C tool's failed read)."""

    errno = _errno.EIO

    def __init__(self, length: int, *, path: str | None = None) -> None:
        super().__init__(
            f"truncated: {length} bytes, shorter than the {HEADER_SIZE}-byte CBT log header",
            path=path, structure="cbt log",
        )
        self.length = length


class ForeignLogError(CbtLogError):
    """The header holds a value no CBT log has: not a log (or a damaged one)."""

    def __init__(self, reason: str, *, field: str, value: object,
                 path: str | None = None) -> None:
        super().__init__(f"not a CBT log: {reason}", path=path, structure="header",
                         field=field, value=value)


class SizeMismatchError(CbtLogError):
    """The file is longer than the header's disk size gives (``expected`` bytes)."""

    def __init__(self, expected: int, actual: int, disk_size: int, *,
                 path: str | None = None) -> None:
        super().__init__(
            f"size mismatch: the file is {actual} bytes, a log for a disk of {disk_size} "
            f"bytes is {expected} bytes",
            path=path, structure="cbt log",
        )
        self.expected = expected
        self.actual = actual
        self.disk_size = disk_size


class BitmapTooSmallError(CbtLogError):
    """The bitmap does not cover the disk: the file holds ``available`` bitmap bytes where
    a disk of ``disk_size`` bytes needs ``needed`` (EIO for a short file, as the C tool's
    failed read; EINVAL for a log made for a smaller disk)."""

    errno = _errno.EIO

    def __init__(self, needed: int, available: int, disk_size: int, *,
                 path: str | None = None, errno: int | None = None) -> None:
        super().__init__(
            f"bitmap smaller than the disk: {available} bytes, a disk of {disk_size} bytes "
            f"needs {needed}",
            path=path, structure="bitmap", errno=errno,
        )
        self.needed = needed
        self.available = available
        self.disk_size = disk_size


# ------------------------------------------------------------------------------ header
@dataclass(frozen=True, slots=True)
class CbtHeader:
    """The 48-byte header. ``size`` is the disk size in bytes (1 .. 2**64-1)."""

    size: int
    parent: _uuid.UUID = NULL_UUID
    child: _uuid.UUID = NULL_UUID
    consistent: bool = False
    padding: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.size <= MAX_DISK_SIZE:
            raise InvalidArgument(f"invalid CBT disk size {self.size}: must be 1..2**64-1 bytes")
        if not 0 <= self.padding <= 0xFFFFFFFF:
            raise InvalidArgument(f"invalid CBT header padding {self.padding}")

    @property
    def block_count(self) -> int:
        return block_count(self.size)

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.size)

    @property
    def log_size(self) -> int:
        return log_size(self.size)

    def encode(self) -> bytes:
        """The 48 bytes of this header."""
        return _HEADER.pack(self.parent.bytes, self.child.bytes, int(self.consistent),
                            self.padding, self.size)


def parse_header(data: bytes | bytearray | memoryview, *, path: str | None = None) -> CbtHeader:
    """The header at the start of ``data`` (at least 48 bytes; the rest is ignored).

    Raises TruncatedLogError for fewer than 48 bytes, ForeignLogError for a disk size of 0
    (``cbt-util create`` refuses it) or a ``consistent`` other than 0 or 1.
    """
    if len(data) < HEADER_SIZE:
        raise TruncatedLogError(len(data), path=path)
    parent, child, consistent, padding, size = _HEADER.unpack_from(data)
    if size == 0:
        raise ForeignLogError("the disk size is 0", field="size", value=0, path=path)
    if consistent not in (0, 1):
        raise ForeignLogError("the consistent flag is neither 0 nor 1", field="consistent",
                              value=consistent, path=path)
    return CbtHeader(size=size, parent=_uuid.UUID(bytes=parent), child=_uuid.UUID(bytes=child),
                     consistent=bool(consistent), padding=padding)


# --------------------------------------------------------------------------------- log
@dataclass(frozen=True, slots=True)
class CbtLog:
    """A whole log: header and bitmap (exactly ``header.bitmap_size`` bytes)."""

    header: CbtHeader
    bitmap: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.bitmap) != self.header.bitmap_size:
            raise InvalidArgument(
                f"a CBT bitmap for {self.header.size} bytes is {self.header.bitmap_size} "
                f"bytes, not {len(self.bitmap)}"
            )

    @classmethod
    def new(cls, size: int) -> CbtLog:
        """A fresh log as ``cbt-util create`` writes it: no parent or child, not
        consistent, no bit set."""
        header = CbtHeader(size=size)
        return cls(header, bytes(header.bitmap_size))

    def encode(self) -> bytes:
        """The file's bytes."""
        return self.header.encode() + self.bitmap

    def bits_set(self) -> list[int]:
        """The blocks whose bit is set, ascending."""
        return list(iter_set(self.bitmap))


def parse_log(
    data: bytes | bytearray | memoryview, *, path: str | None = None,
    allow_trailing: bool = False,
) -> CbtLog:
    """A whole log file's bytes as a :class:`CbtLog`.

    Raises what :func:`parse_header` raises, BitmapTooSmallError when the file ends before
    the bitmap the header's size needs, and SizeMismatchError when it goes on past it
    (unless ``allow_trailing``: then the extra bytes are ignored).
    """
    header = parse_header(data, path=path)
    needed = header.bitmap_size
    available = len(data) - HEADER_SIZE
    if available < needed:
        raise BitmapTooSmallError(needed, available, header.size, path=path)
    if available > needed and not allow_trailing:
        raise SizeMismatchError(header.log_size, len(data), header.size, path=path)
    return CbtLog(header, bytes(data[HEADER_SIZE:HEADER_SIZE + needed]))


def check_covers(header: CbtHeader, disk_size: int, *, path: str | None = None) -> None:
    """Raise BitmapTooSmallError (EINVAL) unless the log's bitmap has a bit for every
    64 KiB block of a disk of ``disk_size`` bytes. Counted in whole bitmap bytes, as the
    C filter maps ``bitmap_size(disk size)`` bytes and ``coalesce`` compares them."""
    if header.bitmap_size < bitmap_size(disk_size):
        raise BitmapTooSmallError(bitmap_size(disk_size), header.bitmap_size, disk_size,
                                  path=path, errno=_errno.EINVAL)


def grown(log: CbtLog, size: int) -> CbtLog:
    """``log`` for a disk grown to ``size`` bytes, as ``cbt-util set -s``: the bitmap is
    extended with zero bits. Raises InvalidArgument when ``size`` is smaller than the
    log's (the C tool's words)."""
    if size < log.header.size:
        raise InvalidArgument(f"Size smaller than current file size ({log.header.size})")
    header = CbtHeader(size=size, parent=log.header.parent, child=log.header.child,
                       consistent=log.header.consistent, padding=log.header.padding)
    return CbtLog(header, log.bitmap.ljust(header.bitmap_size, b"\0"))


def coalesced(parent: CbtLog, child: CbtLog) -> CbtLog:
    """``child`` with ``parent``'s bits ORed in, as ``cbt-util coalesce``. Raises
    InvalidArgument when the parent's bitmap is longer than the child's."""
    if parent.header.bitmap_size > child.header.bitmap_size:
        raise InvalidArgument(
            f"Parent bitmap larger than child bitmap, can't coalesce "
            f"({parent.header.bitmap_size} > {child.header.bitmap_size} bytes)"
        )
    merged = bytearray(child.bitmap)
    merge_into(merged, parent.bitmap)
    return CbtLog(child.header, bytes(merged))


# -------------------------------------------------------------------------------- bits
def blocks_touched(offset: int, length: int) -> range:
    """The blocks a request of ``length`` > 0 bytes at ``offset`` touches (the C filter:
    from the first byte's block to the last byte's block)."""
    assert offset >= 0 and length > 0
    return range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1)


def is_set(bitmap: bytes | bytearray | memoryview, block: int) -> bool:
    return bool(bitmap[block >> 3] >> (block & 7) & 1)


def set_range(bitmap: bytearray | memoryview, first: int, count: int) -> None:
    """Set ``count`` bits from block ``first`` (in place). The caller keeps the range
    inside the bitmap."""
    if count <= 0:
        return
    end = first + count
    assert end <= len(bitmap) * 8
    lo, hi = first >> 3, (end - 1) >> 3
    if lo == hi:
        bitmap[lo] |= ((1 << count) - 1) << (first & 7)
        return
    bitmap[lo] |= (0xFF << (first & 7)) & 0xFF
    if hi > lo + 1:
        bitmap[lo + 1:hi] = b"\xff" * (hi - lo - 1)
    bitmap[hi] |= 0xFF >> (7 - ((end - 1) & 7))


def merge_into(target: bytearray | memoryview, source: bytes | bytearray | memoryview) -> None:
    """``target[:len(source)] |= source``, byte by byte (len(source) <= len(target))."""
    n = len(source)
    assert n <= len(target)
    if n:
        merged = int.from_bytes(target[:n], "little") | int.from_bytes(source, "little")
        target[:n] = merged.to_bytes(n, "little")


def iter_set(bitmap: bytes | bytearray | memoryview) -> Iterator[int]:
    """The set blocks of ``bitmap``, ascending (skips zero bytes quickly)."""
    for match in _NONZERO.finditer(bytes(bitmap)):
        for index in range(match.start(), match.end()):
            byte = bitmap[index]
            base = index << 3
            while byte:
                low = byte & -byte
                yield base + low.bit_length() - 1
                byte ^= low
