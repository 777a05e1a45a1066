"""Handler-call timeouts from one periodic timer.

``asyncio.timeout`` schedules and cancels a timer per call, which cost ~15% of the
relay's CPU at one call per record. Here a call registers its deadline in a dict;
one watcher task wakes every ``interval`` and cancels the tasks whose call ran over.
A call therefore times out between ``timeout_s`` and ``timeout_s + interval``.

Why this is race-free: a call's entry exists only between the two statements around
its ``await``, and the watcher runs only while other tasks are suspended, so it can
cancel a task only while that task is suspended inside the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

if sys.version_info < (3, 12):
    # 3.11's asyncio.current_task() is pure Python (3.12 made it C) and showed up at 8 % of the
    # relay's CPU in py-spy: read the same table it reads.
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    def _current_task_of(loop: asyncio.AbstractEventLoop) -> asyncio.Task[object] | None:
        return _current_tasks.get(loop)
else:  # pragma: no cover - exercised on 3.12+
    def _current_task_of(loop: asyncio.AbstractEventLoop) -> asyncio.Task[object] | None:
        return asyncio.current_task(loop)

_current: Callable[[asyncio.AbstractEventLoop], asyncio.Task[object] | None] = _current_task_of


class CallDeadlines:
    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s
        self.interval_s = min(1.0, max(0.005, timeout_s / 4))
        self._calls: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._watcher: asyncio.Task[None] | None = None

    # What a long-lived worker uses instead of ``run`` (one coroutine less per call): it sets
    # ``running[task]`` to its deadline (time.perf_counter() + timeout_s) before the call and
    # deletes it after; if ``task in expired`` then, the call ran out, and ``took_back(task)``
    # takes the cancellation back.
    @property
    def running(self) -> dict[asyncio.Task[object], float]:
        return self._calls

    @property
    def expired(self) -> set[asyncio.Task[object]]:
        return self._expired

    def start(self) -> None:
        """Start the watcher (``run`` does it by itself)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="handler-deadlines")

    def took_back(self, task: asyncio.Task[Any]) -> None:
        self._expired.discard(task)
        task.uncancel()

    def timeout_error(self) -> TimeoutError:
        return TimeoutError(f"handler call exceeded {self.timeout_s:g} s")

    async def run(self, call: Awaitable[T]) -> T:
        """Await ``call`` and return its result; raise TimeoutError if it takes longer than the timeout."""
        loop = asyncio.get_running_loop()
        self.start()
        task = _current(loop)
        assert task is not None, "handler calls run inside a task"
        calls = self._calls
        calls[task] = time.perf_counter() + self.timeout_s
        try:
            result = await call
        except asyncio.CancelledError:
            if task in self._expired:
                self._expired.discard(task)
                task.uncancel()
                raise TimeoutError(f"handler call exceeded {self.timeout_s:g} s") from None
            raise
        finally:
            del calls[task]
        if task in self._expired:  # finished after all (it swallowed the cancellation)
            self._expired.discard(task)
            task.uncancel()
        return result

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.perf_counter()
            for task, deadline in list(self._calls.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
