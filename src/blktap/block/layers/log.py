"""``log``: changed block tracking, as the C tapdisk's ``log`` filter (``tap-ctl create -C
LOGFILE``), into a ``.cbtlog`` (:class:`blktap.block.cbtlog.CbtLogFile`).

Every write, write-zeroes and discard sets the bits of the 64 KiB blocks it touches
before it is passed down (the C filter marks writes; NBD's zeroes and trims are writes
there too). Reads and block status pass through. The layer must see every write, so it
turns the write fast routes off; reads keep theirs.

Durability, better than the C filter (see :mod:`blktap.block.cbtlog`): a flush returns
only when both the image's flush and the log's sync are done, and a FUA write only when
its data and its bits are durable. Closing syncs the log.

Not registered by name: the log's path is not part of the image string (the C tap-ctl
sends it after the OPEN message), so the VBD opens this layer with
:meth:`LogLayer.opener` once the path reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from blktap.block.capabilities import Capabilities
from blktap.block.cbtlog import CbtLogFile
from blktap.block.driver import OpenOptions
from blktap.block.layer import Layer, LayerOpener, Stack


class LogLayer(Layer):
    """Marks every write's blocks in ``log`` before passing it to ``next``."""

    name = "log"

    def __init__(self, next: Stack, options: OpenOptions, log: CbtLogFile) -> None:
        super().__init__(next, options)
        self.log = log

    @classmethod
    def opener(cls, path: str) -> LayerOpener:
        """An opener of the layer with the log at ``path``: it opens the log for the size
        of the stack below (raising as :meth:`CbtLogFile.open`: a missing, invalid, or
        too small log fails the open; ``next`` stays open, the caller's)."""

        async def open_(next: Stack, options: OpenOptions) -> Layer:
            return cls(next, options, CbtLogFile.open(path, next.size))

        return open_

    def narrow(self, caps: Capabilities) -> Capabilities:
        return caps.must_see_writes()

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


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both to the end, then raise the first one's error, if any."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
