"""The open changed block tracking log (blktap.block.cbtlog): marks are the C tapdisk's
bits (checked against the logs it wrote), they are in the file at once (a process killed
with -9 loses none), they stay coherent with cbt-util working on the same file, syncs are
shared and retried, and invalid logs are refused before anything is written."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap.block.cbtlog import CbtLogFile
from blktap.cbtutil.coalesce import coalesce
from blktap.cbtutil.create import create
from blktap.cbtutil.setfield import set_fields
from blktap.proto import cbt
from tests.reference_data import reference_dir

REF = reference_dir("cbt")
MiB = 1 << 20
T = TypeVar("T")

# The writes the C tapdisk logged (reference/cbt.md, "Fixtures").
RAW_WRITES = [(0, 4096), (65536, 512), (1048064, 1024), (10 * MiB, 3 * MiB),
              (64 * MiB - 512, 512)]
VHD_WRITES = [(128 * 1024, 65536), (5 * MiB, 100 * 1024), (20 * MiB, MiB)]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def copy(tmp_path: Path, name: str) -> str:
    dst = tmp_path / name
    shutil.copyfile(REF / name, dst)
    return str(dst)


def file_bits(path: str) -> list[int]:
    """The bits set in the file, read through another descriptor without the codec."""
    data = Path(path).read_bytes()[48:]
    return [i for i in range(len(data) * 8) if data[i // 8] >> (i % 8) & 1]


class CountingLog(CbtLogFile):
    """Counts the msync calls; fails the first ``fail`` of them with EIO."""

    calls = 0
    fail = 0

    def _msync(self, lo: int, hi: int) -> None:
        type(self).calls += 1
        if type(self).fail:
            type(self).fail -= 1
            raise OSError(errno.EIO, "injected msync failure")
        super()._msync(lo, hi)


# --------------------------------------------------------------- the C tapdisk's bits
@pytest.mark.parametrize(("writes", "expected"), [(RAW_WRITES, "raw-writes.cbtlog"),
                                                  (VHD_WRITES, "vhd-writes.cbtlog")])
def test_marks_are_the_c_tapdisks_bits(
    tmp_path: Path, writes: list[tuple[int, int]], expected: str
) -> None:
    path = copy(tmp_path, "empty-64m.cbtlog")  # made by the C cbt-util create
    log = CbtLogFile.open(path, 64 * MiB)
    for offset, length in writes:
        assert log.mark(offset, length)
    log.close_now()
    assert Path(path).read_bytes() == (REF / expected).read_bytes()


def test_a_log_we_create_takes_the_same_marks(tmp_path: Path) -> None:
    path = str(tmp_path / "ours.cbtlog")
    create(path, 64 * MiB)

    async def go() -> None:
        log = CbtLogFile.open(path, 64 * MiB)
        for offset, length in RAW_WRITES:
            log.mark(offset, length)
        await log.close()

    run(go())
    assert Path(path).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()


def test_marking_again_writes_nothing(tmp_path: Path) -> None:
    path = copy(tmp_path, "raw-writes.cbtlog")
    log = CbtLogFile.open(path, 64 * MiB)
    try:
        assert not log.pending
        for offset, length in RAW_WRITES:
            assert not log.mark(offset, length)
        assert not log.mark(10 * MiB + 4096, 2 * MiB)  # inside a marked range
        assert not log.pending
        assert log.mark(2 * 65536, 1)
        assert log.pending
        assert log.is_marked(2) and not log.is_marked(3)
    finally:
        log.close_now()


def test_marks_on_odd_sizes_and_edges(tmp_path: Path) -> None:
    path = copy(tmp_path, "empty-odd.cbtlog")  # 10489856 bytes: 161 blocks
    log = CbtLogFile.open(path, 10489856)
    try:
        assert log.mark(10489856 - 512, 512)
        assert log.mark(7 * 65536 + 65535, 2)  # blocks 7 and 8: two bytes
        assert log.mark(0, 10489856 // 2)
        assert log.bits_set() == [*range(0, 81), 160]
        assert log.bitmap() == Path(path).read_bytes()[48:]
    finally:
        log.close_now()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8 * MiB - 1), st.integers(1, 2 * MiB)),
                max_size=30))
def test_marks_match_a_model(writes: list[tuple[int, int]]) -> None:
    size = 8 * MiB - 4096
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.cbtlog")
        create(path, size)
        log = CbtLogFile.open(path, size)
        model: set[int] = set()
        for offset, length in writes:
            offset = min(offset, size - 1)
            length = min(length, size - offset)
            new = set(range(offset // 65536, (offset + length - 1) // 65536 + 1))
            assert log.mark(offset, length) == (not new <= model)
            model |= new
        log.close_now()
        assert file_bits(path) == sorted(model)


# ------------------------------------------------------------------- in the file at once
def test_marks_survive_kill_9(tmp_path: Path) -> None:
    """A process that marks and is then killed with -9 (no sync, no close) leaves every
    bit in the file: the map is the page cache."""
    path = copy(tmp_path, "empty-64m.cbtlog")
    script = (
        "import sys, time\n"
        "from blktap.block.cbtlog import CbtLogFile\n"
        "log = CbtLogFile.open(sys.argv[1], 64 << 20)\n"
        "for off, n in ((0, 4096), (65536, 512), (1048064, 1024), (10 << 20, 3 << 20),\n"
        "               ((64 << 20) - 512, 512)):\n"
        "    log.mark(off, n)\n"
        "print('marked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, path], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "marked\n"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert Path(path).read_bytes() == (REF / "raw-writes.cbtlog").read_bytes()


def test_coherent_with_cbt_util_on_the_open_file(tmp_path: Path) -> None:
    """The storage manager may coalesce a parent log into a log in use, or set its flag:
    the open log sees the new bits, keeps them, and never rewrites the header."""
    path = copy(tmp_path, "vhd-writes.cbtlog")
    parent = copy(tmp_path, "raw-writes.cbtlog")
    log = CbtLogFile.open(path, 64 * MiB)
    try:
        coalesce(parent, path)
        set_fields(path, consistent=True)
        assert log.is_marked(1023) and log.is_marked(15)
        assert not log.mark(0, 4096)  # marked by the coalesce
        assert log.mark(3 * 65536, 1)
        log.sync_now()
    finally:
        log.close_now()
    final = cbt.parse_log(Path(path).read_bytes())
    assert final.header.consistent is True
    want = set(cbt.parse_log((REF / "co-child.cbtlog").read_bytes()).bits_set()) | {3}
    assert final.bits_set() == sorted(want)


# --------------------------------------------------------------------------- sync
def test_sync_only_when_something_was_marked(tmp_path: Path) -> None:
    path = copy(tmp_path, "empty-64m.cbtlog")
    CountingLog.calls = 0

    async def go() -> None:
        log = CountingLog.open(path, 64 * MiB)
        await log.sync()
        assert CountingLog.calls == 0
        log.mark(0, 1)
        await log.sync()
        assert CountingLog.calls == 1 and not log.pending
        await log.sync()
        log.mark(0, 512)  # already marked: nothing to sync
        await log.sync()
        assert CountingLog.calls == 1
        await log.close()
        assert CountingLog.calls == 1

    run(go())
    assert file_bits(path) == [0]


def test_concurrent_syncs_share_one_msync(tmp_path: Path) -> None:
    path = copy(tmp_path, "empty-64m.cbtlog")
    CountingLog.calls = 0

    async def go() -> None:
        log = CountingLog.open(path, 64 * MiB)
        log.mark(0, 1)
        log.mark(63 * MiB, 1)
        await asyncio.gather(*(log.sync() for _ in range(8)))
        assert CountingLog.calls == 1
        assert not log.pending
        await log.close()

    run(go())
    assert file_bits(path) == [0, 1008]


class GatedLog(CountingLog):
    """Each msync says it started (``entered``) and waits for ``release``."""

    entered = threading.Event()
    release = threading.Event()

    def _msync(self, lo: int, hi: int) -> None:
        type(self).entered.set()
        type(self).release.wait(10)
        super()._msync(lo, hi)


def test_a_mark_during_a_sync_is_synced_by_the_next(tmp_path: Path) -> None:
    path = copy(tmp_path, "empty-64m.cbtlog")
    GatedLog.calls = 0
    GatedLog.entered.clear()
    GatedLog.release.clear()

    async def go() -> None:
        log = GatedLog.open(path, 64 * MiB)
        log.mark(0, 1)
        first = asyncio.ensure_future(log.sync())
        await asyncio.to_thread(GatedLog.entered.wait, 10)  # it has taken the range
        log.mark(65536, 1)
        second = asyncio.ensure_future(log.sync())  # must cover the second mark
        await asyncio.sleep(0.01)
        assert not second.done()
        GatedLog.release.set()
        await first
        await second
        assert GatedLog.calls == 2
        assert not log.pending
        await log.close()

    run(go())
    assert file_bits(path) == [0, 1]


def test_a_thread_sync_waits_for_the_sync_that_took_its_bits(tmp_path: Path) -> None:
    """A sync that finds the dirty range taken by a sync still writing it back returns
    only when that one is done (the bits it must cover are durable)."""
    path = copy(tmp_path, "empty-64m.cbtlog")
    GatedLog.entered.clear()
    GatedLog.release.clear()
    log = GatedLog.open(path, 64 * MiB)
    log.mark(3 * 65536, 1)
    first = threading.Thread(target=log.sync_now)
    first.start()
    assert GatedLog.entered.wait(10)
    second = threading.Thread(target=log.sync_now)
    second.start()
    second.join(0.05)
    assert second.is_alive()  # waits for the first msync, which holds bit 3
    GatedLog.release.set()
    first.join(10)
    second.join(10)
    assert not log.pending
    log.close_now()
    assert file_bits(path) == [3]


def test_marks_from_many_threads_lose_no_bit(tmp_path: Path) -> None:
    """Threads marking bits of the same bytes at once (the NBD lanes and the event loop):
    every bit is set, and one sync after they are done makes them all durable."""
    path = copy(tmp_path, "empty-64m.cbtlog")
    log = CbtLogFile.open(path, 64 * MiB)
    threads = 4
    blocks = 1024  # 64 MiB of 64 KiB blocks: byte k holds blocks 8k..8k+7

    def marker(first: int) -> None:
        for block in range(first, blocks, threads):  # neighbours: the same bytes
            log.mark(block * 65536, 512)

    workers = [threading.Thread(target=marker, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert log.bits_set() == list(range(blocks))
    assert log.pending
    log.sync_now()
    assert not log.pending
    log.close_now()
    assert file_bits(path) == list(range(blocks))


def test_failed_sync_is_retried_by_the_next(tmp_path: Path) -> None:
    path = copy(tmp_path, "empty-64m.cbtlog")
    CountingLog.calls = 0
    CountingLog.fail = 1

    async def go() -> None:
        log = CountingLog.open(path, 64 * MiB)
        log.mark(5 * 65536, 1)
        with pytest.raises(OSError) as info:
            await log.sync()
        assert info.value.errno == errno.EIO
        assert log.pending
        await log.sync()
        assert not log.pending
        assert CountingLog.calls == 2
        await log.close()

    run(go())
    assert file_bits(path) == [5]


def test_close_is_idempotent(tmp_path: Path) -> None:
    path = copy(tmp_path, "empty-64m.cbtlog")
    log = CbtLogFile.open(path, 64 * MiB)
    log.mark(0, 1)
    log.close_now()
    log.close_now()
    run(log.close())
    assert file_bits(path) == [0]


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("data", "error"),
    [
        (bytes(20), cbt.TruncatedLogError),
        (bytes(48), cbt.ForeignLogError),
        (cbt.CbtHeader(size=64 * MiB).encode() + bytes(64), cbt.BitmapTooSmallError),
        (cbt.CbtHeader(size=64 * MiB).encode() + bytes(200), cbt.SizeMismatchError),
    ],
)
def test_invalid_logs_are_refused_untouched(
    tmp_path: Path, data: bytes, error: type[cbt.CbtLogError]
) -> None:
    path = tmp_path / "bad.cbtlog"
    path.write_bytes(data)
    with pytest.raises(error):
        CbtLogFile.open(str(path), 64 * MiB)
    assert path.read_bytes() == data


def test_log_for_a_smaller_disk_is_refused(tmp_path: Path) -> None:
    path = copy(tmp_path, "fields.cbtlog")  # 16 MiB
    CbtLogFile.open(path, 16 * MiB).close_now()
    with pytest.raises(cbt.BitmapTooSmallError) as info:
        CbtLogFile.open(path, 16 * MiB + 8 * 65536)
    assert info.value.errno == errno.EINVAL
    assert "bitmap smaller than the disk" in str(info.value)
    assert Path(path).read_bytes() == (REF / "fields.cbtlog").read_bytes()


def test_missing_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CbtLogFile.open(str(tmp_path / "none.cbtlog"), 64 * MiB)


@given(st.lists(st.tuples(st.integers(0, 8 * MiB - 1), st.integers(1, 2 * MiB)),
                max_size=20),
       st.lists(st.tuples(st.integers(0, 8 * MiB - 1), st.integers(1, 8 * MiB)),
                min_size=1, max_size=10),
       st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_dirty_extents_match_the_marks(writes: list[tuple[int, int]],
                                       queries: list[tuple[int, int]], limit: int) -> None:
    """dirty_extents: runs that alternate, tile the range, end at block boundaries (or
    the range's end), and say 1 exactly for marked blocks; ``limit`` cuts the list."""
    size = 8 * MiB - 1000
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "e.cbtlog")
        create(path, size)
        log = CbtLogFile.open(path, size)
        try:
            for offset, length in writes:
                offset = min(offset, size - 1)
                log.mark(offset, min(length, size - offset))
            for offset, length in queries:
                offset = min(offset, size - 1)
                length = min(length, size - offset)
                runs = log.dirty_extents(offset, length)
                pos = offset
                for n, flag in runs:
                    assert n > 0 and flag in (0, 1)
                    for block in range(pos // 65536, (pos + n - 1) // 65536 + 1):
                        assert log.is_marked(block) is bool(flag)
                    pos += n
                    assert pos == offset + length or pos % 65536 == 0
                assert pos == offset + length
                assert all(runs[i][1] != runs[i + 1][1] for i in range(len(runs) - 1))
                assert log.dirty_extents(offset, length, limit) == runs[:limit]
        finally:
            log.close_now()
