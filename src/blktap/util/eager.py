"""Run a coroutine eagerly, without a Task, until it first has to wait.

Python 3.12's eager task factory does this; we target 3.11. Most NBD requests on a raw
image complete without ever waiting (a page-cache ``preadv``), and creating an
``asyncio.Task`` for each costs more than the request itself. ``start`` steps the
coroutine right away; if it awaits a future, the future's done-callback steps it again.

Contract for coroutines run this way: they may await futures, other coroutines,
``asyncio.sleep``, locks and events, but must not rely on ``asyncio.current_task()``
(so no ``asyncio.timeout``), and cannot be cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DoneCallback = Callable[[Any, BaseException | None], None]


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
