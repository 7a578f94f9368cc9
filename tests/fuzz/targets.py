"""Fuzz targets: each takes one input (bytes) and fails (raises AssertionError) on a crash,
a hang, or an error the code under test must never show.

Shared by the coverage-guided runner (tests/fuzz/run.py, atheris), the hypothesis
fuzzers and the corpus replay (tests/fuzz/test_fuzz.py). A target is started once,
fed many inputs, and stopped; between inputs it leaves the server as a new client
would find it.

- ``nbd``: NBD servers on two served VBDs (1 MiB raw images; the second under fault
  layers, :data:`FAULTS`), through a real Unix socket connection. The first byte of
  the input picks the VBD (values 3-5: the faulty one) and, modulo 3, how far the
  harness takes the connection before it sends the rest: 0 nothing (the rest is the
  client's handshake), 1 through NBD_OPT_GO (the rest is transmission), 2 through
  structured replies and NBD_OPT_GO. The harness then shuts its sending side and
  reads to the end: the server must close the connection within HANG_S seconds, then
  forget it with no
  request left in flight, log no error (an exception a request cannot cause), and
  reach no event-loop exception handler.
- ``control``: tapdisk's control server (the service behind ``ctl<pid>``) on a real
  socket, minors 0 and 1 allocated. The input is cut into messages of the wire size;
  each goes on its own connection (one request per connection, as tap-ctl does),
  so sequences (ATTACH, OPEN, PAUSE, ...) are reachable. Each connection must end
  within HANG_S seconds with no logged error. The service is renewed between inputs.
- ``vhd``: the VHD parsers on one file's bytes: footer, dynamic header, BAT, batmap
  header, parent name and locators (each returns or raises ImageFormatError),
  ``check_vhd`` (never raises), and the ``vhd`` driver's read-only open of the file
  (opens, reads the first 64 KiB and the block status, or raises ImageFormatError or
  another BlktapError).
- ``nbd-proto``, ``control-proto``, ``vhd-parse``: the same code's codecs and parsers
  in-process, no socket or file (tests/fuzz/codec_targets.py): tens of thousands of
  inputs per second where the targets above reach hundreds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from tests.fuzz.codec_targets import ControlProtoTarget, NbdProtoTarget, VhdParseTarget

HANG_S = 5.0
"""How long a server may take to finish a connection whose client stopped sending."""
SCRATCH: str | None = None
"""Where targets make their temporary directories (None: /dev/shm, else the default)."""
CONTROL_IMAGE = os.path.join(tempfile.gettempdir(), "blktap-fuzz-control.img")
"""A 1 MiB raw image the control corpus's OPEN messages name (made by the target)."""


class Target(Protocol):
    name: str

    def start(self) -> None: ...

    def one(self, data: bytes) -> None: ...

    def stop(self) -> None: ...


class _ErrorLog(logging.Handler):
    """Records ERROR records of the blktap loggers: a server logs an error only for
    something no client may cause (a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _ErrorLog:
        logging.getLogger("blktap").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("blktap").removeHandler(self)

    def check(self) -> None:
        if self.records:
            text = "; ".join(self.format(r) for r in self.records)
            self.records.clear()
            raise AssertionError(f"the server logged an error: {text}")


def _drain(sock: socket.socket, deadline: float) -> None:
    """Read until the peer closes; AssertionError if it does not before ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"hang: the server kept the connection open {HANG_S} s "
                                 "after the client stopped sending")
        sock.settimeout(left)
        try:
            if not sock.recv(1 << 20):
                return
        except ConnectionResetError:
            return
        except TimeoutError:
            continue


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


# ------------------------------------------------------------------------- nbd
_OPTS = 0x49484156454F5054
_OPT_STRUCTURED_REPLY, _OPT_GO = 8, 7
_REP_ACK = 1


