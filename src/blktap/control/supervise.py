"""Supervised VBDs, the library side: start a supervisor, find it, stop it.

A supervised VBD (``tap-ctl create --supervise``) has a small supervisor process of its
own (:mod:`blktap.control.supervisor`, double-forked, no terminal) that starts its
tapdisk and, when that tapdisk dies (killed, crashed), starts a new one on the same
minor, image and options within about a second. Its record is the state file
``<run>/supervise<minor>.json`` (mode 0600): the supervisor's pid, the minor, image and
options, every tapdisk pid it started (the current one last) and the stable NBD socket
path. While it runs, the supervisor holds an exclusive ``flock`` on
``<run>/supervise<minor>.lock`` (its liveness, immune to pid reuse).

The NBD socket of a C-style tapdisk is named after its pid, ``nbd<pid>.<minor>``. The
stable path of a supervised VBD is the first tapdisk's socket name: after a restart it
is a symbolic link to the new tapdisk's ``nbd<newpid>.<minor>``, so a client that
reconnects to the path it was given reaches the new tapdisk. Everything else keeps the C
layout (``ctl<pid>``, ``nbd<pid>.<minor>`` of the current tapdisk, the minor marker).

A tapdisk that exits on purpose (its last VBD detached, SIGTERM) removes its control
socket; the supervisor takes that as the end and exits too, removing its state file and
the stable link. A tapdisk that dies leaves its control socket; that is what is healed.
``tap-ctl destroy`` stops the supervisor first (SIGTERM; a restart in progress is
finished), then destroys the current tapdisk's VBD and removes state file and link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blktap.control.errors import ControlError, TimedOut
from blktap.control.options import ImageInfo, OpenOptions
from blktap.control.rundir import RunDir
from blktap.errors import BlktapError, InvalidArgument
from blktap.proto import control as ctl
from blktap.proto.tcp_export import TcpExport

__all__ = [
    "READY_TIMEOUT",
    "State",
    "forget",
    "lock_path",
    "options_from_json",
    "options_to_json",
    "read_state",
    "start",
    "state_path",
    "stop",
    "supervisor_running",
    "write_state",
]

READY_TIMEOUT = 120.0
"""How long ``start`` waits for the supervisor to report the VBD open."""

STOP_TIMEOUT = 60.0
"""How long ``stop`` waits for the supervisor to finish a restart in progress and exit."""


def state_path(rundir: RunDir, minor: int) -> Path:
    """``<run>/supervise<minor>.json``."""
    return rundir.root / f"supervise{minor}.json"


@dataclass(frozen=True)
class State:
    """A supervisor's record of its VBD (the contents of its state file)."""

    supervisor_pid: int
    minor: int
    image: str
    options: dict[str, Any]
    pids: tuple[int, ...]
    """Every tapdisk started for this VBD, the current one last."""
    nbd_path: str
    """The stable NBD socket path: the first tapdisk's ``nbd<pid>.<minor>``."""
    restarts: int = 0

    @property
    def pid(self) -> int:
        """The current tapdisk."""
        return self.pids[-1]

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        doc["pids"] = list(self.pids)
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> State:
        doc = json.loads(text)
        return cls(
            supervisor_pid=int(doc["supervisor_pid"]),
            minor=int(doc["minor"]),
            image=str(doc["image"]),
            options=dict(doc["options"]),
            pids=tuple(int(p) for p in doc["pids"]),
            nbd_path=str(doc["nbd_path"]),
            restarts=int(doc.get("restarts", 0)),
        )


def write_state(rundir: RunDir, state: State) -> None:
    """Replace the state file atomically (readers never see half of it)."""
    path = state_path(rundir, state.minor)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
    os.replace(tmp, path)


def lock_path(rundir: RunDir, minor: int) -> Path:
    """``<run>/supervise<minor>.lock``: locked (``flock``) by the live supervisor."""
    return rundir.root / f"supervise{minor}.lock"


def read_state(rundir: RunDir, minor: int) -> State | None:
    """The state of ``minor``'s supervisor, or ``None`` if it is not supervised."""
    try:
        return State.from_json(state_path(rundir, minor).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"{state_path(rundir, minor)} is corrupt: {exc}") from None


