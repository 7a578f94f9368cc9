"""Output batching of one NBD connection, and its buffers.

Replies are queued in ``_out`` as their requests complete; the replies of one batch
(what one read of the socket brought, one loop turn, or one burst of AIO completions:
:class:`blktap.util.eager.Batch`) leave together in one ``writev``: the connection's own
on the socket's raw descriptor while the transport holds nothing (and the listener gives
one: not under TLS), else the transport's ``writelines``. READ data is never copied: the
reply is ``[header, buffer]`` with the buffer the VBD read into.

Buffers come from the server's :class:`~blktap.util.buffers.BufferPool` (page-aligned, as
O_DIRECT needs); each connection keeps up to FREE_BUFFER_BYTES of idle ones by exact
length. A READ buffer goes back only once the transport's write buffer no longer holds
its batch, since the event loop may still refer to it until then (``_held``).
"""

from __future__ import annotations

import os
from collections import deque

from blktap.frontends.nbd_base import ConnectionBase
from blktap.util.eager import defer as eager_defer

FLUSH_BYTES = 1024 * 1024
"""Replies of READ data piled up while serving one batch are handed to the transport
past this many bytes (so that the transport's flow control applies within a batch)."""
FREE_BUFFER_BYTES = 256 * 1024
"""Each connection keeps up to this many bytes of idle buffers for reuse (larger ones go
back to the shared pool, which bounds what all connections keep together)."""
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # most buffers one writev takes


class OutputBatching(ConnectionBase):
    """The output part of a connection (see the module docstring)."""

    def _init_output(self) -> None:
        self._out = []
        self._out_bytes = 0
        self._sending = []
        self._held = deque()
        self._queued = 0
        self._fd = -1
        self._free = {}
        self._free_bytes = 0
        self._flush_scheduled = False

    def _take_codec_output(self) -> None:
        """Queue what the codec wrote itself (handshake replies, refusals); flush unless
        a batch is being served."""
        codec = self.codec
        if codec is not None and codec.output:
            self._out.append(bytes(codec.output))
            codec.output.clear()
        if not self._batching:
            self._flush()

    def _flush(self) -> None:
        """Hand the queued replies over (see the module docstring); give back the READ
        buffers the transport has sent. Starts a lane afterwards if one is due."""
        self._flush_scheduled = False
        if not self._batching and not self._pumping and self._lane_due():
            eager_defer(self._loop, self._maybe_start_lane)  # once this flush is done
        transport = self.transport
        if transport is None:
            return
        out = self._out
        if out:
            self._out = []
            self._out_bytes = 0
            total = sum(map(len, out))
            self._queued += total
            if (self._fd >= 0 and len(out) <= _IOV_MAX and not transport.get_write_buffer_size()
                    and not transport.is_closing()):  # a closing transport's fd may be gone
                # Nothing waits in the transport: write the socket ourselves, as it would
                # (one writev), without its per-write bookkeeping; it takes what is left.
                try:
                    sent = os.writev(self._fd, out)
                except OSError:
                    sent = 0  # EAGAIN, or an error the transport will meet and report
                if sent < total:
                    transport.writelines(unsent(out, sent))
            else:
                transport.writelines(out)
            if self._sending:
                self._held.append((self._queued, self._sending))
                self._sending = []
        held = self._held
        if held:
            sent = self._queued - transport.get_write_buffer_size()
            while held and held[0][0] <= sent:
                self._put_bufs(held.popleft()[1])

    # ----------------------------------------------------------------- buffers
    def _get_buf(self, length: int) -> memoryview:
        """A page-aligned buffer of ``length`` bytes: a recycled one or one from the pool."""
        bufs = self._free.get(length)
        if bufs:
            self._free_bytes -= length
            return bufs.pop()
        return self.pool.get(length)

    def _own(self, lent: memoryview) -> memoryview:
        """A copy of a payload lent from the receive buffer, in a buffer of our own."""
        buf = self._get_buf(len(lent))
        buf[:] = lent
        return buf

    def _put_bufs(self, bufs: list[memoryview]) -> None:
        """_put_buf for each of ``bufs`` (one call for a batch of READ buffers)."""
        free = self._free
        kept = self._free_bytes
        for buf in bufs:
            length = len(buf)
            if kept + length > FREE_BUFFER_BYTES:
                self.pool.put(buf)
                continue
            kept += length
            same = free.get(length)
            if same is None:
                free[length] = [buf]
            else:
                same.append(buf)
        self._free_bytes = kept

    def _put_buf(self, buf: memoryview) -> None:
        # Kept per connection by exact length (cheaper than the pool's size classes), up
        # to FREE_BUFFER_BYTES; the rest goes back to the shared pool.
        length = len(buf)
        if self._free_bytes + length > FREE_BUFFER_BYTES:
            self.pool.put(buf)
            return
        self._free_bytes += length
        bufs = self._free.get(length)
        if bufs is None:
            self._free[length] = [buf]
        else:
            bufs.append(buf)

    def _release_output(self) -> None:
        """The connection is lost: nothing more is sent; every buffer goes back to the
        shared pool."""
        self._out.clear()
        put = self.pool.put
        for _mark, bufs in self._held:
            for buf in bufs:
                put(buf)
        self._held.clear()
        for buf in self._sending:
            put(buf)
        self._sending.clear()
        for bufs in self._free.values():
            for buf in bufs:
                put(buf)
        self._free.clear()
        self._free_bytes = 0


def unsent(out: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What of ``out`` remains after its first ``sent`` bytes."""
    for i, item in enumerate(out):
        size = len(item)
        if sent < size:
            return [memoryview(item)[sent:], *out[i + 1 :]] if sent else out[i:]
        sent -= size
    return []
