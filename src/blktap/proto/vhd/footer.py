"""The hard disk footer (512 bytes): at the end of every VHD, with a copy at offset 0 of
dynamic and differencing disks.

:func:`parse_footer` turns bytes into a :class:`Footer` without judging them;
:meth:`Footer.encode` gives the same bytes back (reserved bytes and blktap's ``hidden``
flag included). :meth:`Footer.faults` says what ``vhd-util check`` would object to.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid as _uuid
from dataclasses import dataclass, field

from blktap.errors import ImageFormatError
from blktap.proto.vhd.checksum import ones_complement_sum
from blktap.proto.vhd.constants import (
    FEATURE_RESERVED,
    FEATURE_TEMPORARY,
    FILE_FORMAT_VERSION,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    MAX_CHS_SECTORS,
    NO_OFFSET,
    SECTOR_SIZE,
    TAP_CREATOR,
    TAP_CREATOR_VERSION,
    TIMESTAMP_MAX_SLACK,
    DiskType,
)

# cookie, features, version, data_offset, timestamp, creator_app, creator_ver, creator_os,
# orig_size, curr_size, geometry, type, checksum, uuid, saved, hidden, reserved
_FOOTER = struct.Struct(">8sIIQI4sIIQQIII16sBB426s")
CHECKSUM_OFFSET = 64
assert _FOOTER.size == FOOTER_SIZE


def chs_geometry(size: int) -> int:
    """The CHS geometry the spec's algorithm gives ``size`` bytes, packed as the footer's
    u32 (cylinders << 16 | heads << 8 | sectors per track), as C ``vhd_chs`` computes it."""
    total = min(size // SECTOR_SIZE, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    cylinders = cth // heads
    return (cylinders << 16) | (heads << 8) | spt


@dataclass(frozen=True, slots=True)
class Footer:
    """Every field of the footer, as stored. ``disk_type`` is an int (it may be invalid)."""

    cookie: bytes
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: int
    original_size: int
    current_size: int
    geometry: int
    disk_type: int
    checksum: int
    uuid: bytes
    saved: int
    hidden: int
    reserved: bytes = field(default=bytes(426), repr=False)

    @property
    def cylinders(self) -> int:
        return self.geometry >> 16

    @property
    def heads(self) -> int:
        return (self.geometry >> 8) & 0xFF

    @property
    def sectors_per_track(self) -> int:
        return self.geometry & 0xFF

    @property
    def uuid_obj(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self.uuid)

    @property
    def is_tap(self) -> bool:
        return self.creator_app[:3] == b"tap"

    def encode(self) -> bytes:
        """The 512 bytes of this footer, byte for byte as parsed (checksum as stored)."""
        return _FOOTER.pack(
            self.cookie,
            self.features,
            self.version,
            self.data_offset,
            self.timestamp,
            self.creator_app,
            self.creator_version,
            self.creator_os,
            self.original_size,
            self.current_size,
            self.geometry,
            self.disk_type,
            self.checksum,
            self.uuid,
            self.saved,
            self.hidden,
            self.reserved,
        )

    def computed_checksum(self) -> int:
        return ones_complement_sum(self.encode(), CHECKSUM_OFFSET)

    def with_checksum(self) -> Footer:
        """A copy whose checksum field is correct."""
        return dataclasses.replace(self, checksum=self.computed_checksum())

    def checksum_ok(self) -> bool:
        """True when the checksum matches, accepting old tap images (creator 0.1 or 1.1)
        that set ``hidden`` without updating it (as vhd-util check does)."""
        if self.computed_checksum() == self.checksum:
            return True
        if self.hidden and self.is_tap and self.creator_version in (0x00000001, 0x00010001):
            return dataclasses.replace(self, hidden=0).computed_checksum() == self.checksum
        return False

    def faults(self, now_vhd: int | None = None) -> list[str]:
        """What ``vhd-util check`` objects to in this footer, in its order and words
        (empty when valid). ``now_vhd`` is the current VHD time; None skips the check."""
        out: list[str] = []
        if self.cookie != FOOTER_COOKIE:
            out.append("invalid cookie")
        if not self.checksum_ok():
            out.append("invalid checksum")
        if not self.features & FEATURE_RESERVED:
            out.append("invalid 'reserved' feature")
        if self.features & ~(FEATURE_TEMPORARY | FEATURE_RESERVED):
            out.append("invalid extra features")
        if self.version != FILE_FORMAT_VERSION:
            out.append("invalid file format version")
        if (
            self.disk_type not in (DiskType.DYNAMIC, DiskType.DIFFERENCING)
            and self.data_offset != NO_OFFSET
        ):
            out.append("invalid data offset")
        if now_vhd is not None and self.timestamp > now_vhd + TIMESTAMP_MAX_SLACK:
            out.append("creation time in future")
        if self.is_tap and self.creator_version > TAP_CREATOR_VERSION:
            out.append("unsupported tap creator version")
        if chs_geometry(self.current_size) < self.geometry:
            out.append("geometry too large")
        if self.disk_type not in (DiskType.FIXED, DiskType.DYNAMIC, DiskType.DIFFERENCING):
            out.append("invalid type")
        if self.saved not in (0, 1):
            out.append("invalid 'saved' state")
        if self.hidden not in (0, 1):
            out.append("invalid 'hidden' state")
        if any(self.reserved):
            out.append("invalid 'reserved' bits")
        return out


def parse_footer(data: bytes | bytearray | memoryview, path: str | None = None) -> Footer:
    """Parse a footer from 512 bytes (or an old 511-byte footer, zero-padded).

    Raises ImageFormatError only when ``data`` is shorter than 511 bytes; the values are
    not judged (see :meth:`Footer.faults`).
    """
    raw = bytes(data[:FOOTER_SIZE])
    if len(raw) == FOOTER_SIZE - 1:
        raw += b"\x00"
    if len(raw) != FOOTER_SIZE:
        raise ImageFormatError(
            "truncated footer", path=path, structure="footer", field="length", value=len(raw)
        )
    (
        cookie,
        features,
        version,
        data_offset,
        timestamp,
        creator_app,
        creator_version,
        creator_os,
        original_size,
        current_size,
        geometry,
        disk_type,
        checksum,
        uid,
        saved,
        hidden,
        reserved,
    ) = _FOOTER.unpack(raw)
    return Footer(
        cookie=cookie,
        features=features,
        version=version,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_app=creator_app,
        creator_version=creator_version,
        creator_os=creator_os,
        original_size=original_size,
        current_size=current_size,
        geometry=geometry,
        disk_type=disk_type,
        checksum=checksum,
        uuid=uid,
        saved=saved,
        hidden=hidden,
        reserved=reserved,
    )


def new_footer(
    disk_type: DiskType, size: int, *, timestamp: int, uuid: bytes, data_offset: int | None = None
) -> Footer:
    """A footer as blktap's vhd-util writes it: creator "tap" 1.3, OS 0, features 0x2,
    current and original size exactly ``size``, with a valid checksum."""
    if data_offset is None:
        data_offset = NO_OFFSET if disk_type == DiskType.FIXED else SECTOR_SIZE
    return Footer(
        cookie=FOOTER_COOKIE,
        features=FEATURE_RESERVED,
        version=FILE_FORMAT_VERSION,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_app=TAP_CREATOR,
        creator_version=TAP_CREATOR_VERSION,
        creator_os=0,
        original_size=size,
        current_size=size,
        geometry=chs_geometry(size),
        disk_type=int(disk_type),
        checksum=0,
        uuid=uuid,
        saved=0,
        hidden=0,
    ).with_checksum()
