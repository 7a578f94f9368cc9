"""The tap-ctl fork server: tap-ctl commands run in forks of one pre-imported process.

A tap-ctl command spends most of its time starting Python and importing the control
library. :func:`forward` hands the command instead to a server of the same installation
and uid that has imported it all: the server forks a worker that adopts the command's
standard input, output and error (SCM_RIGHTS), working directory, umask, environment and
arguments, runs :func:`blktap.cli.tap_ctl.main` and reports the exit status, which the
client exits with. SIGINT, SIGTERM and SIGHUP sent to the client are passed on to the
worker (tap-ctl undoes a half-done create on them). Output, exit status and side effects
are those of the same command run in-process.

When no server answers, the client binds the server's address (the bind is the lock),
forks the server off (a daemon named :data:`COMM`, detached, whose command line is the
first client's) and runs its own command in-process. The server exits after
``$BLKTAP_FORKSERVER`` seconds without a request (``off``/``0``: no server is used or
started) and declines (then exits) when an imported source file changed.

Messages (SOCK_SEQPACKET, abstract address per uid and installation): request =
``MAGIC NUL umask NUL cwd NUL argc NUL argv... NUL env...`` with fds 0, 1, 2; replies
``pid:N`` (the worker) and ``exit:N``; ``no`` when declined.
"""

from __future__ import annotations

import array
import contextlib
import io
import os
import signal
import socket
import sys
import time

from blktap.tapdisk import forkserver as fs

__all__ = ["COMM", "forward", "main"]

COMM = "tap-ctl-forksrv"
_MAGIC = b"blktap-tapctl-1"
_MAX_REQUEST = 1 << 20


def _address() -> bytes:
    import zlib

    key = os.fsencode(sys.modules["blktap"].__file__ or "") + b"\0" + os.fsencode(
        sys.executable)
    return f"\0blktap-tapctl-{os.geteuid()}-{zlib.crc32(key):08x}".encode()


def main() -> int:
    """The ``tap-ctl`` command: through the server when one answers, else in-process."""
    argv = sys.argv[1:]
    try:
        status = forward(argv)
    except OSError:
        status = None
    if status is not None:
        return status
    from blktap.cli import tap_ctl

    return tap_ctl.main(argv)


def forward(argv: list[str]) -> int | None:
    """Run ``tap-ctl argv`` in the server; its exit status, or None when the caller must
    run the command itself (no server, turned off, declined; a server is started)."""
    idle = fs.idle_seconds(os.environ)
    if idle is None:
        return None
    addr = _address()
    conn = fs.connect(addr)
    if conn is None:
        _start_server(addr, idle)
        return None
    with conn:
        return _request(conn, argv)


def _request(conn: socket.socket, argv: list[str]) -> int | None:
    mask = os.umask(0)
    os.umask(mask)
    try:
        cwd = os.getcwd()
    except OSError:
        return None  # a removed working directory: let the command fail as it would
    fields = [_MAGIC, b"%o" % mask, os.fsencode(cwd), b"%d" % len(argv)]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items()]
    fds = array.array("i", [0, 1, 2])
    try:
        conn.sendmsg([b"\0".join(fields)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        first = conn.recv(64)
    except OSError:
        return None
    if not first.startswith(b"pid:"):
        return None  # declined or gone before forking: nothing ran
    worker = int(first[4:])

    def pass_on(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, pass_on)
    while True:
        try:
            reply = conn.recv(64)
        except InterruptedError:
            continue
        except OSError:
            reply = b""
        break
    if reply.startswith(b"exit:"):
        return int(reply[5:])
    sys.stderr.write("tap-ctl: the command's process ended without an exit status\n")
    return 1


def _start_server(addr: bytes, idle: float) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind(addr)
    except OSError:
        listener.close()
        return  # another client is starting one
    listener.listen(512)
    try:
        first = os.fork()
    except OSError:
        listener.close()
        return
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
            fs.set_comm(COMM)
            _Server(listener, idle).serve()
            status = 0
        finally:
            os._exit(status)
    os.waitpid(first, 0)
    listener.close()


class _Server:
    def __init__(self, listener: socket.socket, idle: float) -> None:
        import gc

        from blktap.cli import tap_ctl  # and with it the control library

        self.main = tap_ctl.main
        self.listener = listener
        self.idle = idle
        self.sources = fs.source_stamps()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
        gc.collect()
        gc.freeze()

    def serve(self) -> None:
        self.listener.settimeout(1.0)
        last = time.monotonic()
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() - last >= self.idle or fs.source_stamps() != self.sources:
                    return
                continue
            with conn:
                conn.settimeout(None)
                if not self._handle(conn):
                    return
            last = time.monotonic()

    def _handle(self, conn: socket.socket) -> bool:
        fds: list[int] = []
        try:
            if fs.peer_uid(conn) != os.geteuid():
                return True
            data, ancdata, _, _ = conn.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4])
            fields = data.split(b"\0")
            if len(fields) < 4 or fields[0] != _MAGIC or len(fds) != 3:
                return True
            if fs.source_stamps() != self.sources:
                self.listener.close()  # free the address for a new server first
                conn.send(b"no")
                return False
            argc = int(fields[3])
            argv = [os.fsdecode(a) for a in fields[4 : 4 + argc]]
            env = dict(f.split(b"=", 1) for f in fields[4 + argc :] if b"=" in f)
            if os.fork() == 0:
                self._work(conn, fds, int(fields[1], 8), fields[2], argv, env)
            return True
        except (OSError, ValueError):
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def _work(self, conn: socket.socket, fds: list[int], umask: int, cwd: bytes,
              argv: list[str], env: dict[bytes, bytes]) -> None:
        """In the worker: become the command's process, run it, report; never returns."""
        status = 1
        try:
            conn.send(b"pid:%d" % os.getpid())  # first: the client passes signals on to it
            self.listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.environ.clear()
            os.environb.update(env)
            os.umask(umask)
            os.chdir(cwd)
            fs.set_comm("tap-ctl")
            if isinstance(sys.stdout, io.TextIOWrapper):  # the server's was /dev/null
                sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
            sys.argv = ["tap-ctl", *argv]
            try:
                status = self.main(argv)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except KeyboardInterrupt:
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
        finally:
            try:
                conn.send(b"exit:%d" % status)
            finally:
                os._exit(status)
