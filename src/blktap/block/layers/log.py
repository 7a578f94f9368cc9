"""``log``: changed block tracking, as the C tapdisk's ``log`` filter (``tap-ctl create -C
LOGFILE``), into a ``.cbtlog`` (:class:`blktap.block.cbtlog.CbtLogFile`).

Every write, write-zeroes and discard sets the bits of the 64 KiB blocks it touches
before it is passed down (the C filter marks writes; NBD's zeroes and trims are writes
there too). Reads and block status pass through. The layer only has to *know* of each
write before it starts, so it keeps every fast route and declares itself a write
observer (:class:`blktap.block.capabilities.WriteObserver`): a write that takes a fast
route past the layer is marked by the route (the log's ``mark`` is thread-safe: the NBD
lanes' threads call it), and for FUA the route syncs the log before the write; a write
on the general path is marked here. Zeroes and discards take no fast route.

Durability, better than the C filter (see :mod:`blktap.block.cbtlog`): a flush returns
only when both the image's flush and the log's sync are done, and a FUA write only when
its data and its bits are durable. Closing syncs the log.

Not registered by name: the log's path is not part of the image string (the C tap-ctl
sends it after the OPEN or RESUME message), so the VBD opens this layer with
:meth:`LogLayer.opener`, or through a :class:`LogSlot` when the path may change while
the VBD is paused (``tap-ctl unpause -c``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from blktap.block.capabilities import Capabilities, WriteObserver
from blktap.block.cbtlog import CbtLogFile
from blktap.block.driver import OpenOptions
from blktap.block.layer import DirtyBitmap, Layer, LayerOpener, Stack


class LogLayer(Layer):
    """Marks every write's blocks in ``log`` before passing it to ``next``."""

    name = "log"

    def __init__(self, next: Stack, options: OpenOptions, log: CbtLogFile) -> None:
        self.log = log  # before Layer.__init__: narrow reads it
        super().__init__(next, options)

    @classmethod
    def opener(cls, path: str) -> LayerOpener:
        """An opener of the layer with the log at ``path``: it opens the log for the size
        of the stack below (raising as :meth:`CbtLogFile.open`: a missing, invalid, or
        too small log fails the open; ``next`` stays open, the caller's)."""

        async def open_(next: Stack, options: OpenOptions) -> Layer:
            return cls(next, options, CbtLogFile.open(path, next.size))

        return open_

    def narrow(self, caps: Capabilities) -> Capabilities:
        log = self.log
        return caps.observe_writes(WriteObserver(log.mark, log.sync_now, log.sync))

    # The layer is its own DirtyBitmap (blktap.block.layer): the NBD export serves it.
    def dirty_bitmap(self) -> DirtyBitmap | None:
        return self

    @property
    def bitmap_name(self) -> str:
        return bitmap_name(self.log.path)

    def dirty_extents(self, offset: int, length: int,
                      limit: int = 1 << 30) -> list[tuple[int, int]]:
        return self.log.dirty_extents(offset, length, limit)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        if len(data):
            self.log.mark(offset, len(data))
        if fua:
            await _both(self.next.write(offset, data, True), self.log.sync())
        else:
            await self.next.write(offset, data, False)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        if length:
            self.log.mark(offset, length)
        if fua:
            await _both(self.next.write_zeroes(offset, length, may_unmap, True),
                        self.log.sync())
        else:
            await self.next.write_zeroes(offset, length, may_unmap, False)

    async def discard(self, offset: int, length: int) -> None:
        if length:
            self.log.mark(offset, length)  # a trimmed range may read differently after
        await self.next.discard(offset, length)

    async def flush(self) -> None:
        await _both(self.next.flush(), self.log.sync())

    async def close(self) -> None:
        try:
            await self.log.close()
        finally:
            await super().close()


class LogSlot:
    """The place of a VBD's log layer: what its opener opens at each open of the stack
    (the VBD opens its top layers again at every resume).

    ``path`` is the log to open, or ``None`` for no log: the slot then opens a layer
    that passes everything through and narrows nothing (every fast route stays). The
    tapdisk sets ``path`` when a RESUME carries a log (``tap-ctl unpause -c``), which
    adds a log to a VBD opened without one or switches to a new log file (the storage
    manager's CBT snapshot: it renames the old log and creates a new one while the VBD
    is paused). ``layer`` is the log layer open now, if any.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.layer: LogLayer | None = None

    def opener(self) -> LayerOpener:
        """The opener to give the VBD once; it reads :attr:`path` at each open."""

        async def open_(next: Stack, options: OpenOptions) -> Layer:
            if self.path is None:
                self.layer = None
                return Layer(next, options)
            layer = LogLayer(next, options, CbtLogFile.open(self.path, next.size))
            self.layer = layer
            return layer

        return open_

    @property
    def open_layer(self) -> LogLayer | None:
        """The log layer open now (``None`` when there is no log, or the stack holding
        it was closed: paused or closed VBD)."""
        layer = self.layer
        return layer if layer is not None and not layer.log.closed else None


def bitmap_name(path: str) -> str:
    """The name a log's bitmap is served under (NBD ``qemu:dirty-bitmap:<name>``): the
    file's name without its ``.cbtlog`` suffix (the storage manager names a VDI's log
    ``<vdi-uuid>.cbtlog``, so the name is the VDI's uuid), or the whole file name when
    it has no such suffix or nothing before it."""
    base = os.path.basename(path)
    stem = base.removesuffix(SUFFIX)
    return stem if stem else base


SUFFIX = ".cbtlog"


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both to the end, then raise the first one's error, if any."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