def _option(sock: socket.socket, opt: int, payload: bytes) -> bool:
    """Send option ``opt``; read replies up to the last. True on an ACK."""
    sock.sendall(struct.pack(">QII", _OPTS, opt, len(payload)) + payload)
    while True:
        head = _recv_exact(sock, 20)
        if head is None:
            return False
        _magic, _opt, rtype, length = struct.unpack(">QIII", head)
        if _recv_exact(sock, length) is None:
            return False
        if rtype == _REP_ACK:
            return True
        if rtype & 0x80000000:
            return False


FAULTS = ("fault:op=read+write,errno=EIO,rate=0.3,seed=1:"
          "fault:op=zero+trim+flush,errno=ENOSPC,rate=0.3,seed=2:"
          "fault:errno=EAGAIN,rate=0.05,seed=3:aio:")
"""The layers of the ``nbd`` target's second VBD (its error paths and retries)."""


class NbdTarget:
    name = "nbd"

    def __init__(self) -> None:
        self._dir = ""
        self._served: list[Any] = []
        self.served: Any = None
        self._log = _ErrorLog()

    def start(self) -> None:
        from blktap.vbd import ImageSpec
        from tests.nbd_helpers import ServedImage, make_image

        self._dir = tempfile.mkdtemp(prefix="fuzz-nbd-", dir=_shm())
        self._log.__enter__()
        for name in ("plain", "faulty"):
            os.mkdir(os.path.join(self._dir, name))
            image = make_image(os.path.join(self._dir, name), size=1 << 20)
            served = ServedImage(os.path.join(self._dir, name), image, direct=False)
            self._served.append(served)
        faulty = self._served[1]
        faulty.vbd.request_timeout_s = 0.02
        faulty.call(faulty.vbd.pause())
        faulty.call(faulty.vbd.resume(ImageSpec.parse(FAULTS + faulty.image)))

    def stop(self) -> None:
        try:
            for served in self._served:
                served.close()
        finally:
            self._log.__exit__()
            shutil.rmtree(self._dir, ignore_errors=True)

    def one(self, data: bytes) -> None:
        mode, rest = (data[0] % 6, data[1:]) if data else (0, b"")
        self.served = self._served[mode // 3]
        mode %= 3
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HANG_S)
            sock.connect(self.served.socket)
            proceed = True
            if mode:
                greeting = _recv_exact(sock, 18)
                assert greeting is not None, "the server closed before its greeting"
                sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
                if mode == 2:
                    proceed = _option(sock, _OPT_STRUCTURED_REPLY, b"")
                proceed = proceed and _option(sock, _OPT_GO, struct.pack(">IH", 0, 0))
                assert proceed, "the server refused a valid OPT_GO"
            try:
                sock.sendall(rest)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed first (a bad request): fine
            _drain(sock, time.monotonic() + HANG_S)
        finally:
            sock.close()
        self._settled()
        self._log.check()
        assert not self.served.loop_errors, self.served.loop_errors

    def _settled(self) -> None:
        """The connection is gone from the server and no request is left in flight."""
        served = self.served
        deadline = time.monotonic() + HANG_S
        while True:
            state = served.run(lambda: (served.server.connections, served.vbd.inflight))
            if state == (0, 0):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"leak: (connections, requests in flight) = {state} "
                                     f"{HANG_S} s after the client left")
            time.sleep(0.001)


