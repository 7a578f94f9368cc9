"""The tapdisk service: its VBDs and the handling of each control request.

One ``Tapdisk`` per process. ``handle`` takes a decoded request and returns the encoded
reply messages; it never raises. Requests other than PID, LIST and STATS are exclusive:
they queue behind the one in progress (reference: "which requests may run concurrently").
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from blktap import paths
from blktap.block.driver import SECTOR_SIZE, OpenOptions
from blktap.block.layers.log import LogSlot
from blktap.block.layers.mirror import MirrorSlot
from blktap.block.retry import REQUEST_TIMEOUT_S
from blktap.errors import BlktapError, Busy, InvalidArgument, NotFound, errno_of
from blktap.proto import control as ctl
from blktap.vbd import VBD, ImageSpec, VBDState

log = logging.getLogger(__name__)

# Requests the C tapdisk lets run while another one is in progress.
CONCURRENT = frozenset({ctl.MessageType.PID, ctl.MessageType.LIST, ctl.MessageType.STATS})

# OPEN flags we honour; any other flag is refused rather than silently ignored.
SUPPORTED_OPEN_FLAGS = (ctl.OpenFlag.SHARED | ctl.OpenFlag.RDONLY | ctl.OpenFlag.NO_O_DIRECT
                        | ctl.OpenFlag.ADD_LOG | ctl.OpenFlag.SECONDARY | ctl.OpenFlag.STANDBY)

# RESUME flags the C tapdisk acts on: a secondary image (SECONDARY: params.secondary, the
# start of a mirror on a live VBD) and a changed-block log (ADD_LOG: the log path follows
# the message). The C tapdisk ignores the other flags of a RESUME (it reopens with the
# flags of the OPEN), and so does this one, but for STANDBY beside SECONDARY.
RESUME_FLAGS = ctl.OpenFlag.SECONDARY | ctl.OpenFlag.ADD_LOG

# What each unsupported flag asks for, named as tap-ctl's option that sets it, so that a
# refusal says which feature is missing.
_FLAG_FEATURES: dict[ctl.OpenFlag, str] = {
    ctl.OpenFlag.ADD_CACHE: "block cache (ADD_CACHE)",
    ctl.OpenFlag.VHD_INDEX: "VHD index (VHD_INDEX)",
    ctl.OpenFlag.ADD_LOG: "changed-block log (ADD_LOG, tap-ctl -C / unpause -c)",
    ctl.OpenFlag.ADD_LCACHE: "local read cache (ADD_LCACHE, tap-ctl -r)",
    ctl.OpenFlag.REUSE_PRT: "shared parent chain (REUSE_PRT, tap-ctl -e)",
    ctl.OpenFlag.SECONDARY: "secondary image (SECONDARY, tap-ctl -2)",
    ctl.OpenFlag.STANDBY: "standby secondary (STANDBY, tap-ctl -s)",
    ctl.OpenFlag.OPEN_ENCRYPTED: "encryption (OPEN_ENCRYPTED, tap-ctl -E)",
}


def unsupported(flags: ctl.OpenFlag, what: str) -> BlktapError:
    """The EOPNOTSUPP error for a ``what`` request asking for ``flags`` it cannot honour."""
    names = []
    rest = flags
    for flag, text in _FLAG_FEATURES.items():
        if flags & flag:
            names.append(text)
            rest &= ~flag
    if rest:
        names.append(f"flags {int(rest):#x}")
    return BlktapError(f"{what}: not supported yet: {', '.join(names)}", errno=errno.EOPNOTSUPP)


class Frontend(Protocol):
    async def stop(self, force: bool = False) -> None:
        """Stop serving. Without ``force`` it may refuse with Busy (e.g. a mounted device)
        and is then still serving; with ``force`` it never refuses."""


@runtime_checkable
class PauseAware(Protocol):
    """A frontend whose I/O may bypass the VBD (the block device with FUSE passthrough):
    it holds that I/O before the VBD pauses, checks a resume, and reports its I/O path
    in STATS (key ``blockdev``)."""

    async def hold_io(self) -> None: ...

    async def resumed(self) -> None:
        """Let held I/O go; raise BlktapError when the frontend cannot follow the
        resumed stack (the VBD is then paused again)."""

    def report(self) -> dict[str, object]: ...


FrontendFactory = Callable[["AttachedVBD"], Awaitable[Frontend | None]]


@dataclass
class AttachedVBD:
    """A VBD bound to a minor of this tapdisk, with what LIST reports about it.

    ``opened`` is set by the first successful OPEN: the C tapdisk's VBD starts with a
    zero state word and gains its CLOSED bit only when an opened chain is closed.
    ``log`` is the slot of the changed-block log (``tap-ctl -C``) of a writable VBD,
    set at OPEN; a RESUME with ADD_LOG points it at a new log file.
    """

    vbd: VBD
    marker_fd: int
    frontends: list[Frontend] = field(default_factory=list)
    device: str | None = None
    opened: bool = False
    log: LogSlot | None = None
    mirror: MirrorSlot | None = None
    """The secondary image (``tap-ctl -2``) of a writable VBD: set at OPEN or RESUME."""

    def listing(self) -> tuple[int, int, str]:
        """LIST's (minor, state, ``type:/path``) for this VBD, as the C tapdisk reports them.

        A VBD attached and never opened lists as state 0, a closed one as 0x2 (CLOSED);
        neither has a name, since the C tapdisk frees the image name at CLOSE (toolstacks
        count a VBD listed with an image as serving it). A paused VBD keeps its name.
        """
        vbd = self.vbd
        if vbd.state == VBDState.CLOSED:
            return vbd.minor, vbd.state_bits if self.opened else 0, ""
        return vbd.minor, vbd.state_bits, str(vbd.spec or "")


class Tapdisk:
    """The VBDs of this process and the control request handlers."""

    def __init__(
        self,
        rundir: str,
        pid: int,
        *,
        frontends: list[FrontendFactory] | None = None,
        on_last_detach: Callable[[], None] | None = None,
    ) -> None:
        self.rundir = rundir
        self.pid = pid
        self.vbds: dict[int, AttachedVBD] = {}
        self._frontend_factories = frontends or []
        self._on_last_detach = on_last_detach
        self._exclusive = asyncio.Lock()
        T = ctl.MessageType
        self._handlers: dict[ctl.MessageType, Callable[[ctl.Request], Awaitable[list[bytes]]]] = {
            T.PID: self._pid,
            T.ATTACH: self._attach,
            T.OPEN: self._open,
            T.CLOSE: self._close,
            T.FORCE_SHUTDOWN: self._close,
            T.DETACH: self._detach,
            T.PAUSE: self._pause,
            T.RESUME: self._resume,
            T.LIST: self._list,
            T.STATS: self._stats,
            T.DISK_INFO: self._disk_info,
        }

    # ----------------------------------------------------------------- entry
    async def handle(self, request: ctl.Request) -> list[bytes]:
        """Run one request; return its encoded replies (ERROR with errno on failure)."""
        msg = request.message
        handler = self._handlers.get(msg.type)
        if handler is None:
            log.warning("unsupported control message %s", _type_name(msg.type))
            return [ctl.encode(ctl.error_reply(msg.cookie, errno.EINVAL))]
        try:
            _check_names(request)
            if msg.type in CONCURRENT:
                return await handler(request)
            async with self._exclusive:
                return await handler(request)
        except Exception as exc:
            code = errno_of(exc)
            level = logging.INFO if isinstance(exc, BlktapError | OSError) else logging.ERROR
            log.log(level, "%s for minor %s failed: %s", _type_name(msg.type), msg.cookie, exc,
                    exc_info=level == logging.ERROR)
            return [ctl.encode(ctl.error_reply(msg.cookie, code, _reason(exc)))]

    def _vbd(self, minor: int) -> AttachedVBD:
        try:
            return self.vbds[minor]
        except KeyError:
            raise InvalidArgument(f"no VBD for minor {minor}") from None

    @staticmethod
    def _reply(request: ctl.Request, payload: ctl.Payload | None = None) -> list[bytes]:
        return [ctl.encode(ctl.reply(request.message, payload))]

    # -------------------------------------------------------------- handlers
    async def _pid(self, request: ctl.Request) -> list[bytes]:
        return self._reply(request, ctl.PidPayload(self.pid))

    async def _attach(self, request: ctl.Request) -> list[bytes]:
        minor = request.message.cookie
        if not 0 <= minor <= paths.MAX_MINOR:
            raise InvalidArgument(f"minor {minor} out of range")
        if minor in self.vbds:
            raise BlktapError(f"minor {minor} is already attached", errno=errno.EEXIST)
        marker = paths.minor_marker(self.rundir, minor)
        try:
            fd = os.open(marker, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"minor {minor} is not allocated ({marker} missing)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"minor {minor} is held by another tapdisk") from None
        vbd = VBD(minor)
        self.vbds[minor] = AttachedVBD(vbd, fd)
        vbd.log.info("attached")
        return self._reply(request)

    async def _open(self, request: ctl.Request) -> list[bytes]:
        msg = request.message
        params = msg.payload
        assert isinstance(params, ctl.Params)
        attached = self._vbd(msg.cookie)
        vbd = attached.vbd
        if vbd.state != VBDState.CLOSED:
            raise Busy(f"minor {msg.cookie} is already open on {vbd.spec}")
        flags = ctl.OpenFlag(params.flags)
        if flags & ~SUPPORTED_OPEN_FLAGS:
            raise unsupported(flags & ~SUPPORTED_OPEN_FLAGS, f"open of {params.path}")
        spec = ImageSpec.parse(params.path)
        options = OpenOptions(
            read_only=bool(flags & ctl.OpenFlag.RDONLY),
            direct=not flags & ctl.OpenFlag.NO_O_DIRECT,
        )
        # Requests failing with EAGAIN/EBUSY are retried until this timeout, as in the
        # C tapdisk (blktap.block.retry); 0 means its default.
        vbd.request_timeout_s = params.req_timeout or REQUEST_TIMEOUT_S
        log_path = _log_path(request, f"open of {params.path}")
        if log_path is not None and options.read_only:
            # The log records writes; the storage manager never asks for one read-only.
            raise InvalidArgument(f"open of {params.path}: a changed-block log (-C) needs "
                                  "a writable VBD")
        # Every writable VBD gets a log slot (a pass-through layer while empty), so that
        # a RESUME with ADD_LOG can add a log to a VBD opened without one.
        slot = LogSlot(log_path) if not options.read_only else None
        mirror = MirrorSlot() if not options.read_only else None
        if flags & ctl.OpenFlag.SECONDARY:
            if mirror is None:
                raise InvalidArgument(f"open of {params.path}: a secondary image (-2) needs "
                                      "a writable VBD")
            mirror.set(params.secondary, bool(flags & ctl.OpenFlag.STANDBY))
        elif flags & ctl.OpenFlag.STANDBY:
            raise InvalidArgument(f"open of {params.path}: STANDBY needs a secondary (-2)")
        await vbd.open(spec, options, [slot.opener(), mirror.opener()]
                       if slot is not None and mirror is not None else [])
        attached.log = slot
        attached.mirror = mirror
        if slot is not None and slot.path is not None:
            vbd.log.info("changed-block log %s", slot.path)
        if params.req_timeout:
            vbd.log.info("request timeout %d s", params.req_timeout)
        try:
            for factory in self._frontend_factories:
                frontend = await factory(attached)
                if frontend is not None:
                    attached.frontends.append(frontend)
        except BaseException:
            await self._stop_frontends(attached, force=True)
            await vbd.close()
            raise
        attached.opened = True
        return self._reply(request, self._image_payload(vbd))

    @staticmethod
    def _image_payload(vbd: VBD) -> ctl.ImageInfoPayload:
        info = vbd.chain.leaf.info.info if vbd.chain is not None else 0
        return ctl.ImageInfoPayload(vbd.size // SECTOR_SIZE, SECTOR_SIZE, info)

    async def _stop_frontends(self, attached: AttachedVBD, force: bool = False) -> None:
        """Stop the frontends, last started first. A frontend that refuses with Busy keeps
        serving (and so do the ones started before it); the Busy is raised."""
        while attached.frontends:
            frontend = attached.frontends[-1]
            try:
                await frontend.stop(force)
            except Busy:
                if force:
                    attached.vbd.log.error("a frontend refused a forced stop")
                else:
                    raise
            except Exception:
                attached.vbd.log.exception("stopping a frontend failed")
            attached.frontends.pop()
        attached.device = None

    async def _close(self, request: ctl.Request) -> list[bytes]:
        msg = request.message
        attached = self._vbd(msg.cookie)
        force = msg.type == ctl.MessageType.FORCE_SHUTDOWN
        # A device still in use (mounted, held open) makes CLOSE fail with EBUSY, as
        # blktap2 refuses; the VBD then keeps serving.
        await self._stop_frontends(attached, force)
        await attached.vbd.close(force=force)
        # The C tapdisk answers FORCE_SHUTDOWN with CLOSE_RSP as well.
        return [ctl.encode(ctl.Message(ctl.MessageType.CLOSE_RSP, msg.cookie, None))]

    async def _detach(self, request: ctl.Request) -> list[bytes]:
        minor = request.message.cookie
        attached = self._vbd(minor)
        if attached.vbd.state != VBDState.CLOSED:
            raise Busy(f"minor {minor} is still open")
        del self.vbds[minor]
        fcntl.flock(attached.marker_fd, fcntl.LOCK_UN)
        os.close(attached.marker_fd)
        attached.vbd.log.info("detached")
        if not self.vbds and self._on_last_detach is not None:
            asyncio.get_running_loop().call_soon(self._on_last_detach)
        return self._reply(request)

    async def _pause(self, request: ctl.Request) -> list[bytes]:
        attached = self._vbd(request.message.cookie)
        if attached.vbd.state == VBDState.CLOSED:
            raise InvalidArgument(f"minor {request.message.cookie} is not open")
        for frontend in attached.frontends:
            if isinstance(frontend, PauseAware):
                await frontend.hold_io()
        await attached.vbd.pause()
        return self._reply(request)

    async def _resume(self, request: ctl.Request) -> list[bytes]:
        msg = request.message
        attached = self._vbd(msg.cookie)
        params = msg.payload
        spec = None
        log_path = None
        mirror_before = attached.mirror.state if attached.mirror is not None else None
        if isinstance(params, ctl.Params):
            if params.flags & ctl.OpenFlag.SECONDARY:
                _set_secondary(attached, params, f"resume of minor {msg.cookie}")
            if params.path:
                spec = ImageSpec.parse(params.path)
            log_path = _log_path(request, f"resume of minor {msg.cookie}")
        log_before = attached.log.path if attached.log is not None else None
        if log_path is not None:
            if attached.log is None:
                raise InvalidArgument(f"resume of minor {msg.cookie}: a changed-block log "
                                      "(-c) needs a VBD opened writable")
            if attached.vbd.state not in (VBDState.PAUSED, VBDState.RESUME_FAILED):
                raise InvalidArgument(f"minor {msg.cookie} is not paused")
            # As the C tapdisk: the new log replaces the old one for this and every later
            # resume, even if this resume fails.
            attached.log.path = log_path
            attached.vbd.log.info("changed-block log %s", log_path)
        try:
            await attached.vbd.resume(spec)
        except BaseException:
            if attached.mirror is not None:  # a secondary that failed is not kept
                attached.mirror.state = mirror_before
            raise
        try:
            for frontend in attached.frontends:
                if isinstance(frontend, PauseAware):
                    await frontend.resumed()
        except BlktapError:
            # A frontend that cannot follow the new stack (FUSE passthrough under a new
            # log layer): paused again on the stack it can follow, so that a plain
            # unpause works.
            if attached.log is not None:
                attached.log.path = log_before
            await attached.vbd.pause()
            raise
        return self._reply(request)

    async def _list(self, request: ctl.Request) -> list[bytes]:
        entries = [self.vbds[minor].listing() for minor in sorted(self.vbds)]
        return [ctl.encode_list_replies(request.message.cookie, entries)]

    async def _stats(self, request: ctl.Request) -> list[bytes]:
        minor = request.message.cookie
        if minor == ctl.NO_MINOR:
            doc: object = [_stats_of(self.vbds[m]) for m in sorted(self.vbds)]
        else:
            doc = _stats_of(self._vbd(minor))
        return [ctl.encode_stats_reply(minor, json.dumps(doc).encode())]

    async def _disk_info(self, request: ctl.Request) -> list[bytes]:
        vbd = self._vbd(request.message.cookie).vbd
        if vbd.chain is None:
            raise InvalidArgument(f"minor {vbd.minor} is not open")
        return self._reply(request, self._image_payload(vbd))

    # -------------------------------------------------------------- shutdown
    async def shutdown(self) -> None:
        """Close and detach every VBD (on SIGTERM). Errors are logged, not raised."""
        for minor in sorted(self.vbds):
            attached = self.vbds.pop(minor)
            await self._stop_frontends(attached, force=True)
            try:
                await attached.vbd.close()
            except Exception as exc:
                attached.vbd.log.error("close at shutdown failed: %s", exc)
            os.close(attached.marker_fd)


def _check_names(request: ctl.Request) -> None:
    """Refuse (EINVAL) an image, secondary or log path holding a control character: a
    newline in a name would forge lines of ``tap-ctl list`` (one VBD per line) and of
    the logs. Every other character is the file system's business."""
    params = request.message.payload
    names = [request.log_path or ""]
    if isinstance(params, ctl.Params):
        names += [params.path, params.secondary]
    for name in names:
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise InvalidArgument(f"{name!r}: control characters are not allowed in names")


