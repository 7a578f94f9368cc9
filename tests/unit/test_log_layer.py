"""The ``log`` layer over real chains (raw aio, dynamic VHD): the writes behind the C
tapdisk's reference logs, sent through the layer, leave byte for byte the logs it wrote;
data passes through unchanged; flush and FUA make the bits durable; write routes close."""

from __future__ import annotations

import asyncio
import errno
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blktap.block.capabilities import NO_ROUTES
from blktap.block.cbtlog import CbtLogFile
from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.block.layers.log import LogLayer, LogSlot
from blktap.proto import cbt
from blktap.vhd.create import create_dynamic
from tests.reference_data import reference_dir

REF = reference_dir("cbt")
MiB = 1 << 20
SIZE = 64 * MiB
OPTIONS = OpenOptions(direct=False)
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def image(tmp_path: Path, kind: str) -> tuple[str, str]:
    if kind == "aio":
        path = tmp_path / "disk.raw"
        with open(path, "wb") as f:
            f.truncate(SIZE)
    else:
        path = tmp_path / "disk.vhd"
        create_dynamic(str(path), SIZE)
    return kind, str(path)


def fresh_log(tmp_path: Path) -> str:
    dst = tmp_path / "disk.cbtlog"
    shutil.copyfile(REF / "empty-64m.cbtlog", dst)  # made by the C cbt-util create
    return str(dst)


class CountingLog(CbtLogFile):
    calls = 0

    def _msync(self, lo: int, hi: int) -> None:
        type(self).calls += 1
        super()._msync(lo, hi)


@pytest.mark.parametrize("kind", ["aio", "vhd"])
def test_reference_writes_through_the_layer_give_the_c_logs(tmp_path: Path, kind: str) -> None:
    type_name, path = image(tmp_path, kind)
    raw_log = fresh_log(tmp_path)
    vhd_log = str(tmp_path / "second.cbtlog")
    shutil.copyfile(REF / "empty-64m.cbtlog", vhd_log)

    async def go() -> None:
        chain = await Chain.open(type_name, path, OPTIONS)
        top = await LogLayer.opener(raw_log)(chain, OPTIONS)
        top = await LogLayer.opener(vhd_log)(top, OPTIONS)  # two logs, stacked
        for offset, length in [(0, 4096), (65536, 512), (1048064, 1024),
                               (10 * MiB, 3 * MiB), (SIZE - 512, 512)]:
            await top.write(offset, memoryview(bytes([offset % 251 + 1]) * length))
        back = bytearray(1024)
        await top.read(1048064, memoryview(back))
        assert back == bytes([1048064 % 251 + 1]) * 1024
        await top.close()

    run(go())
    assert Path(raw_log).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()
    assert Path(vhd_log).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()


@pytest.mark.parametrize("kind", ["aio", "vhd"])
def test_zeroes_and_discards_mark_too(tmp_path: Path, kind: str) -> None:
    type_name, path = image(tmp_path, kind)
    log_path = fresh_log(tmp_path)

    async def go() -> None:
        chain = await Chain.open(type_name, path, OPTIONS)
        top = await LogLayer.opener(log_path)(chain, OPTIONS)
        await top.write(128 * 1024, memoryview(b"\x11" * 65536))
        await top.write(5 * MiB, memoryview(b"\x22" * 100 * 1024))
        await top.write_zeroes(20 * MiB, MiB, False, False)
        await top.close()

    run(go())
    assert Path(log_path).read_bytes() == (REF / "vhd-writes.cbtlog").read_bytes()

    async def trim() -> list[int]:
        chain = await Chain.open(type_name, path, OPTIONS)
        top = await LogLayer.opener(log_path)(chain, OPTIONS)
        await top.discard(40 * MiB, 65536 + 512)
        assert isinstance(top, LogLayer)
        bits = top.log.bits_set()
        await top.close()
        return bits

    assert [b for b in run(trim()) if b >= 640] == [640, 641]


