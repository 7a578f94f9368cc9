"""Page-aligned, reusable I/O buffers (O_DIRECT needs aligned memory)."""

from __future__ import annotations

import mmap

PAGE_SIZE = mmap.PAGESIZE


def aligned(length: int) -> memoryview:
    """A new zero-filled, page-aligned writable buffer of exactly ``length`` bytes."""
    size = max(PAGE_SIZE, -(-length // PAGE_SIZE) * PAGE_SIZE)
    return memoryview(mmap.mmap(-1, size))[:length]


class BufferPool:
    """Hands out page-aligned buffers, keeping released ones for reuse by size class.

    Size classes are powers of two from one page. At most ``keep`` buffers per class and
    ``max_bytes`` in all are kept; the rest are unmapped when released, so an idle
    daemon gives back what a burst of large requests needed.
    """

    def __init__(self, keep: int = 64, max_bytes: int = 8 << 20) -> None:
        self._keep = keep
        self._max_bytes = max_bytes
        self._bytes = 0
        self._free: dict[int, list[memoryview]] = {}

    @staticmethod
    def _class_of(length: int) -> int:
        size = PAGE_SIZE
        while size < length:
            size <<= 1
        return size

    def get(self, length: int) -> memoryview:
        """A buffer of exactly ``length`` bytes (contents undefined)."""
        size = self._class_of(length)
        free = self._free.get(size)
        if free:
            self._bytes -= size
            return free.pop()[:length]
        return aligned(size)[:length]

    def put(self, buf: memoryview) -> None:
        """Return a buffer obtained from :meth:`get`. The caller must not use it again."""
        whole = buf.obj
        if not isinstance(whole, mmap.mmap):
            return
        view = memoryview(whole)
        size = len(view)
        free = self._free.setdefault(size, [])
        if len(free) < self._keep and self._bytes + size <= self._max_bytes:
            free.append(view)
            self._bytes += size
