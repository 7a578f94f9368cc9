"""``vhd-util query``: facts about one image, in the C tool's units.

Each function opens the image read-only and returns a value; the CLI prints them in the
C tool's formats (``-v`` MiB, ``-s`` bytes, ``-p`` path or "<name> has no parent",
``-f`` "hidden: N", ``-m`` "marker: N", ``-d`` "chain depth: N", ``-a`` a count,
``-S`` MiB; ``-u`` leaves the parent path unresolved, ``-b`` reads the backup footer).
"""

from __future__ import annotations

from dataclasses import dataclass

from blktap.errors import ImageFormatError, InvalidArgument
from blktap.proto.vhd.constants import BAT_UNUSED, FOOTER_COOKIE, FOOTER_SIZE, DiskType, Platform
from blktap.proto.vhd.footer import parse_footer
from blktap.vhd.image import VhdFile, pread_exact
from blktap.vhdutil.common import MB, footer_position
from blktap.vhdutil.create import chain_depth


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """Everything ``query`` can report about one image."""

    path: str
    virtual_size: int
    """Bytes (the footer's current_size)."""
    physical_size: int
    """Bytes: end of the data plus the trailing footer (C ``vhd_get_phys_size``)."""
    disk_type: int
    parent: str | None
    """Path of the parent (resolved, or as stored; see :func:`query`), None if none."""
    hidden: int
    marker: int | None
    """The batmap's marker, None when the image has no batmap."""
    max_bat_size: int
    block_size: int
    allocated_blocks: int
    """Blocks with a BAT entry (0 for a fixed disk, which has no BAT)."""

    @property
    def virtual_size_mb(self) -> int:
        return self.virtual_size >> 20

    @property
    def max_size_mb(self) -> int:
        """``-S``: the largest size (MiB) ``resize -f`` can reach without moving data."""
        return self.max_bat_size * self.block_size // MB


def query(path: str, *, resolve_parent: bool = True, use_backup: bool = False) -> QueryInfo:
    """Open ``path`` read-only and gather :class:`QueryInfo`.

    Without ``resolve_parent`` the parent is the path its preferred locator stores
    (MACX, else W2RU, else W2KU), not searched for. With ``use_backup`` the footer facts
    come from the backup copy at offset 0 (sparse disks).

    Raises ImageFormatError for a malformed image (or, with ``resolve_parent``, a
    differencing disk whose parent cannot be found; with ``use_backup``, an invalid
    backup footer), OSError."""
    with VhdFile.open(path, resolve_parent=resolve_parent) as image:
        footer = image.footer
        if use_backup and image.header is not None:
            backup = parse_footer(pread_exact(image.fd, FOOTER_SIZE, 0), path)
            if backup.cookie != FOOTER_COOKIE or not backup.checksum_ok():
                raise ImageFormatError(
                    "backup footer is not valid", path=path, structure="backup footer"
                )
            footer = backup
        parent = image.parent.path if image.parent is not None else None
        if not resolve_parent and footer.disk_type == DiskType.DIFFERENCING:
            stored = dict(image.locator_paths())
            for code in (Platform.MACX, Platform.W2RU, Platform.W2KU):
                if code in stored:
                    parent = stored[code]
                    break
        h = image.header
        if h is None:
            max_bat = 0
            block_size = 0
            allocated = 0
        else:
            max_bat = h.max_bat_size
            block_size = h.block_size
            allocated = sum(1 for e in image.bat if e != BAT_UNUSED)
        return QueryInfo(
            path=path,
            virtual_size=footer.current_size,
            physical_size=footer_position(image) + FOOTER_SIZE,
            disk_type=footer.disk_type,
            parent=parent,
            hidden=footer.hidden,
            marker=image.batmap_header.marker if image.batmap_header is not None else None,
            max_bat_size=max_bat,
            block_size=block_size,
            allocated_blocks=allocated,
        )


def parent_of(path: str) -> str | None:
    """The resolved parent path (None for fixed and dynamic disks)."""
    info = query(path)
    if info.disk_type != DiskType.DIFFERENCING:
        return None
    return info.parent


def marker_of(path: str) -> int:
    """The batmap marker. Raises InvalidArgument when the image has no batmap."""
    info = query(path, resolve_parent=False)
    if info.marker is None:
        raise InvalidArgument(f"{path}: image has no batmap (no marker)")
    return info.marker


def depth_of(path: str) -> int:
    return chain_depth(path)
