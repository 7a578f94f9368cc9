"""Properties of the ``.cbtlog`` codec: every header and log round-trips; any bytes either
parse into a log that re-encodes to exactly those bytes or raise only the documented
CbtLogError subclasses; the bit helpers agree with a plain set-of-blocks model."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap.errors import InvalidArgument
from blktap.proto import cbt

# Disk sizes small enough to build their bitmaps, many on the edges of a block.
SIZES = st.one_of(
    st.integers(1, 64 << 20),
    st.builds(lambda n, edge: n * cbt.BLOCK_SIZE + edge, st.integers(1, 300),
              st.sampled_from([-1, 0, 1])),
)

uuids = st.one_of(st.just(cbt.NULL_UUID), st.uuids(), st.binary(min_size=16, max_size=16)
                  .map(lambda b: uuid.UUID(bytes=b)))
headers = st.builds(
    cbt.CbtHeader,
    size=st.one_of(SIZES, st.integers(1, cbt.MAX_DISK_SIZE)),
    parent=uuids,
    child=uuids,
    consistent=st.booleans(),
    padding=st.one_of(st.just(0), st.integers(0, 0xFFFFFFFF)),
)


@st.composite
def logs(draw: st.DrawFn) -> cbt.CbtLog:
    header = draw(headers.filter(lambda h: h.size <= 64 << 20))
    bitmap = draw(st.binary(min_size=header.bitmap_size, max_size=header.bitmap_size))
    return cbt.CbtLog(header, bitmap)


@given(headers)
def test_header_round_trip(header: cbt.CbtHeader) -> None:
    data = header.encode()
    assert len(data) == cbt.HEADER_SIZE
    assert cbt.parse_header(data) == header
    assert cbt.parse_header(data + b"anything") == header


@given(logs())
def test_log_round_trip(log: cbt.CbtLog) -> None:
    data = log.encode()
    assert len(data) == cbt.log_size(log.header.size)
    assert cbt.parse_log(data) == log


@given(st.binary(max_size=300))
def test_any_bytes_parse_exactly_or_raise_only_cbt_errors(data: bytes) -> None:
    try:
        log = cbt.parse_log(data)
    except cbt.CbtLogError as exc:
        assert exc.errno > 0
        assert str(exc)
    else:
        assert log.encode() == data


@given(logs(), st.data())
def test_corrupted_logs_parse_exactly_or_raise_only_cbt_errors(
    log: cbt.CbtLog, data: st.DataObject
) -> None:
    raw = bytearray(log.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        parsed = cbt.parse_log(bytes(raw))
    except cbt.CbtLogError:
        pass
    else:
        assert parsed.encode() == bytes(raw)


@given(st.integers(1, 4096), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 64))))
def test_set_range_matches_a_set_model(nbits: int, ranges: list[tuple[int, int]]) -> None:
    bitmap = bytearray(-(-nbits // 8))
    model: set[int] = set()
    for first, count in ranges:
        first = min(first, nbits - 1)
        count = min(count, nbits - first)
        cbt.set_range(bitmap, first, count)
        model.update(range(first, first + count))
    assert list(cbt.iter_set(bitmap)) == sorted(model)
    assert all(cbt.is_set(bitmap, b) == (b in model) for b in range(nbits))


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 24))
def test_blocks_touched_covers_first_and_last_byte(offset: int, length: int) -> None:
    blocks = cbt.blocks_touched(offset, length)
    assert blocks.start * cbt.BLOCK_SIZE <= offset < (blocks.start + 1) * cbt.BLOCK_SIZE
    last = offset + length - 1
    assert (blocks.stop - 1) * cbt.BLOCK_SIZE <= last < blocks.stop * cbt.BLOCK_SIZE


@settings(max_examples=50)
@given(logs(), logs())
def test_coalesced_is_the_union(parent: cbt.CbtLog, child: cbt.CbtLog) -> None:
    if parent.header.bitmap_size > child.header.bitmap_size:
        with pytest.raises(InvalidArgument):
            cbt.coalesced(parent, child)
        return
    merged = cbt.coalesced(parent, child)
    assert merged.header == child.header
    assert set(merged.bits_set()) == set(parent.bits_set()) | set(child.bits_set())


@settings(max_examples=50)
@given(logs(), st.integers(0, 64 << 20))
def test_grown_keeps_every_bit(log: cbt.CbtLog, extra: int) -> None:
    bigger = cbt.grown(log, log.header.size + extra)
    assert bigger.bits_set() == log.bits_set()
    assert bigger.encode()[:cbt.HEADER_SIZE - 8] == log.encode()[:cbt.HEADER_SIZE - 8]
    assert cbt.parse_log(bigger.encode()) == bigger
