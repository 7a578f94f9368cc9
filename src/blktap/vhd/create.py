"""Creating VHD files as blktap's ``vhd-util create``/``snapshot`` lay them out.

Dynamic/differencing layout: footer copy @0, dynamic header @512, BAT @1536 (padded to a
sector, unused entries 0xFFFFFFFF), batmap header right after the BAT, the batmap after
it, then (differencing) three parent locators MACX, W2KU, W2RU of one sector each, and
the footer at the end. Creator "tap\\0" 1.3. The first block, once written, goes where
its data starts on a 4 KiB boundary (see :meth:`VhdFile.reserve_block`).
"""

from __future__ import annotations

import errno
import os
import time
import uuid as _uuid

from blktap.errors import ImageFormatError, InvalidArgument
from blktap.proto.vhd.batmap import batmap_sectors, new_batmap_header
from blktap.proto.vhd.constants import (
    BATMAP_HEADER_SIZE,
    DEFAULT_BLOCK_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    LOCATOR_DATA_SPACE,
    MAX_METADATA_SIZE,
    MAX_VHD_SIZE,
    SECTOR_SIZE,
    VHD_EPOCH,
    DiskType,
    Platform,
)
from blktap.proto.vhd.footer import new_footer
from blktap.proto.vhd.header import ParentLocator, encode_locator_path, new_header
from blktap.vhd.image import VhdFile, network_parent, pwrite_all, read_footer_of

TABLE_OFFSET = FOOTER_SIZE + HEADER_SIZE
"""1536: where vhd-util puts the BAT."""


