"""Requests to one tapdisk over its control socket (libblktapctl's tap-ctl-ipc role).

One request per connection: connect to ``<run>/ctl<pid>``, send the request, read the
reply (a LIST stream, a STATS body), close. Timeouts follow the C tap-ctl: LIST and STATS
give up after 10 s; CLOSE, PAUSE (and destroy) take the caller's timeout; everything else
waits indefinitely. A timeout raises :class:`TimedOut` (ETIMEDOUT); an ERROR reply raises
:class:`TapdiskError` with the errno tapdisk sent. Nothing is retried and nothing is left
open: the socket is closed whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blktap.control.errors import ControlError, NoSuchTapdisk, TapdiskError, TimedOut
from blktap.control.minors import check_minor
from blktap.control.options import ImageInfo, OpenOptions, check_name
from blktap.control.rundir import RunDir
from blktap.errors import InvalidArgument, ProtocolError
from blktap.proto import control as ctl
from blktap.proto import tcp_export

__all__ = [
    "LIST_TIMEOUT",
    "STATS_TIMEOUT",
    "VbdListing",
    "attach",
    "close",
    "detach",
    "disk_info",
    "get_pid",
    "list_vbds",
    "open",
    "pause",
    "stats",
    "stats_text",
    "transact",
    "unpause",
]

log = logging.getLogger(__name__)

LIST_TIMEOUT = 10.0
STATS_TIMEOUT = 10.0
_RECV_SIZE = 65536


def _describe(req: ctl.Request) -> str:
    cookie = req.message.cookie
    minor = "" if cookie == ctl.NO_MINOR else f" minor {cookie}"
    return f"{req.message.type.name}{minor}"


def transact(
    rundir: RunDir, pid: int, req: ctl.Request, *, timeout: float | None = None
) -> ctl.Reply:
    """Send ``req`` to tapdisk ``pid`` and return its complete reply.

    ``timeout`` (seconds) bounds the whole exchange; ``None`` waits indefinitely. Raises
    :class:`NoSuchTapdisk` (ENOENT) when ``ctl<pid>`` is missing or nobody listens on it,
    :class:`TimedOut` (ETIMEDOUT), :class:`TapdiskError` for an ERROR reply (its message
    gives the reason the tapdisk sent, if any, else the errno's text),
    :class:`~blktap.errors.ProtocolError` (EPROTO) for a reply that breaks the protocol,
    :class:`ControlError` for other socket failures (with their errno).
    """
    what = _describe(req)
    data = ctl.encode_request(req)
    path = rundir.ctl_socket(pid)
    deadline = None if timeout is None else time.monotonic() + timeout
    reader = ctl.ReplyReader(req.message.type)

    def remaining() -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            _connect(sock, os.fspath(path), remaining)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            reason = "no control socket" if isinstance(exc, FileNotFoundError) else "stale socket"
            raise NoSuchTapdisk(f"no tapdisk with pid {pid} ({reason} {path})") from None
        log.debug("tapdisk %d: sending %s", pid, what)
        sock.settimeout(remaining())
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as send_error:
            # tapdisk may reject a request early (ERROR, then close) while the rest of it
            # (a log path, a key) is still being sent: prefer its answer to EPIPE.
            reply = _salvage_reply(sock, reader)
            if reply is None:
                raise send_error
        else:
            reply = None
        while reply is None:
            sock.settimeout(remaining())
            chunk = sock.recv(_RECV_SIZE)
            reply = reader.feed(chunk) if chunk else reader.eof()
    except TimeoutError:
        raise TimedOut(f"tapdisk {pid} did not answer {what} within {timeout:g} s") from None
    except ProtocolError as exc:
        raise ProtocolError(
            f"tapdisk {pid}: {exc.message}", errno=errno.EPROTO, remote=True
        ) from None
    except OSError as exc:
        code = exc.errno or errno.EIO
        raise ControlError(f"tapdisk {pid}: {what}: {os.strerror(code)}", errno=code) from None
    finally:
        sock.close()
    if reply.is_error:
        code = reply.errno if reply.errno > 0 else errno.EIO
        minor = None if req.message.cookie == ctl.NO_MINOR else req.message.cookie
        # Our tapdisk says why in the ERROR's message field; the C tapdisk leaves it empty.
        payload = reply.message.payload
        reason = payload.message if isinstance(payload, ctl.ErrorPayload) else ""
        raise TapdiskError(
            f"tapdisk {pid}: {what} failed: {reason or os.strerror(code)}",
            errno=code,
            pid=pid,
            minor=minor,
            request=req.message.type.name,
        )
    log.debug("tapdisk %d: %s done", pid, what)
    return reply


def _salvage_reply(sock: socket.socket, reader: ctl.ReplyReader) -> ctl.Reply | None:
    """Whatever complete reply is already readable after a failed send, else ``None``."""
    try:
        sock.settimeout(1.0)
        while (chunk := sock.recv(_RECV_SIZE)) != b"":
            if (reply := reader.feed(chunk)) is not None:
                return reply
    except (OSError, ProtocolError):
        return None
    return reader.reply


def _connect(sock: socket.socket, path: str, remaining: Callable[[], float | None]) -> None:
    # A Unix socket whose listen backlog is full makes a non-blocking connect fail with
    # EAGAIN at once rather than wait; wait for room until the deadline.
    while True:
        sock.settimeout(remaining())
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            time.sleep(0.01)


def _simple(type: ctl.MessageType, minor: int, payload: ctl.Payload | None = None) -> ctl.Request:
    return ctl.Request(ctl.request(type, minor, payload))


def get_pid(rundir: RunDir, pid: int, *, timeout: float | None = None) -> int:
    """Ask tapdisk ``pid`` for its pid (PID); the answer confirms it is alive."""
    reply = transact(rundir, pid, _simple(ctl.MessageType.PID, ctl.NO_MINOR), timeout=timeout)
    payload = reply.message.payload
    assert isinstance(payload, ctl.PidPayload)
    return payload.pid


def attach(rundir: RunDir, pid: int, minor: int) -> None:
    """Bind ``minor`` to tapdisk ``pid`` (ATTACH); the tapdisk then holds its marker."""
    check_minor(minor)
    transact(rundir, pid, _simple(ctl.MessageType.ATTACH, minor))


def detach(rundir: RunDir, pid: int, minor: int) -> None:
    """Remove VBD ``minor`` from tapdisk ``pid`` (DETACH; EBUSY while open). A tapdisk
    exits after its last VBD is detached."""
    check_minor(minor)
    transact(rundir, pid, _simple(ctl.MessageType.DETACH, minor))


def open(
    rundir: RunDir, pid: int, minor: int, image: str, options: OpenOptions | None = None
) -> ImageInfo:
    """Open ``image`` (``"type:/path"``) on the attached VBD ``minor`` (OPEN)."""
    check_minor(minor)
    opts = options or OpenOptions()
    req = opts.request(minor, image)
    if opts.export is None:
        reply = transact(rundir, pid, req)
    else:
        # tapdisk reads the export settings during this OPEN; they are for it alone.
        rundir.ensure()
        conf = tcp_export.write_config(str(rundir.minors_dir), minor, opts.export)
        try:
            reply = transact(rundir, pid, req)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(conf)
    payload = reply.message.payload
    assert isinstance(payload, ctl.ImageInfoPayload)
    return ImageInfo(payload.sectors, payload.sector_size, payload.info)


def close(
    rundir: RunDir, pid: int, minor: int, *, force: bool = False, timeout: float | None = None
) -> None:
    """Close VBD ``minor`` (CLOSE; FORCE_SHUTDOWN if ``force``: do not wait for I/O)."""
    check_minor(minor)
    kind = ctl.MessageType.FORCE_SHUTDOWN if force else ctl.MessageType.CLOSE
    transact(rundir, pid, _simple(kind, minor), timeout=timeout)


def pause(rundir: RunDir, pid: int, minor: int, *, timeout: float | None = None) -> None:
    """Quiesce VBD ``minor`` and close its chain (PAUSE)."""
    check_minor(minor)
    transact(rundir, pid, _simple(ctl.MessageType.PAUSE, minor), timeout=timeout)


def unpause(
    rundir: RunDir,
    pid: int,
    minor: int,
    *,
    image: str | None = None,
    secondary: str | None = None,
    log_path: str | None = None,
    timeout: float | None = None,
) -> None:
    """Reopen the chain of paused VBD ``minor`` (RESUME), on ``image`` if given (the
    live-snapshot primitive), with a ``secondary`` image or a changed-block ``log_path``."""
    check_minor(minor)
    for what, name in (("image", image), ("secondary image", secondary), ("log path", log_path)):
        check_name(what, name or "")
    flags = ctl.OpenFlag(0)
    if secondary is not None:
        flags |= ctl.OpenFlag.SECONDARY
    if log_path is not None:
        flags |= ctl.OpenFlag.ADD_LOG
    params = ctl.Params(flags=flags, devnum=minor, path=image or "", secondary=secondary or "")
    req = ctl.Request(ctl.request(ctl.MessageType.RESUME, minor, params), log_path=log_path)
    transact(rundir, pid, req, timeout=timeout)


@dataclass(frozen=True)
class VbdListing:
    """One VBD as tapdisk's LIST reports it. ``image`` is ``"type:/path"`` or ``None``."""

    minor: int
    state: int
    image: str | None


def list_vbds(rundir: RunDir, pid: int, *, timeout: float = LIST_TIMEOUT) -> list[VbdListing]:
    """The VBDs of tapdisk ``pid`` (LIST), by ascending minor."""
    reply = transact(rundir, pid, _simple(ctl.MessageType.LIST, ctl.NO_MINOR), timeout=timeout)
    out = [VbdListing(e.minor, e.state, e.path or None) for e in reply.entries]
    return sorted(out, key=lambda v: v.minor)


def stats_text(rundir: RunDir, pid: int, minor: int, *, timeout: float = STATS_TIMEOUT) -> str:
    """The statistics of VBD ``minor`` (STATS) as the JSON text tapdisk sent; ``minor``
    0xFFFF asks for every VBD."""
    if minor != ctl.NO_MINOR:
        check_minor(minor)
    reply = transact(rundir, pid, _simple(ctl.MessageType.STATS, minor), timeout=timeout)
    return reply.data.decode("utf-8", "replace")


def stats(rundir: RunDir, pid: int, minor: int, *, timeout: float = STATS_TIMEOUT) -> Any:
    """:func:`stats_text` parsed: a dict, or a list for minor 0xFFFF. Raises
    :class:`~blktap.errors.ProtocolError` (EPROTO) if tapdisk did not send JSON."""
    text = stats_text(rundir, pid, minor, timeout=timeout)
    try:
        return json.loads(text)
    except ValueError as exc:
        message = f"tapdisk {pid}: STATS is not JSON: {exc}"
        raise ProtocolError(message, errno=errno.EPROTO) from None


def disk_info(rundir: RunDir, pid: int, minor: int) -> ImageInfo:
    """The size of the image open on VBD ``minor`` (DISK_INFO)."""
    check_minor(minor)
    reply = transact(rundir, pid, _simple(ctl.MessageType.DISK_INFO, minor))
    payload = reply.message.payload
    if not isinstance(payload, ctl.ImageInfoPayload):  # pragma: no cover - codec guarantees
        raise InvalidArgument("DISK_INFO_RSP without image info")
    return ImageInfo(payload.sectors, payload.sector_size, payload.info)
