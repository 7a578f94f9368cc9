"""Undo journals for ``resize -j`` and ``vhd-util revert``.

Before an operation rewrites metadata in place it saves every byte range it will
overwrite, plus the file's original size, to a journal file and makes it durable;
``revert`` writes the saved ranges back and cuts the file to its old size.

File format (this implementation's own; the C libvhd journal format is not reproduced):
a 32-byte header (magic ``b"BLKTAPPY-VHD-JNL"``, version u32, reserved u32, original file
size u64), then records (offset u64, length u32, crc32 u32, data), then a 16-byte commit
trailer (``b"JNL-DONE"``, record count u64). All integers big-endian. A journal without
its trailer was never committed: the image was not touched, and revert only removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from dataclasses import dataclass

from blktap.errors import BlktapError, ImageFormatError
from blktap.vhd.image import pread_exact, pwrite_all

MAGIC = b"BLKTAPPY-VHD-JNL"
VERSION = 1
_HEAD = struct.Struct(">16sIIQ")
_REC = struct.Struct(">QII")
_DONE = struct.Struct(">8sQ")
DONE = b"JNL-DONE"


class JournalExists(BlktapError):
    errno = errno.EEXIST


@dataclass(frozen=True, slots=True)
class JournalInfo:
    original_size: int
    records: list[tuple[int, bytes]]
    committed: bool


def write_journal(path: str, image_fd: int, ranges: list[tuple[int, int]]) -> None:
    """Save ``ranges`` (offset, length) of the open image, and its size, to a new
    journal at ``path``; durable (file and directory) when this returns.

    Raises JournalExists (EEXIST) when ``path`` exists, OSError. A failed write removes
    the partial journal."""
    size = os.lseek(image_fd, 0, os.SEEK_END)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise JournalExists(f"journal {path} already exists") from None
    try:
        parts: list[bytes] = [_HEAD.pack(MAGIC, VERSION, 0, size)]
        for off, length in ranges:
            data = pread_exact(image_fd, length, off)
            parts.append(_REC.pack(off, len(data), zlib.crc32(data)))
            parts.append(data)
        parts.append(_DONE.pack(DONE, len(ranges)))
        pwrite_all(fd, list(parts), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    _sync_dir(path)


def _sync_dir(path: str) -> None:
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_journal(path: str) -> JournalInfo:
    """Parse a journal. Raises ImageFormatError when it is not one (or is corrupt)."""
    with open(path, "rb") as f:
        data = f.read()

    def bad(msg: str, value: object = None) -> ImageFormatError:
        return ImageFormatError(msg, path=path, structure="journal", value=value)

    if len(data) < _HEAD.size:
        raise bad("truncated journal header", len(data))
    magic, version, _, size = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise bad("not a vhd-util journal", magic)
    if version != VERSION:
        raise bad("unsupported journal version", version)
    pos = _HEAD.size
    records: list[tuple[int, bytes]] = []
    committed = False
    while pos + 8 <= len(data):
        if data[pos : pos + 8] == DONE and pos + _DONE.size == len(data):
            count = _DONE.unpack_from(data, pos)[1]
            if count != len(records):
                raise bad("journal record count mismatch", count)
            committed = True
            break
        if pos + _REC.size > len(data):
            break
        off, length, crc = _REC.unpack_from(data, pos)
        pos += _REC.size
        chunk = data[pos : pos + length]
        if len(chunk) != length or zlib.crc32(chunk) != crc:
            break
        records.append((off, chunk))
        pos += length
    return JournalInfo(size, records, committed)


def revert(image_path: str, journal_path: str) -> bool:
    """Undo the operation ``journal_path`` recorded on ``image_path``; then remove the
    journal. Returns False when the journal was never committed (the image was not
    touched; only the journal is removed).

    Raises ImageFormatError (not a journal), OSError. Reverting twice is harmless."""
    info = read_journal(journal_path)
    if info.committed:
        fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for off, data in info.records:
                pwrite_all(fd, [data], off)
            os.ftruncate(fd, info.original_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.unlink(journal_path)
    _sync_dir(journal_path)
    return info.committed


def remove_journal(path: str) -> None:
    """Drop a journal once its operation completed (durably)."""
    os.unlink(path)
    _sync_dir(path)
