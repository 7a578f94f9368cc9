"""Constants of the VHD format (Microsoft VHD specification v1.0) and blktap's extensions.

Every on-disk integer is big-endian; a sector is 512 bytes.
"""

from __future__ import annotations

import enum

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

FOOTER_SIZE = 512
HEADER_SIZE = 1024
BATMAP_HEADER_SIZE = 512
LOCATOR_COUNT = 8
LOCATOR_SIZE = 24

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"

FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2
"""Spec: this feature bit must always be set."""

FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
BATMAP_VERSION = 0x00010002
"""blktap's current batmap version (1.2)."""

NO_OFFSET = 0xFFFFFFFFFFFFFFFF
"""data_offset of a fixed disk's footer and of every dynamic header."""

BAT_UNUSED = 0xFFFFFFFF
"""A BAT entry for a block that is not allocated."""

DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024

VHD_EPOCH = 946684800
"""2000-01-01 00:00:00 UTC as a Unix time: VHD timestamps count seconds from it."""

TAP_CREATOR = b"tap\x00"
TAP_CREATOR_VERSION = 0x00010003
"""blktap's vhd-util writes creator version 1.3 (VHD_CURRENT_VERSION)."""
TAP_OLD_LE_BITMAP_VERSION = 0x00000001
"""Creator version 0.1 of "tap" wrote little-endian (LSB first) sector bitmaps."""

MAX_VHD_SIZE = 2040 * 1024 * 1024 * 1024
"""The spec caps VHDs at 2040 GiB; BAT entries are 32-bit sector offsets."""

MAX_METADATA_SIZE = 2 * 1024 * 1024 * 1024 * 1024
"""The largest disk a BAT may be sized for (``create``/``snapshot -S``): 2 TiB, what
XenServer's LVM storage passes (``-S 2097152``) and the most 32-bit sector offsets reach."""

MAX_CHS_SECTORS = 65535 * 16 * 255

TIMESTAMP_MAX_SLACK = 1800
"""vhd-util check tolerates timestamps this many seconds in the future (NFS clock skew)."""

LOCATOR_DATA_SPACE = 512
"""blktap writes each parent locator's data_space in bytes, one sector."""


class DiskType(enum.IntEnum):
    NONE = 0
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


class Platform(enum.IntEnum):
    """Parent locator platform codes (four ASCII characters as a big-endian u32)."""

    NONE = 0
    WI2R = 0x57693272
    WI2K = 0x5769326B
    W2RU = 0x57327275
    W2KU = 0x57326B75
    MAC = 0x4D616320
    MACX = 0x4D616358
