"""The hand-inlined copies of the two request rules stay equal to the rules.

* Admission.admits (blktap.vbd): copied in VBD.read_now/write_now, VBD.read/write's
  direct branch, ThreadIO.read/write and the NBD connection's inline path (nbd_inline).
* HeaderCheck.accepts (blktap.proto.nbd): copied in the codec's fast path and the inline
  path (the lanes call it).
* FlowControl._must_wait (blktap.frontends.nbd_flow, the backpressure rule): copied in
  NbdConnection._serve.

Each test runs a grid of requests through the copy and through the rule and compares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import struct
from pathlib import Path
from typing import Any

import pytest

from blktap.block.driver import SYNC_WRITE_MAX, OpenOptions
from blktap.block.layer import LayerOpener
from blktap.block.layers.log import LogSlot
from blktap.cbtutil.create import create as create_log
from blktap.errors import ProtocolError
from blktap.frontends.nbd_connection import NbdConnection
from blktap.frontends.nbd_server import NbdServer
from blktap.proto.nbd import MAX_BLOCK, REQUEST_MAGIC, Command, ExportInfo, Request, ServerCodec
from blktap.vbd import VBD, ImageSpec, VBDState

SIZE = 1 << 20
OFFSETS = [0, 512, 1000, SIZE - 4096, SIZE - 512, SIZE, -512]
LENGTHS = [0, 512, 700, 4096, SYNC_WRITE_MAX - 512, SYNC_WRITE_MAX, SIZE, SIZE + 512]
HEADER = struct.Struct(">IHHQQI")
BLOCK = 64 << 10  # a changed-block log's block


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SIZE))
    return str(path)


def log_layers(tmp_path: Path, logged: bool) -> tuple[list[LayerOpener], LogSlot]:
    """With ``logged``, a changed-block log on top of the stack (write observers: the
    routes stay, each marks before it writes)."""
    slot = LogSlot(None)
    if logged:
        slot.path = str(tmp_path / "disk.cbtlog")
        create_log(slot.path, SIZE)
    return ([slot.opener()] if logged else []), slot


def blocks_of(requests: list[tuple[int, int]]) -> list[int]:
    return sorted({b for offset, length in requests if length
                   for b in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)})


@pytest.mark.parametrize("logged", [False, True], ids=["plain", "log"])
@pytest.mark.parametrize("read_only", [False, True])
def test_fast_routes_admit_as_the_rule(image: str, read_only: bool, logged: bool,
                                       tmp_path: Path) -> None:
    """...with a log too, which also sees every write they take: its bits are exactly
    those of the admitted writes; FUA writes are declined by write_now (the log's sync
    must not block the loop)."""
    layers, slot = log_layers(tmp_path, logged and not read_only)
    admitted: list[tuple[int, int]] = []

    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec("aio", image), OpenOptions(read_only=read_only, direct=False),
                       layers)
        try:
            ready = vbd.admission
            assert ready is not None
            reader, writer = vbd.thread_io(), vbd.thread_io(write=True)
            assert reader is not None and (writer is None) is read_only
            for running, offset, length in itertools.product((True, False), OFFSETS, LENGTHS):
                vbd.state = VBDState.RUNNING if running else VBDState.PAUSED
                buf = memoryview(bytearray(max(length, 0)))
                read_ok = running and ready.admits(offset, length, False)
                write_ok = running and ready.admits(offset, length, True)
                where = (running, offset, length)
                assert vbd.read_now(offset, buf) is read_ok, where
                assert reader.read(offset, buf) is read_ok, where
                small = length < SYNC_WRITE_MAX
                assert vbd.write_now(offset, buf, False) is (write_ok and small), where
                fua_now = write_ok and small and slot.path is None
                assert vbd.write_now(offset, buf, True) is fua_now, where
                if writer is not None:
                    assert writer.write(offset, buf) is write_ok, where
                # The coroutines' direct branch: served by it, or checked at the entry.
                if read_ok:
                    await vbd.read(offset, buf)
                if write_ok:
                    await vbd.write(offset, buf)
                    admitted.append((offset, length))
            layer = slot.open_layer
            if layer is not None:
                assert layer.log.bits_set() == blocks_of(admitted)
            vbd.state = VBDState.RUNNING
            vbd.release_thread_io(reader)
            if writer is not None:
                vbd.release_thread_io(writer)
        finally:
            await vbd.close()

    asyncio.run(body())


def test_admission_is_none_unless_running(image: str) -> None:
    async def body() -> None:
        vbd = VBD(0)
        assert vbd.admission is None
        await vbd.open(ImageSpec("aio", image), OpenOptions(direct=False))
        assert vbd.admission is not None
        await vbd.pause()
        assert vbd.admission is None and vbd.sync_file() is None
        await vbd.resume()
        assert vbd.admission is not None
        await vbd.close()
        assert vbd.admission is None

    asyncio.run(body())


COMMANDS = [int(c) for c in Command] + [42]
FLAGS = [0, 1, 2, 4, 8, 16, 1 << 15]


def negotiated(structured: bool) -> ServerCodec:
    codec = ServerCodec(ExportInfo(SIZE))
    opts = 0x49484156454F5054
    data = struct.pack(">I", 3)
    if structured:
        data += struct.pack(">QII", opts, 8, 0)
        query = b"base:allocation"
        meta = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", len(query)) + query
        data += struct.pack(">QII", opts, 10, len(meta)) + meta
    data += struct.pack(">QII", opts, 7, 6) + struct.pack(">IH", 0, 0)
    codec.feed(data)
    codec.output.clear()
    return codec


@pytest.mark.parametrize("structured", [False, True])
def test_codec_serves_exactly_what_the_header_check_accepts(structured: bool) -> None:
    for magic, command, flags, length in itertools.product(
            (REQUEST_MAGIC, REQUEST_MAGIC ^ 1), COMMANDS, FLAGS, (0, 512, MAX_BLOCK + 1)):
        codec = negotiated(structured)
        accepted = codec.header_check.accepts(magic, flags, command, length)
        payload = bytes(length) if command == Command.WRITE and length <= MAX_BLOCK else b""
        try:
            events = codec.feed(HEADER.pack(magic, flags, command, 7, 0, length) + payload)
        except ProtocolError:
            events = []
        served = [e for e in events if type(e) is Request]
        assert bool(served) is accepted, (magic, command, flags, length)
        assert not codec.output if accepted else True


class _Transport:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def write(self, data: Any) -> None:
        self.sent.append(data)

    def writelines(self, items: Any) -> None:
        self.sent.extend(items)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("logged", [False, True], ids=["plain", "log"])
@pytest.mark.parametrize("read_only", [False, True])
def test_inline_takes_only_what_the_rules_admit(image: str, read_only: bool, logged: bool,
                                                tmp_path: Path) -> None:
    """...with a log too: FUA writes are left to the VBD (the log's sync must not block
    the loop) and the log's bits are exactly those of the writes taken."""
    layers, slot = log_layers(tmp_path, logged and not read_only)
    taken_writes: list[tuple[int, int]] = []

    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec("aio", image), OpenOptions(read_only=read_only, direct=False),
                       layers)
        conn = NbdConnection(NbdServer(vbd, "/nonexistent"))
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        try:
            handshake = struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0)
            view = conn.get_buffer(len(handshake))
            view[: len(handshake)] = handshake
            conn.buffer_updated(len(handshake))
            codec = conn.codec
            full = vbd.admission
            assert codec is not None and full is not None and full.sync is not None
            # Limits inside the file: a copy that ignored them would still read and write.
            adm = dataclasses.replace(full, read_limit=SIZE - 4096,
                                      write_limit=-1 if read_only else SIZE - 8192)
            assert adm.sync is not None
            check = codec.header_check
            offsets = [o for o in OFFSETS if o >= 0]
            for command, flags, offset, length in itertools.product(
                    (int(Command.READ), int(Command.WRITE), int(Command.FLUSH)), FLAGS,
                    offsets, [n for n in LENGTHS if n <= SYNC_WRITE_MAX]):
                write = command == Command.WRITE
                data = HEADER.pack(REQUEST_MAGIC, flags, command, 9, offset, length)
                if write:
                    data += bytes(length)
                buf = memoryview(bytearray(data))
                pos = conn._inline(codec, adm, adm.sync, buf, 0, len(buf))
                conn._out.clear()
                conn._sending.clear()
                taken = pos == len(buf) and conn._carry == 0
                conn._carry = 0
                rule = (command in (Command.READ, Command.WRITE) and length > 0
                        and check.accepts(REQUEST_MAGIC, flags, command, length)
                        and adm.admits(offset, length, write)
                        and (not write or (length < SYNC_WRITE_MAX and adm.sync.writable
                                           and not (flags and slot.path is not None))))
                assert taken is rule, (command, flags, offset, length)
                if taken and write:
                    taken_writes.append((offset, length))
            layer = slot.open_layer
            if layer is not None:
                assert taken_writes and layer.log.bits_set() == blocks_of(taken_writes)
        finally:
            conn.connection_lost(None)
            await vbd.close()

    asyncio.run(body())


