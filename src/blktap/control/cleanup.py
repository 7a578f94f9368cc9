"""What a dead tapdisk leaves behind: found, shown and removed.

A tapdisk that is killed (SIGKILL, the OOM killer) cannot undo what it made. In the run
directory stay its control socket ``ctl<pid>`` and NBD sockets ``nbd<pid>.<minor>``, and
the marker of each minor it held (the minor is then an orphan, ``minor=N`` in ``list``,
as the C tap-ctl shows it). With a kernel block device also stay, per minor: the FUSE
mount ``<run>/fuse/<minor>`` (its connection is dead: every access fails ENOTCONN), the
loop device bound to the file ``disk`` in it, and the link ``<dev>/tapdev<minor>``.

A tapdisk is *dead* when its process is gone or nothing listens on its ``ctl<pid>``
(connect is refused: a reused pid is another process). A minor's leftovers are removed
only while no tapdisk holds the minor (its marker is not locked), and under the minors
directory's lock and the marker's own lock, so that no tapdisk can attach the minor and
mount in the same place meanwhile.

A loop device still in use (a file system on it is mounted, a process holds it open)
cannot be detached at once: it is marked to detach itself on its last close (the
kernel's autoclear), its FUSE mount is detached lazily, and it is reported as remaining,
with the mount points to unmount. Until then it fails every read and write (EIO); the
mounted file system can still be unmounted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from blktap.control import minors, spawn, supervise
from blktap.control.errors import MinorBusy
from blktap.control.rundir import MAX_MINOR, RunDir
from blktap.errors import BlktapError, NotFound

__all__ = [
    "Cleaned",
    "Leftovers",
    "LoopDevice",
    "clean_minor",
    "dead_pids",
    "find",
    "free",
    "is_dead",
    "orphan_leftovers",
    "remove_sockets",
    "sweep",
]

log = logging.getLogger(__name__)

FUSE_DIR = "fuse"
"""``<run>/fuse/<minor>``: where the block device frontend mounts a VBD's FUSE file."""

_FUSE_FILE = "disk"
_LOOP_CLR_FD = 0x4C01  # linux/loop.h
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_CTL_NAME = re.compile(r"ctl([0-9]+)")
_NBD_NAME = re.compile(r"nbd([0-9]+)\.([0-9]+)")


@dataclass(frozen=True)
class LoopDevice:
    """A loop device bound to a minor's FUSE file; ``mounted_at`` lists the mount points
    of file systems on it or its partitions; ``in_use``: held open exclusively or not."""

    device: str
    mounted_at: tuple[str, ...] = ()
    in_use: bool = False


@dataclass(frozen=True)
class Leftovers:
    """What dead tapdisks left for one minor. Empty when :attr:`empty`."""

    minor: int
    dead_pids: tuple[int, ...] = ()
    sockets: tuple[Path, ...] = ()
    mount: Path | None = None
    loops: tuple[LoopDevice, ...] = ()
    link: Path | None = None

    @property
    def empty(self) -> bool:
        return not (self.sockets or self.mount or self.loops or self.link)

    def paths(self) -> list[str]:
        """Every leftover as a path, for display."""
        out = [str(s) for s in self.sockets]
        out += [loop.device for loop in self.loops]
        if self.mount is not None:
            out.append(str(self.mount))
        if self.link is not None:
            out.append(str(self.link))
        return out


@dataclass
class Cleaned:
    """What a cleanup removed and what it had to leave (each a human-readable line)."""

    removed: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)

    def merge(self, other: Cleaned) -> None:
        self.removed += other.removed
        self.remaining += other.remaining


# ------------------------------------------------------------------ dead tapdisks


