"""Inline serving: READs and small WRITEs on the descriptor the VBD lends.

While the VBD lends its image's descriptor (route 1 of docs/architecture.md: a raw file
opened buffered, :meth:`blktap.vbd.VBD.sync_file`, allowed by the Admission), the
connection serves READs and WRITEs under SYNC_WRITE_MAX itself, one ``preadv`` or
``pwritev`` each, straight from the receive buffer, without a call per request through
the codec, dispatch, the VBD and the driver: with 4 KiB requests, many per read, those
calls cost more than the system call (docs/performance.md). Everything else goes to the
codec. Writes go through the SyncFile's ``pwritev``: with write observers (a
changed-block log) one that tells them first, and FUA writes are left to the VBD. The
descriptor is the image's, not the socket's: this route needs no raw socket and stays on
under TLS.
"""

from __future__ import annotations

import os

from blktap.block.driver import SECTOR_SIZE, SYNC_WRITE_MAX
from blktap.frontends.nbd_base import ConnectionBase
from blktap.frontends.nbd_output import FLUSH_BYTES
from blktap.proto.nbd import MAX_BLOCK, REQUEST, REQUEST_MAGIC, Command, ServerCodec
from blktap.vbd import Admission, SyncFile

CARRY_MAX = 64 * 1024
"""A request served inline whose header and payload together are at most this many bytes
is kept whole in the receive buffer when a read ends inside it; a larger one goes to the
codec, which receives its payload (NbdConnection.get_buffer: DIRECT_PAYLOAD_MIN)."""

_REQ_SIZE = REQUEST.size
_SECTOR_MASK = SECTOR_SIZE - 1
_RWF_DSYNC = os.RWF_DSYNC
_preadv = os.preadv
_unpack_request = REQUEST.unpack_from
_READ = int(Command.READ)  # the command as unpacked
_WRITE = int(Command.WRITE)
_reply_ok = ServerCodec.reply_ok


class InlineServing(ConnectionBase):
    """The inline part of a connection (see the module docstring)."""

    def _inline(self, codec: ServerCodec, adm: Admission, sync: SyncFile, data: memoryview,
                pos: int, end: int) -> int:
        """Serve, from ``data[pos]`` on, the READs and small WRITEs the VBD's SyncFile
        covers, each with one preadv/pwritev; count them once. Returns where it stopped:
        a request it does not take (or whose system call failed or fell short: the
        general path serves it again and reports), which the codec parses next; or
        ``end``, having kept the start of a small request that is not all here at the
        start of the receive buffer (``_carry``), for the next read to complete.

        Which requests it takes is HeaderCheck.accepts (the codec's rule) and
        Admission.admits (the VBD's), copied inline: a call per request costs more than
        the system call's share (tests/unit/test_fast_route_rules.py pins the copies).
        """
        fd = sync.fd
        pwritev = sync.pwritev  # os.pwritev, or one telling write observers first
        read_limit = adm.read_limit
        write_limit = adm.write_limit if sync.writable else -1
        check = codec.header_check
        allowed = check.allowed  # (HeaderCheck.flags without a call per batch)
        read_flags = allowed.get(_READ, 0)
        write_flags = allowed.get(_WRITE, 0) if sync.fua else 0  # else FUA to the VBD
        free = self._free
        out = self._out  # both replaced by each flush
        sending = self._sending
        header = codec.read_reply_header
        reads = read_bytes = writes = written = 0
        try:
            while end - pos >= _REQ_SIZE:
                magic, flags, command, cookie, offset, length = _unpack_request(data, pos)
                # HeaderCheck.accepts and Admission.admits, inline (see the docstring).
                if magic != REQUEST_MAGIC or not length or (offset | length) & _SECTOR_MASK:
                    return pos
                if command == _READ:
                    if flags & ~read_flags or length > MAX_BLOCK or offset + length > read_limit:
                        return pos
                    bufs = free.get(length)
                    if bufs:
                        buf = bufs.pop()
                        self._free_bytes -= length
                    else:
                        buf = self.pool.get(length)
                    try:
                        done = _preadv(fd, (buf,), offset) == length
                    except OSError:
                        done = False
                    if not done:
                        self._put_buf(buf)
                        return pos
                    out.append(header(cookie, offset, length))
                    out.append(buf)
                    sending.append(buf)
                    reads += 1
                    read_bytes += length
                    pos += _REQ_SIZE
                    self._out_bytes += length
                    if self._out_bytes >= FLUSH_BYTES:
                        self._flush()
                        out = self._out
                        sending = self._sending
                        if self._writing_paused:
                            return pos  # the codec parses the rest, into the backlog
                elif command == _WRITE:
                    if (flags & ~write_flags or length >= SYNC_WRITE_MAX
                            or offset + length > write_limit):
                        return pos
                    start = pos + _REQ_SIZE
                    if end - start < length:
                        if _REQ_SIZE + length > CARRY_MAX:
                            return pos  # the codec takes it, its payload to come
                        break
                    try:
                        done = pwritev(fd, (data[start : start + length],), offset,
                                       _RWF_DSYNC if flags else 0) == length
                    except OSError:
                        done = False
                    if not done:
                        return pos
                    out.append(_reply_ok(cookie))
                    writes += 1
                    written += length
                    pos = start + length
                else:
                    return pos
            # What is here of the next request: to the start of the buffer, completed by
            # the next read (nothing else refers to the receive buffer now: no request
            # waits in the backlog, and a payload the loop did not write at once was
            # copied out of it).
            rest = end - pos
            if rest and pos:
                data[:rest] = data[pos:end]
            self._carry = rest
            return end
        finally:
            if reads or writes:
                counts = self._inline_counts  # reused: no object built per batch
                counts.reads, counts.read_bytes = reads, read_bytes
                counts.writes, counts.written_bytes = writes, written
                self._served(counts, False)
                self.vbd.count(counts)
                if self._big > 0:
                    self._big = 0
