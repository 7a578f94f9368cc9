"""Starting and stopping tapdisk processes.

Spawn protocol (reference: "Spawning"): fork and exec the tapdisk binary with stdout on a
pipe; tapdisk daemonizes, creates ``ctl<pid>`` and writes that path as one line; the
spawner reads the line and takes the pid from the name. The pre-daemon child exits and is
reaped here; the daemon itself is not our child.

The binary is ``$BLKTAP_TAPDISK`` if set, else the ``tapdisk`` next to the running Python
(the virtualenv's or the installation's ``bin``), else ``tapdisk`` on ``$PATH``.

When that binary is the installation's own and its run directory's fork server
(:mod:`blktap.tapdisk.forkserver`) is running, the tapdisk is asked of the server
directly (:func:`blktap.prefork.tapdisk_request`), with the same environment and the
line on a pipe of ours: the same tapdisk as the ``tapdisk`` command would start, without
a Python start-up for the launcher. Otherwise (no server yet: the launcher starts one)
the binary is run. Every wait here is for an event (the line, the child's exit), not a
poll.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blktap import prefork
from blktap.control.errors import SpawnError, TimedOut
from blktap.control.rundir import RunDir
from blktap.errors import NotFound
from blktap.paths import DEV_DIR_ENV, RUN_DIR_ENV

__all__ = [
    "TAPDISK_ENV",
    "is_running",
    "spawn",
    "tapdisk_binary",
    "terminate",
    "wait_exit",
]

log = logging.getLogger(__name__)

TAPDISK_ENV = "BLKTAP_TAPDISK"
_SOCKET_LINE = re.compile(r"ctl([0-9]+)")
_MAX_LINE = 4096


def tapdisk_binary() -> str:
    """The tapdisk executable to run (see the module docstring). Raises :class:`NotFound`."""
    explicit = os.environ.get(TAPDISK_ENV)
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "tapdisk"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("tapdisk")
    if found:
        return found
    raise NotFound(f"no tapdisk executable: set ${TAPDISK_ENV} or install blktap")


def spawn(rundir: RunDir, *, binary: str | None = None, timeout: float | None = 60.0) -> int:
    """Start a tapdisk serving ``rundir``; return its (daemon) pid once ``ctl<pid>`` exists.

    ``timeout`` bounds the wait for the socket line (``None``: wait indefinitely). Raises
    :class:`SpawnError` when the binary cannot run, exits with an error, or reports no
    socket (its errno is the exit status when that is 1..133, else EIO; the message holds
    what tapdisk wrote on stderr), :class:`~blktap.control.errors.TimedOut` (ETIMEDOUT)
    when the line does not come. After a failure no child of ours is left running.
    """
    program = binary or tapdisk_binary()
    rundir.ensure()
    env = dict(os.environ)
    env[RUN_DIR_ENV] = str(rundir.root)
    env[DEV_DIR_ENV] = str(rundir.dev_dir)
    if binary is None and TAPDISK_ENV not in os.environ and program == _own_tapdisk():
        pid = _spawn_forked(rundir, env, timeout)
        if pid is not None:
            return pid
    with tempfile.TemporaryFile(prefix="tapdisk-stderr") as errfile:
        try:
            proc = subprocess.Popen(
                [program],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errfile,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise SpawnError(f"cannot run {program}: {os.strerror(code)}", errno=code) from None
        assert proc.stdout is not None
        try:
            line = _read_line(proc.stdout.fileno(), timeout)
        except BaseException:
            _kill_child(proc)
            raise
        finally:
            proc.stdout.close()
        status = _wait_child(proc, 10.0)
        errfile.seek(0)
        stderr = errfile.read(_MAX_LINE).decode("utf-8", "replace").strip()
    match = _SOCKET_LINE.fullmatch(os.path.basename(line.strip()))
    if status != 0 or match is None:
        code = status if status is not None and 0 < status <= 133 else errno.EIO
        how = f"exited with status {status}" if status else f"printed {line.strip()!r}"
        detail = f": {stderr}" if stderr else ""
        raise SpawnError(f"{program} {how} instead of its control socket{detail}", errno=code)
    if stderr:
        log.debug("tapdisk stderr: %s", stderr)
    pid = int(match.group(1))
    log.debug("spawned tapdisk %d", pid)
    return pid


def _own_tapdisk() -> str:
    return str(Path(sys.executable).parent / "tapdisk")


def _spawn_forked(rundir: RunDir, env: dict[str, str], timeout: float | None) -> int | None:
    """The tapdisk from the running fork server (module docstring); None: no server."""
    if env.get("BLKTAP_BLOCKDEV", "auto") not in ("auto", "on", "off"):
        return None  # the tapdisk command reports it
    if prefork.idle_seconds(env) is None:
        return None
    try:
        conn = prefork.connect(prefork.tapdisk_address(str(rundir.root)))
    except OSError:
        return None
    if conn is None:
        return None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            status = prefork.tapdisk_request(conn, str(rundir.root), write_end, env,
                                             timeout)
        except TimeoutError as exc:
            raise TimedOut(str(exc)) from None
        finally:
            conn.close()
            os.close(write_end)
        if status is None:
            return None
        line = _read_line(read_end, 1.0) if status == 0 else ""
    finally:
        os.close(read_end)
    match = _SOCKET_LINE.fullmatch(os.path.basename(line.strip()))
    if match is None:
        raise SpawnError("the forked tapdisk exited before reporting its control socket "
                         "(see the system log)", errno=errno.EIO)
    pid = int(match.group(1))
    log.debug("forked tapdisk %d", pid)
    return pid


def _read_line(fd: int, timeout: float | None) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    data = bytearray()
    while b"\n" not in data and len(data) < _MAX_LINE:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            raise TimedOut(f"tapdisk did not report its control socket within {timeout:g} s")
        chunk = os.read(fd, _MAX_LINE)
        if not chunk:
            break
        data += chunk
    return bytes(data).split(b"\n", 1)[0].decode("utf-8", "surrogateescape")


def _wait_child(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status of ``proc`` (killed after ``timeout`` s). Popen.wait(timeout)
    polls with sleeps of up to 50 ms; a pidfd wakes us as the child exits."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        pidfd = -1
    if pidfd >= 0:
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not ready:
            _kill_child(proc)
        return proc.wait()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_child(proc)
        return proc.returncode


def _kill_child(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def is_running(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    # The state follows the parenthesised command name, which may contain spaces.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True if it did.

    With a pidfd (Linux 5.3+) the wait ends as the process exits; otherwise /proc is
    polled at growing intervals (5 ms to 100 ms)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        pidfd = -1  # no pidfd here (an old kernel, a sandbox): poll
    if pidfd >= 0:
        try:
            select.select([pidfd], [], [], max(0.0, timeout))
        finally:
            os.close(pidfd)
        return not is_running(pid)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while is_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def terminate(rundir: RunDir, pid: int, *, timeout: float = 5.0) -> None:
    """Stop tapdisk ``pid``: SIGTERM, then SIGKILL after ``timeout`` s; then remove the
    sockets it may have left (``ctl<pid>``, ``nbd<pid>.*``). Returns once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout):
        log.warning("tapdisk %d ignored SIGTERM for %g s; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_exit(pid, timeout)
    for leftover in [rundir.ctl_socket(pid), *rundir.nbd_sockets(pid)]:
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
