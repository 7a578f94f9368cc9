"""blktap.util.linux_aio against the real kernel: files opened O_DIRECT on disk."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from blktap.errors import Shutdown
from blktap.util import linux_aio
from blktap.util.buffers import aligned
from blktap.util.linux_aio import RWF_DSYNC, AioContext
from tests.conformance import open_fds

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def addr(buf: memoryview) -> tuple[int, Any]:
    obj = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(obj), obj


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    content = os.urandom(1 << 20)
    path = tmp_path / "data.raw"
    path.write_bytes(content)
    yield str(path), content


@pytest.fixture
def direct_fd(data_file: tuple[str, bytes]) -> Iterator[int]:
    fd = os.open(data_file[0], os.O_RDWR | os.O_DIRECT)
    try:
        yield fd
    finally:
        os.close(fd)


def test_reads_and_writes_round_trip(direct_fd: int, data_file: tuple[str, bytes]) -> None:
    content = data_file[1]

    async def body() -> None:
        ctx = AioContext.for_loop()
        try:
            buf = aligned(8192)
            a, keep = addr(buf)
            assert await ctx.pread(direct_fd, a, 8192, 4096, keep) == 8192
            assert bytes(buf) == content[4096 : 4096 + 8192]
            buf[:] = b"\x5a" * 8192
            assert await ctx.pwrite(direct_fd, a, 8192, 65536, keep, RWF_DSYNC) == 8192
            assert await ctx.fdsync(direct_fd) == 0
            other = aligned(8192)
            b, keep2 = addr(other)
            assert await ctx.pread(direct_fd, b, 8192, 65536, keep2) == 8192
            assert bytes(other) == b"\x5a" * 8192
        finally:
            ctx.release()

    run(body())
    with open(data_file[0], "rb") as f:
        f.seek(65536)
        assert f.read(8192) == b"\x5a" * 8192


def test_many_requests_in_one_iteration_go_in_one_batch(
    direct_fd: int, data_file: tuple[str, bytes]
) -> None:
    content = data_file[1]

    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop(), submit_batch=10**9)  # no early submits
        try:
            bufs = [aligned(4096) for _ in range(64)]
            futs = []
            for i, buf in enumerate(bufs):
                a, keep = addr(buf)
                futs.append(ctx.pread(direct_fd, a, 4096, i * 8192, keep))
            # The first found the device idle and went at once; the rest wait for the
            # loop to turn, then go all in one go.
            assert ctx.queued == 63 and ctx.inflight == 1
            await asyncio.sleep(0)
            assert ctx.queued == 0
            assert await asyncio.gather(*futs) == [4096] * 64
            for i, buf in enumerate(bufs):
                assert bytes(buf) == content[i * 8192 : i * 8192 + 4096]
            assert ctx.inflight == 0
        finally:
            ctx.close()

    run(body())


def test_an_idle_device_gets_requests_early_in_growing_batches(direct_fd: int) -> None:
    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop())
        try:
            buf = aligned(4096)
            a, keep = addr(buf)
            futs = []
            seen = []
            for i in range(42):
                futs.append(ctx.pread(direct_fd, a, 4096, i * 4096, keep))
                seen.append(ctx.inflight)
            # The first goes at once (nothing in flight); then whenever at least 4 wait
            # and at least as many as are in flight: 1, 5, 10, 20, 40 in the kernel. The
            # last 2 wait for the end of the iteration.
            assert sorted(set(seen)) == [1, 5, 10, 20, 40]
            assert seen[0] == 1 and seen[4] == 5 and seen[9] == 10 and seen[19] == 20
            assert seen[39] == 40
            assert ctx.queued == 2
            assert await asyncio.gather(*futs) == [4096] * 42
        finally:
            ctx.close()

    run(body())


def test_more_requests_than_the_context_holds_wait_their_turn(
    direct_fd: int, data_file: tuple[str, bytes]
) -> None:
    content = data_file[1]

    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop(), depth=4)
        try:
            bufs = [aligned(4096) for _ in range(100)]
            futs = []
            for i, buf in enumerate(bufs):
                a, keep = addr(buf)
                futs.append(ctx.pread(direct_fd, a, 4096, (i % 256) * 4096, keep))
            assert ctx.queued + ctx.inflight == 100 and ctx.inflight <= 4
            assert await asyncio.gather(*futs) == [4096] * 100
            for i, buf in enumerate(bufs):
                off = (i % 256) * 4096
                assert bytes(buf) == content[off : off + 4096]
            assert ctx.queued == 0 and ctx.inflight == 0
        finally:
            ctx.close()

    run(body())


def test_errors_become_oserror_with_the_errno(direct_fd: int) -> None:
    async def body() -> None:
        ctx = AioContext.for_loop()
        try:
            buf = aligned(4096)
            a, keep = addr(buf)
            good = ctx.pread(direct_fd, a, 4096, 0, keep)
            bad_fd = ctx.pread(987654, a, 4096, 0, keep)  # refused by io_submit
            misaligned = ctx.pread(direct_fd, a + 1, 4096, 1, keep)  # refused by O_DIRECT
            after = ctx.pread(direct_fd, a, 4096, 4096, keep)
            with pytest.raises(OSError) as info:
                await bad_fd
            assert info.value.errno == errno.EBADF
            with pytest.raises(OSError) as info:
                await misaligned
            assert info.value.errno == errno.EINVAL
            # The requests around the failed ones are unaffected.
            assert await good == 4096
            assert await after == 4096
        finally:
            ctx.release()

    run(body())


def test_short_read_at_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "short.raw"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    async def body() -> None:
        ctx = AioContext.for_loop()
        try:
            buf = aligned(16384)
            a, keep = addr(buf)
            assert await ctx.pread(fd, a, 16384, 0, keep) == 4096
            assert await ctx.pread(fd, a, 4096, 8192, keep) == 0
        finally:
            ctx.release()

    try:
        run(body())
    finally:
        os.close(fd)


def test_cancelled_waiter_does_not_break_the_context(direct_fd: int) -> None:
    async def body() -> None:
        ctx = AioContext.for_loop()
        try:
            buf = aligned(4096)
            a, keep = addr(buf)
            fut = ctx.pread(direct_fd, a, 4096, 0, keep)
            fut.cancel()
            for _ in range(100):  # the request still completes in the kernel
                await asyncio.sleep(0.001)
                if ctx.inflight == 0 and ctx.queued == 0:
                    break
            assert ctx.inflight == 0
            assert await ctx.pread(direct_fd, a, 4096, 0, keep) == 4096
        finally:
            ctx.release()

    run(body())


def test_close_fails_unsubmitted_requests_and_refuses_new_ones(direct_fd: int) -> None:
    async def body() -> None:
        before = open_fds()
        ctx = AioContext(asyncio.get_running_loop(), depth=2)
        buf = aligned(4096)
        a, keep = addr(buf)
        futs = [ctx.pread(direct_fd, a, 4096, 0, keep) for _ in range(5)]
        assert ctx.inflight == 1 and ctx.queued == 4  # the first found the device idle
        ctx.close()
        ctx.close()  # idempotent
        # The submitted one either completed (reaped by close) or was cut off.
        (first,) = await asyncio.gather(futs[0], return_exceptions=True)
        assert first == 4096 or isinstance(first, Shutdown)
        for fut in futs[1:]:
            with pytest.raises(Shutdown):
                await fut
        with pytest.raises(Shutdown):
            ctx.pread(direct_fd, a, 4096, 0, keep)
        # With the first request still in the kernel, io_destroy and the eventfd's close
        # finish in a background thread: wait for it (no later test sees that fd go).
        for _ in range(200):
            if open_fds() == before:
                break
            await asyncio.sleep(0.01)
        assert open_fds() == before

    run(body())


def test_shared_context_per_loop_and_release_closes_it(direct_fd: int) -> None:
    async def body() -> None:
        before = open_fds()
        a = AioContext.for_loop()
        b = AioContext.for_loop()
        assert a is b
        assert len(open_fds() - before) == 1  # the eventfd
        a.release()
        buf = aligned(4096)
        ad, keep = addr(buf)
        assert await b.pread(direct_fd, ad, 4096, 0, keep) == 4096
        b.release()
        assert open_fds() == before
        c = AioContext.for_loop()  # a fresh one after the last release
        assert c is not a
        c.release()

    run(body())


def test_works_under_uvloop(direct_fd: int, data_file: tuple[str, bytes]) -> None:
    async def body() -> None:
        ctx = AioContext.for_loop()
        try:
            bufs = [aligned(4096) for _ in range(32)]
            futs = []
            for i, buf in enumerate(bufs):
                a, keep = addr(buf)
                futs.append(ctx.pread(direct_fd, a, 4096, i * 4096, keep))
            assert await asyncio.gather(*futs) == [4096] * 32
            assert b"".join(bytes(b) for b in bufs) == data_file[1][: 32 * 4096]
        finally:
            ctx.release()

    uvloop.run(body())


def test_close_with_requests_in_flight_does_not_block_or_leak(direct_fd: int) -> None:
    async def body() -> None:
        before = open_fds()
        ctx = AioContext(asyncio.get_running_loop())
        bufs = [aligned(65536) for _ in range(200)]
        futs = []
        for i, buf in enumerate(bufs):
            a, keep = addr(buf)
            futs.append(ctx.pread(direct_fd, a, 65536, (i % 16) * 65536, keep))
        await asyncio.sleep(0)  # submitted, most likely not completed yet
        ctx.close()
        for fut in futs:
            assert fut.done()
            if fut.exception() is None:
                assert fut.result() == 65536
            else:
                assert isinstance(fut.exception(), Shutdown)
        for _ in range(200):  # io_destroy may finish in its thread
            if open_fds() == before:
                break
            await asyncio.sleep(0.01)
        assert open_fds() == before

    run(body())


def test_vectored_reads_and_writes(direct_fd: int, data_file: tuple[str, bytes]) -> None:
    content = data_file[1]

    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop(), depth=2)  # some wait for a slot
        try:
            futs = []
            sets = []
            for i in range(10):
                bufs = [aligned(4096), aligned(8192), aligned(4096)]
                pairs = [addr(b) for b in bufs]
                iov = [(a, len(b)) for (a, _), b in zip(pairs, bufs, strict=True)]
                futs.append(ctx.preadv(direct_fd, iov, i * 16384, [k for _, k in pairs]))
                sets.append(bufs)
            assert await asyncio.gather(*futs) == [16384] * 10
            for i, bufs in enumerate(sets):
                assert b"".join(bytes(b) for b in bufs) == content[i * 16384 : (i + 1) * 16384]
            # Gather-write two buffers, read them back as one.
            one, two = aligned(4096), aligned(4096)
            one[:] = b"1" * 4096
            two[:] = b"2" * 4096
            (a1, k1), (a2, k2) = addr(one), addr(two)
            assert await ctx.pwritev(direct_fd, [(a1, 4096), (a2, 4096)], 0, (k1, k2)) == 8192
            back = aligned(8192)
            ab, kb = addr(back)
            assert await ctx.pread(direct_fd, ab, 8192, 0, kb) == 8192
            assert bytes(back) == b"1" * 4096 + b"2" * 4096
            with pytest.raises(ValueError):
                ctx.preadv(direct_fd, [], 0, None)
            with pytest.raises(ValueError):
                ctx.preadv(direct_fd, [(a1, 512)] * 65, 0, None)
        finally:
            ctx.close()

    run(body())


def test_cancelled_requests_waiting_for_a_slot_are_skipped(
    direct_fd: int, data_file: tuple[str, bytes]
) -> None:
    content = data_file[1]

    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop(), depth=2)
        try:
            bufs = [aligned(4096) for _ in range(50)]
            futs = []
            for i, buf in enumerate(bufs):
                a, keep = addr(buf)
                futs.append(ctx.pread(direct_fd, a, 4096, i * 4096, keep))
            for fut in futs[2::3]:
                fut.cancel()
            results = await asyncio.gather(*futs, return_exceptions=True)
            for i, (res, buf) in enumerate(zip(results, bufs, strict=True)):
                if i >= 2 and (i - 2) % 3 == 0:
                    assert isinstance(res, asyncio.CancelledError)
                else:
                    assert res == 4096
                    assert bytes(buf) == content[i * 4096 : (i + 1) * 4096]
            for _ in range(100):
                if ctx.inflight == 0 and ctx.queued == 0:
                    break
                await asyncio.sleep(0.001)
            assert ctx.inflight == 0 and ctx.queued == 0
        finally:
            ctx.close()

    run(body())


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "io_getevents"])
def test_completions_reaped_from_the_ring_or_by_system_call(
    direct_fd: int, data_file: tuple[str, bytes], ring: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Completions read from the mapped ring (x86_64) or with io_getevents give the same
    results; many times the ring's size goes round it (its head wraps)."""
    content = data_file[1]
    if not ring:
        monkeypatch.setattr(linux_aio, "_map_ring", lambda ctx: (None, None, None))

    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop(), depth=8)
        try:
            if ring and platform.machine() == "x86_64":
                assert ctx._ring is not None
            else:
                assert ctx._ring is None
            bufs = [aligned(4096) for _ in range(6)]
            keeps = [addr(b) for b in bufs]
            for round_ in range(60):  # 360 completions through a ring of 127 events
                offsets = [((round_ * 6 + i) * 4096) % len(content) for i in range(6)]
                futs = [ctx.pread(direct_fd, a, 4096, off, keep)
                        for (a, keep), off in zip(keeps, offsets, strict=True)]
                assert await asyncio.gather(*futs) == [4096] * 6
                for buf, off in zip(bufs, offsets, strict=True):
                    assert bytes(buf) == content[off : off + 4096]
        finally:
            ctx.close()

    run(body())


