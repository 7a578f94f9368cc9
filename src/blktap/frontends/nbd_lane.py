"""An NBD connection's lane: its READs served by a thread of its own while the client
sends one request at a time.

A client at queue depth 1 waits for each reply before it sends the next request, so it
measures our whole path from its request to our reply. Through the event loop that path
is long: the loop wakes, reads, parses, dispatches through layers written for many
requests in flight, and (for O_DIRECT) either blocks the loop on the read or goes
through AIO. A thread that waits in ``poll``, reads the request, reads the data with
``preadv`` and sends the reply with ``writev`` takes a fraction of the Python steps, and
its read blocks only itself: the loop keeps serving every other client (``preadv``
releases the GIL).

The connection (blktap.frontends.nbd_server) starts a lane when its client has sent a
run of lone READs (each one alone, with nothing else in flight), with its reading paused
and nothing in flight or waiting to be sent. Until the lane returns, the lane owns the
socket: it serves each request that arrives alone and is a READ its
:class:`~blktap.vbd.ThreadReader` accepts, and returns at the first anything else (a
write, two requests at once, a read the VBD declines, end of file, an error), handing
back the bytes it received, unparsed: the connection feeds them to its codec as if it
had just received them. :meth:`Lane.stop` makes it return (an eventfd wakes its poll);
the connection calls it before it closes. The lane works on its own duplicate of the
socket's descriptor, so nothing the loop does to the transport can make it write to a
descriptor reused for something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from blktap.proto.nbd import REQUEST, REQUEST_MAGIC, Command, CommandFlag
from blktap.vbd import ThreadReader

LANE_READ_MAX = 256 * 1024
"""Larger READs make the lane return (the loop serves them)."""
_RECV = 4096  # more than one request header: two requests at once are seen as such
_READ = int(Command.READ)
_REQ_SIZE = REQUEST.size
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


@dataclass(slots=True)
class LaneResult:
    """Why a lane returned, and what the connection takes over from it."""

    received: bytes = b""
    """Bytes received and not served: the start of the next request(s)."""
    unsent: list[bytes] = field(default_factory=list)
    """The rest of a reply the lane could not finish sending (it was stopped)."""
    eof: bool = False
    """The client closed its end."""
    error: OSError | None = None
    """The socket failed (the connection is lost)."""


class Lane:
    """Serves one connection's lone READs in a thread until something else comes.

    ``reply_header(cookie, offset, length)`` builds a successful READ reply's header (the
    codec's; it only reads what negotiation settled). ``buf`` is page-aligned memory of
    LANE_READ_MAX bytes the lane reads into; the caller owns it again once ``done``
    was called. ``done(result)`` runs in the event loop when the lane has returned.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock_fd: int, reader: ThreadReader,
                 buf: memoryview, reply_header: Callable[[int, int, int], bytes],
                 structured: bool, done: Callable[[LaneResult], None]) -> None:
        self.reader = reader
        self.buf = buf
        self.requests = 0  # READs served, read and written by the lane's thread only
        self.bytes_read = 0
        self._loop = loop
        self._reply_header = reply_header
        self._flags = int(CommandFlag.FUA) | (int(CommandFlag.DF) if structured else 0)
        self._done = done
        self._stopping = False
        self._fd = os.dup(sock_fd)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._main, name="nbd-lane", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Make the lane return soon (after the request it may be serving). Idempotent;
        call from the event loop, before :meth:`close`."""
        if not self._stopping:
            self._stopping = True
            os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Release the eventfd, once ``done`` was called (the thread has ended). Not in
        the thread itself: the loop may still call :meth:`stop` until ``done`` runs."""
        os.close(self._wake)

    # ------------------------------------------------------------- the thread
    def _main(self) -> None:
        result = LaneResult()
        try:
            self._serve(result)
        except OSError as exc:
            result.error = exc
        except BaseException as exc:  # a bug: the connection logs it and drops the client
            result.error = OSError(errno.EIO, f"NBD lane failed: {exc!r}")
        finally:
            os.close(self._fd)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._done, result)

    def _serve(self, result: LaneResult) -> None:
        fd = self._fd
        poller = select.poll()
        poller.register(fd, _POLLIN)
        poller.register(self._wake, _POLLIN)
        poll = poller.poll
        head = bytearray(_RECV)
        views = [memoryview(head)]
        unpack = REQUEST.unpack_from
        readv = os.readv
        writev = os.writev
        read = self.reader.read
        reply_header = self._reply_header
        buf = self.buf
        flags_ok = self._flags
        while True:
            poll()
            if self._stopping:
                return
            try:
                n = readv(fd, views)
            except BlockingIOError:
                continue
            if not n:
                result.eof = True
                return
            if n == _REQ_SIZE:  # one request, alone: a READ the VBD serves here?
                magic, flags, command, cookie, offset, length = unpack(head)
                data = buf[:length]
                served = (command == _READ and magic == REQUEST_MAGIC
                          and not flags & ~flags_ok and 0 < length <= LANE_READ_MAX
                          and read(offset, data))
            else:
                served = False
            if not served:
                result.received = bytes(head[:n])  # for the loop, unparsed
                return
            header = reply_header(cookie, offset, length)
            try:
                sent = writev(fd, (header, data))
            except BlockingIOError:
                sent = 0
            self.requests += 1
            self.bytes_read += length
            if sent != len(header) + length:
                self._send_rest(result, [header, bytes(data)], sent)
                if result.unsent:
                    return

    def _send_rest(self, result: LaneResult, parts: list[bytes], sent: int) -> None:
        """Send what one writev left of ``parts``, waiting for room; when stopped
        meanwhile, leave the rest in ``result.unsent``."""
        fd = self._fd
        poller = select.poll()
        poller.register(fd, _POLLOUT)
        poller.register(self._wake, _POLLIN)
        while True:
            while parts and sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            if not parts:
                return
            if sent:
                parts[0] = parts[0][sent:]
                sent = 0
            if self._stopping:
                result.unsent = parts
                return
            poller.poll()
            try:
                sent = os.writev(fd, parts)
            except BlockingIOError:
                sent = 0
