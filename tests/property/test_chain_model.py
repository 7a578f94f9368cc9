"""Random operation sequences through a Chain over each driver vs a bytearray model.

Byte-granular (unaligned) reads, writes and write-zeroes go through
``blktap.block.chain.Chain``; discards must leave each sector as it was or zeroed;
concurrent writes to disjoint byte ranges (possibly sharing sectors) must all land.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.block.chain import Chain
from tests.conformance import CASE_IDS, CASES, DriverCase, sectors_equal_or_zero

SIZE = 64 * 1024


@dataclass(frozen=True)
class Op:
    kind: str
    offset: int
    length: int
    seed: int


def ranges() -> st.SearchStrategy[tuple[int, int]]:
    def clip(pair: tuple[int, int]) -> tuple[int, int]:
        offset, length = pair
        return offset, max(1, min(length, SIZE - offset))

    near_edges = st.sampled_from([0, 1, 511, 512, 513, 4095, 4096, SIZE - 4096, SIZE - 513,
                                  SIZE - 512, SIZE - 1])
    offsets = st.one_of(near_edges, st.integers(0, SIZE - 1))
    lengths = st.one_of(st.sampled_from([1, 511, 512, 513, 4096, 8192]), st.integers(1, 20000))
    return st.tuples(offsets, lengths).map(clip)


ops = st.lists(
    st.builds(
        lambda kind, rng, seed: Op(kind, rng[0], rng[1], seed),
        st.sampled_from(["write", "write", "read", "zero", "unmap", "discard", "flush",
                         "concurrent"]),
        ranges(),
        st.integers(0, 2**32),
    ),
    min_size=1,
    max_size=25,
)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case_image(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[DriverCase, str]]:
    case: DriverCase = request.param
    with case.make(tmp_path, random.Random(0).randbytes(SIZE)) as path:
        yield case, path


async def read_chain(chain: Chain, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await chain.read(offset, memoryview(buf))
    return bytes(buf)


async def apply(chain: Chain, model: bytearray, op: Op) -> None:
    rng = random.Random(op.seed)
    off, n = op.offset, op.length
    if op.kind == "write":
        data = rng.randbytes(n)
        await chain.write(off, memoryview(data), fua=bool(op.seed & 1))
        model[off : off + n] = data
    elif op.kind == "read":
        assert await read_chain(chain, off, n) == model[off : off + n]
    elif op.kind in ("zero", "unmap"):
        await chain.write_zeroes(off, n, op.kind == "unmap", bool(op.seed & 1))
        model[off : off + n] = bytes(n)
    elif op.kind == "discard":
        await chain.discard(off, n)
        got = await read_chain(chain, 0, SIZE)
        assert sectors_equal_or_zero(got, bytes(model))
        model[:] = got
    elif op.kind == "flush":
        await chain.flush()
    else:  # several writes to disjoint byte ranges in flight at once
        cuts = sorted(rng.sample(range(off, off + n + 1), min(n + 1, 6)))
        writes = []
        for a, b in itertools.pairwise(cuts):
            if a < b:
                data = rng.randbytes(b - a)
                model[a:b] = data
                writes.append(chain.write(a, memoryview(data)))
        await asyncio.gather(*writes)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops)
def test_chain_matches_the_model(case_image: tuple[DriverCase, str], sequence: list[Op]) -> None:
    case, path = case_image

    async def body() -> None:
        chain = Chain([await case.open(path)])
        try:
            # The image holds whatever earlier examples left: that is the model's start.
            model = bytearray(await read_chain(chain, 0, SIZE))
            for op in sequence:
                await apply(chain, model, op)
            assert await read_chain(chain, 0, SIZE) == model
            extents = chain.block_status(0, SIZE)
            assert sum(e.length for e in extents) == SIZE
        finally:
            await chain.close()

    asyncio.run(body())