# --------------------------------------------------------------------- control
class ControlTarget:
    name = "control"

    def __init__(self) -> None:
        self._dir = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.server: Any = None
        self.loop_errors: list[dict[str, Any]] = []
        self._log = _ErrorLog()

    @property
    def path(self) -> str:
        return os.path.join(self._dir, "ctl1")

    def start(self) -> None:
        from blktap.tapdisk.control_server import ControlServer

        self._dir = tempfile.mkdtemp(prefix="fuzz-ctl-", dir=_shm())
        os.mkdir(os.path.join(self._dir, "tapdisk"))
        for minor in (0, 1):
            open(os.path.join(self._dir, "tapdisk", f"tapdisk-{minor}"), "w").close()
        with open(CONTROL_IMAGE, "ab") as f:
            f.truncate(1 << 20)
        loop = self.loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        self._log.__enter__()
        self.server = ControlServer(self._new_service(), self.path)
        self._call(self.server.start())

    def _new_service(self) -> Any:
        from blktap.tapdisk.service import Tapdisk

        return Tapdisk(self._dir, 1)

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            if self.server is not None:
                self._call(self.server.stop())
                self._call(self.server.tapdisk.shutdown())
        finally:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.loop.stop)
                assert self._thread is not None
                self._thread.join(10)
                self.loop.close()
            self._log.__exit__()
            shutil.rmtree(self._dir, ignore_errors=True)

    def one(self, data: bytes) -> None:
        from blktap.proto import control as ctl

        size = ctl.MESSAGE_SIZE
        for start in range(0, max(len(data), 1), size):
            self._connection(data[start:start + size])
        self._log.check()
        assert not self.loop_errors, self.loop_errors
        # A fresh service for the next input (the VBDs this one opened are closed).
        old = self.server.tapdisk
        self._call(old.shutdown())
        self.server.tapdisk = self._new_service()

    def _connection(self, message: bytes) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HANG_S)
            sock.connect(self.path)
            try:
                sock.sendall(message)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            _drain(sock, time.monotonic() + HANG_S)
        finally:
            sock.close()


# ------------------------------------------------------------------------- vhd
class VhdTarget:
    name = "vhd"

    def __init__(self) -> None:
        self._dir = ""

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fuzz-vhd-", dir=_shm())

    def stop(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def one(self, data: bytes) -> None:
        from blktap.errors import BlktapError, ImageFormatError
        from blktap.proto.vhd import bat, batmap, footer, header
        from blktap.proto.vhd.check import ParentProbe, check_vhd

        def parses(fn: Callable[[], object]) -> object | None:
            try:
                return fn()
            except ImageFormatError:
                return None

        foot = parses(lambda: footer.parse_footer(data[-512:]))
        head = parses(lambda: header.parse_header(data[512:1536]))
        parses(lambda: bat.parse_bat(data[1536:], min(len(data) // 4, 4096)))
        parses(lambda: batmap.parse_batmap_header(data[:512]))
        if isinstance(head, header.DynamicHeader):
            parses(lambda: head.parent_name)
            for code in {loc.code for loc in head.locators}:
                with contextlib.suppress(ImageFormatError):
                    header.decode_locator_path(code, data[:512])
            parses(lambda: head.faults(len(data)))
        if isinstance(foot, footer.Footer):
            foot.faults(None)

        def read(offset: int, length: int) -> bytes:
            return data[offset:offset + length]

        result = check_vhd("fuzz.vhd", read, len(data), now_vhd=0,
                           probe=lambda _path: ParentProbe(False))
        assert isinstance(result.verdict, str)  # must not raise
        path = os.path.join(self._dir, "fuzz.vhd")
        with open(path, "wb") as f:
            f.write(data)
        with contextlib.suppress(BlktapError):
            asyncio.run(_open_vhd(path))


async def _open_vhd(path: str) -> None:
    from blktap.block.chain import Chain
    from blktap.block.driver import OpenOptions

    chain = await Chain.open("vhd", path, OpenOptions(read_only=True, direct=False))
    try:
        length = min(chain.size, 64 << 10)
        await chain.read(0, memoryview(bytearray(length)))
        chain.block_status(0, min(chain.size, 16 << 20))
    finally:
        await chain.close()


def _shm() -> str | None:
    if SCRATCH is not None:
        return SCRATCH
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


TARGETS: dict[str, Callable[[], Target]] = {
    "nbd": NbdTarget,
    "control": ControlTarget,
    "vhd": VhdTarget,
    # In-process (tests/fuzz/codec_targets.py): the codecs and parsers alone, fast.
    "nbd-proto": NbdProtoTarget,
    "control-proto": ControlProtoTarget,
    "vhd-parse": VhdParseTarget,
}
"""Every fuzz target, by name (the corpus directory's name too)."""

CORPUS_ROOT = os.path.join(os.path.dirname(__file__), "corpus")


def corpus_dir(name: str) -> str:
    return os.path.join(CORPUS_ROOT, name)
