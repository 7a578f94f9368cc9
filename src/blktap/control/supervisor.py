"""The supervisor process of one supervised VBD (see :mod:`blktap.control.supervise`).

Run as ``python -m blktap.control.supervisor --run-dir DIR --dev-dir DIR --minor M
--image TYPE:PATH --options JSON`` by :func:`blktap.control.supervise.start`, in a new
session. It forks once more (so it is nobody's child and has no terminal), writes
``supervisor <pid>`` on stdout, takes its lock file, starts the tapdisk (spawn, attach
the already allocated minor, open), writes its state file and one JSON line (``{"ok":
true, "pid": ..., "sectors": ...}`` or ``{"ok": false, "errno": ..., "message": ...}``),
and closes stdout. Then it waits on a pidfd of the tapdisk:

- the tapdisk exited and removed its control socket (last VBD detached, SIGTERM): the
  supervisor removes its state file, lock file and stable NBD link, and exits;
- the tapdisk died (its ``ctl<pid>`` is still there; ``sweep`` leaves the sockets of
  a supervised tapdisk to its supervisor): what it left is removed, a new
  tapdisk is started on the same minor, image and options, the stable NBD path is
  pointed at its socket, and the state file lists the new pid. Restarts are immediate
  up to ``FREE_RESTARTS`` deaths within ``WINDOW`` seconds; beyond that (a crash loop)
  each waits a growing delay (0.5 s, doubling, at most ``MAX_DELAY``), and so does
  each retry of a restart that failed. If the minor is freed meanwhile (its marker is
  gone), supervision ends.

SIGTERM before the VBD is open undoes what was done; after, it stops the supervisor
(finishing a restart in progress) and leaves the tapdisk and the state file alone.
Logs go to syslog (daemon facility) as ``tap-ctl-supervisor[pid]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import logging.handlers
import os
import select
import signal
import sys
import time
from pathlib import Path

from blktap.control import cleanup, lifecycle
from blktap.control.options import OpenOptions
from blktap.control.rundir import RunDir
from blktap.control.supervise import (
    State,
    forget,
    lock_path,
    options_from_json,
    write_state,
)
from blktap.errors import BlktapError, errno_of

log = logging.getLogger("blktap.control.supervisor")

FREE_RESTARTS = 5
WINDOW = 60.0
"""Up to FREE_RESTARTS deaths within WINDOW seconds are restarted without delay."""

MAX_DELAY = 30.0


class _Stop(BaseException):
    """SIGTERM: stop supervising."""


def _on_term(signum: int, frame: object) -> None:
    raise _Stop


def _setup_logging() -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler: logging.Handler
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("tap-ctl-supervisor[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.handlers[:] = [handler]


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(1, (line + "\n").encode())


def _release_stdout() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.close(null)


class Supervisor:
    """Keeps one VBD's tapdisk running; see the module docstring."""

    def __init__(self, rundir: RunDir, minor: int, image: str, options: OpenOptions,
                 options_doc: dict[str, object]) -> None:
        self.rundir = rundir
        self.minor = minor
        self.image = image
        self.options = options
        self.options_doc = options_doc
        self.state: State | None = None
        self.started_at = 0.0
        self.deaths: collections.deque[float] = collections.deque()

    def begin(self) -> int:
        """Start the first tapdisk and report; return the exit status if it failed,
        else -1 (go on supervising)."""
        try:
            pid, info = lifecycle.serve_minor(self.rundir, self.minor, self.image, self.options)
        except _Stop:
            _say(json.dumps({"ok": False, "errno": errno.EINTR, "message": "interrupted"}))
            return 1
        except Exception as exc:
            _say(json.dumps({"ok": False, "errno": errno_of(exc),
                             "message": getattr(exc, "message", str(exc))}))
            return 1
        self.started_at = time.monotonic()
        self.state = State(
            supervisor_pid=os.getpid(), minor=self.minor, image=self.image,
            options=dict(self.options_doc), pids=(pid,),
            nbd_path=str(self.rundir.nbd_socket(pid, self.minor)),
        )
        write_state(self.rundir, self.state)
        _say(json.dumps({"ok": True, "pid": pid, "sectors": info.sectors,
                         "sector_size": info.sector_size, "info": info.info}))
        _release_stdout()
        log.info("minor %d: supervising tapdisk %d serving %s", self.minor, pid, self.image)
        return -1

    def run(self) -> int:
        """Supervise until the tapdisk exits on purpose (0) or SIGTERM (0)."""
        assert self.state is not None
        try:
            while True:
                pid = self.state.pid
                self._wait_exit(pid)
                # A restart runs to its end: destroy's SIGTERM waits for it.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                if self._exited_on_purpose(pid):
                    log.info("minor %d: tapdisk %d exited; supervision ends", self.minor, pid)
                    forget(self.rundir, self.state)
                    return 0
                if not self._restart(pid):
                    forget(self.rundir, self.state)
                    return 0
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        except _Stop:
            log.info("minor %d: supervision stopped", self.minor)
            return 0

    def _wait_exit(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            while True:
                ready, _, _ = select.select([fd], [], [])
                if ready:
                    return
        finally:
            os.close(fd)

    def _exited_on_purpose(self, pid: int) -> bool:
        # A tapdisk that exits by itself removes its control socket; a killed one cannot.
        return not self.rundir.ctl_socket(pid).exists()

    def _restart(self, dead: int) -> bool:
        """Start a tapdisk in place of ``dead``; False if the minor was freed meanwhile
        (someone ended the VBD: nothing to heal)."""
        assert self.state is not None
        now = time.monotonic()
        lived = now - self.started_at
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - WINDOW:
            self.deaths.popleft()
        log.warning("minor %d: tapdisk %d died after %.1f s; restarting", self.minor, dead, lived)
        attempt = max(0, len(self.deaths) - FREE_RESTARTS)
        while True:
            if attempt:
                delay = min(0.5 * 2 ** (attempt - 1), MAX_DELAY)
                self._sleep(delay)
            if not self.rundir.marker(self.minor).exists():
                log.warning("minor %d was freed; supervision ends", self.minor)
                cleanup.remove_sockets(self.rundir, dead)
                return False
            try:
                cleanup.remove_sockets(self.rundir, dead)
                cleanup.clean_minor(self.rundir, self.minor)
                pid, _info = lifecycle.serve_minor(self.rundir, self.minor, self.image,
                                                   self.options)
                break
            except (BlktapError, OSError) as exc:
                log.error("minor %d: restart failed: %s", self.minor, exc)
                attempt += 1
        self.started_at = time.monotonic()
        self._point_stable_path(pid)
        self.state = dataclasses.replace(self.state, pids=(*self.state.pids, pid),
                                         restarts=self.state.restarts + 1)
        write_state(self.rundir, self.state)
        log.warning("minor %d: tapdisk %d serves %s again (restart %d)", self.minor, pid,
                    self.image, self.state.restarts)
        return True

    def _sleep(self, seconds: float) -> None:
        # SIGTERM is blocked here; let it end the wait (and the supervisor).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        try:
            time.sleep(seconds)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def _point_stable_path(self, pid: int) -> None:
        assert self.state is not None
        stable = Path(self.state.nbd_path)
        current = self.rundir.nbd_socket(pid, self.minor)
        if stable == current:
            return
        tmp = stable.with_name(f".{stable.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(current.name, tmp)
        os.replace(tmp, stable)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tap-ctl-supervisor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dev-dir", required=True)
    p.add_argument("--minor", type=int, required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--options", required=True, help="OpenOptions as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rundir = RunDir(root=Path(args.run_dir), dev_dir=Path(args.dev_dir))
    options_doc = json.loads(args.options)
    options = options_from_json(options_doc)
    if os.fork():
        os._exit(0)  # the second fork: the supervisor is nobody's child
    os.chdir("/")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_logging()
    _say(f"supervisor {os.getpid()}")
    lock_fd = os.open(lock_path(rundir, args.minor), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say(json.dumps({"ok": False, "errno": errno.EBUSY,
                         "message": f"minor {args.minor} already has a supervisor"}))
        return 1
    supervisor = Supervisor(rundir, args.minor, args.image, options, options_doc)
    status = supervisor.begin()
    if status >= 0:
        with contextlib.suppress(FileNotFoundError):
            lock_path(rundir, args.minor).unlink()
        return status
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
