"""Pre-imported fork servers: the mechanism shared by tap-ctl's and tapdisk's.

A fork server is a daemon that has imported what its children need and forks a child
per request, so a start costs a fork instead of an interpreter and its imports, and the
children share the imported pages copy-on-write. :mod:`blktap.cli.tapctl_server` runs
tap-ctl commands in such forks; :mod:`blktap.tapdisk.forkserver` forks tapdisks. This
module holds what both need, and the client side of the tapdisk server's protocol,
which tap-ctl (:mod:`blktap.control.spawn`) and the ``tapdisk`` command both speak:

- ``$BLKTAP_FORKSERVER``: ``off`` (or ``0``) turns fork servers off; otherwise the
  seconds a server stays without a request (:func:`idle_seconds`).
- Addresses are abstract Unix sockets (SOCK_SEQPACKET); a server serves only peers of
  its own uid, and clients check the server's uid in turn (:func:`connect`).
- Whoever binds a server's address first starts the server (the bind is the lock;
  concurrent clients queue on the bound socket): :func:`start_server` forks it off as a
  detached daemon named by ``/proc/PID/comm``.
- A request is one datagram of NUL-separated fields with descriptors as SCM_RIGHTS
  (:func:`send`, :func:`receive`).
- A server exits when idle, and declines (then exits) once a source file it imported
  changed (:func:`source_stamps`): an upgrade is never served by old code.

Only built-in modules are imported here (``_socket``, not ``socket``): a tap-ctl client
that finds its server pays nothing more for this module.
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False  # typing's costs an import; mypy goes by the name
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_IDLE", "ENV", "Server", "connect", "idle_seconds", "peer_uid",
    "prepare_run_dir", "receive", "send", "set_comm", "source_files", "source_stamps",
    "start_server",
    "tapdisk_address", "tapdisk_request",
]

ENV = "BLKTAP_FORKSERVER"
DEFAULT_IDLE = 600.0
"""Seconds a fork server stays without a request."""

MAX_REQUEST = 1 << 20
_CREDS = 12  # struct ucred: pid, uid, gid (3 ints)
_INT = 4


def idle_seconds(environ: Mapping[str, str]) -> float | None:
    """The fork servers' idle lifetime from ``$BLKTAP_FORKSERVER``; None when off."""
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


def peer_uid(sock: _socket.socket) -> int:
    """The uid of a connected Unix socket's peer (SO_PEERCRED)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CREDS)
    return int.from_bytes(creds[_INT : 2 * _INT], sys.byteorder)


def connect(addr: bytes) -> _socket.socket | None:
    """A SOCK_SEQPACKET connection to ``addr`` if a server of our uid listens there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(addr)
        if peer_uid(sock) != os.geteuid():
            raise ConnectionRefusedError("fork server of another user")
    except OSError:
        sock.close()
        return None
    return sock


def send(conn: _socket.socket, fields: list[bytes], fds: list[int]) -> None:
    """Send one request: ``fields`` joined by NUL, ``fds`` as SCM_RIGHTS."""
    rights = b"".join(fd.to_bytes(_INT, sys.byteorder) for fd in fds)
    conn.sendmsg([b"\0".join(fields)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


def receive(conn: _socket.socket, max_fds: int) -> tuple[list[bytes], list[int]]:
    """Receive one request from a peer of our uid: its fields and descriptors (the
    caller closes them). Raises PermissionError for another uid's peer."""
    if peer_uid(conn) != os.geteuid():
        raise PermissionError("fork server request from another user")
    data, ancdata, _, _ = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(_INT * max_fds))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i : i + _INT], sys.byteorder, signed=True)
                    for i in range(0, len(payload) - _INT + 1, _INT)]
    return data.split(b"\0"), fds


def environment_fields(environ: Mapping[str, str]) -> list[bytes]:
    """``KEY=VALUE`` fields of an environment (see :func:`parse_environment`)."""
    return [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]


