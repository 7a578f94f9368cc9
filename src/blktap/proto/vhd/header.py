"""The dynamic disk header (1024 bytes at ``footer.data_offset``) and its eight parent
locators.

Parsing never judges values (see :meth:`DynamicHeader.faults`); encoding gives the parsed
bytes back exactly, reserved fields included.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

from blktap.errors import ImageFormatError
from blktap.proto.vhd.checksum import ones_complement_sum
from blktap.proto.vhd.constants import (
    HEADER_COOKIE,
    HEADER_SIZE,
    HEADER_VERSION,
    LOCATOR_COUNT,
    LOCATOR_SIZE,
    NO_OFFSET,
    SECTOR_SIZE,
    Platform,
)

# cookie, data_offset, table_offset, version, max_bat_size, block_size, checksum,
# parent uuid, parent timestamp, reserved1, parent name
_HEAD = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">IIIIQ")
LOCATORS_OFFSET = 576
RESERVED2_OFFSET = LOCATORS_OFFSET + LOCATOR_COUNT * LOCATOR_SIZE
CHECKSUM_OFFSET = 36
PARENT_NAME_SIZE = 512
assert _HEAD.size == LOCATORS_OFFSET and _LOCATOR.size == LOCATOR_SIZE

MACX_PREFIX = "file://"


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """One parent locator entry. ``code`` is an int (it may be an invalid platform code)."""

    code: int = 0
    data_space: int = 0
    data_length: int = 0
    reserved: int = 0
    data_offset: int = 0

    @property
    def space_bytes(self) -> int:
        """The space reserved for the locator's data in bytes: blktap writes bytes, the
        spec says sectors; values under 512 are taken as sectors (as libvhd does)."""
        if self.data_space < SECTOR_SIZE:
            return self.data_space * SECTOR_SIZE
        return self.data_space

    def encode(self) -> bytes:
        return _LOCATOR.pack(
            self.code, self.data_space, self.data_length, self.reserved, self.data_offset
        )

    def is_empty(self) -> bool:
        return self.encode() == bytes(LOCATOR_SIZE)


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    cookie: bytes
    data_offset: int
    table_offset: int
    version: int
    max_bat_size: int
    block_size: int
    checksum: int
    parent_uuid: bytes
    parent_timestamp: int
    reserved1: int
    parent_name_raw: bytes
    locators: tuple[ParentLocator, ...]
    reserved2: bytes = field(default=bytes(HEADER_SIZE - RESERVED2_OFFSET), repr=False)

    @property
    def parent_name(self) -> str:
        """The parent's name (UTF-16 big-endian up to the first NUL); '' when none.

        Raises ImageFormatError (field ``parent_name``) when it is not valid UTF-16."""
        return decode_parent_name(self.parent_name_raw)

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // SECTOR_SIZE

    @property
    def bitmap_size(self) -> int:
        """Bytes of one block's sector bitmap on disk (padded to a whole sector)."""
        return bitmap_size_for(self.block_size)

    @property
    def bat_size(self) -> int:
        """Bytes the BAT occupies on disk (padded to a whole sector)."""
        return -(-self.max_bat_size * 4 // SECTOR_SIZE) * SECTOR_SIZE

    def encode(self) -> bytes:
        """The 1024 bytes of this header, byte for byte as parsed (checksum as stored)."""
        head = _HEAD.pack(
            self.cookie,
            self.data_offset,
            self.table_offset,
            self.version,
            self.max_bat_size,
            self.block_size,
            self.checksum,
            self.parent_uuid,
            self.parent_timestamp,
            self.reserved1,
            self.parent_name_raw,
        )
        return head + b"".join(loc.encode() for loc in self.locators) + self.reserved2

    def computed_checksum(self) -> int:
        return ones_complement_sum(self.encode(), CHECKSUM_OFFSET)

    def with_checksum(self) -> DynamicHeader:
        return dataclasses.replace(self, checksum=self.computed_checksum())

    def faults(self, file_size: int) -> list[str]:
        """What ``vhd-util check`` objects to in this header, in its words (empty if valid).

        ``file_size`` is the image file's size in bytes."""
        out: list[str] = []
        if self.cookie != HEADER_COOKIE:
            out.append("invalid cookie")
        if self.computed_checksum() != self.checksum:
            out.append("invalid checksum")
        if self.version != HEADER_VERSION:
            out.append("invalid header version")
        if self.data_offset != NO_OFFSET:
            out.append("invalid data offset")
        if (
            self.table_offset == 0
            or self.table_offset % SECTOR_SIZE
            or self.table_offset + self.max_bat_size * 4 > file_size - SECTOR_SIZE
        ):
            out.append("invalid table offset")
        if self.block_size == 0 or self.block_size & (self.block_size - 1):
            out.append("invalid block size")
        if self.reserved1 or any(self.reserved2):
            out.append("invalid reserved bits")
        return out


def bitmap_size_for(block_size: int) -> int:
    """Bytes of a sector bitmap for ``block_size``-byte blocks, padded to a sector."""
    bits = block_size // SECTOR_SIZE
    return max(1, -(-bits // (8 * SECTOR_SIZE))) * SECTOR_SIZE


def parse_header(data: bytes | bytearray | memoryview, path: str | None = None) -> DynamicHeader:
    """Parse a dynamic header from 1024 bytes. Raises ImageFormatError only when short."""
    raw = bytes(data[:HEADER_SIZE])
    if len(raw) != HEADER_SIZE:
        raise ImageFormatError(
            "truncated dynamic header",
            path=path,
            structure="dynamic header",
            field="length",
            value=len(raw),
        )
    (
        cookie,
        data_offset,
        table_offset,
        version,
        max_bat_size,
        block_size,
        checksum,
        parent_uuid,
        parent_ts,
        reserved1,
        name,
    ) = _HEAD.unpack_from(raw)
    locators = tuple(
        ParentLocator(*_LOCATOR.unpack_from(raw, LOCATORS_OFFSET + i * LOCATOR_SIZE))
        for i in range(LOCATOR_COUNT)
    )
    return DynamicHeader(
        cookie=cookie,
        data_offset=data_offset,
        table_offset=table_offset,
        version=version,
        max_bat_size=max_bat_size,
        block_size=block_size,
        checksum=checksum,
        parent_uuid=parent_uuid,
        parent_timestamp=parent_ts,
        reserved1=reserved1,
        parent_name_raw=name,
        locators=locators,
        reserved2=raw[RESERVED2_OFFSET:],
    )


def new_header(
    *,
    table_offset: int,
    max_bat_size: int,
    block_size: int,
    parent_uuid: bytes = bytes(16),
    parent_timestamp: int = 0,
    parent_name: str = "",
    locators: tuple[ParentLocator, ...] = (),
) -> DynamicHeader:
    """A dynamic header as vhd-util writes it, with a valid checksum."""
    locs = tuple(locators) + (ParentLocator(),) * (LOCATOR_COUNT - len(locators))
    return DynamicHeader(
        cookie=HEADER_COOKIE,
        data_offset=NO_OFFSET,
        table_offset=table_offset,
        version=HEADER_VERSION,
        max_bat_size=max_bat_size,
        block_size=block_size,
        checksum=0,
        parent_uuid=parent_uuid,
        parent_timestamp=parent_timestamp,
        reserved1=0,
        parent_name_raw=encode_parent_name(parent_name),
        locators=locs,
    ).with_checksum()


def decode_parent_name(raw: bytes) -> str:
    """The UTF-16BE parent name up to the first NUL character."""
    end = len(raw) - len(raw) % 2
    for i in range(0, end, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            end = i
            break
    try:
        return raw[:end].decode("utf-16-be")
    except UnicodeDecodeError:
        raise ImageFormatError(
            "parent name is not UTF-16",
            structure="dynamic header",
            field="parent_name",
            value=raw[:end].hex(),
        ) from None


def encode_parent_name(name: str) -> bytes:
    """``name`` as the 512-byte UTF-16BE, NUL-padded parent name field.

    Raises ImageFormatError (field ``parent_name``) when it does not fit."""
    raw = name.encode("utf-16-be")
    if len(raw) > PARENT_NAME_SIZE:
        raise ImageFormatError(
            "parent name too long", structure="dynamic header", field="parent_name", value=name
        )
    return raw.ljust(PARENT_NAME_SIZE, b"\x00")


def encode_locator_path(code: int, path: str) -> bytes:
    """The data a locator of platform ``code`` stores for ``path`` (a POSIX path, relative
    ones starting with ``./``): MACX "file://" + UTF-8; W2KU/W2RU UTF-16LE with
    backslashes, as blktap's vhd-util writes them."""
    if code == Platform.MACX:
        return (MACX_PREFIX + path).encode("utf-8")
    if code in (Platform.W2KU, Platform.W2RU):
        return path.replace("/", "\\").encode("utf-16-le")
    raise ValueError(f"cannot encode a locator of platform {code:#x}")


def decode_locator_path(code: int, data: bytes) -> str:
    """The POSIX path a locator's data names (relative paths keep their ``./``).

    Raises ImageFormatError (structure ``parent locator``) for an undecodable path or a
    platform code blktap does not read (only MACX, W2KU, W2RU are)."""
    try:
        if code == Platform.MACX:
            text = data.split(b"\x00", 1)[0].decode("utf-8")
            if text.startswith(MACX_PREFIX):
                text = text[len(MACX_PREFIX) :]
            return text
        if code in (Platform.W2KU, Platform.W2RU):
            end = len(data) - len(data) % 2
            for i in range(0, end, 2):
                if data[i] == 0 and data[i + 1] == 0:
                    end = i
                    break
            return data[:end].decode("utf-16-le").replace("\\", "/")
    except UnicodeDecodeError:
        raise ImageFormatError(
            "parent locator path is not decodable",
            structure="parent locator",
            field="data",
            value=data.hex(),
        ) from None
    raise ImageFormatError(
        "unsupported parent locator platform",
        structure="parent locator",
        field="code",
        value=hex(code),
    )
