"""``list`` and ``find``: what runs, joined from three sources as the C tap-ctl does.

The minors (marker files), the running tapdisks (``ctl<pid>`` sockets, each confirmed with
a PID request; a socket nobody answers on is skipped) and each tapdisk's LIST reply are
outer-joined: a VBD gives an entry with pid, minor, state and image; a tapdisk with no VBD
(or whose LIST failed) an entry with only its pid; a marker no VBD claims an entry with
only its minor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blktap.control import client
from blktap.control.minors import list_minors
from blktap.control.rundir import RunDir
from blktap.errors import BlktapError

__all__ = ["TapEntry", "VbdDetails", "details", "find", "find_all", "list_entries", "same_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TapEntry:
    """One line of ``tap-ctl list``; a missing field is ``None``.

    ``state`` is the VBD state word (see :class:`blktap.proto.control.StateBit`); ``type``
    and ``path`` are the two halves of the VBD's ``type:/path``.
    """

    pid: int | None = None
    minor: int | None = None
    state: int | None = None
    type: str | None = None
    path: str | None = None

    @property
    def image(self) -> str | None:
        """``"type:/path"``, or ``None`` when no image is open."""
        if self.type is None or self.path is None:
            return None
        return f"{self.type}:{self.path}"


def _entry_for(pid: int, vbd: client.VbdListing) -> TapEntry:
    kind = path = None
    if vbd.image is not None:
        before, sep, after = vbd.image.partition(":")
        if sep:
            kind, path = before, after
    return TapEntry(pid=pid, minor=vbd.minor, state=vbd.state, type=kind, path=path)


def _confirmed_pid(rundir: RunDir, pid: int) -> int | None:
    try:
        return client.get_pid(rundir, pid, timeout=client.LIST_TIMEOUT)
    except BlktapError as exc:
        log.debug("skipping ctl%d: %s", pid, exc)
        return None


def _tapdisk_entries(rundir: RunDir, pid: int) -> list[TapEntry]:
    try:
        vbds = client.list_vbds(rundir, pid)
    except BlktapError as exc:
        log.warning("tapdisk %d: LIST failed: %s", pid, exc)
        vbds = []
    if not vbds:
        return [TapEntry(pid=pid)]
    return [_entry_for(pid, v) for v in vbds]


def list_entries(rundir: RunDir, *, pid: int | None = None) -> list[TapEntry]:
    """Every tapdisk, VBD and allocated minor: tapdisks by pid, their VBDs by minor, then
    the orphan minors ascending. With ``pid``, only that tapdisk (empty if it does not
    answer), as ``tap-ctl list -p``. Never raises for a tapdisk that fails to answer."""
    if pid is not None:
        confirmed = _confirmed_pid(rundir, pid)
        return [] if confirmed is None else _tapdisk_entries(rundir, confirmed)
    orphans = set(list_minors(rundir))
    out: list[TapEntry] = []
    for candidate in rundir.socket_pids():
        confirmed = _confirmed_pid(rundir, candidate)
        if confirmed is None:
            continue
        for entry in _tapdisk_entries(rundir, confirmed):
            if entry.minor is not None:
                orphans.discard(entry.minor)
            out.append(entry)
    out.extend(TapEntry(minor=m) for m in sorted(orphans))
    return out


def same_image(a: str, b: str) -> bool:
    """True if ``"type:/path"`` strings ``a`` and ``b`` name the same image: same type and
    the same file once symbolic links and redundant separators are resolved."""
    ta, _, pa = a.partition(":")
    tb, _, pb = b.partition(":")
    if ta != tb:
        return False
    return pa == pb or os.path.realpath(pa) == os.path.realpath(pb)


def find_all(rundir: RunDir, image: str) -> list[TapEntry]:
    """The VBDs that have ``image`` open (see :func:`same_image`).

    Asks each tapdisk for its LIST only (no PID round trip first: a tapdisk that answers
    LIST is alive); tapdisks that do not answer are skipped.
    """
    found = []
    for pid in rundir.socket_pids():
        try:
            vbds = client.list_vbds(rundir, pid)
        except BlktapError as exc:
            log.debug("find: skipping ctl%d: %s", pid, exc)
            continue
        for vbd in vbds:
            if vbd.image is not None and same_image(vbd.image, image):
                found.append(_entry_for(pid, vbd))
    return found


def find(rundir: RunDir, image: str) -> TapEntry | None:
    """The first VBD that has ``image`` open, or ``None`` (libxl's reuse check)."""
    found = find_all(rundir, image)
    return found[0] if found else None


@dataclass(frozen=True)
class VbdDetails:
    """A list entry with what ``tap-ctl list --json`` adds: the VBD's NBD socket and kernel
    block device when they exist, its image chain, leaf first, and its changed-block log
    (from STATS, which lists the log first among the images, driver ``log``)."""

    entry: TapEntry
    nbd_socket: Path | None = None
    block_device: Path | None = None
    chain: tuple[str, ...] = ()
    cbt_log: str | None = None
    block_device_io: str | None = None
    """``passthrough`` (the kernel does the block device's I/O on the image file) or
    ``fuse`` (tapdisk serves it), from STATS' ``blockdev``; None without a device."""
    nbd_tcp: dict[str, Any] | None = None
    """The NBD export's TCP address (``address``, ``tls``: x509 or None,
    ``verify_client``), from STATS' ``nbd_tcp``; None when it has none."""


def details(rundir: RunDir, entry: TapEntry) -> VbdDetails:
    """Gather :class:`VbdDetails` for ``entry``; parts that cannot be had are left empty."""
    if entry.pid is None or entry.minor is None:
        device = rundir.tapdev(entry.minor) if entry.minor is not None else None
        return VbdDetails(entry, block_device=device if device and device.exists() else None)
    nbd = rundir.nbd_socket(entry.pid, entry.minor)
    dev = rundir.tapdev(entry.minor)
    chain: tuple[str, ...] = ()
    cbt_log = None
    block_io = None
    nbd_tcp = None
    if entry.image is not None:
        try:
            doc: Any = client.stats(rundir, entry.pid, entry.minor)
            images = doc.get("images", []) if isinstance(doc, dict) else []
            images = [i for i in images if isinstance(i, dict)]
            logs = [i for i in images if _driver_name(i) == "log"]
            cbt_log = str(logs[0].get("name", "")) if logs else None
            chain = tuple(str(i.get("name", "")) for i in images if _driver_name(i) != "log")
            blockdev = doc.get("blockdev") if isinstance(doc, dict) else None
            if isinstance(blockdev, dict) and isinstance(blockdev.get("io_path"), str):
                block_io = blockdev["io_path"]
            tcp = doc.get("nbd_tcp") if isinstance(doc, dict) else None
            nbd_tcp = tcp if isinstance(tcp, dict) else None
        except BlktapError as exc:
            log.debug("tapdisk %d minor %d: no chain: %s", entry.pid, entry.minor, exc)
    return VbdDetails(
        entry,
        nbd_socket=nbd if nbd.exists() else None,
        block_device=dev if dev.exists() else None,
        chain=chain,
        cbt_log=cbt_log,
        block_device_io=block_io,
        nbd_tcp=nbd_tcp,
    )


def _driver_name(image: dict[str, Any]) -> str:
    driver = image.get("driver")
    return str(driver.get("name", "")) if isinstance(driver, dict) else ""
