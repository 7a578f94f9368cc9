"""``vhd-util modify``: dangerous metadata changes.

* ``-p PARENT [-m]``: point a differencing disk at another parent (a raw one with
  ``-m``): parent name, uuid (null for raw), timestamp and the MACX/W2KU/W2RU locators
  are rewritten in place (the new relative path must fit the locators' space).
* ``-s BYTES``: set the physical size: the trailing footer moves to ``BYTES - 512`` (the
  file is cut or extended); it may not cut into the data.
* ``-z``: forget every block (BAT all unused, batmap cleared), then cut the file after
  the metadata: the disk reads as zeros (dynamic) or as its parent (differencing).
"""

from __future__ import annotations

import array
import dataclasses
import errno
import os

from blktap.errors import BlktapError, ImageFormatError, InvalidArgument
from blktap.proto.vhd.bat import encode_bat
from blktap.proto.vhd.check import batmap_header_offset, end_of_headers
from blktap.proto.vhd.constants import BAT_UNUSED, FOOTER_SIZE, SECTOR_SIZE, DiskType, Platform
from blktap.proto.vhd.header import encode_locator_path, encode_parent_name
from blktap.vhd.create import relative_locator_path, vhd_time
from blktap.vhd.image import VhdFile, pwrite_all, read_footer_of
from blktap.vhdutil.common import footer_position, is_regular, write_footers


class NameTooLong(BlktapError):
    errno = errno.ENAMETOOLONG


def set_parent(path: str, parent: str, *, raw: bool = False) -> None:
    """Re-point ``path`` (a differencing disk) at ``parent``.

    Raises InvalidArgument (not differencing), FileNotFoundError (no parent),
    ImageFormatError (parent not a VHD without ``raw``), NameTooLong (the new locator
    does not fit). The header is rewritten last, in one write.
    """
    if not os.path.exists(parent):
        raise FileNotFoundError(errno.ENOENT, "parent not found", parent)
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        h = image.header
        if h is None or image.footer.disk_type != DiskType.DIFFERENCING:
            raise InvalidArgument(f"{path} is not a differencing disk")
        puuid = bytes(16)
        if not raw:
            pfoot = read_footer_of(parent)
            if pfoot is None:
                raise ImageFormatError("parent is not a VHD", path=parent, structure="footer")
            puuid = pfoot.uuid
        rel = relative_locator_path(path, parent)
        locs = list(h.locators)
        writes: list[tuple[int, bytes]] = []
        for i, loc in enumerate(locs):
            if loc.code not in (Platform.MACX, Platform.W2KU, Platform.W2RU):
                continue
            data = encode_locator_path(loc.code, rel)
            if len(data) > loc.space_bytes:
                raise NameTooLong(
                    f"parent path {rel!r} does not fit locator {i} ({loc.space_bytes} bytes)"
                )
            writes.append((loc.data_offset, data.ljust(loc.space_bytes, b"\x00")))
            locs[i] = dataclasses.replace(loc, data_length=len(data))
        if not writes:
            raise InvalidArgument(f"{path} has no MACX/W2KU/W2RU parent locator to rewrite")
        new = dataclasses.replace(
            h,
            parent_uuid=puuid,
            parent_timestamp=vhd_time(os.stat(parent).st_mtime),
            parent_name_raw=encode_parent_name(os.path.basename(parent)),
            locators=tuple(locs),
        ).with_checksum()
        for off, data in writes:
            pwrite_all(image.fd, [data], off)
        os.fsync(image.fd)
        pwrite_all(image.fd, [new.encode()], image.footer.data_offset)
        os.fsync(image.fd)
        image.header = new


def set_physical_size(path: str, size: int) -> None:
    """Move the trailing footer so that the file is ``size`` bytes long.

    Raises InvalidArgument when ``size`` is not a multiple of 512 or would cut into the
    data (or a fixed disk's contents), OSError."""
    if size % SECTOR_SIZE:
        raise InvalidArgument(f"invalid physical size {size}: not a multiple of 512")
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        end = footer_position(image)
        if size < end + FOOTER_SIZE:
            raise InvalidArgument(
                f"physical size {size} is smaller than {path}'s data ({end + FOOTER_SIZE})"
            )
        if image.header is None and size != end + FOOTER_SIZE:
            raise InvalidArgument(f"{path} is a fixed disk: its physical size is fixed")
        raw = image.footer.with_checksum().encode()
        pwrite_all(image.fd, [raw], size - FOOTER_SIZE)
        if image.header is not None:
            pwrite_all(image.fd, [raw], 0)
        if is_regular(image.fd):
            os.ftruncate(image.fd, size)
        if size - FOOTER_SIZE > end:
            # The old trailing footer is now junk inside the file; clear it.
            pwrite_all(image.fd, [bytes(FOOTER_SIZE)], end)
        os.fsync(image.fd)
        image.dirty = False


def zero_data(path: str) -> None:
    """Forget every block of a sparse disk (see module docstring). Raises
    InvalidArgument (ENOSYS in the C tool) for a fixed disk."""
    with VhdFile.open(path, writable=True, resolve_parent=False) as image:
        h = image.header
        if h is None:
            raise InvalidArgument(f"{path} is a fixed disk; -z needs a sparse one",
                                  errno=errno.ENOSYS)
        bat = array.array("I", [BAT_UNUSED] * h.max_bat_size)
        pwrite_all(image.fd, [encode_bat(bat)], h.table_offset)
        if image.batmap_header is not None and image.batmap is not None:
            bits = bytearray(len(image.batmap))
            head = image.batmap_header.with_map_checksum(bits)
            pwrite_all(image.fd, [bytes(bits)], head.batmap_offset)
            pwrite_all(image.fd, [head.encode()], batmap_header_offset(h))
            image.batmap_header, image.batmap = head, bits
        os.fsync(image.fd)
        image.bat = array.array("I", [BAT_UNUSED] * len(image.bat))
        image.bitmaps.clear()
        image.full_blocks.clear()
        eoh = end_of_headers(image.footer, h, None)
        if image.batmap_header is not None:
            eoh = max(
                eoh,
                batmap_header_offset(h) + 512,
                image.batmap_header.batmap_offset + image.batmap_header.map_bytes,
            )
        image.data_end = -(-eoh // SECTOR_SIZE) * SECTOR_SIZE
        write_footers(image)
