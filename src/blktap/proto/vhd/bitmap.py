"""Sector bitmaps: one bit per sector of a block, most significant bit first (bit 1 =
the sector's data is in this file). Images written by "tap" creator 0.1 stored them least
significant bit first; :func:`from_disk`/:func:`to_disk` convert so that everything in
memory is MSB first.
"""

from __future__ import annotations

_REVERSE = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def from_disk(raw: bytes | bytearray | memoryview, lsb_first: bool = False) -> bytearray:
    """A bitmap as read from disk, converted to MSB-first order."""
    out = bytearray(raw)
    if lsb_first:
        out = bytearray(out.translate(_REVERSE))
    return out


def to_disk(bitmap: bytes | bytearray, lsb_first: bool = False) -> bytes:
    """The on-disk bytes of an MSB-first bitmap."""
    return bytes(bitmap).translate(_REVERSE) if lsb_first else bytes(bitmap)


def test(bitmap: bytes | bytearray, sector: int) -> bool:
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def set_range(bitmap: bytearray, first: int, count: int, value: bool = True) -> None:
    """Set (or clear) ``count`` bits from ``first``."""
    if count <= 0:
        return
    nbits = len(bitmap) * 8
    mask = ((1 << count) - 1) << (nbits - first - count)
    cur = int.from_bytes(bitmap, "big")
    cur = cur | mask if value else cur & ~mask
    bitmap[:] = cur.to_bytes(len(bitmap), "big")


def all_set(bitmap: bytes | bytearray, first: int, count: int) -> bool:
    """True when every bit of ``[first, first + count)`` is 1."""
    return runs(bitmap, first, count) == [(first, count, True)]


def runs(bitmap: bytes | bytearray, first: int, count: int) -> list[tuple[int, int, bool]]:
    """The maximal runs of equal bits in ``[first, first + count)``: (start, length, bit)."""
    out: list[tuple[int, int, bool]] = []
    if count <= 0:
        return out
    nbits = len(bitmap) * 8
    width = count
    window = (int.from_bytes(bitmap, "big") >> (nbits - first - count)) & ((1 << count) - 1)
    pos = first
    while width:
        full = (1 << width) - 1
        if window >> (width - 1):
            run = width - ((~window) & full).bit_length()
            bit = True
        else:
            run = width - window.bit_length()
            bit = False
        out.append((pos, run, bit))
        pos += run
        width -= run
        window &= (1 << width) - 1
    return out
