"""The changed-block log keeps the VBD's fast write routes, and every write on each of
them sets its blocks' bits (blktap.block.capabilities.WriteObserver).

A VBD with a log (the tapdisk's LogSlot on top of its stack, as ``tap-ctl create -C``
opens it) on a raw image, served over NBD in the test process (tests/nbd_helpers.py),
written by a raw-socket client: small WRITEs served inline on the lent descriptor,
large ones by the connection's write lane (threads), writes to an O_DIRECT image by the
direct route (the image's coroutine called by the VBD), FUA writes; each test counts
which route served the writes (the layer counts those that reach it, the general path)
and reads the log with ``cbt-util get -b``. Then a real tapdisk with a buffered image and
real clients (qemu-io, fio). Writes through the block device (FUSE, which calls the
VBD's methods) are in tests/system/test_cbt.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from blktap.block.capabilities import NO_ROUTES
from blktap.block.cbtlog import CbtLogFile
from blktap.block.driver import OpenOptions
from blktap.block.layer import Layer, LayerOpener, Stack
from blktap.block.layers.log import LogLayer, LogSlot
from blktap.vbd import VBD, ImageSpec
from tests.nbd_helpers import MIB, SIZE, RawClient, ServedImage, make_image, request
from tests.system.test_cbt import SIZE as CBT_SIZE
from tests.system.test_cbt import (
    TOOLS,
    apply_from_export,
    blocks,
    client_writes,
    create,
    destroy,
    fio_writes,
    full_copy,
    logged,
    same_disk,
    sock,
    uri,
)
from tests.system.test_cbt import make_image as make_disk
from tests.system.test_cbt import new_log as cbt_new_log
from tests.system.test_nbd_server import big_writes, lane_threads, write_reply
from tests.system.test_tap_ctl import assert_clean, qemu_io

BLOCK = 64 << 10
SYNC = 512 << 10  # a write for the thread route (lanes take SYNC_WRITE_MAX and more)


class CountingLogLayer(LogLayer):
    """A log layer that counts the writes reaching it: those of the general path."""

    def __init__(self, next: Stack, options: OpenOptions, log: CbtLogFile) -> None:
        super().__init__(next, options, log)
        self.general = 0

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        self.general += 1
        await super().write(offset, data, fua)


def counting_log(path: str, opened: list[CountingLogLayer]) -> LayerOpener:
    async def open_(next: Stack, options: OpenOptions) -> Layer:
        layer = CountingLogLayer(next, options, CbtLogFile.open(path, next.size))
        opened.append(layer)
        return layer

    return open_


def new_log(path: Path, size: int = SIZE) -> str:
    """A new log for a disk of ``size`` (this file's images: tests.nbd_helpers.SIZE)."""
    return cbt_new_log(path, size)


class Routes:
    """Counts, in the server's loop, which route served the VBD's writes: ``now``
    (VBD.write_now served it), ``coroutine`` (VBD.write: its direct branch, or the
    general path, which ``layer.general`` counts); inline and lane writes are the rest
    of the connection's (the lane's are in its statistics)."""

    def __init__(self, vbd: VBD) -> None:
        self.now = 0
        self.coroutine = 0
        write_now = vbd.write_now
        write = vbd.write

        def counting_now(offset: int, data: memoryview, fua: bool = False) -> bool:
            done = write_now(offset, data, fua)
            self.now += done
            return done

        def counting_write(offset: int, data: memoryview, fua: bool = False
                           ) -> Coroutine[Any, Any, None]:
            self.coroutine += 1
            return write(offset, data, fua)

        # Instance attributes: the connection calls vbd.write_now / vbd.write.
        vbd.write_now = counting_now  # type: ignore[method-assign]
        vbd.write = counting_write  # type: ignore[method-assign]


@contextlib.contextmanager
def served_with_log(workdir: str, serve: Callable[..., ServedImage], direct: bool
                    ) -> Iterator[tuple[ServedImage, CountingLogLayer, str, RawClient, Routes]]:
    """A 64 MiB raw image served with a fresh log on top of its stack, a client that
    has negotiated, and the route counters."""
    log = new_log(Path(workdir) / "disk.cbtlog")
    opened: list[CountingLogLayer] = []
    s = serve(make_image(workdir), direct=direct, layers=[counting_log(log, opened)])
    (layer,) = opened
    routes = Routes(s.vbd)
    c = RawClient(s.socket)
    try:
        c.handshake()
        yield s, layer, log, c, routes
    finally:
        c.close()


def send_writes(c: RawClient, writes: list[tuple[int, int]], flags: int = 0,
                first: int = 0) -> None:
    """The WRITEs, all in one send; every reply must be a success."""
    c.sock.sendall(b"".join(request(1, n, offset, length, flags) + os.urandom(length)
                            for n, (offset, length) in enumerate(writes, first)))
    replies = sorted(write_reply(c) for _ in writes)
    assert replies == [(0, n) for n in range(first, first + len(writes))]


# Small aligned writes in many blocks, two in one block, one across a block boundary.
SMALL = [(i * 3 * BLOCK + (i % 5) * 4096, 4096) for i in range(40)] + [
    (BLOCK + 8192, 4096), (7 * BLOCK - 2048, 4096), (SIZE - 4096, 4096)]


def test_small_writes_served_inline_mark_their_blocks(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    with served_with_log(workdir, serve, direct=False) as (s, layer, log, c, routes):
        adm = s.vbd.admission
        assert adm is not None and adm.sync is not None
        assert adm.sync.pwritev is not os.pwritev and not adm.sync.fua
        send_writes(c, SMALL)
        stats = s.run(s.server.statistics)
        assert stats.writes == len(SMALL) and stats.lane_writes == 0
        # Inline, every one: neither VBD.write_now nor the coroutine saw them.
        assert (routes.now, routes.coroutine, layer.general) == (0, 0, 0)
        assert logged(log) == blocks(SMALL)


def test_fua_writes_leave_the_loop_routes_and_their_bits_are_durable(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """A FUA WRITE is not served inline nor by write_now (the log's sync must not block
    the loop): the VBD's direct route marks it, syncs the log, then writes; once it is
    answered its bits are durable."""
    with served_with_log(workdir, serve, direct=False) as (s, layer, log, c, routes):
        writes = [(20 * MIB, 4096), (40 * MIB + 100, 1000)]
        send_writes(c, writes, flags=1)
        assert routes.coroutine == 2 and routes.now == 0
        assert layer.general == 1  # the unaligned one: only the stack takes it
        assert not s.run(lambda: layer.log.pending)
        assert logged(log) == blocks(writes)


@pytest.mark.parametrize("fua", [0, 1], ids=["plain", "fua"])
def test_large_writes_on_the_write_lane_mark_their_blocks(
        workdir: str, serve: Callable[..., ServedImage], fua: int) -> None:
    with served_with_log(workdir, serve, direct=False) as (s, layer, log, c, routes):
        image = bytearray(SIZE)  # (big_writes keeps it; the data is not checked here)
        offsets = [(i * 7 % 48) * MIB for i in range(24)]  # none overlapping
        big_writes(c, image, offsets, flags=fua)
        assert len(lane_threads()) == 2
        stats = s.run(s.server.statistics)
        assert stats.writes == 24 and stats.lane_writes >= 12
        # The rest went through the coroutine's direct branch (1 MiB: no write_now).
        assert routes.coroutine == 24 - stats.lane_writes and layer.general == 0
        if fua:
            assert not s.run(lambda: layer.log.pending)
        assert logged(log) == blocks((offset, MIB) for offset in offsets)


def test_writes_on_the_direct_route_mark_their_blocks(
        workdir: str, serve: Callable[..., ServedImage]) -> None:
    """O_DIRECT: no write_now, no lent descriptor; the VBD calls the image's coroutine
    itself, marking first."""
    with served_with_log(workdir, serve, direct=True) as (s, layer, log, c, routes):
        adm = s.vbd.admission
        assert adm is not None and adm.write_now is None and adm.write_direct is not None
        send_writes(c, SMALL)
        assert routes.coroutine == len(SMALL) and routes.now == 0 and layer.general == 0
        fua = [(50 * MIB, 8192)]
        send_writes(c, fua, flags=1, first=1000)
        assert layer.general == 0 and not s.run(lambda: layer.log.pending)
        assert logged(log) == blocks(SMALL + fua)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def test_routes_and_observers_follow_the_log_slot_at_each_resume(tmp_path: Path) -> None:
    """With a log: every write route of the Admission calls the log, while frontends see
    no write route of their own (FUSE passthrough would skip the log). No log (a slot
    with path None): the driver's own functions, nothing added. A resume onto a new log
    marks that one only. Marks from another thread (ThreadIO, as a lane) count."""
    img = make_image(str(tmp_path), size=SIZE)
    first = new_log(tmp_path / "first.cbtlog")
    second = new_log(tmp_path / "second.cbtlog")
    slot = LogSlot(first)

    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec("aio", img), OpenOptions(direct=False), [slot.opener()])
        try:
            chain = vbd.chain
            assert chain is not None
            adm = vbd.admission
            assert adm is not None and adm.sync is not None
            assert adm.write_now is not None and adm.write_now is not chain.fast.write_now
            assert adm.write_blocking is not None and adm.sync.pwritev is not os.pwritev
            assert adm.write_direct is not None
            assert vbd.capabilities.writes == NO_ROUTES
            assert vbd.thread_io_possible(write=True)

            assert vbd.write_now(0, memoryview(bytes(4096)))
            assert not vbd.write_now(BLOCK, memoryview(bytes(4096)), fua=True)  # declined
            await vbd.write(BLOCK, memoryview(bytes(4096)), fua=True)  # direct: synced
            io = vbd.thread_io(write=True)
            assert io is not None
            done: list[bool] = []
            worker = threading.Thread(target=lambda: done.append(
                io.write(2 * BLOCK, memoryview(bytes(SYNC)))))
            worker.start()
            await asyncio.to_thread(worker.join, 20)
            assert done == [True]
            vbd.release_thread_io(io)
            await vbd.write(5 * BLOCK, memoryview(bytes(512)))  # the direct branch
            assert logged(first) == {0, 1} | blocks([(2 * BLOCK, SYNC)]) | {5}

            # No log: the routes are the driver's own.
            await vbd.pause()
            slot.path = None
            await vbd.resume()
            chain = vbd.chain
            assert chain is not None
            adm = vbd.admission
            assert adm is not None and adm.sync is not None
            assert adm.sync.pwritev is os.pwritev and adm.sync.fua
            assert adm.write_now is chain.fast.write_now
            assert adm.write_blocking is chain.fast.write_blocking
            assert vbd.capabilities.writes.direct and vbd.capabilities.observers == ()
            assert vbd.write_now(30 * BLOCK, memoryview(bytes(4096)))

            # A new log at resume: marks go to it, not to the first.
            await vbd.pause()
            slot.path = second
            await vbd.resume()
            assert vbd.write_now(40 * BLOCK, memoryview(bytes(4096)))
            assert logged(second) == {40}
            assert logged(first) == {0, 1} | blocks([(2 * BLOCK, SYNC)]) | {5}
        finally:
            await vbd.close()

    run(body())


# ------------------------------------------------------- a real tapdisk, real clients
_missing = [tool for tool in TOOLS if shutil.which(tool) is None]


@pytest.fixture
def clean_run_dir(run_dir: str) -> Iterator[str]:
    """``run_dir`` that must be clean at the end (as test_cbt's ``cbt_run_dir``)."""
    yield run_dir
    fuse = os.path.join(run_dir, "fuse")
    if os.path.isdir(fuse) and not os.listdir(fuse):
        os.rmdir(fuse)
    assert_clean(run_dir)


@pytest.mark.skipif(bool(_missing), reason=f"tools missing: {', '.join(_missing)}")
def test_buffered_tapdisk_with_a_log_real_clients_on_every_route(
        clean_run_dir: str, tmp_path: Path) -> None:
    """``tap-ctl create -D -C``: a buffered raw image, where the log keeps the inline
    route (fio's 4 KiB writes), the write lane (fio's 1 MiB writes), write_now and the
    direct route (qemu-io's writes, FUA ones too), and the general path for the rest
    (unaligned writes, zeroes, discards). ``cbt-util get -b`` names exactly the blocks
    written, and copying only those onto a full copy gives the disk."""
    img = make_disk("aio", tmp_path / "disk.raw")
    log = new_log(tmp_path / "disk.cbtlog", CBT_SIZE)
    pid, minor, _ = create("aio", img, log, "-D")
    try:
        source = uri(clean_run_dir, pid, minor)
        copy = tmp_path / "backup.raw"
        full_copy(source, copy)
        assert logged(log) == set()
        expected = client_writes(source)
        expected |= fio_writes(tmp_path, "--ioengine=nbd", f"--uri={source}",
                               offset=40 * MIB, size=8 * MIB, ios=200)
        big = tmp_path / "big.iolog"
        subprocess.run(["fio", "--name=big", "--ioengine=nbd", f"--uri={source}",
                        "--rw=randwrite", "--bs=1M", "--iodepth=4", f"--offset={48 * MIB}",
                        f"--size={8 * MIB}", "--number_ios=24", "--randseed=3",
                        f"--write_iolog={big}", "--output-format=json"],
                       check=True, capture_output=True, timeout=120)
        expected |= blocks((int(f[-2]), int(f[-1])) for f in
                           (line.split() for line in big.read_text().splitlines())
                           if len(f) >= 4 and f[-3] == "write")
        fua = [(60 * MIB, 4096), (61 * MIB + 512, 8192)]
        qemu_io(source, *[f"write -f -P 0x5a {o} {n}" for o, n in fua])
        expected |= blocks(fua)
        assert logged(log) == expected
        apply_from_export(sock(clean_run_dir, pid, minor), logged(log), copy, tmp_path)
        same_disk(source, copy, tmp_path)
    finally:
        destroy(pid, minor)


def test_two_logs_are_both_marked_on_the_fast_routes(tmp_path: Path) -> None:
    """Observers compose: with two logs stacked, each fast route marks both."""
    img = make_image(str(tmp_path), size=SIZE)
    first = new_log(tmp_path / "first.cbtlog")
    second = new_log(tmp_path / "second.cbtlog")

    async def body() -> None:
        vbd = VBD(0)
        await vbd.open(ImageSpec("aio", img), OpenOptions(direct=False),
                       [LogSlot(first).opener(), LogSlot(second).opener()])
        try:
            adm = vbd.admission
            assert adm is not None and adm.sync is not None
            assert len(vbd.capabilities.observers) == 2
            assert vbd.write_now(0, memoryview(bytes(4096)))
            assert adm.sync.pwritev(adm.sync.fd, [memoryview(bytes(4096))], 3 * BLOCK, 0) == 4096
            await vbd.write(7 * BLOCK, memoryview(bytes(512)), fua=True)
        finally:
            await vbd.close()

    run(body())
    assert logged(first) == logged(second) == {0, 3, 7}