def vhd_time(unix: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC (the VHD timestamp) for a Unix time (default now)."""
    t = time.time() if unix is None else unix
    return max(0, int(t) - VHD_EPOCH)


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR_SIZE:
        raise InvalidArgument(f"VHD size {size} is not a positive multiple of 512")
    if size > MAX_VHD_SIZE:
        raise InvalidArgument(
            f"VHD size {size} exceeds the format's limit of 2040 GiB", errno=errno.EFBIG
        )


def _open_new(path: str, overwrite: bool) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    return os.open(path, flags, 0o644)


def create_fixed(
    path: str, size: int, *, overwrite: bool = False, uuid: bytes | None = None
) -> None:
    """Create a fixed VHD of ``size`` bytes (zeros, sparse where the file system allows).

    Raises InvalidArgument for a bad size, FileExistsError unless ``overwrite``, OSError.
    A failed create removes the partial file.
    """
    _check_size(size)
    footer = new_footer(
        DiskType.FIXED, size, timestamp=vhd_time(), uuid=uuid or _uuid.uuid4().bytes
    )
    fd = _open_new(path, overwrite)
    try:
        os.ftruncate(fd, size)
        pwrite_all(fd, [footer.encode()], size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def create_dynamic(
    path: str,
    size: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    overwrite: bool = False,
    uuid: bytes | None = None,
    metadata_size: int | None = None,
    _parent: tuple[str, bool] | None = None,
) -> None:
    """Create an empty dynamic VHD of ``size`` bytes in blktap's layout.

    ``metadata_size`` (at least ``size``, at most :data:`MAX_METADATA_SIZE`) sizes the
    BAT and batmap for a disk that large, so that a fast resize can later grow the disk
    up to it (vhd-util's ``-S``). Raises InvalidArgument (bad size, block size or
    metadata size), FileExistsError unless ``overwrite``, OSError. A failed create
    removes the partial file.
    """
    _check_size(size)
    if block_size < SECTOR_SIZE * 8 or block_size & (block_size - 1):
        raise InvalidArgument(f"block size {block_size} is not a power of two >= 4096")
    table_size = size
    if metadata_size is not None:
        if metadata_size > MAX_METADATA_SIZE:
            raise InvalidArgument(
                f"metadata preallocation of {metadata_size} bytes exceeds 2 TiB",
                errno=errno.EFBIG,
            )
        table_size = max(size, metadata_size)
    max_bat = -(-table_size // block_size)
    bat_bytes = -(-max_bat * 4 // SECTOR_SIZE) * SECTOR_SIZE
    bm_header_off = TABLE_OFFSET + bat_bytes
    bm_off = bm_header_off + BATMAP_HEADER_SIZE
    bm_bytes = batmap_sectors(max_bat) * SECTOR_SIZE
    end = bm_off + bm_bytes

    locators: list[ParentLocator] = []
    loc_data: list[tuple[int, bytes]] = []
    parent_uuid = bytes(16)
    parent_ts = 0
    parent_name = ""
    disk_type = DiskType.DYNAMIC
    if _parent is not None:
        ppath, raw = _parent
        disk_type = DiskType.DIFFERENCING
        if raw and network_parent(ppath) is not None:
            rel = ppath  # verbatim: no file to point at relatively
            parent_ts = vhd_time(time.time())
            parent_name = ppath
        else:
            rel = relative_locator_path(path, ppath)
            parent_ts = vhd_time(os.stat(ppath).st_mtime)
            parent_name = os.path.basename(ppath)
        if not raw:
            pfoot = read_footer_of(ppath)
            if pfoot is None:
                raise ImageFormatError("parent is not a VHD", path=ppath, structure="footer")
            parent_uuid = pfoot.uuid
        for code in (Platform.MACX, Platform.W2KU, Platform.W2RU):
            data = encode_locator_path(code, rel)
            space = -(-len(data) // LOCATOR_DATA_SPACE) * LOCATOR_DATA_SPACE
            locators.append(
                ParentLocator(code=code, data_space=space, data_length=len(data), data_offset=end)
            )
            loc_data.append((end, data))
            end += space

    footer = new_footer(disk_type, size, timestamp=vhd_time(), uuid=uuid or _uuid.uuid4().bytes)
    header = new_header(
        table_offset=TABLE_OFFSET,
        max_bat_size=max_bat,
        block_size=block_size,
        parent_uuid=parent_uuid,
        parent_timestamp=parent_ts,
        parent_name=parent_name,
        locators=tuple(locators),
    )
    batmap_head = new_batmap_header(bm_off, max_bat)

    image = bytearray(end + FOOTER_SIZE)
    image[0:FOOTER_SIZE] = footer.encode()
    image[FOOTER_SIZE:TABLE_OFFSET] = header.encode()
    image[TABLE_OFFSET : TABLE_OFFSET + bat_bytes] = b"\xff" * max_bat * 4 + bytes(
        bat_bytes - max_bat * 4
    )
    image[bm_header_off:bm_off] = batmap_head.encode()
    for off, data in loc_data:
        image[off : off + len(data)] = data
    image[end:] = footer.encode()
    fd = _open_new(path, overwrite)
    try:
        pwrite_all(fd, [image], 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def relative_locator_path(child: str, parent: str) -> str:
    """The parent's path relative to the child's directory, "./" first when it is below
    it, as vhd-util writes it into locators."""
    rel = os.path.relpath(os.path.abspath(parent), os.path.dirname(os.path.abspath(child)))
    return rel if rel.startswith("../") else "./" + rel


def snapshot(
    path: str,
    parent: str,
    *,
    raw_parent: bool = False,
    size: int | None = None,
    block_size: int | None = None,
    overwrite: bool = False,
    metadata_size: int | None = None,
) -> None:
    """Create ``path``, a differencing VHD over ``parent``, linked exactly to it.

    The child gets the parent's size (or ``size``, which may not be smaller), the parent's
    block size (2 MiB for a raw parent), the parent's base name, footer uuid and mtime
    (``prt_ts``), and three relative locators (MACX, W2KU, W2RU). With ``raw_parent`` the
    parent is a raw image (opened with the aio driver), its uuid null; a raw parent may
    also be a network image ``rbd:pool/image`` (blktap.vhd.image.network_parent), which
    the locators then hold verbatim and whose ``size`` the caller gives. ``metadata_size``:
    as :func:`create_dynamic`.

    Raises NotFound/OSError for a missing parent, ImageFormatError for a malformed VHD
    parent, InvalidArgument for a bad size. Skipping empty parents (vhd-util's default
    without ``-e``) is the caller's choice.
    """
    network = raw_parent and network_parent(parent) is not None
    if network:
        if size is None:
            raise InvalidArgument(f"the size of network parent {parent} must be given")
        psize = size
        pblock = DEFAULT_BLOCK_SIZE
    elif not os.path.exists(parent):
        raise FileNotFoundError(errno.ENOENT, "parent not found", parent)
    elif raw_parent:
        psize = os.stat(parent).st_size
        if psize <= 0 or psize % SECTOR_SIZE:
            # A raw parent that is not whole sectors: the child covers it rounded up.
            psize = -(-psize // SECTOR_SIZE) * SECTOR_SIZE
        pblock = DEFAULT_BLOCK_SIZE
    else:
        with VhdFile.open(parent, resolve_parent=False) as p:
            psize = p.size
            pblock = p.block_size if p.header is not None else DEFAULT_BLOCK_SIZE
    vsize = psize if size is None else size
    if vsize < psize:
        raise InvalidArgument(f"snapshot size {vsize} is smaller than the parent's {psize}")
    create_dynamic(
        path,
        vsize,
        block_size=block_size or pblock,
        overwrite=overwrite,
        metadata_size=metadata_size,
        _parent=(parent, raw_parent),
    )
