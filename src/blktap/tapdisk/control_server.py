"""The control socket server: one request per connection, as the C tapdisk.

A connection must deliver its whole request within ``REQUEST_TIMEOUT`` seconds; a
malformed request gets ERROR EINVAL; data sent after the request, while it is being
served, gets ERROR EBUSY; after the reply the server closes the connection. At most
``MAX_CONNECTIONS`` connections are served at once; later ones wait unread, like a
listen backlog. Nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
from typing import cast

from blktap.proto import control as ctl
from blktap.tapdisk.service import Tapdisk

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 2.0
MAX_CONNECTIONS = 10
BACKLOG = 32


class ControlServer:
    """Serves ``tapdisk`` on the Unix socket ``path`` (created 0600, removed on stop)."""

    def __init__(self, tapdisk: Tapdisk, path: str) -> None:
        self.tapdisk = tapdisk
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._active = 0
        self._waiting: collections.deque[_Connection] = collections.deque()
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if os.path.lexists(self.path):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(
                lambda: _Connection(self), self.path, backlog=BACKLOG
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            conn.abort()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # Connection slots ------------------------------------------------------
    def _admit(self, conn: _Connection) -> None:
        self._connections.add(conn)
        if self._active < MAX_CONNECTIONS:
            self._active += 1
            conn.activate()
        else:
            self._waiting.append(conn)

    def _release(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.active:
            self._active -= 1
            while self._waiting and self._active < MAX_CONNECTIONS:
                nxt = self._waiting.popleft()
                if nxt.alive:
                    self._active += 1
                    nxt.activate()
        else:
            with contextlib.suppress(ValueError):
                self._waiting.remove(conn)


class _Connection(asyncio.Protocol):
    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.reader = ctl.RequestReader()
        self.busy_answered = False
        self.trailer = b""
        self.active = False
        self.alive = True
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.server._admit(self)

    def activate(self) -> None:
        assert self.transport is not None
        self.active = True
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(REQUEST_TIMEOUT, self._timed_out)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            request = self.reader.next_request()
        except ctl.MessageError as exc:
            if self.busy:
                self._busy_reply(exc)
            else:
                self._reject(exc)
            return
        if request is None:
            return
        self.busy = True
        self._cancel_timer()
        asyncio.get_running_loop().create_task(self._serve(request))
        if self.reader.buffered:
            self.data_received(b"")

    def eof_received(self) -> bool | None:
        if not self.busy:
            log.debug("control client closed before sending a whole request")
            self.abort()
        return True  # keep the write side open to reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._cancel_timer()
        self.server._release(self)

    # ------------------------------------------------------------------------
    async def _serve(self, request: ctl.Request) -> None:
        replies = await self.server.tapdisk.handle(request)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines([*replies, self.trailer])
            self.transport.close()

    def _busy_reply(self, exc: ctl.MessageError) -> None:
        # The C tapdisk answers a second request on a busy connection with EBUSY, once.
        if self.busy_answered or self.transport is None:
            return
        self.busy_answered = True
        cookie = exc.cookie if exc.cookie is not None else ctl.NO_MINOR
        # Sent after the reply to the request in progress.
        self.trailer = ctl.encode(ctl.error_reply(cookie, errno.EBUSY))

    def _reject(self, exc: ctl.MessageError) -> None:
        log.info("bad control request: %s", exc)
        cookie = exc.cookie if exc.cookie is not None else ctl.NO_MINOR
        self._cancel_timer()
        assert self.transport is not None
        self.busy = True
        self.busy_answered = True
        self.transport.write(ctl.encode(ctl.error_reply(cookie, exc.errno or errno.EINVAL)))
        self.transport.close()

    def _timed_out(self) -> None:
        self.timer = None
        log.info("control client sent no whole request within %.0f s", REQUEST_TIMEOUT)
        self.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
