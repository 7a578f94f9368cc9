"""The tapdisk fork server: tapdisks forked from one pre-imported process.

Starting a tapdisk the plain way costs a Python interpreter and the import of the whole
data path (asyncio, uvloop, the NBD server, the image drivers): hundreds of milliseconds
and some 18 MiB of private memory per process. The fork server pays that once per run
directory and forks each new tapdisk from itself, so a start costs a fork and the
tapdisks share the imported pages copy-on-write.

Contract of :func:`launch`, used by the ``tapdisk`` command started without arguments
(the spawn protocol, reference "Spawning"): it asks the run directory's fork server to
start a tapdisk whose standard output is the caller's, and returns once that tapdisk has
written its control socket's path there - exactly what a self-daemonizing tapdisk does,
so tap-ctl (ours or the C one) sees no difference. The tapdisk is a new session leader
whose parent is not the server (it is forked twice). When no server answers, the first
launcher binds the server's address itself (the bind is the lock: concurrent launchers
queue on the bound socket) and forks a server off. :func:`launch` returns ``None`` when
the fork server is off or cannot be used; the caller then runs tapdisk itself.

The server listens on the abstract Unix socket named by :func:`address` (nothing in the
run directory), serves only peers with its own uid, and checks the server's uid in turn.
Each request carries the launcher's environment and umask, which the tapdisk adopts.
The server exits after ``$BLKTAP_FORKSERVER`` seconds without a request (default
:data:`DEFAULT_IDLE`; ``off`` or ``0`` turns the fork server off), when its run directory
is removed or replaced, and when a source file it imported changed (an upgrade): it then
declines the request and the launcher falls back to a plain start.

Messages (SOCK_SEQPACKET): request = ``MAGIC NUL umask NUL blktap-file NUL executable
NUL run-directory NUL env...`` with the launcher's stdout as SCM_RIGHTS; replies: ``no`` (declined,
nothing started), or ``forked`` from the server and then ``ok`` from the tapdisk once
its socket line is written (a tapdisk that dies first leaves the connection closed).
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
import sys
import time

__all__ = [
    "COMM", "DEFAULT_IDLE", "ENV", "address", "connect", "idle_seconds", "launch",
    "peer_uid", "prepare_run_dir", "request", "set_comm", "source_stamps",
]

ENV = "BLKTAP_FORKSERVER"
DEFAULT_IDLE = 600.0
"""Seconds a fork server stays without a request."""

COMM = "tapdisk-forksrv"
"""The server's process name (``/proc/PID/comm``; ``ps -e``); its tapdisks are named
``tapdisk`` again. Its command line and initial environment are the first launcher's."""

_MAGIC = b"blktap-forkserver-1"
_TICK = 1.0  # how often an idle server looks at its run directory and source files
_MAX_REQUEST = 1 << 20


