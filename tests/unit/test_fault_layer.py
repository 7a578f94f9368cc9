"""The fault layer's settings, its decisions, the capabilities it narrows, and the VBD's
bounded retry of transient errors (blktap.block.retry)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from blktap.block.driver import OpenOptions
from blktap.block.layer import split_layers
from blktap.block.layers.fault import FaultLayer, FaultSpec, Injector
from blktap.block.retry import FIRST_DELAY_S, MAX_DELAY_S, Backoff
from blktap.errors import BlktapError, InvalidArgument
from blktap.vbd import VBD, ImageSpec

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SIZE))
    return str(path)


def test_the_image_string_carries_the_settings() -> None:
    text = "fault:op=write,errno=ENOSPC,offset=0-1M,rate=0.5,after=10,latency=5ms:vhd:/a:b"
    spec = ImageSpec.parse(text)
    assert spec.layers == ("fault:op=write,errno=ENOSPC,offset=0-1M,rate=0.5,after=10,"
                           "latency=5ms",)
    assert (spec.type, spec.path, str(spec)) == ("vhd", "/a:b", text)
    assert split_layers("fault:aio:/p") == (("fault",), "aio:/p")  # no field: defaults
    assert split_layers("fault::aio:/p") == (("fault:",), "aio:/p")
    assert split_layers("null:fault:op=read:null:aio:/p") == (
        ("null", "fault:op=read", "null"), "aio:/p")
    assert split_layers("fault:op=read:/p") == ((), "fault:op=read:/p")  # no type:path


def test_settings_parse() -> None:
    spec = FaultSpec.parse("op=write+zero,errno=ENOSPC,offset=1K-2M,rate=0.25,after=3,"
                           "count=4,latency=100us,seed=9")
    assert spec == FaultSpec(ops=frozenset({"write", "zero"}), errno=errno.ENOSPC,
                             start=1024, end=2 << 20, rate=0.25, after=3, count=4,
                             latency_s=100e-6, seed=9)
    assert FaultSpec.parse("") == FaultSpec()
    assert FaultSpec.parse("errno=none,latency=2").latency_s == 0.002
    assert FaultSpec.parse("latency=0.5s,offset=1M-").end is None


@pytest.mark.parametrize("text", [
    "op=wrte", "op=", "errno=eio", "errno=EWHAT", "offset=1M", "offset=2M-1M", "offset=x-1",
    "rate=1.5", "rate=nan", "after=-1", "count=1.5", "latency=fast", "latency=inf",
    "seed=", "speed=1", "op=read,op=write", "latency",
])
def test_bad_settings_are_invalid_arguments(text: str) -> None:
    with pytest.raises(InvalidArgument, match="fault"):
        FaultSpec.parse(text)


def test_the_injector_is_deterministic_for_a_seed() -> None:
    def hits(seed: int) -> list[bool]:
        inj = Injector(FaultSpec.parse(f"rate=0.5,seed={seed}"))
        return [inj.hit("write", n * 512, 512) for n in range(200)]

    assert hits(1) == hits(1)
    assert hits(1) != hits(2)
    assert 50 < sum(hits(1)) < 150


def test_the_injector_selects_by_op_range_after_and_count() -> None:
    inj = Injector(FaultSpec.parse("op=write+flush,offset=4K-8K,after=1,count=2"))
    assert not inj.hit("read", 4096, 512)  # not selected
    assert not inj.hit("write", 0, 4096)  # ends at the range's start
    assert not inj.hit("write", 8192, 512)  # starts at its end
    assert not inj.hit("write", 4096, 512)  # matched, skipped by after=1
    assert inj.hit("write", 0, 4097)  # overlaps by one byte
    assert inj.hit("flush", 0, 0)  # flush has no range
    assert not inj.hit("write", 4096, 512)  # count=2 reached
    assert (inj.matched, inj.hits) == (4, 2)


@pytest.mark.parametrize(("settings", "reads", "writes"), [
    ("op=read", False, False), ("op=any", False, False), ("op=write", True, False),
    ("op=trim", True, False), ("op=flush", True, True),
])
def test_capabilities_narrow_by_operation(image: str, settings: str, reads: bool,
                                          writes: bool) -> None:
    async def main() -> None:
        vbd = VBD(1)
        await vbd.open(ImageSpec.parse(f"fault:{settings}:aio:{image}"),
                       OpenOptions(direct=False))
        caps = vbd.capabilities
        assert (caps.reads.any, caps.writes.any) == (reads, writes)
        await vbd.close()

    asyncio.run(main())


def test_backoff_doubles_is_capped_and_ends_at_the_deadline() -> None:
    backoff = Backoff(started=0.0, timeout_s=120.0)
    now, delays = 0.0, []
    while (delay := backoff.next_delay(now)) is not None:
        delays.append(delay)
        now += delay
    assert delays[:3] == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, 4 * FIRST_DELAY_S]
    assert max(delays) == MAX_DELAY_S and now == pytest.approx(120.0)
    assert len(delays) < 130  # about one attempt a second: no retry storm


def test_vbd_retries_eagain_and_hides_it(image: str) -> None:
    async def main() -> None:
        vbd = VBD(1)
        await vbd.open(ImageSpec.parse(f"fault:op=write,errno=EAGAIN,count=3:aio:{image}"),
                       OpenOptions(direct=False))
        layer = vbd._stack
        assert isinstance(layer, FaultLayer)
        await vbd.write(0, memoryview(b"\x01" * 4096))
        assert (layer.injector.matched, layer.injector.hits) == (4, 3)
        buf = memoryview(bytearray(4096))
        await vbd.read(0, buf)
        assert bytes(buf) == b"\x01" * 4096
        assert vbd.stats()["errors"] == [0, 0] and vbd.inflight == 0
        await vbd.close()

    asyncio.run(main())


def test_vbd_gives_up_at_the_request_timeout_with_few_attempts(image: str) -> None:
    async def main() -> None:
        vbd = VBD(1)
        vbd.request_timeout_s = 0.3
        await vbd.open(ImageSpec.parse(f"fault:op=zero+flush,errno=EBUSY:aio:{image}"),
                       OpenOptions(direct=False))
        layer = vbd._stack
        assert isinstance(layer, FaultLayer)
        with pytest.raises(BlktapError) as exc:
            await vbd.write_zeroes(0, 4096, may_unmap=False, fua=False)
        assert exc.value.errno == errno.EBUSY
        # Waits of 10, 20, 40, 80, 160 ms fit in 0.3 s: at most 6 attempts in all.
        assert 2 <= layer.injector.hits <= 6
        assert vbd.stats()["errors"] == [0, 1] and vbd.inflight == 0
        vbd.request_timeout_s = 0  # no retries
        with pytest.raises(BlktapError):
            await vbd.flush()
        assert layer.injector.hits <= 7
        await vbd.close()

    asyncio.run(main())


def test_non_transient_errors_are_not_retried(image: str) -> None:
    async def main() -> None:
        vbd = VBD(1)
        await vbd.open(ImageSpec.parse(f"fault:op=read,errno=ENOSPC:aio:{image}"),
                       OpenOptions(direct=False))
        layer = vbd._stack
        assert isinstance(layer, FaultLayer)
        with pytest.raises(BlktapError) as exc:
            await vbd.read(0, memoryview(bytearray(512)))
        assert exc.value.errno == errno.ENOSPC and layer.injector.hits == 1
        assert vbd.stats()["errors"] == [1, 0]
        await vbd.close()

    asyncio.run(main())


def test_close_ends_a_retrying_request_with_eshutdown(image: str) -> None:
    async def main() -> None:
        vbd = VBD(1)
        await vbd.open(ImageSpec.parse(f"fault:op=write,errno=EAGAIN:aio:{image}"),
                       OpenOptions(direct=False))
        task = asyncio.create_task(vbd.write(0, memoryview(bytes(512))))
        await asyncio.sleep(0.05)
        assert not task.done()
        await vbd.close()  # does not wait for the request between its attempts
        with pytest.raises(BlktapError) as exc:
            await task
        assert exc.value.errno == errno.ESHUTDOWN

    asyncio.run(main())


def test_pause_does_not_wait_for_a_request_between_attempts(image: str) -> None:
    async def main() -> None:
        vbd = VBD(1)
        vbd.request_timeout_s = 30
        await vbd.open(ImageSpec.parse(f"fault:op=write,errno=EAGAIN,count=3:aio:{image}"),
                       OpenOptions(direct=False))
        task = asyncio.create_task(vbd.write(0, memoryview(b"\x02" * 512)))
        await asyncio.sleep(0.005)
        await asyncio.wait_for(vbd.pause(), 5)  # the request is not in flight
        assert not task.done()
        await vbd.resume()  # a new stack: its fault layer fails three more times
        await asyncio.wait_for(task, 10)
        buf = memoryview(bytearray(512))
        await vbd.read(0, buf)
        assert bytes(buf) == b"\x02" * 512
        await vbd.close()

    asyncio.run(main())