def supervisor_running(rundir: RunDir, minor: int) -> bool:
    """True while a supervisor holds ``minor``'s lock file."""
    try:
        fd = os.open(lock_path(rundir, minor), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def options_to_json(options: OpenOptions) -> dict[str, Any]:
    """``options`` as JSON values. An encryption key cannot be kept for restarts:
    :class:`InvalidArgument`."""
    if options.key is not None:
        raise InvalidArgument("a supervised VBD cannot use an encryption key (-E)")
    doc = dataclasses.asdict(options)
    doc["extra_flags"] = int(options.extra_flags)
    del doc["key"]
    return doc


def options_from_json(doc: dict[str, Any]) -> OpenOptions:
    """The inverse of :func:`options_to_json`."""
    values = dict(doc)
    values["extra_flags"] = ctl.OpenFlag(int(values.get("extra_flags", 0)))
    if values.get("export") is not None:
        values["export"] = TcpExport.from_doc(values["export"])
    return OpenOptions(**values)


def start(
    rundir: RunDir, minor: int, image: str, options: OpenOptions, *,
    timeout: float = READY_TIMEOUT,
) -> tuple[int, ImageInfo]:
    """Start a supervisor for allocated ``minor``; it spawns a tapdisk, attaches the
    minor and opens ``image``. Return (tapdisk pid, image info) once it is open.

    Raises the error of the failing step with its errno (e.g. ENOENT for a missing
    image), :class:`TimedOut` past ``timeout``. On failure, including
    KeyboardInterrupt, the supervisor has undone its steps and exited; the minor is
    left allocated (the caller frees it).
    """
    rundir.ensure()
    doc = options_to_json(options)
    argv = [sys.executable, "-m", "blktap.control.supervisor",
            "--run-dir", str(rundir.root), "--dev-dir", str(rundir.dev_dir),
            "--minor", str(minor), "--image", image, "--options", json.dumps(doc)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)
    assert proc.stdout is not None
    supervisor: int | None = None
    try:
        lines = _read_lines(proc.stdout.fileno(), timeout)
        proc.wait(timeout=10.0)
        if lines and lines[0].startswith("supervisor "):
            supervisor = int(lines[0].split()[1])
        result = json.loads(lines[-1]) if len(lines) > 1 else None
    except BaseException:
        _abort(rundir, minor, supervisor, proc)
        raise
    finally:
        proc.stdout.close()
    if result is None:
        raise ControlError("the supervisor exited without reporting", errno=errno.EIO)
    if not result.get("ok"):
        raise BlktapError(str(result.get("message", "supervisor failed")),
                          errno=int(result.get("errno", errno.EIO)))
    info = ImageInfo(int(result["sectors"]), int(result["sector_size"]), int(result["info"]))
    return int(result["pid"]), info


def _read_lines(fd: int, timeout: float) -> list[str]:
    """Lines until EOF (the supervisor closes its stdout once the VBD is open)."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise TimedOut(f"the supervisor did not report within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return [line for line in data.decode("utf-8", "replace").splitlines() if line]


def _abort(rundir: RunDir, minor: int, supervisor: int | None,
           proc: subprocess.Popen[bytes]) -> None:
    # SIGTERM before it is ready makes the supervisor undo its steps and exit.
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10.0)
    if supervisor is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        _wait_unlocked(rundir, minor, STOP_TIMEOUT)


def _wait_unlocked(rundir: RunDir, minor: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while supervisor_running(rundir, minor):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def stop(rundir: RunDir, minor: int, *, timeout: float = STOP_TIMEOUT) -> State | None:
    """Stop ``minor``'s supervisor (if it runs) without touching its tapdisk; return its
    final state (the current tapdisk last in ``pids``), or ``None`` if the minor is not
    supervised. A restart in progress is finished first. Raises :class:`TimedOut` if
    the supervisor does not exit within ``timeout``. The state file stays: see
    :func:`forget`."""
    state = read_state(rundir, minor)
    if state is None:
        return None
    if supervisor_running(rundir, minor):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.supervisor_pid, signal.SIGTERM)
        if not _wait_unlocked(rundir, minor, timeout):
            raise TimedOut(f"the supervisor of minor {minor} (pid {state.supervisor_pid}) "
                           f"did not stop within {timeout:g} s")
        state = read_state(rundir, minor) or state
    return state


def forget(rundir: RunDir, state: State) -> None:
    """Remove a stopped supervisor's state file, lock file and stable NBD link."""
    stable = Path(state.nbd_path)
    if stable.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            stable.unlink()
    for path in (state_path(rundir, state.minor), lock_path(rundir, state.minor)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
