"""The control library's front door: one object per run directory.

>>> ctl = Control()                       # $BLKTAP_RUN_DIR or /run/blktap-control
>>> vbd = ctl.create("aio:/srv/disk.img")  # doctest: +SKIP
>>> ctl.destroy(vbd.pid, vbd.minor)        # doctest: +SKIP

Every method raises :class:`~blktap.errors.BlktapError` subclasses carrying the errno
that ``tap-ctl`` exits with; none prints. See the modules for each contract:
:mod:`~blktap.control.minors`, :mod:`~blktap.control.spawn`,
:mod:`~blktap.control.client`, :mod:`~blktap.control.listing`,
:mod:`~blktap.control.lifecycle`.
"""

from __future__ import annotations

from typing import Any

from blktap.control import cleanup, client, lifecycle, listing, minors, spawn, supervise
from blktap.control.lifecycle import Created
from blktap.control.listing import TapEntry, VbdDetails
from blktap.control.options import ImageInfo, OpenOptions
from blktap.control.rundir import RunDir

__all__ = ["Control"]


class Control:
    """The libblktapctl operations on one run directory (default: from the environment)."""

    def __init__(self, rundir: RunDir | None = None) -> None:
        self.rundir = rundir if rundir is not None else RunDir.from_env()

    # minors
    def allocate(self) -> int:
        """Reserve the lowest free minor (its marker exists afterwards)."""
        return minors.allocate(self.rundir)

    def free(self, minor: int) -> cleanup.Cleaned:
        """Release ``minor``; EWOULDBLOCK while attached, ENOENT if not allocated. What a
        dead tapdisk left for it (sockets, FUSE mount, loop device, link) is removed; a
        loop device still mounted stays and is named in the result's ``remaining``."""
        return cleanup.free(self.rundir, minor)

    def sweep(self) -> cleanup.Cleaned:
        """Remove what dead tapdisks left in the run directory (``create`` does this)."""
        return cleanup.sweep(self.rundir)

    def leftovers(self, minor: int) -> cleanup.Leftovers | None:
        """What dead tapdisks left for ``minor``, or ``None`` while a tapdisk holds it."""
        return cleanup.orphan_leftovers(self.rundir, minor)

    def minors(self) -> list[int]:
        """Allocated minors, ascending."""
        return minors.list_minors(self.rundir)

    def device_path(self, minor: int) -> str:
        """The kernel block device of ``minor`` if there is one, else its marker path."""
        return str(lifecycle.device_path(self.rundir, minor))

    # tapdisk processes
    def spawn(self) -> int:
        """Start a tapdisk; return its pid."""
        return spawn.spawn(self.rundir)

    def pid(self, pid: int) -> int:
        """Ask tapdisk ``pid`` for its pid (confirms that it answers)."""
        return client.get_pid(self.rundir, pid)

    # one VBD
    def attach(self, pid: int, minor: int) -> None:
        """Add a VBD for ``minor`` to tapdisk ``pid``."""
        client.attach(self.rundir, pid, minor)

    def detach(self, pid: int, minor: int) -> None:
        """Remove VBD ``minor`` from tapdisk ``pid`` (EBUSY while open)."""
        client.detach(self.rundir, pid, minor)

    def open(
        self, pid: int, minor: int, image: str, options: OpenOptions | None = None
    ) -> ImageInfo:
        """Open ``image`` (``type:/path``) on VBD ``minor``."""
        return client.open(self.rundir, pid, minor, image, options)

    def close(
        self, pid: int, minor: int, *, force: bool = False, timeout: float | None = None
    ) -> None:
        """Close VBD ``minor``; ``force`` does not wait for in-flight I/O."""
        client.close(self.rundir, pid, minor, force=force, timeout=timeout)

    def pause(self, pid: int, minor: int, *, timeout: float | None = None) -> None:
        """Quiesce VBD ``minor`` and close its chain."""
        client.pause(self.rundir, pid, minor, timeout=timeout)

    def unpause(
        self,
        pid: int,
        minor: int,
        *,
        image: str | None = None,
        secondary: str | None = None,
        log_path: str | None = None,
    ) -> None:
        """Reopen VBD ``minor``'s chain, on ``image`` if given."""
        client.unpause(self.rundir, pid, minor, image=image, secondary=secondary, log_path=log_path)

    def stats(self, pid: int, minor: int) -> Any:
        """VBD ``minor``'s statistics (parsed JSON); minor 0xFFFF: a list of all."""
        return client.stats(self.rundir, pid, minor)

    def disk_info(self, pid: int, minor: int) -> ImageInfo:
        """The size of the image open on VBD ``minor`` (DISK_INFO)."""
        return client.disk_info(self.rundir, pid, minor)

    def stats_text(self, pid: int, minor: int) -> str:
        """VBD ``minor``'s statistics as the JSON text tapdisk sent."""
        return client.stats_text(self.rundir, pid, minor)

    # composites
    def create(
        self,
        image: str,
        options: OpenOptions | None = None,
        *,
        find_existing: bool = True,
        supervised: bool = False,
    ) -> Created:
        """allocate → spawn → attach → open, undone completely on failure. ``supervised``:
        a supervisor restarts the tapdisk when it dies (:mod:`blktap.control.supervise`)."""
        return lifecycle.create(self.rundir, image, options, find_existing=find_existing,
                                supervised=supervised)

    def supervision(self, minor: int) -> supervise.State | None:
        """The supervisor's record of ``minor`` (current tapdisk pid, restarts, stable NBD
        path), or ``None`` if the minor is not supervised."""
        return supervise.read_state(self.rundir, minor)

    def supervised(self, minor: int) -> bool:
        """True while a supervisor runs for ``minor``."""
        return supervise.supervisor_running(self.rundir, minor)

    def destroy(self, pid: int, minor: int, *, timeout: float | None = None) -> None:
        """close → detach → free."""
        lifecycle.destroy(self.rundir, pid, minor, timeout=timeout)

    # queries
    def list(self, *, pid: int | None = None) -> list[TapEntry]:
        """The outer join of minors, tapdisks and VBDs (see :mod:`blktap.control.listing`)."""
        return listing.list_entries(self.rundir, pid=pid)

    def find(self, image: str) -> TapEntry | None:
        """An existing VBD that has ``image`` open, or ``None``."""
        return listing.find(self.rundir, image)

    def details(self, entry: TapEntry) -> VbdDetails:
        """``entry`` with its NBD socket, block device and image chain."""
        return listing.details(self.rundir, entry)