def test_may_block_once_per_loop_iteration_and_only_when_idle(direct_fd: int) -> None:
    async def body() -> None:
        ctx = AioContext(asyncio.get_running_loop())
        try:
            assert ctx.may_block()
            assert not ctx.may_block()  # the same iteration: the next request goes async
            await asyncio.sleep(0)
            buf = aligned(4096)
            a, keep = addr(buf)
            fut = ctx.pread(direct_fd, a, 4096, 0, keep)
            assert not ctx.may_block()  # something of ours is in the kernel
            await fut
            await asyncio.sleep(0)
            assert ctx.may_block()
            await asyncio.sleep(0)
            # Requests that keep finding others in flight (several clients): no, even
            # at a moment when the kernel has none of ours...
            bufs = [aligned(4096) for _ in range(4)]
            keeps = [addr(b) for b in bufs]
            for _ in range(20):
                await asyncio.gather(*(ctx.pread(direct_fd, a, 4096, 0, k) for a, k in keeps))
            await asyncio.sleep(0)
            assert ctx.inflight == 0 and not ctx.may_block()
            # ... until requests come one at a time again.
            for _ in range(60):
                await ctx.pread(direct_fd, a, 4096, 0, keep)
            await asyncio.sleep(0)
            assert ctx.may_block()
        finally:
            ctx.close()
        await asyncio.sleep(0)
        assert not ctx.may_block()  # closed

    run(body())
