"""The Block Allocation Table: ``max_bat_size`` big-endian u32 sector offsets, padded to a
whole sector on disk; :data:`BAT_UNUSED` marks an unallocated block."""

from __future__ import annotations

import array
import sys

from blktap.errors import ImageFormatError
from blktap.proto.vhd.constants import BAT_UNUSED, SECTOR_SIZE

__all__ = ["BAT_UNUSED", "encode_bat", "encode_bat_sector", "parse_bat"]


def parse_bat(
    data: bytes | bytearray | memoryview, entries: int, path: str | None = None
) -> array.array[int]:
    """The ``entries`` BAT entries at the start of ``data`` as an ``array('I')``.

    Raises ImageFormatError when ``data`` holds fewer than ``entries`` entries."""
    need = entries * 4
    if len(data) < need:
        raise ImageFormatError(
            "truncated BAT", path=path, structure="BAT", field="length", value=len(data)
        )
    table = array.array("I")
    table.frombytes(bytes(data[:need]))
    if sys.byteorder == "little":
        table.byteswap()
    return table


def encode_bat(table: array.array[int], padding: bytes = b"") -> bytes:
    """The on-disk BAT: entries big-endian, then ``padding`` (the bytes that filled the
    last sector when parsed; zeros if omitted, as the C vhd-util and tapdisk write)."""
    out = array.array("I", table)
    if sys.byteorder == "little":
        out.byteswap()
    raw = out.tobytes()
    pad = -len(raw) % SECTOR_SIZE
    return raw + padding[:pad].ljust(pad, b"\0")


def encode_bat_sector(
    table: array.array[int], index: int, padding: bytes = b"", max_entries: int | None = None
) -> tuple[int, bytes]:
    """The sector of the BAT that holds entry ``index``: (byte offset within the BAT, 512
    bytes), for the one-sector BAT update of an allocating write.

    ``table`` may hold fewer entries than the header's ``max_entries`` (metadata
    preallocated for a later resize): those entries are written unused (0xFFFFFFFF);
    bytes past ``max_entries`` are ``padding``, zeros if omitted, as C writes them."""
    per = SECTOR_SIZE // 4
    first = index - index % per
    chunk = array.array("I", table[first : first + per])
    limit = len(table) if max_entries is None else max_entries
    unused = min(first + per, limit) - first - len(chunk)
    if unused > 0:
        chunk.extend([BAT_UNUSED] * unused)
    if sys.byteorder == "little":
        chunk.byteswap()
    raw = chunk.tobytes()
    if len(raw) < SECTOR_SIZE:
        pad = SECTOR_SIZE - len(raw)
        raw += padding[:pad].ljust(pad, b"\0")
    return first * 4, raw
