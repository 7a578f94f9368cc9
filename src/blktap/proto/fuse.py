"""The FUSE kernel protocol (``/dev/fuse``), sans-IO: message layouts, decoders, encoders.

Layouts follow ``include/uapi/linux/fuse.h`` (protocol 7.x, host byte order). Every
request the kernel sends is one ``read`` from ``/dev/fuse``: a 40-byte ``fuse_in_header``
then the opcode's arguments. Every reply is one ``write``: a 16-byte ``fuse_out_header``
(``error`` is 0 or a negative errno) then the opcode's result. FORGET, BATCH_FORGET and
INTERRUPT get no reply.

Only what a one-file filesystem needs is here. The hot path (READ, WRITE) uses the
precompiled ``struct.Struct`` objects directly; colder requests decode into frozen
dataclasses.
"""

from __future__ import annotations

import enum
import stat
import struct
from dataclasses import dataclass

from blktap.errors import ProtocolError

KERNEL_MAJOR = 7
KERNEL_MINOR = 38
"""The newest minor version whose layouts this module follows."""

ROOT_ID = 1
MIN_READ_BUFFER = 8192
"""A read of /dev/fuse must offer at least this many bytes (FUSE_MIN_READ_BUFFER)."""


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


class InitFlag(enum.IntFlag):
    """fuse_init_in/out ``flags`` (the low 32 bits; ``flags2`` holds the high ones)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31


class OpenFlag(enum.IntFlag):
    """fuse_open_out ``open_flags`` (FOPEN_*)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7
    """Reads and writes of this open file go to the backing file named by the open
    reply's ``backing_id`` in the kernel, not to the server (DIRECT_IO overrides it)."""


INIT_PASSTHROUGH = 1 << 37
"""FUSE_PASSTHROUGH (a flags2 bit, so INIT_EXT must be set): open replies may carry
FOPEN_PASSTHROUGH; the reply's ``max_stack_depth`` must be 1 or 2, and WRITEBACK_CACHE
must be off."""
MAX_STACK_DEPTH = 2
"""FILESYSTEM_MAX_STACK_DEPTH: a backing file may live on a stacked filesystem (an
overlay) of depth at most ``max_stack_depth - 1``."""

# /dev/fuse ioctls (FUSE_DEV_IOC_MAGIC 229): _IOW(229, 1, struct fuse_backing_map) and
# _IOW(229, 2, uint32_t backing_id). Both need CAP_SYS_ADMIN and a connection whose INIT
# reply enabled passthrough.
FUSE_DEV_IOC_BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1
FUSE_DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2
BACKING_MAP = struct.Struct("=iIQ")  # fd flags(0) padding(0)
BACKING_ID = struct.Struct("=I")


def encode_backing_map(fd: int) -> bytes:
    """The argument of FUSE_DEV_IOC_BACKING_OPEN for descriptor ``fd``."""
    return BACKING_MAP.pack(fd, 0, 0)


class SetattrValid(enum.IntFlag):
    """fuse_setattr_in ``valid`` (FATTR_*)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


# fallocate(2) modes the kernel passes through unchanged (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# ------------------------------------------------------------------------- layouts
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
IN_HEADER_PREFIX = struct.Struct("=IIQQ")  # len opcode unique nodeid: what dispatch needs
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
WRITE_REPLY = struct.Struct("=IiQII")  # a whole successful WRITE reply: header, write_out
READ_IN = struct.Struct("=QQII")  # fh offset size read_flags (lock_owner flags pad follow)
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("=II")  # size pad
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_IN_FLAGS2 = struct.Struct("=I")  # flags2, at offset 16 when INIT_EXT is set
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")  # ... max_pages map_alignment flags2 max_stack
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QII")  # fh open_flags backing_id
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode pad
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags pad
BATCH_FORGET_IN = struct.Struct("=II")  # count dummy
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # blocks bfree bavail files ffree bsize ...
DIRENT_HEAD = struct.Struct("=QQII")  # ino off namelen type

WRITE_HEAD_SIZE = IN_HEADER.size + WRITE_IN.size
"""Bytes before a WRITE's data: read /dev/fuse into this much, then the data buffer."""

DT_DIR = 4
DT_REG = 8


def _need(body: bytes | memoryview, struc: struct.Struct, opcode: Opcode) -> None:
    if len(body) < struc.size:
        raise ProtocolError(f"FUSE {opcode.name}: {len(body)} argument bytes, "
                            f"need {struc.size}")


