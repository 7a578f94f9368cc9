"""Layers seen from a real NBD client (libnbd): a layer that must see every write sees
every write, whichever fast route (inline on the lent descriptor, a write lane, the
driver's synchronous write) would have served it over the bare image."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from blktap.block.capabilities import Capabilities
from blktap.block.driver import OpenOptions
from blktap.block.layer import Layer, register
from blktap.frontends.nbd_server import NbdServer, Statistics
from blktap.vbd import VBD, ImageSpec

SIZE = 64 << 20
SMALL = 4096
SMALL_WRITES = 256  # pipelined (QD32): the inline path's
BIG = 1 << 20
BIG_WRITES = 12  # one at a time, a run: a write lane's
FUA_WRITES = 8
ZEROES = 5
TRIMS = 3


class CountWrites(Layer):
    """Counts every write, zero, trim and flush that reaches it; must see all of them."""

    name = "test-count-writes"
    seen: dict[str, int] = {}  # noqa: RUF012 - one per test process, reset by the test

    def narrow(self, caps: Capabilities) -> Capabilities:
        return caps.must_see_writes()

    def _count(self, key: str, n: int = 1) -> None:
        self.seen[key] = self.seen.get(key, 0) + n

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self._count("writes")
        self._count("bytes", len(data))
        if fua:
            self._count("fua")
        await super().write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        self._count("zeroes")
        await super().write_zeroes(offset, length, may_unmap, fua)

    async def discard(self, offset: int, length: int) -> None:
        self._count("trims")
        await super().discard(offset, length)

    async def flush(self) -> None:
        self._count("flushes")
        await super().flush()


register(CountWrites.name, CountWrites.open)


class Served:
    """``spec`` served by an NbdServer in a thread running its own uvloop."""

    def __init__(self, directory: Path, spec: str) -> None:
        self.socket = str(directory / "nbd.sock")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.loop = uvloop.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.vbd = VBD(0)
        self.server = NbdServer(self.vbd, self.socket)
        try:
            self.call(self.vbd.open(ImageSpec.parse(spec), OpenOptions(direct=False)))
            self.call(self.server.start())
        except BaseException:
            self.stop()
            raise

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def statistics(self) -> Statistics:
        async def get() -> Statistics:
            return self.server.statistics()

        result: Statistics = self.call(get())
        return result

    def stop(self) -> None:
        try:
            self.call(self.server.stop(timeout=5.0))
            self.call(self.vbd.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    yield path


CLIENT = """
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = json.loads(sys.argv[2])
small = nbd.Buffer.from_bytearray(bytearray(b"\\x5a" * n["small"]))
for i in range(n["small_writes"]):
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    h.aio_pwrite(small, i * n["small"])
while h.aio_in_flight() > 0:
    h.poll(-1)
big = b"\\xa5" * n["big"]
for i in range(n["big_writes"]):
    h.pwrite(big, (8 << 20) + i * n["big"])
for i in range(n["fua_writes"]):
    h.pwrite(b"\\x11" * 4096, (30 << 20) + i * 4096, nbd.CMD_FLAG_FUA)
for i in range(n["zeroes"]):
    h.zero(65536, (32 << 20) + i * 65536)
for i in range(n["trims"]):
    h.trim(65536, (40 << 20) + i * 65536)
h.flush()
h.shutdown()
"""
COUNTS = {"small": SMALL, "small_writes": SMALL_WRITES, "big": BIG, "big_writes": BIG_WRITES,
          "fua_writes": FUA_WRITES, "zeroes": ZEROES, "trims": TRIMS}


def run_client(uri: str) -> None:
    proc = subprocess.run(["/usr/bin/python3", "-c", CLIENT, uri, json.dumps(COUNTS)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def check_contents(path: Path) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data[: SMALL_WRITES * SMALL] == b"\x5a" * (SMALL_WRITES * SMALL)
    assert data[8 << 20 : (8 << 20) + BIG_WRITES * BIG] == b"\xa5" * (BIG_WRITES * BIG)
    assert data[30 << 20 : (30 << 20) + FUA_WRITES * 4096] == b"\x11" * (FUA_WRITES * 4096)


def test_a_layer_that_must_see_writes_sees_every_write(tmp_path: Path, image: Path) -> None:
    CountWrites.seen = {}
    served = Served(tmp_path, f"{CountWrites.name}:aio:{image}")
    try:
        # Reads keep their fast routes; writes have none past the layer.
        adm = served.vbd.admission
        assert adm is not None and adm.sync is not None and not adm.sync.writable
        assert adm.read_now is not None and adm.write_now is None
        run_client(served.uri)
        stats = served.statistics()
    finally:
        served.stop()
    assert not served.errors, served.errors
    writes = SMALL_WRITES + BIG_WRITES + FUA_WRITES
    assert CountWrites.seen == {
        "writes": writes, "bytes": SMALL_WRITES * SMALL + BIG_WRITES * BIG + FUA_WRITES * 4096,
        "fua": FUA_WRITES, "zeroes": ZEROES, "trims": TRIMS, "flushes": 1}
    assert stats.writes == writes and stats.lane_writes == 0 and stats.errors == 0
    check_contents(image)


def test_over_the_bare_image_fast_routes_take_those_writes(tmp_path: Path, image: Path) -> None:
    """The control: without the layer the same client's writes take the routes the layer
    closes (a write lane; the lent descriptor is offered for writes)."""
    served = Served(tmp_path, f"aio:{image}")
    try:
        adm = served.vbd.admission
        assert adm is not None and adm.sync is not None and adm.sync.writable
        run_client(served.uri)
        stats = served.statistics()
    finally:
        served.stop()
    assert not served.errors, served.errors
    assert stats.lane_writes > 0
    check_contents(image)
    assert os.path.getsize(image) == SIZE