def test_reads_pass_and_write_routes_stay_with_the_log_as_observer(tmp_path: Path) -> None:
    type_name, path = image(tmp_path, "aio")
    log_path = fresh_log(tmp_path)

    async def go() -> None:
        chain = await Chain.open(type_name, path, OPTIONS)
        top = await LogLayer.opener(log_path)(chain, OPTIONS)
        caps = top.capabilities()
        assert caps.writes == chain.capabilities().writes != NO_ROUTES
        assert caps.reads == chain.capabilities().reads
        assert caps.flush == chain.capabilities().flush
        buf = bytearray(MiB)
        await top.read(0, memoryview(buf))
        assert not any(buf)
        assert isinstance(top, LogLayer)
        assert top.log.bits_set() == []
        # The routes past the layer mark through its observer (the log's own mark).
        (observer,) = caps.observers
        observer.mark(3 * 65536 + 512, 65536)
        assert top.log.bits_set() == [3, 4]
        assert top.log.pending
        observer.sync_now()
        assert not top.log.pending
        await top.close()

    run(go())
    assert cbt.parse_header(Path(log_path).read_bytes()[:cbt.HEADER_SIZE]) == cbt.parse_header(
        (REF / "empty-64m.cbtlog").read_bytes()[:cbt.HEADER_SIZE])


def test_two_logs_are_two_observers_and_a_pass_through_log_slot_none(tmp_path: Path) -> None:
    type_name, path = image(tmp_path, "aio")
    first, second = fresh_log(tmp_path), str(tmp_path / "second.cbtlog")
    shutil.copyfile(REF / "empty-64m.cbtlog", second)

    async def go() -> None:
        chain = await Chain.open(type_name, path, OPTIONS)
        bottom = await LogLayer.opener(first)(chain, OPTIONS)
        top = await LogSlot(second).opener()(bottom, OPTIONS)
        assert isinstance(bottom, LogLayer) and isinstance(top, LogLayer)
        observers = top.capabilities().observers
        assert len(observers) == 2
        for observer in observers:
            observer.mark(0, 512)
        assert bottom.log.bits_set() == top.log.bits_set() == [0]
        none = await LogSlot(None).opener()(top, OPTIONS)
        assert none.capabilities() == top.capabilities()  # adds nothing
        await none.close()

    run(go())


def test_flush_and_fua_sync_the_log(tmp_path: Path) -> None:
    type_name, path = image(tmp_path, "aio")
    log_path = fresh_log(tmp_path)
    CountingLog.calls = 0

    async def go() -> None:
        chain = await Chain.open(type_name, path, OPTIONS)
        log = CountingLog.open(log_path, SIZE)
        top = LogLayer(chain, OPTIONS, log)
        await top.write(0, memoryview(bytes(4096)))
        assert log.pending
        await top.flush()
        assert not log.pending and CountingLog.calls == 1
        await top.flush()  # nothing new: no msync
        assert CountingLog.calls == 1
        await top.write(MiB, memoryview(bytes(512)), fua=True)
        assert not log.pending and CountingLog.calls == 2
        await top.write_zeroes(2 * MiB, 4096, False, True)
        assert not log.pending and CountingLog.calls == 3
        await top.write(0, memoryview(bytes(512)), fua=True)  # already marked
        assert CountingLog.calls == 3
        await top.close()

    run(go())
    assert cbt.parse_log(Path(log_path).read_bytes()).bits_set() == [0, 16, 32]


def test_a_log_too_small_for_the_disk_fails_the_open(tmp_path: Path) -> None:
    type_name, path = image(tmp_path, "aio")
    log_path = str(tmp_path / "small.cbtlog")
    shutil.copyfile(REF / "fields.cbtlog", log_path)  # 16 MiB

    async def go() -> None:
        chain = await Chain.open(type_name, path, OPTIONS)
        try:
            with pytest.raises(cbt.BitmapTooSmallError) as info:
                await LogLayer.opener(log_path)(chain, OPTIONS)
            assert info.value.errno == errno.EINVAL
            buf = bytearray(512)
            await chain.read(0, memoryview(buf))  # the chain stays open, the caller's
        finally:
            await chain.close()

    run(go())
    assert Path(log_path).read_bytes() == (REF / "fields.cbtlog").read_bytes()
