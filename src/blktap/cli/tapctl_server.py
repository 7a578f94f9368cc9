"""The tap-ctl fork server: tap-ctl commands run in forks of one pre-imported process.

A tap-ctl command spends most of its time starting Python and importing the control
library. :func:`forward` hands the command instead to a server of the same installation
and uid that has imported it all: the server forks a worker that adopts the command's
standard input, output and error (SCM_RIGHTS), working directory, umask, environment and
arguments, runs :func:`blktap.cli.tap_ctl.main` and reports the exit status, which the
client exits with. SIGINT, SIGTERM and SIGHUP sent to the client are passed on to the
worker (tap-ctl undoes a half-done create on them). Output, exit status and side effects
are those of the same command run in-process.

The client is this module's :func:`main` (the ``tap-ctl`` executable): until it knows
that no server answers, it imports nothing but built-in modules (:mod:`blktap.prefork`,
``_signal``), so that its interpreter start-up is most of its cost.

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

import os
import sys

from blktap import prefork

TYPE_CHECKING = False  # typing's costs an import; mypy goes by the name
if TYPE_CHECKING:
    import _socket
    import socket

__all__ = ["COMM", "forward", "main"]

COMM = "tap-ctl-forksrv"
_MAGIC = b"blktap-tapctl-1"
_WARM_UP_ROUNDS = 12  # more than the runs after which Python 3.11 specializes code
# None starts a tapdisk: create fails on its image name before anything is done.
_WARM_UP = (("list",), ("allocate",), ("list", "-m", "0"), ("free", "-m", "0"),
            ("destroy", "-p", "1", "-m", "0"), ("create", "-a", "no-type"),
            ("stats", "-p", "1", "-m", "0"))


def _address() -> bytes:
    import zlib

    key = zlib.crc32(b"\0".join(prefork.installation()))
    return f"\0blktap-tapctl-{os.geteuid()}-{key:08x}".encode()


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
    idle = prefork.idle_seconds(os.environ)
    if idle is None:
        return None
    addr = _address()
    conn = prefork.connect(addr)
    if conn is None:
        prefork.start_server(addr, COMM, lambda listener: _Server(listener, idle).serve())
        return None
    try:
        return _request(conn, argv)
    finally:
        conn.close()


def _request(conn: _socket.socket, argv: list[str]) -> int | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None  # a removed working directory: let the command fail as it would
    fields = [_MAGIC, b"%o" % prefork.current_umask(), os.fsencode(cwd), b"%d" % len(argv)]
    fields += [os.fsencode(a) for a in argv]
    fields += prefork.environment_fields(os.environ)
    # Signals are caught from before the request on: one that comes before the worker
    # is known waits for it (or, when no worker comes, takes its default effect here).
    worker = 0
    pending: list[int] = []

    def pass_on(signum: int, _frame: object) -> None:
        if not worker:
            pending.append(signum)
            return
        try:  # noqa: SIM105 - contextlib is an import the client does without
            os.kill(worker, signum)
        except ProcessLookupError:
            pass

    signals = __import__("_signal")  # signal's own module costs enum
    caught = (signals.SIGINT, signals.SIGTERM, signals.SIGHUP)
    previous = [signals.signal(sig, pass_on) for sig in caught]
    try:
        prefork.send(conn, fields, [0, 1, 2])
        first = conn.recv(64)
    except OSError:
        first = b""
    if not first.startswith(b"pid:"):  # declined or gone before forking: nothing ran
        for sig, handler in zip(caught, previous, strict=True):
            signals.signal(sig, handler)
        for sig in pending:
            os.kill(os.getpid(), sig)  # what it would have done had it come later
        return None
    worker = int(first[4:])
    for sig in pending:
        pass_on(sig, None)
    try:
        reply = conn.recv(64)  # a signal handled meanwhile does not interrupt (PEP 475)
    except OSError:
        reply = b""
    if reply.startswith(b"exit:"):
        return int(reply[5:])
    sys.stderr.write("tap-ctl: the command's process ended without an exit status\n")
    return 1


class _Server(prefork.Server):
    def __init__(self, listener: socket.socket, idle: float) -> None:
        import signal

        from blktap.cli import tap_ctl  # and with it the control library

        self.main = tap_ctl.main
        super().__init__(listener, idle)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
        self.freeze()

    def warm_up(self) -> None:
        """Run commands that touch no tapdisk a few times in a scratch run directory.

        Python specializes a function's bytecode in place after some runs and fills
        caches on first use; done here, that happens once, in pages the workers share,
        instead of in each worker (its CPU time, and its copies of those pages). Done
        when the server is first idle (tens of milliseconds of CPU that the commands of
        a cold start do not wait for)."""
        import contextlib
        import tempfile

        saved = dict(os.environ)
        try:
            with tempfile.TemporaryDirectory(prefix="tapctl-warm-") as scratch:
                os.environ["BLKTAP_RUN_DIR"] = os.path.join(scratch, "run")
                os.environ["BLKTAP_DEV_DIR"] = os.path.join(scratch, "dev")
                for _ in range(_WARM_UP_ROUNDS):
                    for argv in _WARM_UP:
                        with contextlib.suppress(Exception):
                            self.main(list(argv))
        except OSError:
            pass  # an optimization only
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def handle(self, conn: socket.socket) -> bool:
        fds: list[int] = []
        try:
            fields, fds = prefork.receive(conn, 4)
            if len(fields) < 4 or fields[0] != _MAGIC or len(fds) != 3:
                return True
            if self.decline_stale(conn):
                return False
            argc = int(fields[3])
            argv = [os.fsdecode(a) for a in fields[4 : 4 + argc]]
            env = prefork.parse_environment(fields[4 + argc :])
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
        import io
        import signal

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
            prefork.set_comm("tap-ctl")
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
