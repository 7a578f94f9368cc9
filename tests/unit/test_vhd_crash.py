"""Crash safety: a writer killed at any instant leaves an image that the checker accepts,
that holds every acknowledged write, and that never shows stale data for the write that
was in flight (only the old contents or the new ones)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blktap.vhd import VhdFile, check_file, create_dynamic, snapshot
from tests.vhd_helpers import chain_bytes, run

MiB = 1024 * 1024
SIZE = 8 * MiB

WRITER = r"""
import asyncio, random, sys
from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions

async def main(path, seed, size):
    chain = await Chain.open("vhd", path, OpenOptions(direct=False))
    rng = random.Random(seed)
    i = 0
    while True:
        off = rng.randrange(0, size // 512 - 64) * 512 + rng.choice([0, 0, 100])
        n = rng.randint(1, 64) * 512 - rng.choice([0, 0, 37])
        print(f"start {i} {off} {n}", flush=True)
        await chain.write(off, memoryview(bytes([i % 251 + 1]) * n))
        print(f"ack {i}", flush=True)
        i += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def _make_chain(tmp: Path) -> tuple[str, bytes]:
    base = tmp / "base.vhd"
    create_dynamic(str(base), SIZE, block_size=256 * 1024)
    rng = random.Random(1)
    initial = bytearray(SIZE)

    async def fill() -> None:
        from blktap.block.chain import Chain
        from blktap.block.driver import OpenOptions

        chain = await Chain.open("vhd", str(base), OpenOptions())
        try:
            for _ in range(30):
                off = rng.randrange(0, SIZE - 65536, 512)
                data = rng.randbytes(65536)
                await chain.write(off, memoryview(data))
                initial[off : off + 65536] = data
        finally:
            await chain.close()

    run(fill())
    leaf = tmp / "leaf.vhd"
    snapshot(str(leaf), str(base))
    return str(leaf), bytes(initial)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.2])
def test_killed_writer_leaves_a_valid_image_with_every_acked_write(
    tmp_path: Path, delay: float
) -> None:
    leaf, initial = _make_chain(tmp_path)
    seed = int(delay * 1000) + 1
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, leaf, str(seed), str(SIZE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            # Let it get going (20 acknowledged writes), then kill it a little later.
            while not any(line.startswith("ack 20") for line in lines[-2:]):
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
                lines.append(line)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            # Read the rest through the same buffered stream readline used.
            out = proc.stdout.read()
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = "".join(lines) + out
    assert proc.returncode == -signal.SIGKILL, err
    model = bytearray(initial)
    pending: tuple[int, int, int] | None = None
    acked = 0
    for line in out.splitlines():
        word, *nums = line.split()
        if word == "start":
            pending = (int(nums[0]), int(nums[1]), int(nums[2]))
        elif word == "ack":
            assert pending is not None and pending[0] == int(nums[0]), line
            i, off, n = pending
            model[off : off + n] = bytes([i % 251 + 1]) * n
            pending = None
            acked += 1
    assert acked > 10, "the writer did not get going"
    results = check_file(leaf, check_parents=True)
    assert all(r.valid for r in results), [r.faults for r in results]
    got = run(chain_bytes(leaf))
    if pending is None:
        assert got == model
    else:
        i, off, n = pending
        assert got[:off] == model[:off] and got[off + n :] == model[off + n :]
        new = bytes([i % 251 + 1])
        for pos in range(off, off + n):
            assert got[pos] == model[pos] or got[pos : pos + 1] == new, pos


@pytest.mark.parametrize("stop_after", ["reserve", "data", "bat"])
def test_interrupted_allocation_hides_the_unfinished_write(tmp_path: Path, stop_after: str) -> None:
    """Each prefix of the allocation sequence (zero-fill; data; BAT entry; bitmap) is a
    valid image in which the unfinished write is invisible (the parent shows)."""
    leaf, initial = _make_chain(tmp_path)
    vf = VhdFile.open(leaf, writable=True)
    block = 5
    entry = vf.reserve_block()
    if stop_after in ("data", "bat"):
        base = vf.data_offset_of_entry(entry)
        os.pwrite(vf.fd, b"\xee" * 4096, base)
    if stop_after == "bat":
        vf.write_bat_entry(block, entry)
    os.close(vf.fd)  # the process dies here: no bitmap, no footer rewrite
    results = check_file(leaf, check_parents=True)
    assert all(r.valid for r in results), [r.faults for r in results]
    assert run(chain_bytes(leaf)) == initial