def idle_seconds(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """The fork server's idle lifetime from ``$BLKTAP_FORKSERVER``; None when it is off."""
    value = environ.get(ENV, "").strip().lower()
    if not value:
        return DEFAULT_IDLE
    if value in ("off", "no", "false"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return DEFAULT_IDLE
    return seconds if seconds > 0 else None


def prepare_run_dir(rundir: str) -> None:
    """Create ``rundir`` (0700); make it private if it is ours and open to others: its
    sockets are the keys to every VBD."""
    os.makedirs(rundir, mode=0o700, exist_ok=True)
    st = os.stat(rundir)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(rundir, 0o700)


def address(rundir: str) -> bytes:
    """The abstract socket address of ``rundir``'s fork server: uid, device, inode and a
    checksum of the resolved path (an inode is reused by a later directory)."""
    import zlib

    st = os.stat(rundir)
    where = zlib.crc32(os.fsencode(os.path.realpath(rundir)))
    return f"\0blktap-tapdisk-{os.geteuid()}-{st.st_dev:x}-{st.st_ino:x}-{where:08x}".encode()


# --------------------------------------------------------------------------- launcher


def launch(rundir: str) -> int | None:
    """Start a tapdisk through ``rundir``'s fork server with our stdout (module docstring).

    Returns the launcher's exit status (0 once the tapdisk wrote its socket line, EIO if
    it died before), or None when the caller must start tapdisk itself.
    """
    idle = idle_seconds(os.environ)
    if idle is None:
        return None
    try:
        prepare_run_dir(rundir)
        addr = address(rundir)
    except OSError:
        return None
    conn = connect(addr) or _start_server(addr, rundir, idle)
    if conn is None:
        return None
    with conn:
        return _request(conn, rundir, 1, os.environ, None)


def request(rundir: str, stdout_fd: int, environ: dict[str, str],
            timeout: float | None) -> int | None:
    """Have ``rundir``'s running fork server start a tapdisk with ``environ`` that writes
    its socket line to ``stdout_fd``; start no server. Returns as :func:`launch` (None:
    off, no server, or declined); raises TimeoutError when no answer comes in
    ``timeout`` seconds. For tap-ctl, which so spares the ``tapdisk`` launcher."""
    if idle_seconds(environ) is None:
        return None
    try:
        conn = connect(address(rundir))
    except OSError:
        return None
    if conn is None:
        return None
    with conn:
        conn.settimeout(timeout)
        return _request(conn, rundir, stdout_fd, environ, timeout)


def connect(addr: bytes) -> socket.socket | None:
    """A SOCK_SEQPACKET connection to ``addr`` if a server of our uid listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(addr)
        if peer_uid(sock) != os.geteuid():
            raise ConnectionRefusedError("fork server of another user")
    except OSError:
        sock.close()
        return None
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of a connected Unix socket's peer (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _request(conn: socket.socket, rundir: str, stdout_fd: int,
             environ: dict[str, str] | os._Environ[str], timeout: float | None) -> int | None:
    mask = os.umask(0)
    os.umask(mask)
    blktap = sys.modules["blktap"].__file__ or ""
    fields = [_MAGIC, b"%o" % mask, os.fsencode(blktap), os.fsencode(sys.executable),
              os.fsencode(os.path.realpath(rundir))]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    fds = array.array("i", [stdout_fd])
    try:
        conn.sendmsg([b"\0".join(fields)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        first = conn.recv(64)
    except OSError:
        return None
    if first != b"forked":
        return None  # declined, or the server went away: nothing was started
    try:
        second = conn.recv(64)
    except TimeoutError:
        raise TimeoutError(f"the forked tapdisk did not report its control socket within "
                           f"{timeout:g} s") from None
    except OSError:
        second = b""
    if second != b"ok":
        sys.stderr.write("tapdisk: the forked tapdisk exited before creating its control "
                         "socket (see the system log)\n")
        return errno.EIO  # what the spawner reports for a tapdisk that printed nothing
    return 0


def _start_server(addr: bytes, rundir: str, idle: float) -> socket.socket | None:
    """Bind ``addr`` and fork the server off; None if another launcher won the bind and
    still does not answer, or the server could not be forked."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind(addr)
    except OSError:
        listener.close()
        return connect(addr)  # another launcher is starting one: queue on its socket
    listener.listen(512)
    try:
        first = os.fork()
    except OSError:
        listener.close()
        return None
    if first == 0:
        _server_process(listener, rundir, idle)  # never returns
    os.waitpid(first, 0)
    listener.close()
    return connect(addr)


# --------------------------------------------------------------------------- server


def source_stamps() -> dict[str, int]:
    """Modification time of every imported blktap source file: a pre-imported server
    whose stamps changed runs old code and must make way."""
    found = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and module.__name__.startswith("blktap"):
            try:
                found[path] = os.stat(path).st_mtime_ns
            except OSError:
                found[path] = -1
    return found


def set_comm(name: str) -> None:
    """Set this process's name (/proc/self/comm, at most 15 bytes)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass  # a name for people and tests only


def _server_process(listener: socket.socket, rundir: str, idle: float) -> None:
    """The forked server: detach (session, second fork), import, serve; never returns."""
    status = 1
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        set_comm(COMM)
        _Server(listener, rundir, idle).serve()
        status = 0
    finally:
        os._exit(status)


class _Server:
    def __init__(self, listener: socket.socket, rundir: str, idle: float) -> None:
        import gc

        from blktap.tapdisk import daemon  # the data path: what every tapdisk shares

        daemon.preload()
        self.daemon = daemon
        self.listener = listener
        self.rundir = rundir
        self.root = os.stat(rundir)
        self.idle = idle
        self.blktap = os.fsencode(sys.modules["blktap"].__file__ or "")
        self.executable = os.fsencode(sys.executable)
        self.where = os.fsencode(os.path.realpath(rundir))
        self.sources = self._sources()
        # Objects that exist now are never collected: keep the collector from writing to
        # (and so unsharing) every page of them in each child.
        gc.collect()
        gc.freeze()

    @staticmethod
    def _sources() -> dict[str, int]:
        return source_stamps()

    def _fresh(self) -> bool:
        """The run directory is the same and no imported source file changed."""
        try:
            st = os.stat(self.rundir)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != (self.root.st_dev, self.root.st_ino):
            return False
        return self._sources() == self.sources

    def serve(self) -> None:
        self.listener.settimeout(_TICK)
        last = time.monotonic()
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() - last >= self.idle or not self._fresh():
                    return
                continue
            with conn:
                conn.settimeout(None)
                if not self._handle(conn):
                    return
            last = time.monotonic()

    def _handle(self, conn: socket.socket) -> bool:
        """Serve one request; False when the server must exit (it declined as stale)."""
        fds: list[int] = []
        try:
            if peer_uid(conn) != os.geteuid():
                return True
            data, ancdata, _, _ = conn.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4])
            fields = data.split(b"\0")
            if len(fields) < 5 or fields[0] != _MAGIC or len(fds) != 1:
                return True
            if fields[2:5] != [self.blktap, self.executable, self.where]:
                conn.send(b"no")  # another installation or directory: not ours to serve
                return True
            if not self._fresh():
                self.listener.close()  # free the address for a new server first
                conn.send(b"no")
                return False
            env = dict(f.split(b"=", 1) for f in fields[5:] if b"=" in f)
            conn.send(b"forked")
            child = os.fork()
            if child == 0:
                self._tapdisk(conn, fds[0], int(fields[1], 8), env)  # never returns
            os.waitpid(child, 0)
            return True
        except OSError:
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
            set_comm("tapdisk")
            if "random" in sys.modules:  # fault injection's rate draws differ per tapdisk
                sys.modules["random"].seed()

            def ready() -> None:
                with contextlib.suppress(OSError):  # the launcher is gone
                    conn.send(b"ok")
                conn.close()

            status = self.daemon.run_forked(ready)
        finally:
            os._exit(status)
