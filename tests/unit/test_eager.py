"""blktap.util.eager: coroutines run without a Task, EagerFuture, Batch and defer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from blktap.util import eager
from blktap.util.eager import Batch, EagerFuture


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_coroutine_that_never_waits_completes_inside_start() -> None:
    async def body() -> None:
        async def work() -> int:
            return 7

        seen: list[tuple[Any, BaseException | None]] = []
        eager.start(work(), lambda result, exc: seen.append((result, exc)))
        assert seen == [(7, None)]

    run(body())


def test_an_eager_waiter_resumes_inside_resolve_without_a_loop_turn() -> None:
    async def body() -> None:
        fut: EagerFuture[int] = EagerFuture(loop=asyncio.get_running_loop())
        trace: list[str] = []

        async def work() -> int:
            trace.append("waiting")
            value = await fut
            trace.append("resumed")
            return value * 2

        seen: list[tuple[Any, BaseException | None]] = []
        eager.start(work(), lambda result, exc: seen.append((result, exc)))
        assert trace == ["waiting"] and not seen
        fut.resolve(21)
        assert trace == ["waiting", "resumed"]
        assert seen == [(42, None)]

    run(body())


def test_an_eager_waiter_gets_the_exception_of_fail() -> None:
    async def body() -> None:
        fut: EagerFuture[int] = EagerFuture(loop=asyncio.get_running_loop())

        async def work() -> int:
            return await fut

        seen: list[tuple[Any, BaseException | None]] = []
        eager.start(work(), lambda result, exc: seen.append((result, exc)))
        error = OSError(5, "Input/output error")
        fut.fail(error)
        assert seen == [(None, error)]

    run(body())


def test_a_task_awaiting_an_eager_future_sees_an_ordinary_future() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fut: EagerFuture[str] = EagerFuture(loop=loop)
        task = loop.create_task(_await(fut))
        await asyncio.sleep(0)
        fut.resolve("done")
        assert not task.done()  # a Task is woken by the loop, as usual
        assert await task == "done"
        failing: EagerFuture[str] = EagerFuture(loop=loop)
        task = loop.create_task(_await(failing))
        await asyncio.sleep(0)
        failing.fail(ValueError("bad"))
        with pytest.raises(ValueError, match="bad"):
            await task

    run(body())


async def _await(fut: EagerFuture[str]) -> str:
    return await fut


def test_defer_inside_a_batch_runs_at_its_end_and_nested_batches_wait_for_the_outer() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        with Batch(loop):
            eager.defer(loop, lambda: order.append("a"))
            with Batch(loop):
                eager.defer(loop, lambda: order.append("b"))
            assert order == []  # the inner batch does not run them
            order.append("body")
        assert order == ["body", "a", "b"]

    run(body())


def test_defer_outside_a_batch_runs_next_loop_turn() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        eager.defer(loop, lambda: order.append("deferred"))
        assert order == []
        await asyncio.sleep(0)
        assert order == ["deferred"]

    run(body())


def test_a_failing_deferred_call_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        def boom() -> None:
            raise RuntimeError("boom")

        with Batch(loop):
            eager.defer(loop, boom)
            eager.defer(loop, lambda: order.append("after"))
        assert order == ["after"]

    run(body())
    assert "boom" in caplog.text
