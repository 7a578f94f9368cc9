"""The layer mechanism (blktap.block.layer): parsing, stacking, pass-through order,
capabilities that only narrow, and clean-up when a layer fails to open."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import pytest

from blktap.block.capabilities import (
    ALL_ROUTES,
    NO_ROUTES,
    Capabilities,
    Routes,
    WriteObserver,
)
from blktap.block.chain import Chain, StatusExtent
from blktap.block.driver import OpenOptions, opener_for
from blktap.block.layer import Layer, Stack, open_stack, register, split_layers
from blktap.errors import NotFound
from blktap.vbd import VBD, ImageSpec
from tests.conformance import open_fds

SIZE = 1 << 20


class Recorder(Layer):
    """Records each call on the way down ("name>op") and up ("name<op")."""

    name = "rec"
    calls: ClassVar[list[str]] = []

    def __init__(self, next: Stack, options: OpenOptions, tag: str) -> None:
        super().__init__(next, options)
        self.tag = tag

    async def _around(self, op: str, coro: object) -> None:
        self.calls.append(f"{self.tag}>{op}")
        await coro  # type: ignore[misc]
        self.calls.append(f"{self.tag}<{op}")

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._around("read", super().read(offset, buf))

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self._around("write", super().write(offset, data, fua))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        await self._around("zero", super().write_zeroes(offset, length, may_unmap, fua))

    async def discard(self, offset: int, length: int) -> None:
        await self._around("trim", super().discard(offset, length))

    async def flush(self) -> None:
        await self._around("flush", super().flush())

    def block_status(self, offset: int, length: int) -> list[StatusExtent]:
        self.calls.append(f"{self.tag}>status")
        return super().block_status(offset, length)

    async def close(self) -> None:
        await self._around("close", super().close())


class WriteWatcher(Layer):
    """A layer that must see every write: narrows the write routes only."""

    name = "test-watch"

    def narrow(self, caps: Capabilities) -> Capabilities:
        return caps.must_see_writes()


class Broken(Layer):
    name = "test-broken"

    @classmethod
    async def open(cls, next: Stack, options: OpenOptions) -> Layer:
        raise NotFound("this layer never opens")


register("test-watch", WriteWatcher.open)
register("test-broken", Broken.open)


@pytest.fixture
def raw(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return str(path)


def test_split_layers_takes_registered_prefixes_only() -> None:
    assert split_layers("aio:/p") == ((), "aio:/p")
    assert split_layers("null:aio:/p") == (("null",), "aio:/p")
    assert split_layers("null:null:vhd:/a:b") == (("null", "null"), "vhd:/a:b")
    assert split_layers("null:/p") == ((), "null:/p")  # no type:path after it: not a layer
    assert split_layers("nosuch:aio:/p") == ((), "nosuch:aio:/p")


def test_image_spec_keeps_the_layers_and_prints_back() -> None:
    spec = ImageSpec.parse("null:null:aio:/tmp/a:b.raw")
    assert (spec.layers, spec.type, spec.path) == (("null", "null"), "aio", "/tmp/a:b.raw")
    assert str(spec) == "null:null:aio:/tmp/a:b.raw"
    assert ImageSpec.parse("vhd:/x").layers == ()


def test_calls_pass_through_a_stack_in_order(raw: str) -> None:
    async def body() -> None:
        options = OpenOptions(direct=False)
        chain = Chain([await opener_for("aio")(raw, options)])
        bottom = Recorder(chain, options, "b")
        top = Recorder(bottom, options, "t")
        Recorder.calls.clear()
        buf = memoryview(bytearray(4096))
        await top.write(4096, memoryview(b"\x11" * 4096), True)
        await top.read(4096, buf)
        assert bytes(buf) == b"\x11" * 4096
        await top.write_zeroes(0, 4096, True, False)
        await top.discard(8192, 4096)
        await top.flush()
        status = top.block_status(0, SIZE)
        assert sum(e.length for e in status) == SIZE
        assert top.chain is chain and top.size == SIZE
        await top.close()
        ops = ["write", "read", "zero", "trim", "flush"]
        expected = [c for op in ops for c in (f"t>{op}", f"b>{op}", f"b<{op}", f"t<{op}")]
        expected += ["t>status", "b>status", "t>close", "b>close", "b<close", "t<close"]
        assert Recorder.calls == expected

    asyncio.run(body())


def test_capabilities_only_narrow() -> None:
    caps = Capabilities(reads=ALL_ROUTES, writes=ALL_ROUTES)
    assert caps.narrow(multi_conn=False).multi_conn is False
    assert caps.must_see_writes().writes == NO_ROUTES
    assert caps.must_see_writes().reads == ALL_ROUTES
    assert caps.must_see_everything().reads == NO_ROUTES
    small = caps.narrow(reads=Routes(direct=True))
    with pytest.raises(ValueError):
        small.narrow(reads=ALL_ROUTES)
    with pytest.raises(ValueError):
        caps.narrow(fast_zero=True)
    with pytest.raises(TypeError):
        caps.narrow(nosuch=False)


def test_write_observers_keep_the_routes_compose_and_stay() -> None:
    def observer(marks: list[tuple[int, int]]) -> WriteObserver:
        async def sync() -> None:
            pass

        return WriteObserver(lambda offset, length: marks.append((offset, length)),
                             lambda: None, sync)

    caps = Capabilities(reads=ALL_ROUTES, writes=ALL_ROUTES)
    first, second = observer([]), observer([])
    watched = caps.observe_writes(first).observe_writes(second)
    assert watched.writes == ALL_ROUTES and watched.reads == ALL_ROUTES
    assert watched.observers == (first, second)  # bottom layer's first
    # An observer, once there, stays: a layer above may add, never drop nor replace.
    with pytest.raises(ValueError):
        watched.narrow(observers=())
    with pytest.raises(ValueError):
        watched.narrow(observers=(second, first))
    assert watched.must_see_writes().observers == (first, second)


def test_pass_through_keeps_the_fast_routes_and_a_watcher_narrows_writes(raw: str) -> None:
    async def body() -> None:
        for text, writes_fast in (("aio:", True), ("null:aio:", True),
                                  ("test-watch:aio:", False), ("null:test-watch:aio:", False)):
            vbd = VBD(0)
            await vbd.open(ImageSpec.parse(text + raw), OpenOptions(direct=False))
            try:
                caps = vbd.capabilities
                assert caps.reads == Routes(direct=True, sync=True, thread=True, lent_fd=True)
                assert caps.writes.any is writes_fast, text
                adm = vbd.admission
                assert adm is not None
                assert (adm.sync is not None) and adm.sync.writable is writes_fast
                assert (adm.write_now is not None) is writes_fast
                assert vbd.thread_io_possible(write=True) is writes_fast
                assert vbd.thread_io_possible(write=False)
                assert vbd.stats()["name"] == text + raw
            finally:
                await vbd.close()

    asyncio.run(body())


def test_a_layer_that_fails_to_open_leaves_nothing_open(raw: str) -> None:
    async def body() -> None:
        before = open_fds()
        vbd = VBD(0)
        with pytest.raises(NotFound):
            await vbd.open(ImageSpec.parse("null:test-broken:aio:" + raw), OpenOptions())
        assert open_fds() == before
        options = OpenOptions(direct=False)
        chain = Chain([await opener_for("aio")(raw, options)])
        with pytest.raises(NotFound):
            await open_stack(("null", "test-broken"), chain, options)
        assert open_fds() == before

    asyncio.run(body())


def test_capabilities_are_computed_again_at_resume(raw: str) -> None:
    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec.parse("test-watch:aio:" + raw), OpenOptions(direct=False))
        try:
            assert not vbd.capabilities.writes.any
            await vbd.pause()
            assert vbd.admission is None
            await vbd.resume(ImageSpec.parse("null:aio:" + raw))  # the layers may change
            assert vbd.capabilities.writes.any and vbd.thread_io_possible(write=True)
            assert vbd.stats()["name"] == "null:aio:" + raw
        finally:
            await vbd.close()

    asyncio.run(body())


def test_layers_given_to_open_are_on_top_and_reopened_at_resume(raw: str) -> None:
    opened: list[Stack] = []

    async def watch(next: Stack, options: OpenOptions) -> Layer:
        opened.append(next)
        return WriteWatcher(next, options)

    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec.parse("null:aio:" + raw), OpenOptions(direct=False), [watch])
        try:
            assert len(opened) == 1 and isinstance(opened[0], Layer)  # over the null layer
            assert not vbd.capabilities.writes.any
            await vbd.pause()
            await vbd.resume()
            assert len(opened) == 2 and not vbd.capabilities.writes.any
        finally:
            await vbd.close()

    asyncio.run(body())
