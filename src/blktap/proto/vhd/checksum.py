"""The VHD checksum: one's complement of the byte sum (spec, "Hard Disk Footer Format")."""

from __future__ import annotations


def ones_complement_sum(
    data: bytes | bytearray | memoryview, skip_at: int = -1, skip_len: int = 4
) -> int:
    """``~sum(data)`` as a u32, ignoring ``skip_len`` bytes at ``skip_at`` (the checksum field).

    Pass ``skip_at=-1`` to sum everything.
    """
    total = sum(bytes(data))
    if skip_at >= 0:
        total -= sum(bytes(data[skip_at : skip_at + skip_len]))
    return ~total & 0xFFFFFFFF
