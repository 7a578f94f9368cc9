"""The tapdisk fork server: tapdisks forked from one pre-imported process.

Starting a tapdisk the plain way costs a Python interpreter and the import of the whole
data path (asyncio, uvloop, the NBD server, the image drivers): hundreds of milliseconds
and some 18 MiB of private memory per process. The fork server pays that once per run
directory and forks each new tapdisk from itself, so a start costs a fork and the
tapdisks share the imported pages copy-on-write. The mechanism (addresses, the bind as
the lock, requests, staleness) is :mod:`blktap.prefork`'s.

Contract of :func:`launch`, used by the ``tapdisk`` command started without arguments
(the spawn protocol, reference "Spawning"): it asks the run directory's fork server to
start a tapdisk whose standard output is the caller's, and returns once that tapdisk has
written its control socket's path there - exactly what a self-daemonizing tapdisk does,
so tap-ctl (ours or the C one) sees no difference. The tapdisk is a new session leader
whose parent is not the server (it is forked twice). When no server answers, the first
launcher binds the server's address itself (concurrent launchers queue on the bound
socket) and forks a server off. :func:`launch` returns ``None`` when the fork server is
off or cannot be used; the caller then runs tapdisk itself. tap-ctl asks a running
server directly (:func:`blktap.prefork.tapdisk_request`), sparing the launcher.

The server listens on :func:`blktap.prefork.tapdisk_address` (nothing in the run
directory). Each request carries the launcher's environment and umask, which the
tapdisk adopts. The server exits after ``$BLKTAP_FORKSERVER`` seconds without a request
(default :data:`~blktap.prefork.DEFAULT_IDLE`; ``off`` or ``0`` turns the fork server
off), when its run directory is removed or replaced, and when a source file it imported
changed (an upgrade): it then declines the request and the launcher falls back to a
plain start.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

from blktap import prefork
from blktap.prefork import prepare_run_dir

if TYPE_CHECKING:
    import socket

__all__ = ["COMM", "launch", "prepare_run_dir"]

COMM = "tapdisk-forksrv"
"""The server's process name (``/proc/PID/comm``; ``ps -e``); its tapdisks are named
``tapdisk`` again. Its command line and initial environment are the first launcher's."""


def launch(rundir: str) -> int | None:
    """Start a tapdisk through ``rundir``'s fork server with our stdout (module docstring).

    Returns the launcher's exit status (0 once the tapdisk wrote its socket line, EIO if
    it died before), or None when the caller must start tapdisk itself.
    """
    idle = prefork.idle_seconds(os.environ)
    if idle is None:
        return None
    try:
        prepare_run_dir(rundir)
        addr = prefork.tapdisk_address(rundir)
    except OSError:
        return None
    conn = prefork.connect(addr)
    if conn is None:
        prefork.start_server(addr, COMM, lambda listener: _serve(listener, rundir, idle))
        conn = prefork.connect(addr)  # ours, or the one another launcher is starting
    if conn is None:
        return None
    try:
        status = prefork.tapdisk_request(conn, rundir, 1, os.environ, None)
    finally:
        conn.close()
    if status:
        sys.stderr.write("tapdisk: the forked tapdisk exited before creating its control "
                         "socket (see the system log)\n")
    return status


def _serve(listener: socket.socket, rundir: str, idle: float) -> None:
    _Server(listener, rundir, idle).serve()


class _Server(prefork.Server):
    def __init__(self, listener: socket.socket, rundir: str, idle: float) -> None:
        from blktap.tapdisk import daemon  # the data path: what every tapdisk shares

        daemon.preload()
        self.daemon = daemon
        super().__init__(listener, idle)
        self.rundir = rundir
        self.root = os.stat(rundir)
        self.expected = [*prefork.installation(), os.fsencode(os.path.realpath(rundir))]
        self.freeze()

    def fresh(self) -> bool:
        """The run directory is the same and no imported source file changed."""
        try:
            st = os.stat(self.rundir)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != (self.root.st_dev, self.root.st_ino):
            return False
        return super().fresh()

    def handle(self, conn: socket.socket) -> bool:
        """Serve one request; False when the server must exit (it declined as stale)."""
        fds: list[int] = []
        try:
            fields, fds = prefork.receive(conn, 4)
            if len(fields) < 5 or fields[0] != prefork.TAPDISK_MAGIC or len(fds) != 1:
                return True
            if fields[2:5] != self.expected:
                conn.send(b"no")  # another installation or directory: not ours to serve
                return True
            if self.decline_stale(conn):
                return False
            env = prefork.parse_environment(fields[5:])
            conn.send(b"forked")
            child = os.fork()
            if child == 0:
                self._tapdisk(conn, fds[0], int(fields[1], 8), env)  # never returns
            os.waitpid(child, 0)
            return True
        except (OSError, ValueError):
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def _tapdisk(self, conn: socket.socket, stdout: int, umask: int,
                 env: dict[bytes, bytes]) -> None:
        """In the first child: become a session leader, fork the tapdisk, exit."""
        status = 1
        try:
            self.listener.close()
            os.setsid()
            if os.fork():
                os._exit(0)
            os.environ.clear()
            os.environb.update(env)
            os.umask(umask)
            os.dup2(stdout, 1)
            os.close(stdout)
            prefork.set_comm("tapdisk")
            if "random" in sys.modules:  # fault injection's rate draws differ per tapdisk
                sys.modules["random"].seed()

            def ready() -> None:
                with contextlib.suppress(OSError):  # the launcher is gone
                    conn.send(b"ok")
                conn.close()

            status = self.daemon.run_forked(ready)
        finally:
            os._exit(status)
