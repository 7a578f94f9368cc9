"""Helpers shared by the vhd-util operations: footer rewriting, block allocation without
redundant zeroing, fast in-kernel copies, and bitmaps."""

from __future__ import annotations

import errno
import os
import stat

from blktap.errors import ImageFormatError, InvalidArgument
from blktap.proto.vhd import bitmap as bm
from blktap.proto.vhd.constants import FOOTER_SIZE, SECTOR_SIZE, DiskType
from blktap.proto.vhd.footer import Footer
from blktap.vhd.image import DATA_ALIGN, VhdFile, pwrite_all

MB = 1 << 20
_ZEROS = bytes(1 << 20)


def is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def open_vhd(path: str, *, writable: bool = False, resolve_parent: bool = True) -> VhdFile:
    """:meth:`VhdFile.open` with a clearer error for a missing file (NotFound-like
    FileNotFoundError is kept as it is: its errno is ENOENT)."""
    return VhdFile.open(path, writable=writable, resolve_parent=resolve_parent)


def footer_position(image: VhdFile) -> int:
    """Where the trailing footer belongs: after the last block (sparse) or after the
    data (fixed)."""
    if image.header is None:
        return image.footer.current_size
    return image.data_end


def write_footers(
    image: VhdFile,
    footer: Footer | None = None,
    *,
    truncate: bool = True,
    in_place: bool = False,
) -> None:
    """Make ``footer`` (default: the image's, checksum recomputed) the image's footer:
    the trailing copy at :func:`footer_position` and, for sparse disks, the backup at 0;
    with ``truncate`` a regular file is cut right after the trailing footer (as the C
    ``vhd_write_footer`` does). With ``in_place`` (and a valid trailing footer) the
    trailing copy is rewritten where it is instead and nothing is truncated. Durable
    when this returns.

    On failure the file may hold the new footer in one place and the old in the other;
    ``vhd-util repair`` mends that.
    """
    new = (footer or image.footer).with_checksum()
    image.footer = new
    raw = new.encode()
    pos = footer_position(image)
    if in_place and not image.footer_repaired and image.file_size >= FOOTER_SIZE:
        pos = image.file_size - (FOOTER_SIZE - 1 if image.file_size % SECTOR_SIZE else FOOTER_SIZE)
        truncate = False
    if image.header is not None:
        pwrite_all(image.fd, [raw], 0)
    pwrite_all(image.fd, [raw], pos)
    if truncate and is_regular(image.fd):
        os.ftruncate(image.fd, pos + FOOTER_SIZE)
        image.file_size = pos + FOOTER_SIZE
    os.fsync(image.fd)
    image.footer_repaired = False
    image.dirty = False


def full_bitmap(image: VhdFile) -> bytearray:
    """An on-disk-sized bitmap with every sector of a block set."""
    assert image.header is not None
    bits = bytearray(image.header.bitmap_size)
    bm.set_range(bits, 0, image.header.sectors_per_block)
    return bits


def next_block_position(image: VhdFile) -> int:
    """Byte offset where the next block's bitmap goes: at the end of the data, placed so
    that the block's data starts on a 4 KiB boundary (blktap's layout)."""
    assert image.header is not None
    start = image.data_end
    return start + (-(start + image.header.bitmap_size)) % DATA_ALIGN


def allocate_block(image: VhdFile, *, zero: bool) -> int:
    """Reserve room for a new block at the end of the data and return its BAT entry
    (sector offset); the BAT itself is not updated. See :meth:`VhdFile.reserve_block`
    (``zero``: the block's bitmap and data read as zeros afterwards)."""
    return image.reserve_block(zero=zero)


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes between files, in the kernel where it can
    (``copy_file_range``), else through a buffer. Short source reads raise EIO."""
    use_cfr = hasattr(os, "copy_file_range")
    while length > 0:
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    use_cfr = False
                    continue
                raise
        else:
            chunk = os.pread(src_fd, min(length, 4 * MB), src_off)
            n = len(chunk)
            if n:
                pwrite_all(dst_fd, [chunk], dst_off)
        if n <= 0:
            raise OSError(errno.EIO, f"short read copying {length} bytes at {src_off}")
        src_off += n
        dst_off += n
        length -= n


def require_sparse(image: VhdFile, what: str) -> None:
    """Raise InvalidArgument unless ``image`` is dynamic or differencing."""
    if image.header is None:
        raise InvalidArgument(f"{image.path}: {what} needs a dynamic or differencing VHD")


def disk_type_name(disk_type: int) -> str:
    """The C tool's HD_TYPE_STR wording."""
    names = {
        0: "None",
        1: "Reserved (deprecated)",
        DiskType.FIXED: "Fixed hard disk",
        DiskType.DYNAMIC: "Dynamic hard disk",
        DiskType.DIFFERENCING: "Differencing hard disk",
        5: "Reserved (deprecated)",
        6: "Reserved (deprecated)",
    }
    return names.get(disk_type, "Unknown type!")


def parse_size_mb(value: int, what: str = "size") -> int:
    """``value`` MiB in bytes; InvalidArgument unless positive."""
    if value <= 0:
        raise InvalidArgument(f"invalid {what}: {value} MB")
    return value * MB


def not_vhd(path: str, message: str) -> ImageFormatError:
    return ImageFormatError(message, path=path, structure="file")
