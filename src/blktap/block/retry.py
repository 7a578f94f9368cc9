"""Retrying a request that failed with a transient error, as the C tapdisk does, until
the VBD's request timeout (``tap-ctl create -t``, the OPEN message's ``req_timeout``).

Transient errors are EAGAIN and EBUSY (storage that is briefly unavailable: NFS, a
lock held elsewhere, an injected fault). Every other error fails the request at once.

The VBD calls :func:`retry_transient` where it sends a request to the top of its
stack, only after a failure: a request that succeeds pays nothing, and the fast routes
past the stack are unchanged. Between attempts the request is not in flight (a pause or
close does not wait for it; its next attempt waits for a resume, or fails with
ESHUTDOWN after a close). The waits double from :data:`FIRST_DELAY_S` up to
:data:`MAX_DELAY_S`, so a request that keeps failing costs a few attempts a second:
no retry storm, no busy loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable

from blktap.errors import errno_of

log = logging.getLogger(__name__)

TRANSIENT = frozenset({errno.EAGAIN, errno.EBUSY})
"""The errnos a request is retried for."""
REQUEST_TIMEOUT_S = 120.0
"""The C tapdisk's default request timeout (an OPEN with ``req_timeout`` 0)."""
FIRST_DELAY_S = 0.01
MAX_DELAY_S = 1.0


class Backoff:
    """The waits between one request's attempts (pure: the caller passes the clock).

    ``next_delay(now)`` is the next wait in seconds (doubling, at most MAX_DELAY_S, never
    past the deadline), or None once ``timeout_s`` has passed since ``started``."""

    def __init__(self, started: float, timeout_s: float) -> None:
        self.deadline = started + timeout_s
        self._delay = FIRST_DELAY_S
        self.attempts = 1

    def next_delay(self, now: float) -> float | None:
        remaining = self.deadline - now
        if remaining <= 0:
            return None
        delay = min(self._delay, remaining)
        self._delay = min(self._delay * 2, MAX_DELAY_S)
        self.attempts += 1
        return delay


async def retry_transient(first: BaseException, attempt: Callable[[], Awaitable[None]],
                          timeout_s: float) -> None:
    """Continue a request whose first attempt failed with ``first``.

    Raises ``first`` unless its errno is transient (:data:`TRANSIENT`) and ``timeout_s``
    is positive. Otherwise waits (:class:`Backoff`) and calls ``attempt()`` again until it
    returns, raises a non-transient error (raised), or ``timeout_s`` seconds after the
    first failure have passed (the last transient error is raised: the client sees it,
    e.g. NBD_EIO for EAGAIN)."""
    if timeout_s <= 0 or errno_of(first) not in TRANSIENT:
        raise first
    loop = asyncio.get_running_loop()
    backoff = Backoff(loop.time(), timeout_s)
    last = first
    while (delay := backoff.next_delay(loop.time())) is not None:
        await asyncio.sleep(delay)
        try:
            await attempt()
            return
        except BaseException as exc:
            if errno_of(exc) not in TRANSIENT:
                raise
            last = exc
    log.info("request failed with %s for %.1f s (%d attempts): giving up", last,
             timeout_s, backoff.attempts)
    raise last