def _set_secondary(attached: AttachedVBD, params: ctl.Params, what: str) -> None:
    """Point a paused VBD's mirror at ``params.secondary`` (a RESUME with SECONDARY: the
    C tap-ctl's ``unpause -2``), for this and every later resume."""
    if attached.mirror is None:
        raise InvalidArgument(f"{what}: a secondary image (-2) needs a VBD opened writable")
    if attached.vbd.state not in (VBDState.PAUSED, VBDState.RESUME_FAILED):
        raise InvalidArgument(f"{what}: the VBD is not paused")
    attached.mirror.set(params.secondary, bool(params.flags & ctl.OpenFlag.STANDBY))
    attached.vbd.log.info("secondary image %s", params.secondary)


def _log_path(request: ctl.Request, what: str) -> str | None:
    """The changed-block log path an OPEN or RESUME carries (ADD_LOG), else ``None``.
    An empty path is refused (EINVAL), as the C tapdisk refuses ADD_LOG without a path."""
    params = request.message.payload
    if not isinstance(params, ctl.Params) or not params.flags & ctl.OpenFlag.ADD_LOG:
        return None
    if not request.log_path:
        raise InvalidArgument(f"{what}: ADD_LOG with an empty log path")
    return request.log_path


# The C tapdisk's disk type number of its log filter (DISK_TYPE_LOG).
_DISK_TYPE_LOG = 9


