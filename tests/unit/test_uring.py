"""blktap.util.uring: writes through io_uring's kernel workers, against real files."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blktap.block.driver import SYNC_WRITE_MAX, OpenOptions
from blktap.block.drivers import aio as aio_module
from blktap.block.drivers.aio import open_aio
from blktap.util import uring
from blktap.util.buffers import aligned
from tests.conformance import open_fds


def ring_or_skip(loop: asyncio.AbstractEventLoop) -> uring.Uring:
    ring = uring.for_loop(loop)
    if ring is None:  # the suite's machines have it; say so where one does not
        pytest.skip(f"io_uring unavailable: {uring._unavailable}")
    return ring


def address(buf: memoryview) -> tuple[int, ctypes.c_char]:
    obj = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(obj), obj


def test_writes_land_where_asked_also_beyond_the_ring_depth(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(4 << 20))
    before = open_fds()
    count = uring.DEPTH * 3  # more than the ring takes at once: the rest wait in order

    async def body() -> None:
        loop = asyncio.get_running_loop()
        ring = ring_or_skip(loop)
        fd = os.open(path, os.O_WRONLY)
        try:
            futs = []
            for i in range(count):
                buf = aligned(16384)
                buf[:] = bytes([i % 251 + 1]) * 16384
                addr, obj = address(buf)
                flags = os.RWF_DSYNC if i % 7 == 0 else 0
                futs.append(ring.write(fd, addr, 16384, i * 16384, obj, flags))
            assert await asyncio.gather(*futs) == [16384] * count
            # Errors come back as OSError: a descriptor not open for writing.
            rfd = os.open(path, os.O_RDONLY)
            try:
                buf = aligned(4096)
                addr, obj = address(buf)
                with pytest.raises(OSError) as info:
                    await ring.write(rfd, addr, 4096, 0, obj)
                assert info.value.errno == errno.EBADF
            finally:
                os.close(rfd)
        finally:
            os.close(fd)
            ring.release()

    asyncio.run(body())
    data = path.read_bytes()
    for i in range(count):
        assert data[i * 16384 : (i + 1) * 16384] == bytes([i % 251 + 1]) * 16384, i
    assert open_fds() == before  # the last release closed the ring and its eventfd


def test_one_ring_per_loop_closed_by_the_last_release(tmp_path: Path) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        before = open_fds()  # the loop's own included
        first = ring_or_skip(loop)
        second = uring.for_loop(loop)
        assert second is first
        first.release()
        assert open_fds() != before  # still referenced
        assert uring.for_loop(loop) is first
        first.release()
        first.release()
        assert open_fds() == before
        third = uring.for_loop(loop)
        assert third is not None and third is not first  # a new one after the last release
        third.release()
        assert open_fds() == before

    asyncio.run(body())


def test_closing_with_writes_in_flight_keeps_their_buffers_until_done(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    before = open_fds()

    # The file stays open until the ring's writes are over: a write the kernel has not
    # started yet would otherwise find its descriptor closed (EBADF) and write nothing.
    fd = os.open(path, os.O_WRONLY)

    async def body() -> list[BaseException | int]:
        loop = asyncio.get_running_loop()
        ring = ring_or_skip(loop)
        futs = []
        for i in range(16):
            buf = aligned(1 << 20)
            buf[:] = bytes([i + 1]) * (1 << 20)
            addr, obj = address(buf)
            futs.append(ring.write(fd, addr, 1 << 20, i << 20, obj))
        ring.release()  # at once: most writes are still in the kernel
        return await asyncio.gather(*futs, return_exceptions=True)

    try:
        results = asyncio.run(body())
    finally:
        deadline = time.monotonic() + 10
        while any(t.name == "uring-close" for t in threading.enumerate()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.close(fd)
    (closing,) = [m for r in caplog.records
                  if (m := re.fullmatch(r"closing the io_uring with (\d+) writes in flight",
                                        r.getMessage()))]
    in_kernel = int(closing[1])
    assert 1 <= in_kernel <= 16
    assert len(results) == 16
    for res in results:  # done, or failed with ESHUTDOWN: never anything else
        assert res == 1 << 20 or (isinstance(res, OSError) and res.errno == errno.ESHUTDOWN)
    assert open_fds() == before
    data = path.read_bytes()
    chunks = [data[i << 20 : (i + 1) << 20] for i in range(16)]
    whole = [i for i, chunk in enumerate(chunks) if chunk == bytes([i + 1]) * (1 << 20)]
    # What was written is whole (never stale memory): its own bytes, or nothing (zeros, or
    # past the end) for a write that never reached the kernel.
    for i, chunk in enumerate(chunks):
        assert i in whole or chunk in (bytes(1 << 20), bytes(len(chunk))), i
    # Every write reported done is there, and so is every write that was still in the
    # kernel when the ring closed (it completed later, from the buffer kept for it).
    assert {i for i, res in enumerate(results) if res == 1 << 20} <= set(whole)
    assert len(whole) >= in_kernel + sum(res == 1 << 20 for res in results)


@pytest.mark.parametrize("with_uring", [True, False], ids=["io_uring", "worker-thread"])
def test_large_buffered_writes_of_the_aio_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_uring: bool) -> None:
    """Buffered writes of SYNC_WRITE_MAX or more go to io_uring, or to the copier
    thread where io_uring is unavailable; both write what they are given, fua too."""
    path = tmp_path / "image.raw"
    path.write_bytes(bytes(8 << 20))
    if not with_uring:
        monkeypatch.setattr(uring, "for_loop", lambda loop: None)
    copier_calls: list[int] = []
    real_copier = aio_module._copier

    def counting_copier() -> Any:
        copier_calls.append(1)
        return real_copier()

    monkeypatch.setattr(aio_module, "_copier", counting_copier)
    before = open_fds()
    chunks = {i * SYNC_WRITE_MAX * 3: os.urandom(SYNC_WRITE_MAX * (1 + i % 3))
              for i in range(8)}

    async def body() -> None:
        image = await open_aio(str(path), OpenOptions(direct=False))
        try:
            await asyncio.gather(*[image.write(offset, memoryview(bytearray(data)),
                                               fua=bool(n % 2))
                                   for n, (offset, data) in enumerate(chunks.items())])
            # Read-only memory has no address for the kernel: the worker thread takes it.
            await image.write(0, memoryview(bytes(chunks[0])))
            assert (image._uring is not None) is with_uring
        finally:
            await image.close()

    asyncio.run(body())
    assert open_fds() == before
    content = path.read_bytes()
    for offset, data in chunks.items():
        assert content[offset : offset + len(data)] == data
    # The worker thread took the read-only buffer, and every write without io_uring.
    assert len(copier_calls) == (1 if with_uring else len(chunks) + 1)
