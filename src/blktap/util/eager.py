"""Run a coroutine eagerly, without a Task, until it first has to wait.

Python 3.12's eager task factory does this; we target 3.11. Most NBD requests on a raw
image complete without ever waiting (a page-cache ``preadv``), and creating an
``asyncio.Task`` for each costs more than the request itself. ``start`` steps the
coroutine right away; if it awaits a future, the future's done-callback steps it again.

Two more turns of the event loop per request are saved for I/O that does wait:

* an :class:`EagerFuture` resumes its eager waiter as soon as it is resolved (an asyncio
  future schedules its callbacks for the next loop turn);
* whoever resolves many of them at once (the AIO reaper) opens a :class:`Batch`, and
  :func:`defer` runs work once at its end: the NBD server writes all the replies of a
  burst of completions with one ``writev``, right away.

Contract for coroutines run this way: they may await futures, other coroutines,
``asyncio.sleep``, locks and events, but must not rely on ``asyncio.current_task()``
(so no ``asyncio.timeout``), and cannot be cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DoneCallback = Callable[[Any, BaseException | None], None]

log = logging.getLogger(__name__)


class EagerFuture(asyncio.Future[T]):
    """An asyncio future that also resumes a coroutine run by :func:`start` at once.

    Resolve it with :meth:`resolve` or :meth:`fail` (``set_result``/``set_exception``
    alone leave the eager waiter for ``wake``). Anything else awaiting it (a Task,
    ``asyncio.wait_for``) sees an ordinary future.
    """

    # A class attribute, not __init__ state: creating one costs what a plain future does.
    waiter: Callable[[EagerFuture[Any]], None] | None = None

    def resolve(self, result: T) -> None:
        self.set_result(result)
        self.wake()

    def fail(self, exc: BaseException) -> None:
        self.set_exception(exc)
        self.wake()

    def wake(self) -> None:
        """Resume the eager waiter, if any (the future must be done)."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter(self)


_batches: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}


class Batch:
    """``with Batch(loop):`` collects :func:`defer` calls made on ``loop`` inside and runs
    them on exit. Nests (only the outermost runs them). A class, not a generator-based
    context manager: it is entered once per burst of completions."""

    __slots__ = ("_deferred", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._deferred: list[Callable[[], None]] | None = None

    def __enter__(self) -> None:
        if self._loop not in _batches:
            self._deferred = _batches[self._loop] = []

    def __exit__(self, *exc_info: object) -> None:
        deferred = self._deferred
        if deferred is None:
            return
        self._deferred = None
        del _batches[self._loop]
        for fn in deferred:
            try:
                fn()
            except Exception:
                log.exception("deferred call %r failed", fn)


def defer(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Run ``fn`` at the end of the open :class:`Batch` on ``loop``, else in the next loop
    turn. Callers make sure they do not defer the same work twice."""
    deferred = _batches.get(loop)
    if deferred is None:
        loop.call_soon(fn)
    else:
        deferred.append(fn)


def start(coro: Coroutine[Any, Any, Any], on_done: DoneCallback) -> None:
    """Step ``coro`` now; call ``on_done(result, None)`` or ``on_done(None, exc)`` when it ends.

    ``on_done`` may run before ``start`` returns.
    """
    _step(coro, on_done, None)


def _step(coro: Coroutine[Any, Any, Any], on_done: DoneCallback, exc: BaseException | None) -> None:
    try:
        yielded = coro.send(None) if exc is None else coro.throw(exc)
    except StopIteration as stop:
        on_done(stop.value, None)
        return
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        on_done(None, error)
        return
    if getattr(yielded, "_asyncio_future_blocking", False):
        # The coroutine awaits a future (the protocol asyncio.Task implements).
        yielded._asyncio_future_blocking = False
        if type(yielded) is EagerFuture:
            yielded.waiter = lambda fut: _wake(coro, on_done, fut)
        else:
            yielded.add_done_callback(lambda fut: _wake(coro, on_done, fut))
    elif yielded is None:
        # A bare yield (asyncio.sleep(0)): give the loop one turn.
        asyncio.get_running_loop().call_soon(_step, coro, on_done, None)
    else:
        bad = RuntimeError(f"eager coroutine yielded {yielded!r}")
        _step(coro, on_done, bad)


def _wake(coro: Coroutine[Any, Any, Any], on_done: DoneCallback, fut: asyncio.Future[Any]) -> None:
    try:
        fut.result()
    except BaseException as error:
        _step(coro, on_done, error)
        return
    _step(coro, on_done, None)