def parse_environment(fields: list[bytes]) -> dict[bytes, bytes]:
    return dict(f.split(b"=", 1) for f in fields if b"=" in f)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_comm(name: str) -> None:
    """Set this process's name (/proc/self/comm, at most 15 bytes)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass  # a name for people and tests only


def source_files() -> list[str]:
    """The source file of every imported blktap module."""
    found = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and module.__name__.startswith("blktap"):
            found.append(path)
    return sorted(found)


def source_stamps(files: list[str] | None = None) -> list[int]:
    """Modification times of ``files`` (default :func:`source_files`), -1 for one gone:
    a pre-imported server whose stamps changed runs old code and must make way."""
    stamps = []
    for path in source_files() if files is None else files:
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return stamps


def prepare_run_dir(rundir: str) -> None:
    """Create ``rundir`` (0700); make it private if it is ours and open to others: its
    sockets are the keys to every VBD."""
    os.makedirs(rundir, mode=0o700, exist_ok=True)
    st = os.stat(rundir)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(rundir, 0o700)


# ------------------------------------------------------------------------ the server


def start_server(addr: bytes, comm: str, serve: Callable[[socket.socket], None]) -> bool:
    """Bind ``addr`` and fork off a detached daemon named ``comm`` that runs
    ``serve(listener)``. False when another process holds the address (it is starting
    a server: connect and queue) or no process could be forked."""
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind(addr)
    except OSError:
        listener.close()
        return False
    listener.listen(512)
    try:
        first = os.fork()
    except OSError:
        listener.close()
        return False
    if first == 0:
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
            set_comm(comm)
            serve(listener)
            status = 0
        finally:
            os._exit(status)
    os.waitpid(first, 0)
    listener.close()
    return True


class Server:
    """The accept loop of a fork server: one request at a time, in :meth:`handle`.

    Subclasses import what their children share before calling :meth:`freeze`, and
    implement :meth:`handle` (False: exit) and, if they have more reasons to go than a
    changed source file, :meth:`fresh`."""

    TICK = 1.0
    """How often an idle server looks whether it is stale."""

    def __init__(self, listener: socket.socket, idle: float) -> None:
        self.listener = listener
        self.idle = idle
        self.sources = source_files()
        self.stamps = source_stamps(self.sources)

    def freeze(self) -> None:
        """Call once everything is imported. Takes the stamps of the sources imported
        by now (checked before each request: one stat each, not a walk of sys.modules).
        Keeps the collector away from every object that exists now: it would write to
        (and so unshare) each of their pages in every child. Output the server made so
        far goes to /dev/null now, not later from a child to its client's stdout."""
        import gc

        self.sources = source_files()
        self.stamps = source_stamps(self.sources)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        gc.collect()
        gc.freeze()

    def fresh(self) -> bool:
        """No imported source file changed since the server started."""
        return source_stamps(self.sources) == self.stamps

    def warm_up(self) -> None:
        """Run once the server has been idle for a :data:`TICK` (and freeze again):
        what would make its children cheaper but must not delay the first requests."""

    def serve(self) -> None:
        import time

        self.listener.settimeout(self.TICK)
        last = time.monotonic()
        warm = False
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() - last >= self.idle or not self.fresh():
                    return
                if not warm:
                    warm = True
                    self.warm_up()
                    self.freeze()
                continue
            with conn:
                conn.settimeout(None)
                if not self.handle(conn):
                    return
            last = time.monotonic()

    def decline_stale(self, conn: socket.socket) -> bool:
        """True after declining ``conn`` (``no``) because the server is stale; the
        address is free for a new server by then."""
        if self.fresh():
            return False
        self.listener.close()
        conn.send(b"no")
        return True

    def handle(self, conn: socket.socket) -> bool:
        raise NotImplementedError


# ------------------------------------------------- the tapdisk server's client side

TAPDISK_MAGIC = b"blktap-forkserver-2"
"""Request: ``MAGIC NUL umask NUL blktap-file NUL bin-directory NUL run-directory NUL
env...`` with the stdout for the socket line as SCM_RIGHTS. Replies: ``no`` (declined,
nothing started), or ``forked`` from the server and then ``ok`` from the tapdisk once
its socket line is written (a tapdisk that dies first leaves the connection closed)."""


def tapdisk_address(rundir: str) -> bytes:
    """The abstract socket address of ``rundir``'s tapdisk fork server: uid, device,
    inode and a checksum of the resolved path (an inode is reused by a later directory)."""
    import zlib

    st = os.stat(rundir)
    where = zlib.crc32(os.fsencode(os.path.realpath(rundir)))
    return f"\0blktap-tapdisk-{os.geteuid()}-{st.st_dev:x}-{st.st_ino:x}-{where:08x}".encode()


def installation() -> tuple[bytes, bytes]:
    """This installation: the blktap package's file and the interpreter's directory,
    resolved (``python`` and ``python3`` in one virtualenv are one installation)."""
    where = os.path.realpath(os.path.dirname(sys.executable))
    return os.fsencode(sys.modules["blktap"].__file__ or ""), os.fsencode(where)


def tapdisk_request(conn: _socket.socket, rundir: str, stdout_fd: int,
                    environ: Mapping[str, str], timeout: float | None) -> int | None:
    """Ask the tapdisk fork server on ``conn`` for a tapdisk with ``environ`` that writes
    its socket line to ``stdout_fd``. Returns 0 once it did, EIO when the tapdisk died
    before, None when nothing was started (declined, server gone); raises TimeoutError
    when the line is not written within ``timeout`` seconds."""
    fields = [TAPDISK_MAGIC, b"%o" % current_umask(), *installation(),
              os.fsencode(os.path.realpath(rundir)), *environment_fields(environ)]
    conn.settimeout(timeout)
    try:
        send(conn, fields, [stdout_fd])
        first = conn.recv(64)
    except OSError:  # also a timeout: the server is busy or stuck; start no tapdisk
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
        import errno

        return errno.EIO  # what a spawner reports for a tapdisk that printed nothing
    return 0
