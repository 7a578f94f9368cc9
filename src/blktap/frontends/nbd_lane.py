"""An NBD connection's lanes: threads of its own that serve its requests while the client
sends one kind of request, in a way the event loop serves slowly.

A **read lane** serves READs while the client sends one request at a time. Such a client
waits for each reply before it sends the next request, so it measures our whole path
from its request to our reply. Through the event loop that path is long: the loop wakes,
reads, parses, dispatches through layers written for many requests in flight, and (for
O_DIRECT) either blocks the loop on the read or goes through AIO. A thread that waits in
``poll``, reads the request, reads the data with ``preadv`` and sends the reply with
``writev`` takes a fraction of the Python steps, and its read blocks only itself: the
loop keeps serving every other client (``preadv`` releases the GIL).

A **write lane** serves large WRITEs to a buffered image. Through the loop each payload
arrives in many small reads (as much as the client's socket buffer holds each time),
each a trip through the loop and its Python callbacks, and its copy into the page cache
goes to a kernel worker that competes with the loop for the CPU. The write lane's
threads take turns to receive a request and its whole payload, then each writes its
payload with ``pwritev`` and sends the reply itself, while the other receives the next
one (as nbdkit's threads do).

The connection (blktap.frontends.nbd_server) starts a lane after a run of such requests,
with its reading paused, nothing in flight or waiting to be sent, and its codec between
requests. Until the lane returns, the lane owns the socket: it serves each request it
takes (a :class:`~blktap.vbd.ThreadIO` does the I/O) and returns at the first anything
else (another kind of request, a request the VBD declines, end of file, an error),
handing back what it received and did not serve: whole requests, then the start of the
next one, unparsed; the connection feeds them to its codec as if it had just received
them. :meth:`Lane.stop` makes it return (an eventfd wakes its polls); the connection
calls it before it closes. The lane works on its own duplicate of the socket's
descriptor, so nothing the loop does to the transport can make it write to a descriptor
reused for something else.
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

from blktap.block.driver import SYNC_WRITE_MAX
from blktap.proto.nbd import (
    REQUEST,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    Command,
    CommandFlag,
    HeaderCheck,
)
from blktap.vbd import IOCounts, ThreadIO

LANE_READ_MAX = 256 * 1024
"""Larger READs make a read lane return (the loop serves them)."""
WRITE_LANE_MIN = SYNC_WRITE_MAX
"""Smaller WRITEs make a write lane return (the loop writes them at once)."""
WRITE_LANE_MAX = 4 << 20
"""Larger WRITEs make a write lane return (each of its threads has a buffer this big)."""
WRITE_LANE_THREADS = 2
"""One receives while the other writes."""
_RECV = 4096  # more than one request header: two requests at once are seen as such
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_FUA = int(CommandFlag.FUA)
_REQ_SIZE = REQUEST.size
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


@dataclass(slots=True)
class LaneResult:
    """Why a lane returned, and what the connection takes over from it."""

    requests: list[tuple[bytes, memoryview]] = field(default_factory=list)
    """Whole requests received and not served, as (header, payload), in the lane's
    buffers: they come before ``received``."""
    received: bytes = b""
    """Bytes received and not served: the start of the next request(s)."""
    unsent: list[bytes] = field(default_factory=list)
    """The rest of the replies the lane could not finish sending (it was stopped)."""
    eof: bool = False
    """The client closed its end."""
    error: OSError | None = None
    """The socket failed (the connection is lost)."""


class Lane:
    """What every lane has: its threads, its duplicate of the socket, its stop eventfd,
    counters, and the way it returns.

    ``ios`` (one :class:`~blktap.vbd.ThreadIO` per thread) and ``bufs`` (page-aligned
    memory, one per thread) belong to the caller again once ``done(result)`` ran in the
    event loop, when every thread of the lane has returned.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock_fd: int, ios: list[ThreadIO],
                 bufs: list[memoryview], done: Callable[[LaneResult], None]) -> None:
        self.ios = ios
        self.bufs = bufs
        self.counts = IOCounts()
        """Requests served, changed by the lane's threads only (a write lane's under its
        send lock); the connection takes them when the lane returns."""
        self._loop = loop
        self._done = done
        self._result = LaneResult()
        self._stopping = False
        self._fd = os.dup(sock_fd)
        try:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            os.close(self._fd)
            raise
        self._running = len(ios)
        self._exit_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._main, args=(index,), name="nbd-lane",
                                          daemon=True) for index in range(len(ios))]

    def start(self) -> None:
        """Start the threads. Raises RuntimeError when not even one could start (the
        lane is then closed, ``done`` never runs); when fewer than planned did, those
        return at once and ``done`` runs as usual."""
        for started, thread in enumerate(self._threads):
            try:
                thread.start()
            except RuntimeError:  # out of threads
                if not started:
                    os.close(self._fd)
                    os.close(self._wake)
                    raise
                self.stop()
                with self._exit_lock:
                    self._running -= len(self._threads) - started
                    last = not self._running
                if last:
                    self._finish()
                return

    def stop(self) -> None:
        """Make the lane return soon (after the requests it may be serving). Idempotent;
        from the event loop (before :meth:`close`) or a thread of the lane."""
        if not self._stopping:
            self._stopping = True
            os.eventfd_write(self._wake, 1)  # stays readable: every later poll returns

    def close(self) -> None:
        """Release the eventfd, once ``done`` was called (every thread has ended). Not in
        a thread of the lane: the loop may still call :meth:`stop` until ``done`` runs."""
        os.close(self._wake)

    # ----------------------------------------------------------- the threads
    def _serve(self, index: int) -> None:
        raise NotImplementedError

    def _main(self, index: int) -> None:
        try:
            self._serve(index)
        except OSError as exc:
            self._fail(exc)
        except BaseException as exc:  # a bug: the connection logs it and drops the client
            self._fail(OSError(errno.EIO, f"NBD lane failed: {exc!r}"))
        finally:
            with self._exit_lock:
                self._running -= 1
                last = not self._running
            if last:
                self._finish()

    def _finish(self) -> None:
        """The last thread is out: the connection takes over."""
        os.close(self._fd)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._done, self._result)

    def _fail(self, exc: OSError) -> None:
        if self._result.error is None:
            self._result.error = exc
        self.stop()

    def _send_rest(self, parts: list[bytes], sent: int) -> None:
        """Send what one write left of ``parts``, waiting for room; when stopped
        meanwhile, leave the rest in the result's ``unsent``."""
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
                self._result.unsent.extend(parts)
                return
            poller.poll()
            try:
                sent = os.writev(fd, parts)
            except BlockingIOError:
                sent = 0