def test_serve_holds_back_exactly_what_the_backpressure_rule_says(image: str) -> None:
    """NbdConnection._serve's inline copy of FlowControl._must_wait: a request goes to the
    backlog exactly when the rule says it must wait."""
    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec("aio", image), OpenOptions(direct=False))
        conn = NbdConnection(NbdServer(vbd, "/nonexistent", max_inflight=4,
                                       max_inflight_bytes=64 * 1024))
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        try:
            handshake = struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0)
            view = conn.get_buffer(len(handshake))
            view[: len(handshake)] = handshake
            conn.buffer_updated(len(handshake))
            waiting = Request(Command.READ, 0, 1, 0, 0)
            for backlog, paused, inflight, inflight_bytes in itertools.product(
                    (False, True), (False, True), (0, 3, 4, 5), (0, 64 * 1024 - 1, 64 * 1024)):
                conn._backlog.clear()
                if backlog:
                    conn._backlog.append(waiting)
                conn._writing_paused = paused
                conn._inflight, conn._inflight_bytes = inflight, inflight_bytes
                rule = conn._must_wait()
                before = len(conn._backlog)
                conn._serve([Request(Command.READ, 0, 2, 0, 0)])  # (answered at once)
                held = len(conn._backlog) > before
                assert held is rule, (backlog, paused, inflight, inflight_bytes)
                assert conn._inflight == inflight  # what was served is answered already
            conn._backlog.clear()
            conn._writing_paused = False
            conn._inflight = conn._inflight_bytes = 0
        finally:
            conn.connection_lost(None)
            await vbd.close()

    asyncio.run(body())
