"""Handler-call timeouts driven by one periodic timer."""

from __future__ import annotations

import asyncio

import pytest

from segment_relay.handlers.deadlines import CallDeadlines


async def test_a_call_over_its_deadline_raises_timeout_and_the_task_lives_on() -> None:
    deadlines = CallDeadlines(0.02)
    never = asyncio.Event()
    try:
        with pytest.raises(TimeoutError):
            await deadlines.run(never.wait())
        # The cancellation used for the timeout is fully consumed: the task keeps working.
        await asyncio.sleep(0.001)
        await deadlines.run(asyncio.sleep(0))
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
    finally:
        await deadlines.close()


async def test_fast_calls_pass_and_results_are_awaited() -> None:
    deadlines = CallDeadlines(5.0)
    done: list[int] = []

    async def work(n: int) -> None:
        await asyncio.sleep(0)
        done.append(n)

    try:
        await asyncio.gather(*(deadlines.run(work(n)) for n in range(50)))
    finally:
        await deadlines.close()
    assert sorted(done) == list(range(50))


async def test_only_the_slow_call_times_out() -> None:
    deadlines = CallDeadlines(0.05)
    finished: list[str] = []

    async def quick() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        finished.append("quick")

    async def slow() -> None:
        await asyncio.Event().wait()

    try:
        results = await asyncio.gather(deadlines.run(slow()), deadlines.run(quick()), return_exceptions=True)
    finally:
        await deadlines.close()
    assert isinstance(results[0], TimeoutError) and results[1] is None
    assert finished == ["quick"]


async def test_an_outside_cancellation_is_not_turned_into_a_timeout() -> None:
    deadlines = CallDeadlines(10.0)
    started = asyncio.Event()

    async def call() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(deadlines.run(call()))
    try:
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await deadlines.close()


async def test_a_call_that_swallows_the_cancellation_counts_as_finished() -> None:
    deadlines = CallDeadlines(0.02)

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # bad manners, but the relay must survive it

    try:
        await deadlines.run(stubborn())
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.001)  # and no stray cancellation is left behind
    finally:
        await deadlines.close()