def _stats_of(attached: AttachedVBD) -> dict[str, Any]:
    """The VBD's STATS object; an open changed-block log is listed first among the images,
    as the C tapdisk lists its log filter (an image named by the log's path, driver type
    ``log``, whose counts stay zero: it passes every request on to the image below)."""
    doc = attached.vbd.stats()
    for frontend in attached.frontends:
        if isinstance(frontend, PauseAware):
            doc["blockdev"] = frontend.report()  # an extra key: C parsers ignore it
        tcp = getattr(frontend, "tcp_export", None)  # the NBD export's TCP address
        if tcp is not None:
            doc["nbd_tcp"] = tcp  # an extra key too
    layer = attached.log.open_layer if attached.log is not None else None
    if layer is not None and doc.get("images"):
        entry = {"name": layer.log.path, "hits": [0, 0], "fail": [0, 0],
                 "driver": {"type": _DISK_TYPE_LOG, "name": "log", "status": 0}}
        doc["images"] = [entry, *doc["images"]]
    if attached.mirror is not None and (mirror := attached.mirror.report()) is not None:
        # C keys keep their meaning; "mirror" is an extra key C parsers ignore.
        doc["nbd_mirror_failed"] = int(attached.mirror.failed)
        doc["FIXME_enospc_redirect_count"] = attached.mirror.redirected_sectors
        doc["mirror"] = mirror
    return doc


def _reason(exc: BaseException) -> str:
    """``exc`` as the ERROR reply's message: at most 255 bytes of UTF-8, no NUL.

    The C tapdisk leaves this field zero and the C tap-ctl ignores it; our tap-ctl shows
    it, so that a refusal says why and not only its errno.
    """
    text = str(exc).replace("\0", " ") or type(exc).__name__
    raw = text.encode("utf-8", "replace")[: ctl.PATH_MAX - 1]
    return raw.decode("utf-8", "ignore")


def _type_name(value: int) -> str:
    try:
        return ctl.MessageType(value).name
    except ValueError:
        return f"type {value}"
