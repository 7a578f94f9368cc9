"""``vhd-util copy -n NAME -N NEW``: copy a VHD's virtual disk into a new VHD file.

As the C tool: the new image has the source's virtual size, a new uuid, metadata sized
for that size, and every block that holds data written in full. A fixed source gives a
fixed copy (its data copied extent by extent, holes kept); a dynamic or differencing
source gives a standalone dynamic copy with the blocks that any image of its chain
holds, read through the chain (the C tool copies a differencing disk's own blocks only,
which loses what its parents hold; it also fails on fixed sources). Encryption (the C
tool's ``-k``/``-E``) is not implemented and refused before anything is written.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from blktap.errors import BlktapError, InvalidArgument
from blktap.proto.vhd.constants import SECTOR_SIZE, DiskType
from blktap.vhd import create_fixed
from blktap.vhd.image import VhdFile, pwrite_all
from blktap.vhdutil.common import allocate_block, copy_range, full_bitmap
from blktap.vhdutil.create import create
from blktap.vhdutil.progress import Progress
from blktap.vhdutil.reader import ChainReader

log = logging.getLogger(__name__)


class EncryptionUnsupported(BlktapError):
    """``copy -k``/``-E``: this vhd-util cannot encrypt."""

    errno = errno.EOPNOTSUPP


@dataclass(frozen=True, slots=True)
class CopyResult:
    disk_type: DiskType
    blocks: int
    """Blocks (dynamic copy) or data extents (fixed copy) written."""
    bytes_copied: int


def copy(source: str, target: str, *, progress: bool | None = None) -> CopyResult:
    """Copy ``source`` (and what its parents hold) into the new file ``target``.

    Raises FileExistsError when ``target`` exists (nothing is touched), ImageFormatError
    for a malformed source or chain, OSError. On any failure the partly written target
    is removed.
    """
    if os.path.lexists(target):
        raise FileExistsError(
            errno.EEXIST, "VHD file already exists, choose a different name", target
        )
    with ChainReader.open(source) as chain:
        leaf = chain.layers[0]
        assert isinstance(leaf, VhdFile)
        kind = DiskType(leaf.footer.disk_type)
        log.debug("copy %s (%s, %d bytes, chain of %d) to %s", source, kind.name,
                  leaf.size, len(chain.layers), target)
        try:
            if kind == DiskType.FIXED:
                result = _copy_fixed(leaf, target)
            else:
                result = _copy_sparse(chain, target, progress)
        except BaseException:
            _remove(target)
            raise
    log.debug("copied %d bytes in %d pieces", result.bytes_copied, result.blocks)
    return result


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.error("cannot remove the partial copy %s: %s", path, exc)


def _copy_fixed(leaf: VhdFile, target: str) -> CopyResult:
    size = leaf.size
    create_fixed(target, size)
    fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
    pieces = copied = 0
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(leaf.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(leaf.fd, start, os.SEEK_HOLE), size)
            copy_range(leaf.fd, start, fd, start, end - start)
            pieces += 1
            copied += end - start
            pos = end
        os.fsync(fd)
    finally:
        os.close(fd)
    return CopyResult(DiskType.FIXED, pieces, copied)


def _copy_sparse(chain: ChainReader, target: str, progress: bool | None) -> CopyResult:
    size = chain.size
    # The C tool sizes the new image's metadata for the source's size (mbytes = size).
    create(target, size, prealloc=size)
    written = 0
    with VhdFile.open(target, writable=True) as image:
        assert image.header is not None
        bs = image.block_size
        full = full_bitmap(image)
        buf = bytearray(bs)
        blocks = -(-size // bs)
        bar = Progress(f"copy {chain.layers[0].path}", blocks, enabled=progress)
        for block in range(blocks):
            bar.update(block)
            offset = block * bs
            if not chain.has_data(offset, bs):
                continue
            length = min(bs, size - offset)
            view = memoryview(buf)
            chain.read_into(offset, view[:length])
            if length < bs:
                view[length:] = bytes(bs - length)
            entry = allocate_block(image, zero=False)
            pwrite_all(image.fd, [full, buf], entry * SECTOR_SIZE)
            # The BAT entry makes the block visible only once its data is in place.
            image.write_bat_entry(block, entry)
            image.write_bitmap(block, bytearray(full))
            written += 1
        bar.finish()
    return CopyResult(DiskType.DYNAMIC, written, written * bs)


def refuse_encryption(key_file: str | None, key_on_stdin: bool) -> None:
    """Raise EncryptionUnsupported when ``-k``/``-E`` is asked for, InvalidArgument
    when both are (the C tool: "Only supply -E or -k once")."""
    if key_file is not None and key_on_stdin:
        raise InvalidArgument("Only supply -E or -k once")
    if key_file is not None or key_on_stdin:
        raise EncryptionUnsupported(
            "encrypted copies (-k/-E) are not supported by this vhd-util: "
            "copy without a key, or use the C tool with libblockcrypto"
        )
