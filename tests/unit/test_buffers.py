"""The aligned buffer pool: alignment, reuse, and the bounds on what it keeps."""

from __future__ import annotations

import ctypes

from blktap.util.buffers import PAGE_SIZE, BufferPool, aligned


def address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_aligned_buffers_are_page_aligned_zeroed_and_exact() -> None:
    for length in (1, 512, 4096, 5000, 1 << 20):
        buf = aligned(length)
        assert len(buf) == length and not buf.readonly
        assert address(buf) % PAGE_SIZE == 0
        assert bytes(buf[:64]) == bytes(min(64, length))


def test_released_buffers_are_reused_by_size_class() -> None:
    pool = BufferPool()
    a = pool.get(3000)
    addr = address(a)
    pool.put(a)
    b = pool.get(4096)  # same class (one page)
    assert address(b) == addr and len(b) == 4096
    c = pool.get(4096)  # the class is empty again: a new buffer
    assert address(c) != addr


def test_pool_keeps_at_most_max_bytes() -> None:
    pool = BufferPool(keep=100, max_bytes=4 * PAGE_SIZE)
    bufs = [pool.get(PAGE_SIZE) for _ in range(8)]
    addrs = {address(b) for b in bufs}
    for b in bufs:
        pool.put(b)
    again = [pool.get(PAGE_SIZE) for _ in range(8)]
    assert len({address(b) for b in again} & addrs) == 4


def test_pool_keeps_at_most_keep_per_class() -> None:
    pool = BufferPool(keep=2)
    bufs = [pool.get(8192) for _ in range(5)]
    addrs = {address(b) for b in bufs}
    for b in bufs:
        pool.put(b)
    again = [pool.get(8192) for _ in range(5)]
    assert len({address(b) for b in again} & addrs) == 2


def test_foreign_buffers_are_ignored() -> None:
    pool = BufferPool()
    pool.put(memoryview(bytearray(4096)))
    assert address(pool.get(4096)) % PAGE_SIZE == 0