class ReadLane(Lane):
    """Serves one connection's lone READs in one thread until something else comes.

    ``reply_header(cookie, offset, length)`` builds a successful READ reply's header (the
    codec's; it only reads what negotiation settled); ``check`` is the codec's request
    header rule. Its one buffer has LANE_READ_MAX bytes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock_fd: int, io: ThreadIO,
                 buf: memoryview, reply_header: Callable[[int, int, int], bytes],
                 check: HeaderCheck, done: Callable[[LaneResult], None]) -> None:
        super().__init__(loop, sock_fd, [io], [buf], done)
        self._reply_header = reply_header
        self._accepts = check.accepts

    def _serve(self, index: int) -> None:
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
        read = self.ios[0].read
        reply_header = self._reply_header
        buf = self.bufs[0]
        accepts = self._accepts
        while True:
            poll()
            if self._stopping:
                return
            try:
                n = readv(fd, views)
            except BlockingIOError:
                continue
            if not n:
                self._result.eof = True
                return
            if n == _REQ_SIZE:  # one request, alone: a READ the VBD serves here?
                magic, flags, command, cookie, offset, length = unpack(head)
                data = buf[:length]
                served = (command == _READ and 0 < length <= LANE_READ_MAX
                          and accepts(magic, flags, command, length)
                          and read(offset, data))
            else:
                served = False
            if not served:
                self._result.received = bytes(head[:n])  # for the loop, unparsed
                return
            header = reply_header(cookie, offset, length)
            # Counted before the reply leaves: a client that has it sees it counted.
            counts = self.counts
            counts.reads += 1
            counts.read_bytes += length
            try:
                sent = writev(fd, (header, data))
            except BlockingIOError:
                sent = 0
            if sent != len(header) + length:
                self._send_rest([header, bytes(data)], sent)
                if self._result.unsent:
                    return


class WriteLane(Lane):
    """Serves one connection's large WRITEs in WRITE_LANE_THREADS threads until
    something else comes. Each thread has a buffer of WRITE_LANE_MAX bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock_fd: int, ios: list[ThreadIO],
                 bufs: list[memoryview], check: HeaderCheck,
                 done: Callable[[LaneResult], None]) -> None:
        super().__init__(loop, sock_fd, ios, bufs, done)
        self._accepts = check.accepts
        self._recv_lock = threading.Lock()  # the thread that receives the next request
        self._send_lock = threading.Lock()  # replies whole, one after the other
        self._head = bytearray(_REQ_SIZE)

    def _serve(self, index: int) -> None:
        write = self.ios[index].write
        buf = self.bufs[index]
        poller = select.poll()
        poller.register(self._fd, _POLLIN)
        poller.register(self._wake, _POLLIN)
        while True:
            with self._recv_lock:
                request = self._receive(poller, buf)
            if request is None:
                return
            header, cookie, offset, data, fua = request
            if not write(offset, data, fua):
                # The loop serves it once the lane has returned (each thread's other
                # requests answered): whole requests before the partial one received.
                self._result.requests.append((header, data))
                self.stop()
                return
            reply = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
            with self._send_lock:
                counts = self.counts
                counts.writes += 1
                counts.written_bytes += len(data)
                if self._result.unsent:  # stopped while a reply waited for room
                    self._result.unsent.append(reply)
                    continue
                try:
                    sent = os.write(self._fd, reply)
                except BlockingIOError:
                    sent = 0
                if sent != len(reply):
                    self._send_rest([reply], sent)

    def _receive(self, poller: select.poll, buf: memoryview
                 ) -> tuple[bytes, int, int, memoryview, bool] | None:
        """The next request, a WRITE this lane takes, with its payload in ``buf``; or
        None when the lane returns (what was received then is in the result)."""
        if self._stopping:
            return None  # another thread's received bytes, if any, are in the result
        head = self._head
        got = self._recv_into(poller, memoryview(head))
        if got < _REQ_SIZE:
            self._result.received = bytes(head[:got])
            return None
        magic, flags, command, cookie, offset, length = REQUEST.unpack_from(head)
        if (command != _WRITE or not WRITE_LANE_MIN <= length <= len(buf)
                or not self._accepts(magic, flags, command, length)):
            self._result.received = bytes(head)
            self.stop()
            return None
        data = buf[:length]
        got = self._recv_into(poller, data)
        if got < length:
            self._result.received = bytes(head) + bytes(data[:got])
            return None
        return bytes(head), cookie, offset, data, bool(flags & _FUA)

    def _recv_into(self, poller: select.poll, view: memoryview) -> int:
        """Fill ``view`` from the socket; fewer bytes when stopped or at end of file."""
        fd = self._fd
        size = len(view)
        got = 0
        while got < size:
            if self._stopping:
                break
            try:
                n = os.readv(fd, (view[got:],))
            except BlockingIOError:
                poller.poll()
                continue
            if not n:
                self._result.eof = True
                self.stop()
                break
            got += n
        return got