def is_dead(rundir: RunDir, pid: int) -> bool:
    """True if tapdisk ``pid`` cannot serve: its process is gone, or its ``ctl<pid>``
    socket is missing, or refuses connections while the pid names another program (a
    reused pid). A tapdisk that is starting refuses too, between binding its socket
    and listening on it: it is not dead."""
    if not spawn.is_running(pid):
        return True
    path = rundir.ctl_socket(pid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(1.0)
        sock.connect(str(path))
    except FileNotFoundError:
        return True
    except ConnectionRefusedError:
        return not _is_tapdisk(pid)
    except OSError:  # a full backlog, a timeout: somebody is there
        return False
    finally:
        sock.close()
    return False


def _is_tapdisk(pid: int) -> bool:
    """Whether process ``pid`` runs tapdisk (named so when forked by the fork server,
    else a Python running the tapdisk entry point)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            if f.read().strip() == b"tapdisk":
                return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return any(os.path.basename(arg) == b"tapdisk" for arg in f.read().split(b"\0"))
    except OSError:
        return False


def dead_pids(rundir: RunDir) -> list[int]:
    """Pids named by ``ctl<pid>`` or ``nbd<pid>.<minor>`` entries whose tapdisk is dead."""
    pids: set[int] = set()
    for name in _names(rundir.root):
        match = _CTL_NAME.fullmatch(name) or _NBD_NAME.fullmatch(name)
        if match is not None:
            pids.add(int(match.group(1)))
    return sorted(p for p in pids if is_dead(rundir, p))


def remove_sockets(rundir: RunDir, pid: int) -> list[str]:
    """Remove ``ctl<pid>`` and ``nbd<pid>.*`` of dead tapdisk ``pid``; return their
    paths. Symbolic links are left: a supervised VBD's stable NBD path is one."""
    removed = []
    for path in [rundir.ctl_socket(pid), *rundir.nbd_sockets(pid)]:
        if path.is_symlink():
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed


# ------------------------------------------------------------------ one minor


def _fuse_dir(rundir: RunDir, minor: int) -> Path:
    # Resolved, as the block device frontend mounts it and the kernel names loop backings.
    return Path(os.path.realpath(rundir.root)) / FUSE_DIR / str(minor)


def find(rundir: RunDir, minor: int, dead: list[int] | None = None) -> Leftovers:
    """What dead tapdisks left for ``minor`` (whether or not a live tapdisk holds it:
    callers decide). ``dead``: the dead pids if already known."""
    dead = dead_pids(rundir) if dead is None else dead
    # A symbolic link is a supervised VBD's stable NBD path, not a leftover.
    left = {pid: rundir.nbd_socket(pid, minor) for pid in dead}
    left = {pid: path for pid, path in left.items() if path.exists() and not path.is_symlink()}
    pids, sockets = tuple(left), tuple(left.values())
    fuse_dir = _fuse_dir(rundir, minor)
    mounts = _mounts()
    mount = fuse_dir if any(point == str(fuse_dir) for _dev, point in mounts) else None
    loops = tuple(
        LoopDevice(device, _mounted_from(device, mounts), _in_use(device))
        for device in _loops_backed_by(str(fuse_dir / _FUSE_FILE))
    )
    link = rundir.tapdev(minor)
    return Leftovers(
        minor=minor,
        dead_pids=pids,
        sockets=sockets,
        mount=mount,
        loops=loops,
        link=link if _our_link(link, str(fuse_dir / _FUSE_FILE)) else None,
    )


def _our_link(link: Path, fuse_file: str) -> bool:
    """A ``tapdev`` link the block device frontend made, to a loop device that is unbound
    or bound to ``fuse_file`` (not a device node of the C blktap2 driver, nor the link of
    another run directory sharing the device directory)."""
    try:
        target = os.readlink(link)
    except OSError:
        return False
    name = os.path.basename(target)
    if not name.startswith("loop"):
        return False
    backing = _sysfs(f"/sys/block/{name}/loop/backing_file")
    return backing is None or backing.removesuffix(" (deleted)") == fuse_file


def _clean(rundir: RunDir, found: Leftovers) -> Cleaned:
    """Remove ``found``; the caller holds the minors directory lock and the minor is not
    held by any tapdisk."""
    done = Cleaned()
    busy: list[LoopDevice] = []
    for loop in found.loops:
        try:
            _loop_clear(loop.device)
        except OSError as exc:
            done.remaining.append(f"{loop.device}: cannot detach: {exc.strerror}")
            continue
        if loop.in_use or loop.mounted_at or not _unbound_soon(loop.device):
            busy.append(loop)  # still open: it detaches itself on its last close
        else:
            done.removed.append(loop.device)
    for loop in busy:
        if loop.mounted_at:
            where = ", ".join(loop.mounted_at)
            done.remaining.append(
                f"minor {found.minor}: {loop.device} still holds a mounted file system "
                f"(mounted on {where}); its tapdisk is gone, so every I/O on it fails. "
                f"Unmount it (umount {loop.mounted_at[0]}) and {loop.device} detaches itself"
            )
        else:
            done.remaining.append(
                f"minor {found.minor}: {loop.device} is still open by a process; its tapdisk "
                f"is gone, so every I/O on it fails. It detaches itself when closed "
                f"(see: fuser -v {loop.device})"
            )
    if found.link is not None:
        with contextlib.suppress(FileNotFoundError):
            found.link.unlink()
            done.removed.append(str(found.link))
    fuse_dir = _fuse_dir(rundir, found.minor)
    if found.mount is not None:
        # Lazily: the dead connection answers nothing, and a busy loop device still
        # holds the file; the mount goes once that is released.
        try:
            _umount(str(found.mount), _MNT_DETACH)
            done.removed.append(str(found.mount))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                done.remaining.append(f"{found.mount}: cannot unmount: {exc.strerror}")
    with contextlib.suppress(OSError):
        fuse_dir.rmdir()
    with contextlib.suppress(OSError):  # the last one of this run directory
        fuse_dir.parent.rmdir()
    for path in found.sockets:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            done.removed.append(str(path))
    return done


@contextmanager
def _minor_free_of_tapdisks(rundir: RunDir, minor: int) -> Iterator[bool]:
    """Hold ``minor``'s marker lock, if it has a marker; yield whether it had one.
    Raises :class:`MinorBusy` if a tapdisk holds the minor. The caller holds the
    minors directory lock (so that no marker appears meanwhile)."""
    try:
        fd = os.open(rundir.marker(minor), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MinorBusy(f"minor {minor} is attached to a tapdisk") from None
        yield True
    finally:
        os.close(fd)


def free(rundir: RunDir, minor: int) -> Cleaned:
    """Release ``minor`` and remove what dead tapdisks left for it (see the module).

    Raises :class:`~blktap.errors.InvalidArgument` for an out-of-range minor,
    :class:`MinorBusy` (EWOULDBLOCK) while a tapdisk holds it (nothing is touched then),
    :class:`NotFound` (ENOENT) if it is neither allocated nor has leftovers. A loop device
    still in use stays, marked to detach on its last close: see ``remaining``, which is
    also logged as a warning.
    """
    minors.check_minor(minor)
    dead = dead_pids(rundir)
    with minors.locked_dir(rundir), _minor_free_of_tapdisks(rundir, minor) as allocated:
        found = find(rundir, minor, dead)
        if not allocated and found.empty:
            path = rundir.marker(minor)
            raise NotFound(f"minor {minor} is not allocated ({path} does not exist)")
        done = _clean(rundir, found)
        if allocated:
            rundir.marker(minor).unlink()
    supervised = _supervised_pids(rundir)
    for pid in dead:
        if pid not in supervised and not rundir.nbd_sockets(pid):
            done.removed += remove_sockets(rundir, pid)
    _report(done)
    return done


def clean_minor(rundir: RunDir, minor: int) -> Cleaned:
    """Remove what dead tapdisks left for ``minor``, keeping its marker (the minor stays
    allocated). Raises :class:`MinorBusy` (touching nothing) if a tapdisk holds it."""
    dead = dead_pids(rundir)
    with minors.locked_dir(rundir), _minor_free_of_tapdisks(rundir, minor):
        found = find(rundir, minor, dead)
        done = Cleaned() if found.empty else _clean(rundir, found)
    _report(done)
    return done


def sweep(rundir: RunDir) -> Cleaned:
    """Remove what dead tapdisks left anywhere in ``rundir``: their sockets, and the FUSE
    mounts, loop devices and links of minors no tapdisk holds. Minor markers stay (an
    allocated minor with no tapdisk is a valid state: ``allocate`` makes one). Minors
    that a tapdisk holds, and dead tapdisks a running supervisor started (it restarts
    them), are not touched. Never raises for one leftover it cannot remove: that goes
    into ``remaining`` (and the log)."""
    done = Cleaned()
    # A supervisor decides about its own dead tapdisk (it reads the sockets it left).
    dead = [pid for pid in dead_pids(rundir) if pid not in _supervised_pids(rundir)]
    candidates = _minors_with_leftovers(rundir, dead)
    if candidates:
        with minors.locked_dir(rundir):
            for minor in candidates:
                try:
                    with _minor_free_of_tapdisks(rundir, minor):
                        found = find(rundir, minor, dead)
                        if not found.empty:
                            done.merge(_clean(rundir, found))
                except MinorBusy:
                    continue
    for pid in dead:
        done.removed += remove_sockets(rundir, pid)
    _report(done)
    return done


def _supervised_pids(rundir: RunDir) -> set[int]:
    """Tapdisk pids that a running supervisor of ``rundir`` started."""
    pids: set[int] = set()
    for name in _names(rundir.root):
        match = re.fullmatch(r"supervise([0-9]+)\.json", name)
        if match is None or not supervise.supervisor_running(rundir, int(match.group(1))):
            continue
        with contextlib.suppress(BlktapError):
            state = supervise.read_state(rundir, int(match.group(1)))
            if state is not None:
                pids.update(state.pids)
    return pids


def orphan_leftovers(rundir: RunDir, minor: int) -> Leftovers | None:
    """What dead tapdisks left for ``minor`` if no tapdisk holds it, else ``None``."""
    if minors.is_held(rundir, minor):
        return None
    return find(rundir, minor)


def _minors_with_leftovers(rundir: RunDir, dead: list[int]) -> list[int]:
    found: set[int] = set()
    for name in _names(rundir.root):
        match = _NBD_NAME.fullmatch(name)
        if match is not None and int(match.group(1)) in dead:
            found.add(int(match.group(2)))
    fuse_root = Path(os.path.realpath(rundir.root)) / FUSE_DIR
    found.update(int(n) for n in _names(fuse_root) if n.isdigit())
    found.update(int(n[6:]) for n in _names(rundir.dev_dir)
                 if n.startswith("tapdev") and n[6:].isdigit())
    return sorted(m for m in found if 0 <= m <= MAX_MINOR)


def _report(done: Cleaned) -> None:
    for line in done.removed:
        log.info("removed %s, left by a dead tapdisk", line)
    for line in done.remaining:
        log.warning("%s", line)


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


# ------------------------------------------------------------------ kernel state
# Small and local on purpose: the control side must not import the frontends (which
# pull in the data path); these read sysfs and /proc and make two system calls.

def _umount(target: str, flags: int) -> None:
    # ctypes is imported here, not at the top: find_library runs ldconfig, which every
    # tap-ctl command would pay for a call that only a dead tapdisk's mount needs.
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.umount2(target.encode(), ctypes.c_int(flags | _UMOUNT_NOFOLLOW)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unescape(text: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mounts() -> list[tuple[str, str]]:
    """(major:minor, mount point) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            fields = line.split(" ")
            if len(fields) > 4:
                out.append((fields[2], _unescape(fields[4])))
    return out


def _sysfs(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def _loops_backed_by(path: str) -> list[str]:
    found = []
    for name in sorted(_names(Path("/sys/block"))):
        if not name.startswith("loop"):
            continue
        backing = _sysfs(f"/sys/block/{name}/loop/backing_file")
        if backing is not None and backing.removesuffix(" (deleted)") == path:
            found.append(f"/dev/{name}")
    return found


def _unbound_soon(device: str, timeout: float = 2.0) -> bool:
    """Wait up to ``timeout`` s for ``device`` to lose its backing file (the kernel may
    finish a detach just after the last close returns)."""
    deadline = time.monotonic() + timeout
    while _sysfs(f"/sys/block/{os.path.basename(device)}/loop/backing_file") is not None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _mounted_from(device: str, mounts: list[tuple[str, str]]) -> tuple[str, ...]:
    """Mount points of file systems on ``device`` or one of its partitions."""
    name = os.path.basename(device)
    numbers = {_sysfs(f"/sys/block/{name}/dev")}
    for part in _names(Path(f"/sys/block/{name}")):
        if part.startswith(name + "p"):
            numbers.add(_sysfs(f"/sys/block/{name}/{part}/dev"))
    numbers.discard(None)
    return tuple(point for dev, point in mounts if dev in numbers)


def _in_use(device: str) -> bool:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def _loop_clear(device: str) -> None:
    """LOOP_CLR_FD: detach now if unused, else on the last close (autoclear)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: already unbound
            raise
    finally:
        os.close(fd)  # the last close of a device being cleared does the detach
