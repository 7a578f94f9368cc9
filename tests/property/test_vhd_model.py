"""Property test: random writes, zeroes, discards, snapshots and reopens on random VHD
chains, compared at every step with a plain ``bytearray`` model of the virtual disk."""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blktap.block.chain import Chain
from blktap.block.driver import OpenOptions
from blktap.vhd import check_file, create_dynamic, create_fixed, snapshot

T = TypeVar("T")
KiB = 1024
SIZES = [1024 * KiB, 1024 * KiB + 3 * 512]


class VhdChainModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vhd-model-"))
        self.loop = asyncio.new_event_loop()
        self.chain: Chain | None = None
        self.model = bytearray()
        self.leaf = ""
        self.depth = 0
        self.leaf_is_dynamic_root = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def _open(self) -> None:
        self.chain = self._run(Chain.open("vhd", self.leaf, OpenOptions(direct=False)))

    def _close(self) -> None:
        if self.chain is not None:
            self._run(self.chain.close())
            self.chain = None

    @initialize(
        root=st.sampled_from(["dynamic", "fixed", "raw"]),
        size=st.sampled_from(SIZES),
        block_size=st.sampled_from([16 * KiB, 64 * KiB, 2048 * KiB]),
        seed=st.integers(0, 2**32 - 1),
    )
    def create(self, root: str, size: int, block_size: int, seed: int) -> None:
        self.model = bytearray(size)
        path = self.dir / "root.img"
        if root == "dynamic":
            create_dynamic(str(path), size, block_size=block_size)
            self.leaf_is_dynamic_root = True
        elif root == "fixed":
            create_fixed(str(path), size)
        else:
            self.model[:] = random.Random(seed).randbytes(size)
            path.write_bytes(self.model)
            snapshot(str(self.dir / "leaf0.vhd"), str(path), raw_parent=True)
            path = self.dir / "leaf0.vhd"
            self.depth = 1
        self.leaf = str(path)
        self._open()

    def teardown(self) -> None:
        try:
            self._close()
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _span(self, data: st.DataObject, align: bool) -> tuple[int, int]:
        size = len(self.model)
        unit = 512 if align else 1
        offset = data.draw(st.integers(0, size // unit - 1)) * unit
        length = data.draw(st.integers(1, min(300 * KiB, size - offset) // unit)) * unit
        return offset, length

    @rule(data=st.data(), align=st.booleans(), fua=st.booleans())
    def write(self, data: st.DataObject, align: bool, fua: bool) -> None:
        assert self.chain is not None
        offset, length = self._span(data, align)
        payload = random.Random(offset * 31 + length).randbytes(length)
        self._run(self.chain.write(offset, memoryview(payload), fua))
        self.model[offset : offset + length] = payload

    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_unmap: bool) -> None:
        assert self.chain is not None
        offset, length = self._span(data, align=False)
        self._run(self.chain.write_zeroes(offset, length, may_unmap, False))
        self.model[offset : offset + length] = bytes(length)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.chain is not None
        offset, length = self._span(data, align=False)
        self._run(self.chain.discard(offset, length))
        if self.leaf_is_dynamic_root:
            # A dynamic disk with no parent forgets whole sectors: they read as zeros.
            start = -(-offset // 512) * 512
            end = (offset + length) // 512 * 512
            if start < end:
                self.model[start:end] = bytes(end - start)

    @precondition(lambda self: self.depth < 5)
    @rule()
    def take_snapshot(self) -> None:
        self._close()
        self.depth += 1
        child = str(self.dir / f"leaf{self.depth}.vhd")
        snapshot(child, self.leaf)
        self.leaf = child
        self.leaf_is_dynamic_root = False
        self._open()

    @rule()
    def reopen(self) -> None:
        self._close()
        self._open()

    @rule()
    def flush(self) -> None:
        assert self.chain is not None
        self._run(self.chain.flush())

    @invariant()
    def reads_match_the_model(self) -> None:
        if self.chain is None:
            return
        buf = bytearray(len(self.model))
        self._run(self.chain.read(0, memoryview(buf)))
        assert buf == self.model
        status = self.chain.block_status(0, len(self.model))
        assert sum(e.length for e in status) == len(self.model)
        for e in status:
            if e.flags & 2:  # ZERO
                assert self.model[e.offset : e.offset + e.length] == bytes(e.length)

    @rule()
    def closed_chain_checks_valid(self) -> None:
        self._close()
        if self.leaf.endswith(".vhd") or self.depth == 0:
            for result in check_file(self.leaf, check_parents=True):
                assert result.valid, result.faults
        self._open()


VhdChainModel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_vhd_chain_model = VhdChainModel.TestCase
