"""``create`` and ``destroy``: the composite operations, undone completely on failure.

create = allocate → spawn → attach → open (``tap_ctl_create``). A failure at any step
undoes the earlier ones, so nothing is left behind: a spawned tapdisk that could not
attach is terminated (the C code leaves it running), a VBD that could not open is detached
(its tapdisk then exits; it is terminated if it does not) and the minor is freed.

destroy = close → detach → free (``tap_ctl_destroy``), stopping at the first error.

Dead tapdisks (see :mod:`blktap.control.cleanup`): ``create`` first removes what they
left in the run directory; ``destroy`` of a VBD whose tapdisk is dead removes its
leftovers and frees the minor instead of failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blktap.control import cleanup, client, listing, minors, spawn, supervise
from blktap.control.errors import MinorBusy, NoSuchTapdisk
from blktap.control.options import ImageInfo, OpenOptions, split_image
from blktap.control.rundir import RunDir
from blktap.errors import BlktapError, Busy, NotFound

__all__ = ["EXIT_WAIT", "Created", "create", "destroy", "device_path", "serve_minor"]

log = logging.getLogger(__name__)

EXIT_WAIT = 5.0
"""How long create's undo and destroy wait for a tapdisk with no VBD left to exit."""


@dataclass(frozen=True)
class Created:
    """A VBD made by :func:`create`: its tapdisk, minor, device path and image size."""

    pid: int
    minor: int
    device: Path
    info: ImageInfo


def device_path(rundir: RunDir, minor: int) -> Path:
    """What ``create``/``allocate`` report: the kernel block device ``<dev>/tapdev<minor>``
    if it exists, else the minor's marker (what the current C tap-ctl prints)."""
    dev = rundir.tapdev(minor)
    return dev if dev.exists() else rundir.marker(minor)


def _refuse_shared_write(rundir: RunDir, image: str, options: OpenOptions) -> None:
    for entry in listing.find_all(rundir, image):
        assert entry.pid is not None and entry.minor is not None
        if not options.read_only:
            raise Busy(
                f"{image} is already open on minor {entry.minor} of tapdisk {entry.pid}; "
                "it cannot also be opened read-write"
            )
        if _opened_read_write(rundir, entry.pid, entry.minor):
            raise Busy(f"{image} is open read-write on minor {entry.minor} of tapdisk {entry.pid}")


def _opened_read_write(rundir: RunDir, pid: int, minor: int) -> bool:
    # The C STATS has no open mode; ours may add "read_only". Unknown counts as read-only.
    try:
        doc = client.stats(rundir, pid, minor)
    except BlktapError:
        return False
    return isinstance(doc, dict) and doc.get("read_only") is False


def _undo(what: str, action: Callable[..., object], *args: object) -> None:
    # Undo steps must not mask the error being handled; their own failures are logged.
    try:
        action(*args)
    except Exception as exc:
        log.warning("undoing create: %s failed: %s", what, exc)


def _retire(rundir: RunDir, pid: int) -> None:
    """Make sure tapdisk ``pid`` (which has no VBD left) is gone."""
    if not spawn.wait_exit(pid, EXIT_WAIT):
        log.warning("tapdisk %d did not exit after its last detach; terminating it", pid)
        spawn.terminate(rundir, pid)


def create(
    rundir: RunDir,
    image: str,
    options: OpenOptions | None = None,
    *,
    find_existing: bool = True,
    supervised: bool = False,
) -> Created:
    """Make a VBD serving ``image`` (``"type:/path"``) in a new tapdisk.

    With ``find_existing`` (the default), an image that another VBD has open (same type,
    same file) is refused with :class:`~blktap.errors.Busy` (EBUSY) when this open is
    read-write, or when the other VBD's STATS say ``"read_only": false``; read-only opens
    may share an image. Concurrent creates of one image are serialized, so that only one
    of several read-write creates can succeed. Other errors
    are those of the failing step (e.g. ENOENT from OPEN for a missing image). On any
    failure, including KeyboardInterrupt, every earlier step has been undone: no marker,
    tapdisk or socket of this call remains.

    With ``supervised``, a supervisor process (:mod:`blktap.control.supervise`) starts
    the tapdisk and restarts it on the same minor, image and NBD path whenever it dies,
    until ``destroy``. An encryption key cannot be supervised (InvalidArgument).
    """
    opts = options or OpenOptions()
    split_image(image)
    opts.request(0, image)  # reject what cannot be encoded before touching anything
    cleanup.sweep(rundir)
    if supervised:
        supervise.options_to_json(opts)  # refuse what a restart could not repeat
    if not find_existing:
        return _create(rundir, image, opts, supervised)
    with _image_lock(rundir, image):
        _refuse_shared_write(rundir, image, opts)
        return _create(rundir, image, opts, supervised)


def _create(rundir: RunDir, image: str, opts: OpenOptions, supervised: bool) -> Created:
    minor = minors.allocate(rundir)
    try:
        if supervised:
            pid, info = supervise.start(rundir, minor, image, opts)
        else:
            pid, info = serve_minor(rundir, minor, image, opts)
    except BaseException:
        _undo(f"free minor {minor}", minors.free, rundir, minor)
        raise
    log.info("created minor %d on tapdisk %d for %s%s", minor, pid, image,
             " (supervised)" if supervised else "")
    return Created(pid=pid, minor=minor, device=device_path(rundir, minor), info=info)


