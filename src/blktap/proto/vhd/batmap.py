"""blktap's batmap: a "tdbatmap" header (512 bytes, right after the BAT) and a bitmap with
one bit per block, MSB first; a set bit means the whole block is allocated so its sector
bitmap need not be read. The header's checksum covers the bitmap bytes only."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

from blktap.errors import ImageFormatError
from blktap.proto.vhd.checksum import ones_complement_sum
from blktap.proto.vhd.constants import (
    BATMAP_COOKIE,
    BATMAP_HEADER_SIZE,
    BATMAP_VERSION,
    SECTOR_SIZE,
)

# cookie, batmap_offset, batmap_size (sectors), version, checksum, marker,
# keyhash cookie, keyhash nonce, keyhash hash, reserved
_BATMAP = struct.Struct(">8sQIIIBB32s32s418s")
assert _BATMAP.size == BATMAP_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class BatmapHeader:
    cookie: bytes
    batmap_offset: int
    batmap_size: int
    """In sectors."""
    version: int
    checksum: int
    marker: int
    keyhash_cookie: int = 0
    keyhash_nonce: bytes = bytes(32)
    keyhash_hash: bytes = bytes(32)
    reserved: bytes = field(default=bytes(418), repr=False)

    @property
    def map_bytes(self) -> int:
        return self.batmap_size * SECTOR_SIZE

    def encode(self) -> bytes:
        return _BATMAP.pack(
            self.cookie,
            self.batmap_offset,
            self.batmap_size,
            self.version,
            self.checksum,
            self.marker,
            self.keyhash_cookie,
            self.keyhash_nonce,
            self.keyhash_hash,
            self.reserved,
        )

    def with_map_checksum(self, bitmap: bytes | bytearray) -> BatmapHeader:
        return dataclasses.replace(self, checksum=batmap_checksum(bitmap))

    def faults(self, bitmap: bytes | bytearray, max_bat_size: int, file_size: int) -> list[str]:
        """What ``vhd-util check`` objects to in this batmap (empty when valid)."""
        out: list[str] = []
        if self.cookie != BATMAP_COOKIE:
            out.append("invalid cookie")
        if self.version > BATMAP_VERSION:
            out.append("unsupported batmap version")
        if batmap_checksum(bitmap) != self.checksum:
            out.append("invalid checksum")
        if not self.batmap_size:
            out.append("invalid size zero")
        if self.batmap_size * SECTOR_SIZE * 8 < max_bat_size:
            out.append("batmap-BAT size mismatch")
        if not self.batmap_offset or self.batmap_offset % SECTOR_SIZE:
            out.append("invalid batmap offset")
        elif self.batmap_offset + self.map_bytes > file_size - SECTOR_SIZE:
            out.append("invalid batmap size")
        return out


def batmap_checksum(bitmap: bytes | bytearray) -> int:
    return ones_complement_sum(bitmap)


def parse_batmap_header(
    data: bytes | bytearray | memoryview, path: str | None = None
) -> BatmapHeader:
    raw = bytes(data[:BATMAP_HEADER_SIZE])
    if len(raw) != BATMAP_HEADER_SIZE:
        raise ImageFormatError(
            "truncated batmap header",
            path=path,
            structure="batmap header",
            field="length",
            value=len(raw),
        )
    return BatmapHeader(*_BATMAP.unpack(raw))


def batmap_sectors(max_bat_size: int) -> int:
    """Sectors of batmap vhd-util allocates for ``max_bat_size`` blocks."""
    return max(1, -(-max_bat_size // (8 * SECTOR_SIZE)))


def new_batmap_header(batmap_offset: int, max_bat_size: int) -> BatmapHeader:
    """An empty batmap's header as vhd-util writes it (version 1.2, marker 0)."""
    size = batmap_sectors(max_bat_size)
    return BatmapHeader(
        cookie=BATMAP_COOKIE,
        batmap_offset=batmap_offset,
        batmap_size=size,
        version=BATMAP_VERSION,
        checksum=batmap_checksum(bytes(size * SECTOR_SIZE)),
        marker=0,
    )


def test_block(bitmap: bytes | bytearray, block: int) -> bool:
    return bool(bitmap[block >> 3] & (0x80 >> (block & 7)))


def set_block(bitmap: bytearray, block: int, value: bool = True) -> None:
    if value:
        bitmap[block >> 3] |= 0x80 >> (block & 7)
    else:
        bitmap[block >> 3] &= ~(0x80 >> (block & 7)) & 0xFF
