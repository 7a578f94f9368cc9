"""The tapdisk process: daemonize, publish the control socket, serve until done.

Spawn protocol (reference: "Spawning"): unless foreground, the process daemonizes first
so that the pid in ``ctl<pid>`` is the final one; it then creates the control socket,
writes its path as one line on the original stdout and releases stdout. It exits after
the last VBD is detached, or on SIGTERM/SIGINT after closing every VBD.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass

from blktap import paths
from blktap.frontends.nbd_listen import psk_refusal, tls_context
from blktap.frontends.nbd_server import NbdServer
from blktap.proto import control as ctl
from blktap.proto import tcp_export
from blktap.tapdisk.control_server import ControlServer
from blktap.tapdisk.forkserver import prepare_run_dir
from blktap.tapdisk.service import AttachedVBD, Frontend, FrontendFactory, Tapdisk
from blktap.util.buffers import BufferPool
from blktap.vbd import VBD

log = logging.getLogger("blktap.tapdisk")


@dataclass(frozen=True)
class DaemonOptions:
    foreground: bool = False
    run_dir: str | None = None
    dev_dir: str | None = None
    blockdev: str = "auto"
    """``auto``: publish a kernel block device when the host allows; ``on``: required; ``off``."""
    log_level: int = logging.INFO


class _ContextFilter(logging.Filter):
    """Gives every record ``minor`` and ``image`` so that one format fits all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "minor"):
            record.minor = "-"
        if not hasattr(record, "image"):
            record.image = "-"
        return True


def _setup_logging(foreground: bool, level: int) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "tapdisk[%(process)d] %(levelname)s [minor=%(minor)s %(image)s] %(name)s: %(message)s"
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        fmt = "tapdisk[%(process)d]: [minor=%(minor)s %(image)s] %(message)s"
    else:
        handler = logging.NullHandler()
        fmt = ""
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_ContextFilter())
    root.handlers[:] = [handler]


def _daemonize() -> None:
    """Detach from the terminal and the spawner's session; stdout stays open for the path."""
    first = os.fork()
    if first:
        os.waitpid(first, 0)  # reap the intermediate child: leave no zombie behind
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 2)
    os.close(null)


def _release_stdout() -> None:
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def run(options: DaemonOptions) -> int:
    """Run a tapdisk. Returns the exit status."""
    rundir = paths.run_dir(options.run_dir)
    prepare_run_dir(rundir)
    if not options.foreground:
        _daemonize()
    return _run(options, rundir, None)


def run_forked(ready: Callable[[], None]) -> int:
    """Run a tapdisk forked by :mod:`blktap.tapdisk.forkserver`: already detached, with
    the spawner's stdout and environment; ``ready()`` is called once the socket line is
    written. Options come from the environment, as for ``tapdisk`` without arguments.
    Returns the exit status."""
    options = DaemonOptions(blockdev=os.environ.get("BLKTAP_BLOCKDEV", "auto"))
    try:
        return _run(options, paths.run_dir(None), ready)
    finally:
        logging.shutdown()


def preload() -> None:
    """Import what a tapdisk may import later (event loop, drivers, layers, the block
    device frontend), so that tapdisks forked after this share it."""
    import importlib

    from blktap.block import drivers, layer

    importlib.import_module("blktap.frontends.blockdev")
    drivers.load_all()
    layer.layer_names()
    with contextlib.suppress(ImportError):  # uvloop is a dependency; run() copes without
        importlib.import_module("uvloop").install()
    # A VBD's life, through a control server on a private socket: what first use
    # initializes (event loop machinery, caches) is then shared too, and so is the
    # bytecode Python specializes in place after some runs. Optional.
    with contextlib.suppress(Exception):
        asyncio.run(_warm_up())


_WARM_UP_ROUNDS = 10  # more than the runs after which Python 3.11 specializes code