def serve_minor(
    rundir: RunDir, minor: int, image: str, opts: OpenOptions
) -> tuple[int, ImageInfo]:
    """spawn → attach ``minor`` (allocated) → open ``image``; return (pid, image info).

    On failure, including KeyboardInterrupt, the tapdisk started here is gone (detached
    and retired, or terminated); the minor stays allocated.
    """
    pid = spawn.spawn(rundir)
    try:
        client.attach(rundir, pid, minor)
    except BaseException:
        _undo(f"terminate tapdisk {pid}", spawn.terminate, rundir, pid)
        raise
    try:
        info = client.open(rundir, pid, minor, image, opts)
    except BaseException:
        _undo(f"detach minor {minor}", client.detach, rundir, pid, minor)
        _undo(f"retire tapdisk {pid}", _retire, rundir, pid)
        raise
    return pid, info


@contextmanager
def _image_lock(rundir: RunDir, image: str) -> Iterator[None]:
    """Serialize creates of one image (same type and file) so that the sharing check and
    the open are atomic with respect to each other. The lock file
    ``tapdisk/.image-<hash>.lock`` exists only while held."""
    kind, path = split_image(image)
    key = hashlib.sha256(f"{kind}:{os.path.realpath(path)}".encode()).hexdigest()[:32]
    rundir.ensure()
    lock = rundir.minors_dir / f".image-{key}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder before us unlinks the file as it lets go; lock the current one.
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


def destroy(rundir: RunDir, pid: int, minor: int, *, timeout: float | None = None) -> None:
    """Close, detach and free VBD ``minor`` of tapdisk ``pid``; stop at the first error.

    ``timeout`` bounds the close (ETIMEDOUT past it), as in the C tap-ctl. When the VBD
    was the tapdisk's last, this returns once the tapdisk has exited.

    When tapdisk ``pid`` is dead but left its ``ctl<pid>`` or ``nbd<pid>.<minor>``
    socket here (so the minor was its), ``minor`` is freed with what it left
    (:func:`blktap.control.cleanup.free`) and its sockets are removed; a loop device
    still mounted stays, marked to detach itself when unmounted, and is logged as a
    warning. A dead pid that left nothing here, or whose minor another tapdisk now
    holds, raises :class:`~blktap.control.errors.NoSuchTapdisk` (ENOENT) as before.

    A supervised VBD may be named by any pid its supervisor started: the supervisor is
    stopped first (it finishes a restart in progress), then the current tapdisk's VBD
    is destroyed and the supervisor's state file and stable NBD link are removed. If
    that fails the VBD stays, unsupervised; destroying it again finishes the job.
    """
    state = supervise.read_state(rundir, minor)
    if state is not None and pid in state.pids:
        state = supervise.stop(rundir, minor)
        assert state is not None
        if pid != state.pid:
            log.info("minor %d: tapdisk %d was restarted as %d", minor, pid, state.pid)
        try:
            if cleanup.is_dead(rundir, state.pid):  # stopped before it could restart
                with contextlib.suppress(NotFound):
                    cleanup.free(rundir, minor)
                cleanup.remove_sockets(rundir, state.pid)
            else:
                _destroy(rundir, state.pid, minor, timeout)
        except BaseException:
            log.warning("minor %d is no longer supervised; destroy -p %d -m %d again "
                        "to finish", minor, pid, minor)
            raise
        supervise.forget(rundir, state)
        return
    _destroy(rundir, pid, minor, timeout)


def _destroy(rundir: RunDir, pid: int, minor: int, timeout: float | None) -> None:
    if cleanup.is_dead(rundir, pid):
        _destroy_dead(rundir, pid, minor)
        return
    client.close(rundir, pid, minor, timeout=timeout)
    client.detach(rundir, pid, minor)
    if not _attached(rundir, pid):
        _retire(rundir, pid)
    minors.free(rundir, minor)
    log.info("destroyed minor %d of tapdisk %d", minor, pid)


def _destroy_dead(rundir: RunDir, pid: int, minor: int) -> None:
    ours = rundir.nbd_socket(pid, minor).exists() or rundir.ctl_socket(pid).exists()
    if not ours:
        raise NoSuchTapdisk(f"no tapdisk with pid {pid} (to release minor {minor} of a "
                            f"dead tapdisk: tap-ctl free -m {minor})")
    log.info("tapdisk %d is gone; removing what it left for minor %d", pid, minor)
    try:
        cleanup.free(rundir, minor)
    except (MinorBusy, NotFound):
        raise NoSuchTapdisk(f"no tapdisk with pid {pid}; minor {minor} is not its") from None
    finally:
        if not rundir.nbd_sockets(pid):  # its last VBD: the control socket goes too
            cleanup.remove_sockets(rundir, pid)
    log.info("destroyed minor %d of dead tapdisk %d", minor, pid)


def _attached(rundir: RunDir, pid: int) -> set[int]:
    """Minors tapdisk ``pid`` still serves; empty if it no longer answers."""
    try:
        return {v.minor for v in client.list_vbds(rundir, pid)}
    except BlktapError:
        return set()