# ------------------------------------------------------------------------ requests
@dataclass(frozen=True, slots=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    @classmethod
    def decode(cls, data: bytes | memoryview) -> InHeader:
        if len(data) < IN_HEADER.size:
            raise ProtocolError(f"FUSE request of {len(data)} bytes is shorter than a header")
        length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(data)
        if length != len(data):
            raise ProtocolError(f"FUSE header says {length} bytes, read {len(data)}")
        return cls(length, opcode, unique, nodeid, uid, gid, pid)


@dataclass(frozen=True, slots=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int
    """Both words: ``flags | flags2 << 32`` (flags2 only with INIT_EXT)."""

    @classmethod
    def decode(cls, body: bytes | memoryview) -> InitIn:
        _need(body, INIT_IN, Opcode.INIT)
        major, minor, readahead, flags = INIT_IN.unpack_from(body)
        if flags & InitFlag.INIT_EXT and len(body) >= INIT_IN.size + INIT_IN_FLAGS2.size:
            (flags2,) = INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)
            flags |= flags2 << 32
        return cls(major, minor, readahead, flags)


@dataclass(frozen=True, slots=True)
class SetattrIn:
    valid: int
    fh: int
    size: int
    mode: int
    uid: int
    gid: int

    @classmethod
    def decode(cls, body: bytes | memoryview) -> SetattrIn:
        _need(body, SETATTR_IN, Opcode.SETATTR)
        (valid, _pad, fh, size, _lock, _at, _mt, _ct, _atn, _mtn, _ctn, mode, _u4, uid, gid,
         _u5) = SETATTR_IN.unpack_from(body)
        return cls(valid, fh, size, mode, uid, gid)


@dataclass(frozen=True, slots=True)
class FallocateIn:
    fh: int
    offset: int
    length: int
    mode: int

    @classmethod
    def decode(cls, body: bytes | memoryview) -> FallocateIn:
        _need(body, FALLOCATE_IN, Opcode.FALLOCATE)
        fh, offset, length, mode, _pad = FALLOCATE_IN.unpack_from(body)
        return cls(fh, offset, length, mode)


def decode_open_flags(body: bytes | memoryview, opcode: Opcode = Opcode.OPEN) -> int:
    """The open(2) flags of an OPEN or OPENDIR request."""
    _need(body, OPEN_IN, opcode)
    return int(OPEN_IN.unpack_from(body)[0])


def decode_name(body: bytes | memoryview) -> bytes:
    """The NUL-terminated name of a LOOKUP request."""
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("FUSE LOOKUP name is not NUL-terminated")
    return raw[:end]


def decode_read_size(body: bytes | memoryview, opcode: Opcode) -> tuple[int, int]:
    """``(offset, size)`` of a READ or READDIR request."""
    _need(body, READ_IN, opcode)
    _fh, offset, size, _flags = READ_IN.unpack_from(body)
    return offset, size


# ------------------------------------------------------------------------- replies
@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode (``struct fuse_attr``); times in whole seconds."""

    ino: int
    size: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    time: int = 0
    blksize: int = 4096

    def encode(self) -> bytes:
        return ATTR.pack(self.ino, self.size, -(-self.size // 512), self.time, self.time,
                         self.time, 0, 0, 0, self.mode, self.nlink, self.uid, self.gid, 0,
                         self.blksize, 0)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def reply(unique: int, payload: bytes = b"") -> bytes:
    """A whole successful reply carrying ``payload``."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def reply_header(unique: int, payload_length: int) -> bytes:
    """The header of a successful reply whose payload is sent separately (scatter write)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_length, 0, unique)


def reply_error(unique: int, errno: int) -> bytes:
    """An error reply; ``errno`` is positive."""
    assert errno > 0
    return OUT_HEADER.pack(OUT_HEADER.size, -errno, unique)


def encode_init_out(minor: int, max_readahead: int, flags: int, *, max_background: int,
                    congestion_threshold: int, max_write: int, max_pages: int,
                    max_stack_depth: int = 0) -> bytes:
    """fuse_init_out for protocol 7.``minor``; ``flags`` may include flags2 bits (<< 32),
    which the kernel reads only when INIT_EXT is among them. ``max_stack_depth`` matters
    only with INIT_PASSTHROUGH."""
    return INIT_OUT.pack(KERNEL_MAJOR, minor, max_readahead, flags & 0xFFFFFFFF,
                         max_background, congestion_threshold, max_write, 1, max_pages, 0,
                         flags >> 32, max_stack_depth)


def encode_entry_out(attr: Attr, valid_seconds: int, generation: int = 1) -> bytes:
    return ENTRY_OUT_HEAD.pack(attr.ino, generation, valid_seconds, valid_seconds, 0, 0) \
        + attr.encode()


def encode_attr_out(attr: Attr, valid_seconds: int) -> bytes:
    return ATTR_OUT_HEAD.pack(valid_seconds, 0, 0) + attr.encode()


def encode_open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    """fuse_open_out; ``backing_id`` (from FUSE_DEV_IOC_BACKING_OPEN) with
    OpenFlag.PASSTHROUGH."""
    return OPEN_OUT.pack(fh, open_flags, backing_id)


def encode_write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def encode_statfs_out(*, blocks: int, bsize: int, files: int, namelen: int = 255) -> bytes:
    """A full, read-only-looking filesystem: no free blocks or inodes."""
    return STATFS_OUT.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


def encode_dirent(ino: int, next_offset: int, name: bytes, dtype: int) -> bytes:
    """One ``fuse_dirent``, padded to 8 bytes; ``next_offset`` resumes after it."""
    raw = DIRENT_HEAD.pack(ino, next_offset, len(name), dtype) + name
    return raw + bytes(-len(raw) % 8)