async def _warm_up() -> None:
    """Attach, open (a scratch raw image; once with O_DIRECT through Linux AIO, whose
    teardown waits tens of milliseconds, then buffered), STATS, LIST, close and detach
    a VBD exported over NBD, repeatedly, with requests on the control socket."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tapdisk-warm-") as scratch:
        pid = os.getpid()
        os.mkdir(paths.minor_dir(scratch))
        with open(paths.minor_marker(scratch, 0), "wb"):
            pass
        image = os.path.join(scratch, "image")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        tapdisk = Tapdisk(scratch, pid, frontends=_frontends(
            DaemonOptions(blockdev="off"), scratch, pid))
        server = ControlServer(tapdisk, paths.control_socket(scratch, pid))
        await server.start()
        T, F = ctl.MessageType, ctl.OpenFlag
        try:
            for round_ in range(_WARM_UP_ROUNDS):
                flags = F(0) if round_ == 0 else F.NO_O_DIRECT
                params = ctl.Params(flags=flags, devnum=0, path=f"aio:{image}")
                for message in (ctl.request(T.ATTACH, 0), ctl.request(T.OPEN, 0, params),
                                ctl.request(T.STATS, 0), ctl.request(T.LIST),
                                ctl.request(T.CLOSE, 0), ctl.request(T.DETACH, 0)):
                    await _exchange(server.path, ctl.Request(message))
        finally:
            await server.stop()
            await tapdisk.shutdown()


async def _exchange(path: str, request: ctl.Request) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(ctl.encode_request(request))
        replies = ctl.ReplyReader(request.message.type)
        while (chunk := await reader.read(65536)) and replies.feed(chunk) is None:
            pass
    finally:
        writer.close()


def _run(options: DaemonOptions, rundir: str, ready: Callable[[], None] | None) -> int:
    _setup_logging(options.foreground, options.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without
        log.warning("uvloop is not available; using the default event loop")
    try:
        asyncio.run(_serve(options, rundir, ready))
    except Exception:
        log.exception("tapdisk failed")
        return 1
    return 0


async def _serve(options: DaemonOptions, rundir: str,
                 ready: Callable[[], None] | None) -> None:
    loop = asyncio.get_running_loop()
    pid = os.getpid()
    done = asyncio.Event()
    tapdisk = Tapdisk(
        rundir, pid,
        frontends=_frontends(options, rundir, pid),
        on_last_detach=done.set,
    )
    server = ControlServer(tapdisk, paths.control_socket(rundir, pid))
    await server.start()
    print(server.path, flush=True)
    _release_stdout()
    if ready is not None:
        ready()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGPIPE, lambda: None)
    log.info("serving %s", server.path)
    try:
        await done.wait()
    finally:
        await server.stop()
        await tapdisk.shutdown()
    log.info("exiting")


class _NbdFrontend:
    """The NBD export as a Frontend: closing a paused VBD fails the I/O waiting for it
    (it could never be served) so that the export's connections can finish."""

    def __init__(self, server: NbdServer, vbd: VBD, tls: str | None = None) -> None:
        self.server = server
        self.vbd = vbd
        self._tls = tls

    @property
    def tcp_export(self) -> dict[str, object] | None:
        """STATS' ``nbd_tcp``: the TCP address and TLS kind (None: Unix socket only)."""
        if self.server.tcp_address is None:
            return None
        return {"address": self.server.tcp_address, "tls": self._tls,
                "verify_client": bool(self.server.tls is not None
                                      and self.server.tls.verify_mode == ssl.CERT_REQUIRED)}

    async def stop(self, force: bool = False) -> None:
        self.vbd.fail_waiting_io()
        await self.server.stop(timeout=0 if force else None)


def _frontends(options: DaemonOptions, rundir: str, pid: int) -> list[FrontendFactory]:
    buffers = BufferPool()  # shared by every export of this process: bounds their memory

    async def nbd(attached: AttachedVBD) -> Frontend | None:
        vbd = attached.vbd
        # A TCP export: settings tap-ctl left beside this OPEN (blktap.proto.tcp_export).
        export = tcp_export.read_config(paths.minor_dir(rundir), vbd.minor)
        tcp = tls = None
        if export is not None:
            if export.tls_psk is not None:
                raise psk_refusal(export.tls_psk)
            if export.tls_creds is not None:
                tls = tls_context(export.tls_creds, verify_client=export.tls_verify_client)
            tcp = export.host_port
        server = NbdServer(vbd, paths.nbd_socket(rundir, pid, vbd.minor), buffers=buffers,
                           tcp=tcp, tls=tls)
        await server.start()
        return _NbdFrontend(server, vbd, None if export is None else export.tls)

    async def blockdev(attached: AttachedVBD) -> Frontend | None:
        from blktap.frontends.blockdev import BlockDevice

        ok, why = BlockDevice.available()
        if not ok:
            if options.blockdev == "on":
                raise OSError(f"no kernel block device: {why}")
            log.info("minor %d: no kernel block device: %s", attached.vbd.minor, why)
            return None
        device = BlockDevice(attached.vbd, attached.vbd.minor, run_dir=rundir,
                             dev_dir=paths.dev_dir(options.dev_dir))
        try:
            attached.device = await device.start()
        except Exception as exc:
            if options.blockdev == "on":
                raise
            log.warning("minor %d: kernel block device failed: %s", attached.vbd.minor, exc)
            with contextlib.suppress(Exception):
                await device.stop()
            return None
        return device

    factories: list[FrontendFactory] = [nbd]
    if options.blockdev != "off":
        factories.append(blockdev)
    return factories
