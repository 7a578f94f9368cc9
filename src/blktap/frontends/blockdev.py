"""The kernel block device frontend: a one-file FUSE filesystem with a loop device on top.

This is the role of blktap2's kernel driver on a host without the nbd or ublk modules.
For the VBD of minor X, tapdisk serves a FUSE filesystem mounted on
``<run_dir>/fuse/X/`` holding one regular file, ``disk``, whose bytes are the VBD's
bytes; a loop device (``/dev/loopN``, 512-byte sectors, read-only for a read-only VBD,
direct I/O when the kernel allows it, partitions scanned) sits on that file and is
published as ``<dev_dir>/tapdevX``, a symbolic link to ``/dev/loopN``.

The FUSE protocol (``blktap.proto.fuse``) is spoken on a non-blocking ``/dev/fuse``
descriptor from the event loop: each readable event reads requests until the device is
empty, and each READ, WRITE, FSYNC or FALLOCATE runs eagerly (``blktap.util.eager``), so
that many requests are in flight at once and replies go out in completion order.

Where the VBD is one raw file and the kernel has FUSE passthrough (6.9 and later), the
file is opened with FOPEN_PASSTHROUGH instead and the kernel does the loop device's reads
and writes on the image file itself (see :class:`BlockDevice` for what that costs a
pause). By default (BLKTAP_FUSE_PASSTHROUGH=auto) only read-only devices use it;
``on`` lets read-write devices use it too, ``off`` keeps every request here, as does a
kernel without it.

Deadlock rule: the thread running the event loop never does I/O on the FUSE file or the
loop device itself (opening the file, configuring or clearing the loop device, and
unmounting all wait for the FUSE server): those calls run in the loop's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from blktap.errors import BlktapError, Busy, InvalidArgument, ProtocolError, errno_of
from blktap.frontends.fuse_uring import FuseRing, possible_cpus
from blktap.proto import fuse, fuse_uring
from blktap.proto.fuse import Opcode
from blktap.util import eager
from blktap.util.buffers import aligned
from blktap.vbd import VBD, VBDState

log = logging.getLogger(__name__)

FILE_NAME = "disk"
FILE_ID = 2
"""Node id of the one file (the root directory is fuse.ROOT_ID)."""
SERVED_NAME = "disk.served"
SERVED_ID = 3
"""A second name for the same bytes, never opened with passthrough: a read-only loop
device is switched onto it (LOOP_CHANGE_FD) while its VBD is paused. Not listed."""
_DATA_IDS = (FILE_ID, SERVED_ID)

MAX_IO = 1 << 20
"""Largest READ or WRITE negotiated with the kernel (max_write, max_pages)."""

MAX_BACKGROUND = 256
"""Asynchronous requests the kernel may have outstanding (the loop device's queue depth is
128; the kernel's default of 12 would cap direct I/O at 12 requests in flight)."""

ATTR_VALID_SECONDS = 86400
"""Names and attributes never change while the device exists (the VBD size is fixed)."""

FILE_BLKSIZE = 4096

PASSTHROUGH_ENV = "BLKTAP_FUSE_PASSTHROUGH"
"""Which block devices let the kernel read and write their one raw image file itself
(FUSE passthrough): ``auto`` (the default) read-only ones, ``on`` read-write ones too,
``off`` none (:class:`PassthroughMode`)."""

IO_FUSE = "fuse"
IO_PASSTHROUGH = "passthrough"
IO_FUSE_URING = "fuse-uring"
"""The I/O path when tapdisk serves the requests through FUSE over io_uring."""

URING_ENV = "BLKTAP_FUSE_URING"
"""``auto``, ``on`` or ``off``: whether tapdisk serves the FUSE requests through io_uring
ring entries (FUSE over io_uring) instead of reading and writing ``/dev/fuse``."""
URING_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
URING_DEPTH = 32
"""Ring entries per queue (one queue per possible CPU): the requests of one CPU the
server holds at once; more wait in the kernel. Each entry has a MAX_IO payload buffer,
whose pages are touched only as far as requests fill them."""

_HOLD_OFFSET = 1 << 62
"""The offset of the FALLOCATE that tapdisk itself sends to hold a passthrough file's
writes: no request of a device smaller than 4 EiB starts there."""
_HOLD_MODE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE: takes the inode lock
_WAIT_TIMEOUT = 30.0
"""How long INIT, or the holder's request, may take to arrive (a loaded host is slow)."""
_HOLD_SCRIPT = (
    "import ctypes,os,sys;l=ctypes.CDLL(None,use_errno=True);"
    "l.fallocate.argtypes=[ctypes.c_int,ctypes.c_int,ctypes.c_int64,ctypes.c_int64];"
    "fd=os.open(sys.argv[1],os.O_RDWR);"
    f"sys.exit(0 if l.fallocate(fd,{_HOLD_MODE},{_HOLD_OFFSET},4096)==0 else 1)")
"""What holds when util-linux's fallocate is missing."""


class PassthroughMode(enum.Enum):
    """BLKTAP_FUSE_PASSTHROUGH: which block devices may use FUSE passthrough."""

    OFF = "off"
    """Never: every request goes through tapdisk."""
    AUTO = "auto"
    """Read-only devices only (the default): their pause holds every request and their
    resume may land on another file, as without passthrough."""
    ON = "on"
    """Read-write devices too, with what a pause can do then (see :class:`BlockDevice`):
    reads that arrive alone still reach the image while paused, and a resume must land
    on the same file (a live snapshot's unpause onto a new leaf is refused)."""


def passthrough_mode() -> PassthroughMode:
    """BLKTAP_FUSE_PASSTHROUGH: ``off`` (also 0/no/false), ``on`` (also 1/yes/true),
    anything else ``auto``."""
    value = os.environ.get(PASSTHROUGH_ENV, "auto").strip().lower()
    if value in ("off", "0", "no", "false"):
        return PassthroughMode.OFF
    if value in ("on", "1", "yes", "true"):
        return PassthroughMode.ON
    return PassthroughMode.AUTO

class UringMode(enum.Enum):
    """BLKTAP_FUSE_URING: whether the FUSE requests come through io_uring."""

    OFF = "off"
    """Never: requests are read from and answered on ``/dev/fuse``."""
    AUTO = "auto"
    """Where the kernel offers it (the ``fuse.enable_uring`` module parameter is Y and
    the connection negotiates it), else ``/dev/fuse``."""
    ON = "on"
    """Required: a block device that cannot have it fails to start, saying why."""


URING_DEFAULT = UringMode.OFF
"""What an unset BLKTAP_FUSE_URING means (see docs/performance.md for why)."""


def uring_mode() -> UringMode:
    """BLKTAP_FUSE_URING: ``off`` (also 0/no/false), ``on`` (also 1/yes/true), ``auto``;
    unset or anything else: URING_DEFAULT."""
    value = os.environ.get(URING_ENV, "").strip().lower()
    if value in ("off", "0", "no", "false"):
        return UringMode.OFF
    if value in ("on", "1", "yes", "true"):
        return UringMode.ON
    if value == "auto":
        return UringMode.AUTO
    return URING_DEFAULT


def uring_parameter() -> str | None:
    """The ``fuse.enable_uring`` module parameter (``Y``/``N``), None when the kernel has
    no FUSE over io_uring (no parameter)."""
    try:
        with open(URING_PARAMETER, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None

# --------------------------------------------------------------------- loop ioctls
# linux/loop.h
_LOOP_CLR_FD = 0x4C01
_LOOP_CHANGE_FD = 0x4C06
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_PARTSCAN = 8
_LO_FLAGS_DIRECT_IO = 16
# struct loop_config: fd, block_size, struct loop_info64, __reserved[8]
_LOOP_CONFIG = struct.Struct("=II" "QQQQQ" "IIII" "64s64s32s" "QQ" "64x")
_SECTOR_SIZE = 512

# mount(2) / umount2(2)
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_FORCE = 1
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _wait_direct_io(path: str) -> None:
    """Wait for the direct I/O in flight on the file ``path`` (best effort).

    ext4 and XFS wait for it (inode_dio_wait) in fallocate(2); a KEEP_SIZE allocation of
    one block that is already data changes nothing. The block is the file's first data
    (SEEK_DATA), the first block when it has none. Other filesystems: nothing waits.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            offset = os.lseek(fd, 0, os.SEEK_DATA) & ~4095
        except OSError:
            offset = 0
        if offset + 4096 <= os.fstat(fd).st_size:
            _fallocate(fd, 0x01, offset, 4096)  # FALLOC_FL_KEEP_SIZE; errors: nothing waits
    finally:
        os.close(fd)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}", target)


def _umount(target: str, flags: int) -> None:
    if _libc.umount2(target.encode(), ctypes.c_int(flags | _UMOUNT_NOFOLLOW)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}", target)


_PR_SET_IO_FLUSHER = 57


def _become_io_flusher() -> bool:
    """PR_SET_IO_FLUSHER for the calling thread: its memory allocations never wait for
    I/O, which could be writeback through this very server (the FUSE-on-loop deadlock).
    """
    if _libc.prctl(ctypes.c_int(_PR_SET_IO_FLUSHER), ctypes.c_ulong(1), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        log.debug("PR_SET_IO_FLUSHER: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def _mounted(target: str) -> bool:
    """Whether ``target`` is a mount point, from /proc/self/mountinfo (no I/O on it: a
    FUSE mount there may be served by a process that no longer answers)."""
    want = os.path.join(os.path.realpath(os.path.dirname(target)), os.path.basename(target))
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            fields = line.split(" ", 5)
            if len(fields) > 4 and _unescape(fields[4]) == want:
                return True
    return False


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _loop_name(device: str) -> str:
    return os.path.basename(device)


def loop_backing_file(device: str) -> str | None:
    """The backing file of loop ``device`` as sysfs shows it, or None when unbound."""
    try:
        with open(f"/sys/block/{_loop_name(device)}/loop/backing_file",
                  encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except (FileNotFoundError, OSError):
        return None


def loops_backed_by(path: str) -> list[str]:
    """The loop devices whose backing file is ``path``."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("loop") and loop_backing_file(f"/dev/{name}") == path:
                found.append(f"/dev/{name}")
    return found


def loop_direct_io(device: str) -> bool:
    try:
        with open(f"/sys/block/{_loop_name(device)}/loop/dio", encoding="utf-8") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _loop_configure(backing_fd: int, name: str, lo_flags: int) -> str:
    """Bind a free loop device to ``backing_fd``; return its path. Retries lost races."""
    # The kernel makes the loop device read-only unless it was itself opened for writing.
    access = os.O_RDONLY if lo_flags & _LO_FLAGS_READ_ONLY else os.O_RDWR
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(32):
            number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            for _wait in range(100):  # devtmpfs creates the node right after the add
                try:
                    lfd = os.open(device, access | os.O_CLOEXEC)
                    break
                except FileNotFoundError:
                    time.sleep(0.01)
            else:
                raise BlktapError(f"{device} did not appear", errno=errno.ENODEV)
            try:
                config = _LOOP_CONFIG.pack(
                    backing_fd, _SECTOR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, lo_flags,
                    name.encode()[:63], b"", b"", 0, 0)
                fcntl.ioctl(lfd, _LOOP_CONFIGURE, config)
                return device
            except OSError as exc:
                if exc.errno != errno.EBUSY:  # EBUSY: another process took it first
                    raise
            finally:
                os.close(lfd)
        raise Busy("no free loop device after 32 tries")
    finally:
        os.close(ctl)


def _loop_attach(path: str, read_only: bool, direct: bool) -> str:
    """Put a loop device on ``path``; direct I/O if ``direct`` and the kernel accepts it.

    Blocks until the FUSE server answers: call it outside the event loop's thread.
    """
    access = os.O_RDONLY if read_only else os.O_RDWR
    lo_flags = _LO_FLAGS_PARTSCAN | (_LO_FLAGS_READ_ONLY if read_only else 0)
    if direct:
        try:
            fd = os.open(path, access | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:
                return _loop_configure(fd, path, lo_flags | _LO_FLAGS_DIRECT_IO)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                os.close(fd)
    fd = os.open(path, access | os.O_CLOEXEC)
    try:
        return _loop_configure(fd, path, lo_flags)
    finally:
        os.close(fd)


def _loop_change_fd(device: str, path: str, direct: bool) -> None:
    """LOOP_CHANGE_FD: the read-only loop ``device`` goes on reading ``path`` (same size).
    The kernel drains the device's requests in flight first.

    Blocks until the FUSE server answers the open: call it outside the event loop's
    thread."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    try:
        lfd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(lfd, _LOOP_CHANGE_FD, fd)
        finally:
            os.close(lfd)
    finally:
        os.close(fd)


def _loop_claimed(device: str) -> bool:
    """Whether ``device`` is held exclusively (mounted, a dm/md member, ...)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return False
        raise
    os.close(fd)
    return False


def _loop_clear(device: str) -> None:
    """LOOP_CLR_FD: detach now if unused, else when its last user closes it (autoclear)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: not bound any more
            raise
    finally:
        os.close(fd)  # the last close of a device being cleared does the detach


def loop_counters(device: str) -> tuple[int, int, int, int, int]:
    """(reads, sectors read, writes, sectors written, in flight) of ``device`` from
    /sys/block/<name>/stat (all zeros when unreadable)."""
    try:
        with open(f"/sys/block/{_loop_name(device)}/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return 0, 0, 0, 0, 0
    if len(fields) < 9:
        return 0, 0, 0, 0, 0
    return fields[0], fields[2], fields[4], fields[6], fields[8]


def _publish(target: str, link: str) -> None:
    """Make ``link`` a symbolic link to ``target``, atomically replacing what was there."""
    tmp = f"{link}.new{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ------------------------------------------------------------------ FUSE session
# The hot path's constants and struct methods, bound once.
_READ = int(Opcode.READ)
_WRITE = int(Opcode.WRITE)
_IN_SIZE = fuse.IN_HEADER.size
_OUT_SIZE = fuse.OUT_HEADER.size
_READ_HEAD_SIZE = fuse.IN_HEADER.size + fuse.READ_IN.size
_WRITE_HEAD_SIZE = fuse.WRITE_HEAD_SIZE
_WRITE_REPLY_SIZE = fuse.WRITE_REPLY.size
_READ_IN_SIZE = fuse.READ_IN.size
_WRITE_IN_SIZE = fuse.WRITE_IN.size
_WRITE_OUT_SIZE = fuse.WRITE_OUT.size
_OP_OFFSET = fuse_uring.OP_OFFSET
_encode_ring_reply = fuse_uring.encode_reply_header
_pack_write_out_into = fuse.WRITE_OUT.pack_into
_unpack_prefix = fuse.IN_HEADER_PREFIX.unpack_from
_unpack_read = fuse.READ_IN.unpack_from
_unpack_write = fuse.WRITE_IN.unpack_from
_pack_out = fuse.OUT_HEADER.pack
_pack_write_reply = fuse.WRITE_REPLY.pack


class _Buffers:
    """Page-aligned buffers kept for reuse by exact length (requests repeat their sizes).

    At most BUDGET bytes are kept, so memory stays bounded by what the peak concurrency
    needed.
    """

    BUDGET = 64 << 20

    def __init__(self) -> None:
        self._free: dict[int, list[memoryview]] = {}
        self._kept = 0

    def get(self, length: int) -> memoryview:
        free = self._free.get(length)
        if free:
            self._kept -= length
            return free.pop()
        return aligned(length)

    def put(self, buf: memoryview) -> None:
        length = len(buf)
        if self._kept + length > self.BUDGET:
            return
        free = self._free.get(length)
        if free is None:
            free = self._free[length] = []
        free.append(buf)
        self._kept += length


Payload = bytes
SyncOp = Callable[[int, memoryview], Payload]
AsyncOp = Callable[[int, memoryview], Coroutine[Any, Any, Payload]]


class _FuseSession:
    """The server side of one FUSE connection: one directory holding one file.

    Requests come two ways, handled alike: read from the non-blocking ``fd`` in the event
    loop and answered with one ``writev`` each, and, once ``ring`` is registered, from its
    entries, answered in the same entry (FUSE over io_uring). A request carries its *ref*:
    -1 for ``/dev/fuse``, the ring entry's index otherwise; the reply goes back the way the
    request came. ``inflight`` counts requests whose reply is not sent yet.
    """

    def __init__(self, fd: int, vbd: VBD, logger: logging.LoggerAdapter[logging.Logger], *,
                 open_flags: int, passthrough: bool = False,
                 ring: FuseRing | None = None) -> None:
        self.fd = fd
        self.ring = ring
        """Ring entries to offer at INIT (FUSE_OVER_IO_URING); None: ``/dev/fuse`` only."""
        self.uring = False
        """The INIT reply enabled FUSE over io_uring (the ring must then be registered)."""
        self.ring_requests = 0
        """Requests that came through the ring."""
        self._ring_payloads: list[memoryview] = ring.payloads if ring is not None else []
        self._ring_headers: list[memoryview] = ring.header_views if ring is not None else []
        self.ended = False
        self.stopping = False
        self.inflight = 0
        self.stats = [0, 0, 0, 0]  # reads, largest read, writes, largest write
        self.initialized = False
        self.init_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.passthrough = False
        """The kernel accepted FUSE_PASSTHROUGH at INIT (asked for only if wanted)."""
        self.backing_id: int | None = None
        """While set, every OPEN of the file is answered with FOPEN_PASSTHROUGH to it."""
        self.hold_unique: int | None = None
        """The request id of tapdisk's own FALLOCATE that holds the file's writes."""
        self.hold_ref = -1
        """Where that FALLOCATE came from (-1: ``/dev/fuse``, else a ring entry)."""
        self.hold_taken: asyncio.Future[None] | None = None
        self._want_passthrough = passthrough
        self.hold_tid = -1
        """The process sending the holding FALLOCATE (the header's pid is the caller's
        thread id: the child's pid)."""
        self.hold_spawning = False
        """The holder is being started: its pid is not known yet, and its FALLOCATE may
        already be here (it is then recognised as a child of this process's)."""
        self._vbd = vbd
        self._size = vbd.size
        self._read_only = vbd.read_only
        self._log = logger
        self._open_flags = open_flags
        self._buffers = _Buffers()
        self._head = memoryview(bytearray(fuse.WRITE_HEAD_SIZE))
        self._data = self._buffers.get(MAX_IO)
        self._iov = [self._head, self._data]
        self._idle: asyncio.Future[None] | None = None
        self._reading = False
        now = int(time.time())
        self._root = fuse.Attr(fuse.ROOT_ID, 0, stat.S_IFDIR | 0o755, nlink=2, time=now)
        self._file = fuse.Attr(FILE_ID, self._size,
                               stat.S_IFREG | (0o400 if self._read_only else 0o600),
                               time=now, blksize=FILE_BLKSIZE)
        self._served = fuse.Attr(SERVED_ID, self._size, self._file.mode, time=now,
                                 blksize=FILE_BLKSIZE)
        self._sync_ops: dict[int, SyncOp] = {
            Opcode.INIT: self._init,
            Opcode.LOOKUP: self._lookup,
            Opcode.GETATTR: self._getattr,
            Opcode.SETATTR: self._setattr,
            Opcode.OPEN: self._open,
            Opcode.RELEASE: self._nothing,
            Opcode.FLUSH: self._nothing,
            Opcode.STATFS: self._statfs,
            Opcode.OPENDIR: self._opendir,
            Opcode.READDIR: self._readdir,
            Opcode.RELEASEDIR: self._nothing,
            Opcode.FSYNCDIR: self._nothing,
            Opcode.DESTROY: self._nothing,
        }
        for op in (Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME,
                   Opcode.RENAME2, Opcode.LINK, Opcode.SYMLINK, Opcode.CREATE, Opcode.TMPFILE):
            self._sync_ops[op] = self._no_namespace_change
        # An async op decodes its arguments before it returns its coroutine: the request
        # buffer is reused by the next read of /dev/fuse.
        self._async_ops: dict[int, AsyncOp] = {
            Opcode.FSYNC: self._fsync,
            Opcode.FALLOCATE: self._fallocate,
        }

    # ------------------------------------------------------------ event loop side
    def start_reading(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        self._reading = True

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.fd)

    def close(self) -> None:
        """Stop reading, close the ring (it holds the connection too) and the descriptor
        (which aborts the connection if mounted)."""
        self.stop_reading()
        self.ended = True
        if self.ring is not None:
            self.ring.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def wait_idle(self) -> None:
        """Return when no request is in flight."""
        while self.inflight:
            if self._idle is None or self._idle.done():
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    def _finished(self) -> None:
        self.inflight -= 1
        if not self.inflight and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _on_readable(self) -> None:
        # Drain the queue, but yield to the loop now and then so replies and other
        # VBDs are not starved by a busy device.
        for _ in range(128):
            if self.fd < 0:
                return
            try:
                n = os.readv(self.fd, self._iov)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile
                    continue
                if exc.errno != errno.ENODEV:
                    self._log.error("reading /dev/fuse: %s", exc)
                elif not self.stopping:  # ENODEV: unmounted, the connection is over
                    self._log.warning("FUSE connection ended: unmounted from outside?")
                self.ended = True
                self.stop_reading()
                return
            self._dispatch(n)

    def _dispatch(self, n: int) -> None:
        if n < _IN_SIZE:
            self._log.error("FUSE request of %d bytes ignored (shorter than a header)", n)
            return
        head = self._head
        length, opcode, unique, nodeid = _unpack_prefix(head)
        if length != n:
            self._log.error("FUSE request %d: header says %d bytes, read %d", unique, length, n)
            self._send_errno(-1, unique, errno.EIO)
            return
        if opcode == _READ:
            if n < _READ_HEAD_SIZE:
                self._send_errno(-1, unique, errno.EINVAL)
                return
            _fh, offset, size, _flags = _unpack_read(head, _IN_SIZE)
            self._read(-1, unique, nodeid, offset, size)
        elif opcode == _WRITE:
            _fh, offset, size, _wflags, _owner, _flags, _pad = _unpack_write(head, _IN_SIZE)
            if n != _WRITE_HEAD_SIZE + size:
                self._log.error("FUSE WRITE %d: %d data bytes announced, %d read", unique,
                                size, n - fuse.WRITE_HEAD_SIZE)
                self._send_errno(-1, unique, errno.EINVAL)
                return
            data = self._data
            if self._write(-1, unique, nodeid, offset, data[:size], data):
                # The write waits (e.g. for the disk, or a paused VBD): it keeps this
                # buffer, the next request is read into another.
                self._data = self._buffers.get(MAX_IO)
                self._iov = [self._head, self._data]
        else:
            pid = int(fuse.IN_HEADER.unpack_from(head)[6])
            self._other(-1, opcode, unique, nodeid, pid, n)

    def on_ring_request(self, index: int) -> None:
        """Serve the request the kernel put in ring entry ``index``."""
        header = self._ring_headers[index]
        self.ring_requests += 1
        try:
            _length, opcode, unique, nodeid, op_size, payload_sz = \
                fuse_uring.decode_entry(header)
        except ProtocolError as exc:
            self._log.error("%s", exc)
            unique = _unpack_prefix(header)[2]
            self._send_errno(index, unique, errno.EIO)
            return
        if opcode == _READ:
            if op_size < _READ_IN_SIZE:
                self._send_errno(index, unique, errno.EINVAL)
                return
            _fh, offset, size, _flags = _unpack_read(header, _OP_OFFSET)
            self._read(index, unique, nodeid, offset, size)
        elif opcode == _WRITE:
            _fh, offset, size, _wflags, _owner, _flags, _pad = _unpack_write(header, _OP_OFFSET)
            if size != payload_sz or op_size < _WRITE_IN_SIZE:
                self._log.error("FUSE WRITE %d: %d data bytes announced, %d in the ring "
                                "entry", unique, size, payload_sz)
                self._send_errno(index, unique, errno.EINVAL)
                return
            self._write(index, unique, nodeid, offset, self._ring_payloads[index][:size])
        else:
            pid = int(fuse.IN_HEADER.unpack_from(header)[6])
            body = memoryview(bytes(header[_OP_OFFSET:_OP_OFFSET + op_size])
                              + bytes(self._ring_payloads[index][:payload_sz]))
            self._other(index, opcode, unique, nodeid, pid, body)

    # ----------------------------------------------------------------- replies
    def _send(self, parts: list[bytes | memoryview]) -> None:
        if self.fd < 0:
            return
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the kernel dropped the request (interrupted, or aborted);
            # ENODEV/EBADF: the connection is gone. Neither concerns anyone else.
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                self._log.error("writing a FUSE reply: %s", exc)

    def _commit(self, index: int, unique: int, error: int, payload_sz: int) -> None:
        """Answer the request in ring entry ``index`` (its payload already written)."""
        ring = self.ring
        assert ring is not None
        _encode_ring_reply(self._ring_headers[index], unique, error, payload_sz)
        ring.commit(index, unique)

    def _send_reply(self, ref: int, unique: int, payload: bytes = b"") -> None:
        if ref < 0:
            self._send([fuse.reply(unique, payload)])
            return
        size = len(payload)
        if size:
            self._ring_payloads[ref][:size] = payload
        self._commit(ref, unique, 0, size)

    def _send_errno(self, ref: int, unique: int, err: int) -> None:
        if ref < 0:
            self._send([fuse.reply_error(unique, err)])
        else:
            self._commit(ref, unique, err, 0)

    def _send_exc(self, ref: int, unique: int, exc: BaseException, what: str) -> None:
        err = errno_of(exc)
        if isinstance(exc, BlktapError):  # refused at the VBD's entry, or its state
            self._log.debug("%s failed: %s", what, exc)
        elif isinstance(exc, OSError):  # the image's storage failed
            self._log.warning("%s failed: %s", what, exc)
        else:
            self._log.error("%s failed", what, exc_info=exc)
        self._send_errno(ref, unique, err)

    # --------------------------------------------------------------- data path
    def _read(self, ref: int, unique: int, nodeid: int, offset: int, size: int) -> None:
        if nodeid not in _DATA_IDS:
            self._send_errno(ref, unique,
                             errno.EISDIR if nodeid == fuse.ROOT_ID else errno.ENOENT)
            return
        if size > MAX_IO:
            self._send_errno(ref, unique, errno.EINVAL)
            return
        end = offset + size
        if end > self._size:
            end = self._size
            if offset >= end:  # at or past the end of the file: a short (empty) read
                self._send_reply(ref, unique)
                return
        length = end - offset
        # Through the ring the data goes straight into the entry's payload buffer.
        buf = self._buffers.get(length) if ref < 0 else self._ring_payloads[ref][:length]
        self.inflight += 1
        stats = self.stats
        stats[0] += 1
        if length > stats[1]:
            stats[1] = length

        def done(_result: object, exc: BaseException | None) -> None:
            if exc is not None:
                self._send_exc(ref, unique, exc, f"read {offset}+{length}")
            elif ref < 0:
                self._send([_pack_out(_OUT_SIZE + length, 0, unique), buf])
            else:
                self._commit(ref, unique, 0, length)
            if ref < 0:
                self._buffers.put(buf)
            self._finished()

        eager.start(self._vbd.read(offset, buf), done)

    def _write(self, ref: int, unique: int, nodeid: int, offset: int, data: memoryview,
               pooled: memoryview | None = None) -> bool:
        """Start the WRITE of ``data``; True when it still runs (and keeps ``data``).
        ``pooled``: the buffer holding ``data``, back to the pool when a write that
        waited is done."""
        size = len(data)
        if nodeid not in _DATA_IDS:
            self._send_errno(ref, unique, errno.EBADF)
            return False
        stats = self.stats
        stats[2] += 1
        if size > stats[3]:
            stats[3] = size
        running = [True]
        self.inflight += 1

        def done(_result: object, exc: BaseException | None) -> None:
            if exc is not None:
                self._send_exc(ref, unique, exc, f"write {offset}+{size}")
            elif ref < 0:
                self._send([_pack_write_reply(_WRITE_REPLY_SIZE, 0, unique, size, 0)])
            else:
                _pack_write_out_into(self._ring_payloads[ref], 0, size, 0)
                self._commit(ref, unique, 0, _WRITE_OUT_SIZE)
            if not running[0] and pooled is not None:
                self._buffers.put(pooled)
            running[0] = False
            self._finished()

        eager.start(self._vbd.write(offset, data), done)
        if running[0]:
            running[0] = False
            return True
        return False

    # ----------------------------------------------------------- other requests
    def _body(self, n: int) -> memoryview:
        head_args = fuse.WRITE_HEAD_SIZE - fuse.IN_HEADER.size
        if n <= fuse.WRITE_HEAD_SIZE:
            return self._head[fuse.IN_HEADER.size : n]
        joined = bytes(self._head[fuse.IN_HEADER.size :]) + bytes(
            self._data[: n - fuse.IN_HEADER.size - head_args])
        return memoryview(joined)

    def _other(self, ref: int, opcode: int, unique: int, nodeid: int, pid: int,
               body_or_n: memoryview | int) -> None:
        if opcode in fuse.NO_REPLY:
            # FORGET/BATCH_FORGET: our two inodes live as long as the mount.
            # INTERRUPT: requests here cannot be cancelled; they finish and reply.
            return
        body = self._body(body_or_n) if isinstance(body_or_n, int) else body_or_n
        if opcode == Opcode.FSYNC and pid == self.hold_tid:
            # util-linux fallocate, the holder, fsyncs before it exits: nothing of ours
            # to flush, and the VBD may still be paused (a destroy while paused).
            self._send_reply(ref, unique)
            return
        if opcode == Opcode.FALLOCATE and self._is_hold(pid, body):
            # Tapdisk's own request, sent with the file's inode lock held: not answered
            # until release_hold, so that passthrough writes wait in the kernel.
            self.hold_unique = unique
            self.hold_ref = ref
            if self.hold_taken is not None and not self.hold_taken.done():
                self.hold_taken.set_result(None)
            return
        sync_op = self._sync_ops.get(opcode)
        if sync_op is not None:
            try:
                payload = sync_op(nodeid, body)
            except (BlktapError, OSError) as exc:
                self._send_exc(ref, unique, exc, _opname(opcode))
                return
            self._send_reply(ref, unique, payload)
            return
        async_op = self._async_ops.get(opcode)
        if async_op is None:
            self._send_errno(ref, unique, errno.ENOSYS)
            return
        try:
            coro = async_op(nodeid, body)
        except (BlktapError, OSError) as exc:
            self._send_exc(ref, unique, exc, _opname(opcode))
            return
        self.inflight += 1

        def done(result: Payload | None, exc: BaseException | None) -> None:
            if exc is None:
                self._send_reply(ref, unique, result or b"")
            else:
                self._send_exc(ref, unique, exc, _opname(opcode))
            self._finished()

        eager.start(coro, done)

    def _is_hold(self, pid: int, body: memoryview) -> bool:
        if len(body) < fuse.FALLOCATE_IN.size:
            return False
        if pid != self.hold_tid and not (self.hold_spawning and _parent_of(pid) == os.getpid()):
            return False
        req = fuse.FallocateIn.decode(body)
        if req.offset != _HOLD_OFFSET or req.mode != _HOLD_MODE:
            return False
        self.hold_tid = pid
        return True

    def release_hold(self) -> None:
        """Answer the holding FALLOCATE (if any): the kernel lets the held writes go."""
        unique, self.hold_unique = self.hold_unique, None
        if unique is not None:
            self._send_reply(self.hold_ref, unique)

    def _attr(self, nodeid: int) -> fuse.Attr:
        if nodeid == FILE_ID:
            return self._file
        if nodeid == SERVED_ID:
            return self._served
        if nodeid == fuse.ROOT_ID:
            return self._root
        raise BlktapError(f"no inode {nodeid}", errno=errno.ENOENT)

    def _init(self, _nodeid: int, body: memoryview) -> Payload:
        init = fuse.InitIn.decode(body)
        if init.major != fuse.KERNEL_MAJOR:
            raise ProtocolError(f"FUSE protocol {init.major}.{init.minor} is not 7.x",
                                errno=errno.EPROTO)
        want = (fuse.InitFlag.ASYNC_READ | fuse.InitFlag.BIG_WRITES | fuse.InitFlag.ASYNC_DIO
                | fuse.InitFlag.MAX_PAGES)
        flags = init.flags & want
        depth = 0
        if self._want_passthrough and init.flags & fuse.INIT_PASSTHROUGH:
            flags |= fuse.INIT_PASSTHROUGH | fuse.InitFlag.INIT_EXT
            depth = fuse.MAX_STACK_DEPTH
            self.passthrough = True
        if self.ring is not None and init.flags & fuse_uring.INIT_OVER_IO_URING:
            # From now on the kernel holds every request until the ring is registered.
            flags |= fuse_uring.INIT_OVER_IO_URING | fuse.InitFlag.INIT_EXT
            self.uring = True
        minor = min(init.minor, fuse.KERNEL_MINOR)
        self.initialized = True
        if not self.init_done.done():
            self.init_done.set_result(None)
        self._log.debug("FUSE %d.%d negotiated, flags %#x", fuse.KERNEL_MAJOR, minor, flags)
        return fuse.encode_init_out(
            minor, init.max_readahead, flags, max_background=MAX_BACKGROUND,
            congestion_threshold=MAX_BACKGROUND * 3 // 4, max_write=MAX_IO,
            max_pages=MAX_IO // 4096, max_stack_depth=depth)

    def _lookup(self, nodeid: int, body: memoryview) -> Payload:
        name = fuse.decode_name(body)
        if nodeid == fuse.ROOT_ID and name == FILE_NAME.encode():
            return fuse.encode_entry_out(self._file, ATTR_VALID_SECONDS)
        if nodeid == fuse.ROOT_ID and name == SERVED_NAME.encode():
            return fuse.encode_entry_out(self._served, ATTR_VALID_SECONDS)
        raise BlktapError(f"no {name!r} in inode {nodeid}", errno=errno.ENOENT)

    def _getattr(self, nodeid: int, _body: memoryview) -> Payload:
        return fuse.encode_attr_out(self._attr(nodeid), ATTR_VALID_SECONDS)

    def _setattr(self, nodeid: int, body: memoryview) -> Payload:
        attr = self._attr(nodeid)
        req = fuse.SetattrIn.decode(body)
        valid = fuse.SetattrValid(req.valid)
        if valid & fuse.SetattrValid.SIZE and req.size != attr.size:
            raise BlktapError(f"the size of the device is fixed ({attr.size} bytes)",
                              errno=errno.EPERM)
        changes = fuse.SetattrValid.MODE | fuse.SetattrValid.UID | fuse.SetattrValid.GID
        if valid & changes:
            raise BlktapError("owner and mode are fixed", errno=errno.EPERM)
        # Times (touch) are accepted and forgotten.
        return fuse.encode_attr_out(attr, ATTR_VALID_SECONDS)

    def _open(self, nodeid: int, body: memoryview) -> Payload:
        flags = fuse.decode_open_flags(body)
        if nodeid not in _DATA_IDS:
            raise BlktapError("not a file", errno=errno.EISDIR)
        if self._read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise BlktapError("the device is read-only", errno=errno.EROFS)
        if self.backing_id is not None and nodeid == FILE_ID:
            # Every open of an inode in passthrough mode must name the same backing file.
            return fuse.encode_open_out(0, fuse.OpenFlag.PASSTHROUGH, self.backing_id)
        return fuse.encode_open_out(0, self._open_flags)

    def _opendir(self, nodeid: int, body: memoryview) -> Payload:
        fuse.decode_open_flags(body, Opcode.OPENDIR)
        if nodeid != fuse.ROOT_ID:
            raise BlktapError("not a directory", errno=errno.ENOTDIR)
        return fuse.encode_open_out(0, 0)

    def _readdir(self, nodeid: int, body: memoryview) -> Payload:
        if nodeid != fuse.ROOT_ID:
            raise BlktapError("not a directory", errno=errno.ENOTDIR)
        offset, size = fuse.decode_read_size(body, Opcode.READDIR)
        entries = ((fuse.ROOT_ID, b".", fuse.DT_DIR), (fuse.ROOT_ID, b"..", fuse.DT_DIR),
                   (FILE_ID, FILE_NAME.encode(), fuse.DT_REG))
        out = b""
        for index in range(offset, len(entries)):
            ino, name, dtype = entries[index]
            dirent = fuse.encode_dirent(ino, index + 1, name, dtype)
            if len(out) + len(dirent) > size:
                break
            out += dirent
        return out

    def _statfs(self, _nodeid: int, _body: memoryview) -> Payload:
        return fuse.encode_statfs_out(blocks=-(-self._size // FILE_BLKSIZE), bsize=FILE_BLKSIZE,
                                      files=2)

    @staticmethod
    def _nothing(_nodeid: int, _body: memoryview) -> Payload:
        return b""

    @staticmethod
    def _no_namespace_change(_nodeid: int, _body: memoryview) -> Payload:
        raise BlktapError("the filesystem holds exactly one file", errno=errno.EPERM)

    def _fsync(self, nodeid: int, _body: memoryview) -> Coroutine[Any, Any, Payload]:
        if nodeid not in _DATA_IDS:
            return _done_payload()
        return self._flush()

    async def _flush(self) -> Payload:
        await self._vbd.flush()
        return b""

    def _fallocate(self, nodeid: int, body: memoryview) -> Coroutine[Any, Any, Payload]:
        req = fuse.FallocateIn.decode(body)
        if nodeid not in _DATA_IDS:
            raise BlktapError("not a file", errno=errno.EISDIR)
        mode = req.mode
        end = req.offset + req.length
        if mode & ~(fuse.FALLOC_FL_KEEP_SIZE | fuse.FALLOC_FL_PUNCH_HOLE
                    | fuse.FALLOC_FL_ZERO_RANGE):
            raise BlktapError(f"fallocate mode {mode:#x} not supported", errno=errno.EOPNOTSUPP)
        if mode & fuse.FALLOC_FL_PUNCH_HOLE and mode & fuse.FALLOC_FL_ZERO_RANGE:
            raise InvalidArgument("fallocate: PUNCH_HOLE and ZERO_RANGE together")
        if not mode & (fuse.FALLOC_FL_PUNCH_HOLE | fuse.FALLOC_FL_ZERO_RANGE):
            # Plain allocation: every byte inside the device already exists.
            if end > self._size and not mode & fuse.FALLOC_FL_KEEP_SIZE:
                raise BlktapError("the size of the device is fixed", errno=errno.EFBIG)
            return _done_payload()
        # The loop driver punches holes for discard *and* for write-zeroes with unmap
        # (and uses ZERO_RANGE for write-zeroes without unmap): both must read back as
        # zeros afterwards, as fallocate(2) promises, so both become write_zeroes; the
        # image may deallocate on PUNCH_HOLE.
        length = min(end, self._size) - req.offset
        if length <= 0:
            return _done_payload()
        if not self._vbd.capabilities.zero:  # the stack does not serve write-zeroes
            raise BlktapError("zeroing is not supported here", errno=errno.EOPNOTSUPP)
        return self._zero(req.offset, length, bool(mode & fuse.FALLOC_FL_PUNCH_HOLE))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> Payload:
        await self._vbd.write_zeroes(offset, length, may_unmap=may_unmap, fua=False)
        return b""


async def _done_payload() -> Payload:
    return b""


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


# ------------------------------------------------------------------ the frontend
@dataclass(frozen=True, slots=True)
class BlockDeviceStatistics:
    loop_device: str | None
    direct_io: bool
    inflight: int
    """FUSE requests received and not answered yet."""
    reads: int
    writes: int
    largest_read: int
    """Bytes in the largest READ the kernel sent (shows the negotiated limit at work)."""
    largest_write: int
    io_path: str = IO_FUSE
    """``passthrough``: the kernel reads and writes the image file itself and the counts
    above stay at zero for that I/O (``loop_*`` count it); ``fuse``: tapdisk serves
    every request."""
    passthrough_reason: str = ""
    """Why the I/O path is ``fuse`` (empty with passthrough)."""
    loop_reads: int = 0
    """The loop device's completed requests and sectors (/sys/block/loopN/stat): with
    passthrough, the only count of the I/O that bypasses tapdisk."""
    loop_read_sectors: int = 0
    loop_writes: int = 0
    loop_write_sectors: int = 0
    held: bool = False
    """Writes are held in the kernel for a pause (passthrough only)."""
    uring_reason: str = ""
    """Why the requests do not come through io_uring (empty when they do: ``io_path``
    ``fuse-uring``; also with passthrough when the ring is there for what remains)."""
    uring_entries: int = 0
    """Ring entries registered with the kernel (queues x depth), 0 without the ring."""
    ring_requests: int = 0
    """Requests that came through the ring (the others through ``/dev/fuse``)."""

    def as_dict(self) -> dict[str, object]:
        return {"loop_device": self.loop_device, "direct_io": self.direct_io,
                "io_path": self.io_path, "passthrough_reason": self.passthrough_reason,
                "uring_reason": self.uring_reason, "uring_entries": self.uring_entries,
                "fuse_ring_requests": self.ring_requests,
                "held": self.held, "fuse_inflight": self.inflight,
                "fuse_reads": self.reads, "fuse_writes": self.writes,
                "fuse_largest_read": self.largest_read,
                "fuse_largest_write": self.largest_write,
                "loop_reads": self.loop_reads, "loop_read_sectors": self.loop_read_sectors,
                "loop_writes": self.loop_writes,
                "loop_write_sectors": self.loop_write_sectors}


class BlockDevice:
    """The kernel block device of one VBD: FUSE file + loop device + published link.

    ``start`` mounts ``<run_dir>/fuse/<minor>/``, binds a loop device to its ``disk``
    file and links ``<dev_dir>/tapdev<minor>`` to it. ``stop`` undoes all of it. The VBD
    must be open (its size is read at ``start`` and must not change until ``stop``).

    **Passthrough.** Where the VBD is one raw file (``aio``) and no layer must see its
    requests (the Capabilities routes allow ``direct`` for reads, and for writes unless
    read-only), the kernel offers FUSE passthrough and BLKTAP_FUSE_PASSTHROUGH is not
    ``off``, the file is registered with FUSE_DEV_IOC_BACKING_OPEN and opened with
    FOPEN_PASSTHROUGH: the loop device's reads and writes go to the image file in the
    kernel, never to tapdisk (flush and discard still come to tapdisk). Passthrough is
    per open file, for reads and writes together, and lasts as long as the loop device
    holds the file open, i.e. the device's life: the kernel offers no way to revoke it,
    and a read-write loop device cannot change its file (LOOP_CHANGE_FD is for read-only
    devices). What a pause can do then (:meth:`hold_io`): tapdisk sends itself a
    FALLOCATE that the kernel sends with the FUSE inode's lock held, and answers it at
    resume; a passthrough write takes that lock, so writes, flushes and discards wait in
    the kernel, and with them any read the loop device queued behind a waiting write;
    writes already started are waited for where the image's filesystem allows
    (:func:`_wait_direct_io`: ext4, XFS).
    Reads that arrive alone still reach the image file, which the kernel keeps open while
    paused. A resume must land on the same file with the same routes (:meth:`resumed`
    refuses any other). A read-only device does better: LOOP_CHANGE_FD moves it onto
    a second name of the file that tapdisk serves (``disk.served``), so that a pause holds
    every request and lets the image file go, and a resume moves it back, onto whichever
    file the VBD then has. Otherwise (``fuse``) every request goes through tapdisk.
    """

    BUSY_TIMEOUT = 2.0
    """How long ``stop`` waits for the loop device to let go of the file."""

    def __init__(self, vbd: VBD, minor: int, *, run_dir: str, dev_dir: str,
                 direct_io: bool = True, fuse_direct_io: bool = True) -> None:
        """``direct_io``: ask for a direct-I/O loop device (no page cache above the
        FUSE file). ``fuse_direct_io``: open the FUSE file with FOPEN_DIRECT_IO (no page
        cache in the FUSE file itself, even for buffered openers)."""
        self.vbd = vbd
        self.minor = minor
        # Resolved, as the kernel shows the loop device's backing file.
        self.mountpoint = os.path.join(os.path.realpath(run_dir), "fuse", str(minor))
        self.file_path = os.path.join(self.mountpoint, FILE_NAME)
        self.served_path = os.path.join(self.mountpoint, SERVED_NAME)
        self.dev_dir = dev_dir
        self.path = os.path.join(dev_dir, f"tapdev{minor}")
        self.loop_device: str | None = None
        self.direct_io = False
        self._want_direct = direct_io
        self._open_flags = fuse.OpenFlag.PARALLEL_DIRECT_WRITES | (
            fuse.OpenFlag.DIRECT_IO if fuse_direct_io else 0)
        self._session: _FuseSession | None = None
        self._clearing: asyncio.Future[None] | None = None
        self._backing = self.file_path
        self.io_path = IO_FUSE
        self.passthrough_reason = "not started"
        self._passthrough_mode = passthrough_mode()
        self._uring_mode = uring_mode()
        self._ring: FuseRing | None = None
        self.uring_reason = "not started"
        self._backing_key: tuple[int, int] | None = None
        self._holder: asyncio.subprocess.Process | None = None  # sends the hold
        self._holder_exit: asyncio.Future[int] | None = None
        self._loop_base = (0, 0, 0, 0, 0)  # the loop device's counters when bound
        self._swapped = False  # a read-only device moved onto SERVED_NAME for a pause
        self._mounted = False
        self._linked = False
        self._started = False
        self.log = logging.LoggerAdapter(log, vbd.log_context)

    def statistics(self) -> BlockDeviceStatistics:
        """Counters of the FUSE data requests served since ``start``."""
        session = self._session
        loop = [0, 0, 0, 0]
        if self.loop_device is not None:
            now = loop_counters(self.loop_device)
            loop = [now[i] - self._loop_base[i] for i in range(4)]
        counts = session.stats if session is not None else [0, 0, 0, 0]
        reads, largest_read, writes, largest_write = counts
        return BlockDeviceStatistics(
            self.loop_device, self.direct_io, session.inflight if session else 0,
            reads, writes, largest_read, largest_write, self.io_path,
            self.passthrough_reason, loop[0], loop[1], loop[2], loop[3],
            self._swapped or (session is not None and session.hold_unique is not None),
            self.uring_reason, self._ring.live if self._ring is not None else 0,
            session.ring_requests if session is not None else 0)

    def report(self) -> dict[str, object]:
        """What STATS adds for this device (``blockdev``): the I/O path and counters."""
        return {"path": self.path, **self.statistics().as_dict()}

    @property
    def inflight(self) -> int:
        """FUSE requests received and not answered yet."""
        return self._session.inflight if self._session is not None else 0

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether this host can make the device: ``(True, "")`` or ``(False, reason)``."""
        if os.geteuid() != 0:
            return False, "mounting FUSE and binding loop devices needs root"
        if not os.path.exists("/dev/fuse"):
            return False, "/dev/fuse is missing (no fuse module)"
        if not os.path.exists("/dev/loop-control"):
            return False, "/dev/loop-control is missing (no loop module)"
        return True, ""

    # ------------------------------------------------------------------- start
    async def start(self) -> str:
        """Create and publish the device; return its path ``<dev_dir>/tapdev<minor>``.

        Raises BlktapError (EOPNOTSUPP when the host cannot, EBUSY when started twice)
        or OSError. On failure everything set up so far is undone.
        """
        ok, why = self.available()
        if not ok:
            raise BlktapError(f"no kernel block device on this host: {why}",
                              errno=errno.EOPNOTSUPP)
        if self._started:
            raise Busy(f"minor {self.minor}: block device already started")
        self._started = True
        try:
            await self._start()
        except BaseException:
            try:
                await self._teardown(force=True)
            except Exception:
                self.log.exception("cleaning up after a failed start")
            else:
                self._started = False
            raise
        self.log.info("block device %s -> %s (%s, direct I/O %s)", self.path,
                      self.loop_device, "read-only" if self.vbd.read_only else "read-write",
                      "on" if self.direct_io else "off")
        return self.path

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(self.mountpoint), mode=0o700, exist_ok=True)
        for stale in loops_backed_by(self.file_path) + loops_backed_by(self.served_path):
            # Left by a tapdisk that died: its I/O fails at once, so clearing is quick;
            # if something still holds it open it detaches on its last close.
            self.log.warning("detaching %s, left on %s by a previous tapdisk", stale,
                             self.file_path)
            await loop.run_in_executor(None, _loop_clear, stale)
        if _mounted(self.mountpoint):
            # Left by a tapdisk that died: its connection is dead, take the place.
            self.log.warning("%s: lazily unmounting a stale mount", self.mountpoint)
            _umount(self.mountpoint, _MNT_DETACH)
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        # The ring exists before INIT: the INIT reply offers it only if it does.
        self._ring = self._make_ring(loop)
        self._session = _FuseSession(fd, self.vbd, self.log, open_flags=self._open_flags,
                                     passthrough=self._passthrough_mode is not PassthroughMode.OFF,
                                     ring=self._ring)
        options = (f"fd={fd},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,allow_other,"
                   "default_permissions")
        # Mounting queues INIT and returns; nothing here waits for the server.
        _mount("blktap", self.mountpoint, "fuse.blktap", _MS_NOSUID | _MS_NODEV, options)
        self._mounted = True
        # This thread runs the event loop that serves the FUSE requests.
        _become_io_flusher()
        self._session.start_reading()
        await asyncio.wait_for(asyncio.shield(self._session.init_done), _WAIT_TIMEOUT)
        self._start_ring()
        self._setup_passthrough()
        try:
            await self._attach()
        except OSError as exc:
            if self._session.backing_id is None:
                raise
            # The kernel refused the passthrough open: serve the file ourselves.
            self._drop_passthrough(f"passthrough open refused: {exc.strerror}")
            await self._attach()
        if self._session.backing_id is not None:
            self.io_path = IO_PASSTHROUGH
            self.passthrough_reason = ""
        else:
            self.io_path = self._served_io_path()
        assert self.loop_device is not None
        self._loop_base = loop_counters(self.loop_device)
        self.direct_io = loop_direct_io(self.loop_device)
        self._backing = loop_backing_file(self.loop_device) or self.file_path
        os.makedirs(self.dev_dir, mode=0o755, exist_ok=True)
        _publish(self.loop_device, self.path)
        self._linked = True

    async def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        attach = loop.run_in_executor(None, _loop_attach, self.file_path,
                                      self.vbd.read_only, self._want_direct)
        try:
            self.loop_device = await asyncio.shield(attach)
        except asyncio.CancelledError:
            # The thread goes on: let it finish so that teardown can detach its device.
            await asyncio.wait([attach])
            if not attach.cancelled() and attach.exception() is None:
                self.loop_device = attach.result()
            raise

    # --------------------------------------------------------- FUSE over io_uring
    def _served_io_path(self) -> str:
        """The I/O path when tapdisk serves the requests."""
        return IO_FUSE_URING if self._ring is not None else IO_FUSE

    def _uring_refused(self, why: str) -> None:
        """Record why the requests do not come through io_uring; with
        BLKTAP_FUSE_URING=on, fail the start instead (BlktapError, EOPNOTSUPP)."""
        if self._uring_mode is UringMode.ON:
            raise BlktapError(f"{self.path}: {URING_ENV}=on but FUSE over io_uring is "
                              f"unavailable: {why}", errno=errno.EOPNOTSUPP)
        self.uring_reason = why
        if self._uring_mode is UringMode.AUTO:
            self.log.info("%s: FUSE over io_uring off: %s", self.path, why)

    def _make_ring(self, loop: asyncio.AbstractEventLoop) -> FuseRing | None:
        """The ring entries to offer at INIT, or None (with the reason recorded)."""
        if self._uring_mode is UringMode.OFF:
            self._uring_refused(f"{URING_ENV}=off" if os.environ.get(URING_ENV)
                                else f"off by default ({URING_ENV}=auto or on enables it)")
            return None
        parameter = uring_parameter()
        if parameter is None:
            self._uring_refused("this kernel has no FUSE over io_uring (no "
                                f"{URING_PARAMETER})")
            return None
        if parameter != "Y":
            self._uring_refused(f"the fuse module parameter enable_uring is {parameter} "
                                f"(root turns it on: echo Y > {URING_PARAMETER})")
            return None
        try:
            return FuseRing.create(loop, queues=possible_cpus(), depth=URING_DEPTH,
                                   payload_size=fuse_uring.payload_size(MAX_IO, MAX_IO // 4096))
        except OSError as exc:
            self._uring_refused(f"cannot make an io_uring: {exc.strerror}")
            return None

    def _start_ring(self) -> None:
        """After INIT: hand the ring's entries to the kernel, or fall back to
        ``/dev/fuse`` (raising instead with BLKTAP_FUSE_URING=on)."""
        ring, session = self._ring, self._session
        if ring is None or session is None:
            return
        if not session.uring:
            self._close_ring()
            self._uring_refused("the kernel did not offer FUSE_OVER_IO_URING at INIT")
            return
        ring.on_request = session.on_ring_request
        try:
            ring.register(session.fd)
        except OSError as exc:
            # A refused REGISTER turns the connection back to /dev/fuse (fc->io_uring).
            self._close_ring()
            self._uring_refused(f"the kernel refused the ring entries: {exc.strerror}")
            return
        self.uring_reason = ""
        self.log.info("%s: FUSE requests through io_uring (%d queues x %d entries)",
                      self.path, ring.queues, ring.depth)

    def _close_ring(self) -> None:
        if self._session is not None:
            self._session.ring = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    # ------------------------------------------------------------- passthrough
    def _passthrough_refusal(self) -> tuple[str, str | None]:
        """``(reason, None)`` when the VBD cannot use passthrough now, else
        ``("", image path)``."""
        mode = self._passthrough_mode
        if mode is PassthroughMode.OFF:
            return f"{PASSTHROUGH_ENV}=off", None
        session = self._session
        if session is None or not session.passthrough:
            return "the kernel does not offer FUSE passthrough", None
        chain = self.vbd.chain
        if chain is None or len(chain.images) != 1 or chain.images[0].type_name != "aio":
            return "the image is not one raw file (aio)", None
        caps = self.vbd.capabilities
        # The ``direct`` route: past every layer to the one image. A layer that must see
        # writes (a changed-block log) or everything turns it off.
        if not caps.reads.direct or (not self.vbd.read_only and not caps.writes.direct):
            return "a layer must see every request", None
        if mode is PassthroughMode.AUTO and not self.vbd.read_only:
            # A read-write passthrough device cannot hold every request while paused
            # nor change its file at resume (the storage manager's live snapshot).
            return (f"read-write device ({PASSTHROUGH_ENV}=on lets read-write devices "
                    "use passthrough, with a weaker pause)"), None
        return "", chain.images[0].path

    def _setup_passthrough(self) -> None:
        """Register the image file as the FUSE file's backing file, or say why not."""
        session = self._session
        assert session is not None
        why, path = self._passthrough_refusal()
        if path is None:
            self.passthrough_reason = why
            return
        try:
            fd = os.open(path, (os.O_RDONLY if self.vbd.read_only else os.O_RDWR)
                         | os.O_CLOEXEC)
        except OSError as exc:
            self.passthrough_reason = f"opening {path}: {exc.strerror}"
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.passthrough_reason = "the image is not a regular file"
                return
            # A mutable argument makes ioctl return the call's result: the backing id.
            arg = bytearray(fuse.encode_backing_map(fd))
            backing_id = fcntl.ioctl(session.fd, fuse.FUSE_DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as exc:
            self.passthrough_reason = f"FUSE_DEV_IOC_BACKING_OPEN: {exc.strerror}"
            return
        finally:
            os.close(fd)  # the kernel holds its own reference
        session.backing_id = int(backing_id)
        self._backing_key = (st.st_dev, st.st_ino)

    def _drop_passthrough(self, why: str) -> None:
        session = self._session
        if session is not None and session.backing_id is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(session.fd, fuse.FUSE_DEV_IOC_BACKING_CLOSE,
                            bytearray(fuse.BACKING_ID.pack(session.backing_id)), True)
            session.backing_id = None
        self.io_path = self._served_io_path()
        self.passthrough_reason = why
        self.log.info("%s: FUSE passthrough off: %s", self.path, why)

    async def hold_io(self) -> None:
        """Before the VBD pauses: hold passthrough writes in the kernel (see the class
        docstring). Does nothing without passthrough, for a read-only VBD, or when
        already holding. Raises BlktapError (EIO) when the hold does not take.

        The holding FALLOCATE comes from a child process, never from a thread of ours:
        a thread waiting for its own process's reply cannot exit, so a tapdisk killed
        while holding would never finish dying (its /dev/fuse descriptor stays open).
        When tapdisk dies, the connection aborts and the child's request fails, which
        lets the held writes go.
        """
        session = self._session
        if self.io_path != IO_PASSTHROUGH or session is None or self._holder is not None:
            return
        loop = asyncio.get_running_loop()
        if self.vbd.read_only:
            if not self._swapped and self.loop_device is not None:
                # A read-only device can change its file: onto the served name, whose
                # reads wait for the paused VBD, and the image file is let go.
                await loop.run_in_executor(None, _loop_change_fd, self.loop_device,
                                           self.served_path, self.direct_io)
                self._swapped = True
                self._backing = loop_backing_file(self.loop_device) or self.served_path
                self.log.info("%s: served by tapdisk while paused", self.path)
            return
        session.hold_taken = loop.create_future()
        tool = shutil.which("fallocate")
        argv = ([tool, "--keep-size", "--punch-hole", "--offset", str(_HOLD_OFFSET),
                 "--length", "4096", self.file_path] if tool else
                [sys.executable, "-c", _HOLD_SCRIPT, self.file_path])
        # The holder's FALLOCATE can arrive while this awaits its start (the event loop
        # serves /dev/fuse meanwhile): hold_spawning lets _is_hold know it by its parent.
        session.hold_spawning = True
        try:
            holder = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        finally:
            session.hold_spawning = False
        session.hold_tid = holder.pid
        exited = asyncio.ensure_future(holder.wait())
        waiters: list[asyncio.Future[Any]] = [session.hold_taken, exited]
        done, _ = await asyncio.wait(waiters, timeout=_WAIT_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if session.hold_taken.done():
            self._holder = holder
            self._holder_exit = exited
            # No passthrough write starts now; those already started may still be in
            # flight on the image file: wait for them where the filesystem can.
            chain = self.vbd.chain
            if chain is not None:
                await loop.run_in_executor(None, _wait_direct_io, chain.images[0].path)
            self.log.info("%s: passthrough writes held", self.path)
            return
        session.hold_tid = -1
        if exited not in done:
            holder.kill()
        await exited
        err = b""
        if holder.stderr is not None:
            err = await holder.stderr.read()
        raise BlktapError(f"{self.path}: cannot hold passthrough writes: "
                          f"{err.decode(errors='replace').strip() or 'no answer'}",
                          errno=errno.EIO)

    async def resumed(self) -> None:
        """After the VBD resumed: let held writes go if the device can follow the new
        stack. Raises Busy (holding on) when it cannot: passthrough goes to the file the
        device started on, which the new stack no longer is, or a layer of the new stack
        must see every request. A read-only device always follows: back to passthrough
        on the new stack's file where it can, else served by tapdisk from now on."""
        if self.io_path != IO_PASSTHROUGH:
            return
        if self._swapped:
            await self._resume_read_only()
            return
        why, path = self._passthrough_refusal()
        if path is not None:
            try:
                st = os.stat(path)
            except OSError as exc:
                why = f"{path}: {exc.strerror}"
            else:
                if (st.st_dev, st.st_ino) != self._backing_key:
                    why = f"{path} is not the file the device passes I/O through to"
        if why:
            raise Busy(f"{self.path}: the kernel passes this device's I/O through to its "
                       f"image file and cannot change that ({why}); destroy and recreate "
                       f"the device, or create it with {PASSTHROUGH_ENV}=off")
        self._release_hold()

    async def _resume_read_only(self) -> None:
        session = self._session
        assert session is not None and self.loop_device is not None
        self._swapped = False  # resumed: on whichever file, the device no longer waits
        why, path = self._passthrough_refusal()
        if path is not None:
            try:
                st = os.stat(path)
            except OSError as exc:
                why = f"{path}: {exc.strerror}"
            else:
                if (st.st_dev, st.st_ino) != self._backing_key:
                    self._drop_passthrough("the image file changed")
                    self._setup_passthrough()
                    why = self.passthrough_reason if session.backing_id is None else ""
        if why:
            self._drop_passthrough(why)
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, _loop_change_fd, self.loop_device, self.file_path, self.direct_io)
        except OSError as exc:
            self._drop_passthrough(f"back to passthrough: {exc.strerror}")
            return
        self.io_path = IO_PASSTHROUGH
        self.passthrough_reason = ""
        self._backing = loop_backing_file(self.loop_device) or self.file_path
        self.log.info("%s: passthrough again", self.path)

    def _release_hold(self) -> None:
        if self._session is not None and self._session.hold_unique is not None:
            self._session.release_hold()
            self.log.info("%s: passthrough writes released", self.path)
        session, exited = self._session, self._holder_exit
        if session is not None and exited is not None:
            # Its FSYNC is answered at once until it has exited, not after: the thread
            # id may be reused.
            tid = session.hold_tid

            def forget(_done: asyncio.Future[int]) -> None:
                if session.hold_tid == tid:
                    session.hold_tid = -1

            exited.add_done_callback(forget)
        self._holder = None  # it exits once answered; asyncio reaps it
        self._holder_exit = None

    # -------------------------------------------------------------------- stop
    async def stop(self, force: bool = False) -> None:
        """Withdraw the device: unlink, detach the loop device, unmount, remove the dir.

        Waits for in-flight FUSE requests. Raises Busy, changing nothing, when the device
        is mounted or otherwise held exclusively, or when I/O waits for a paused VBD.
        Raises Busy after unlinking and marking the loop device to detach on its last
        close when, after BUSY_TIMEOUT, a process still has it open or its I/O has not
        finished; the FUSE file is still served then, and calling ``stop`` again later
        finishes the job. With ``force`` nothing is refused: the FUSE connection is
        aborted instead, and remaining users of the loop device get I/O errors.
        Stopping a stopped device does nothing.
        """
        if not self._started:
            return
        await self._teardown(force)
        self._started = False
        self.log.info("block device %s removed", self.path)

    async def _teardown(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        device = self.loop_device
        session = self._session
        if device is not None:
            if not force:
                if await loop.run_in_executor(None, _loop_claimed, device):
                    raise Busy(f"{self.path} ({device}) is in use (mounted or claimed)")
                if session is not None and session.inflight and not self._vbd_running():
                    raise Busy(f"{self.path}: I/O is waiting for the paused VBD")
                if session is not None and session.hold_unique is not None \
                        and loop_counters(device)[4]:
                    raise Busy(f"{self.path}: I/O is held for the paused VBD")
            # Held passthrough writes cannot be failed: released, they reach the image.
            self._release_hold()
            self._unlink()
            if self._clearing is None or self._clearing.done():
                self._clearing = loop.run_in_executor(None, _loop_clear, device)
            # Clearing waits for the loop device's I/O in flight, served by us; that I/O
            # may wait for a paused VBD.
            done, _ = await asyncio.wait([self._clearing], timeout=self.BUSY_TIMEOUT)
            if not done:
                if not force:
                    raise Busy(f"{device}: I/O in flight does not finish; the device "
                               "detaches when it does")
                self._abort("I/O in flight does not finish")
                await asyncio.wait([self._clearing])
            self._clearing.result()
            if not await self._released(device):
                if not force:
                    raise Busy(f"{device} is still open; it detaches when its last user "
                               "closes it")
                self._abort(f"{device} is still open")
            self.loop_device = None
        self._unlink()
        if self._mounted:
            if session is not None:
                session.stopping = True
                if not force:
                    try:
                        await asyncio.wait_for(session.wait_idle(), self.BUSY_TIMEOUT)
                    except TimeoutError:
                        raise Busy(f"{self.mountpoint}: FUSE requests in flight do not "
                                   "finish") from None
            await loop.run_in_executor(None, self._unmount, force)
            self._mounted = False
        if session is not None:
            session.close()
            self._session = None
        self._close_ring()
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.mountpoint)
        with contextlib.suppress(OSError):  # the last device of this run directory
            os.rmdir(os.path.dirname(self.mountpoint))

    def _vbd_running(self) -> bool:
        return self.vbd.state is VBDState.RUNNING

    def _abort(self, why: str) -> None:
        """Abort the FUSE connection: every request, waiting or future, fails (ENOTCONN)."""
        if self._session is not None and self._session.fd >= 0:
            self.log.warning("%s: %s, aborting the FUSE connection", self.path, why)
            self._session.close()

    def _unlink(self) -> None:
        if self._linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._linked = False

    async def _released(self, device: str) -> bool:
        """Wait up to BUSY_TIMEOUT for ``device`` to stop using our file."""
        deadline = time.monotonic() + self.BUSY_TIMEOUT
        while True:
            if loop_backing_file(device) != self._backing:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)

    def _unmount(self, force: bool) -> None:
        # A file the loop device just closed may still be held for a moment (the
        # kernel's deferred close): retry EBUSY briefly.
        deadline = time.monotonic() + self.BUSY_TIMEOUT
        while True:
            try:
                _umount(self.mountpoint, 0)
                return
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):  # not mounted any more
                    return
                if exc.errno != errno.EBUSY:
                    raise
                if time.monotonic() >= deadline:
                    break
            time.sleep(0.01)
        if not force:
            raise Busy(f"{self.mountpoint} is busy")
        with contextlib.suppress(OSError):
            _umount(self.mountpoint, _MNT_FORCE)  # aborts the FUSE connection
        with contextlib.suppress(OSError):
            _umount(self.mountpoint, _MNT_DETACH)


def _parent_of(pid: int) -> int:
    """The parent of process ``pid`` (/proc/PID/stat), or -1 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return -1
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat[stat.rindex(b")") + 2:].split()[1])
