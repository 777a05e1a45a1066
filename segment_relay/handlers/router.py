"""Routes each change to the handlers that want it, with retries, then the dead letter."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..consumer.deadletter import DeadLetter
from ..consumer.membership import ChangeType
from ..ops.stats import RelayStats
from .api import Handler, HandlerRetry, PermanentHandlerError, SegmentChange
from .deadlines import CallDeadlines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per handler and change; backoff doubles from ``initial_backoff_s`` up to
    ``max_backoff_s`` with jitter. A handler's own Retry-After (``HandlerRetry.after``)
    wins over the backoff, up to ``max_retry_after_s``."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0
    handler_timeout_s: float = 30.0  # one call; a timeout is a failed attempt

    def delay(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return min(max(after, 0.0), self.max_retry_after_s)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


class Router:
    def __init__(
        self,
        handlers: Sequence[Handler],
        dead_letter: DeadLetter,
        *,
        retry: RetryPolicy | None = None,
        stats: RelayStats | None = None,
    ) -> None:
        names = [handler.name for handler in handlers]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"handler names must be unique, got {sorted(duplicates)} more than once")
        self.handlers = tuple(handlers)
        self.dead_letter = dead_letter
        self.retry = retry or RetryPolicy()
        self.stats = stats or RelayStats()
        self._routes: dict[tuple[ChangeType, str], tuple[Handler, ...]] = {}
        self._deadlines = CallDeadlines(self.retry.handler_timeout_s)

    def handlers_for(self, change: ChangeType, segment_id: str) -> tuple[Handler, ...]:
        key = (change, segment_id)
        selected = self._routes.get(key)
        if selected is None:
            selected = tuple(
                handler for handler in self.handlers
                if any(route.matches(change, segment_id) for route in handler.routes)
            )
            if len(self._routes) < 100_000:  # segments are few; the bound only guards odd streams
                self._routes[key] = selected
        return selected

    async def start(self) -> None:
        for handler in self.handlers:
            await handler.start()

    async def dispatch(self, change: SegmentChange) -> None:
        """Returns when every matching handler has succeeded or the change is dead-lettered for it."""
        for handler in self.handlers_for(change.change, change.segment_id):
            # The first attempt inline (the hot path: one coroutine less per change), retries apart.
            started = time.perf_counter()
            try:
                await self._deadlines.run(handler.handle(change))
            except Exception as exc:  # noqa: BLE001 - any handler error is retried, then dead-lettered
                await self._after_failure(handler, change, exc, time.perf_counter() - started)
            else:
                self.stats.handler_succeeded(handler.name, time.perf_counter() - started)

    async def _after_failure(self, handler: Handler, change: SegmentChange, exc: Exception, took_s: float) -> None:
        """Attempt 1 failed with ``exc``: retry with backoff until success, a permanent error or
        ``max_attempts``; then the dead letter."""
        policy = self.retry
        attempt = 1
        while True:
            self.stats.handler_failed(handler.name, took_s)
            if isinstance(exc, PermanentHandlerError):
                await self._give_up(handler, change, attempt, "handler_rejected", exc)
                return
            if attempt >= policy.max_attempts:
                await self._give_up(handler, change, attempt, "handler_failed", exc)
                return
            delay = policy.delay(attempt, exc.after if isinstance(exc, HandlerRetry) else None)
            log.warning(
                "handler failed, will retry",
                extra={"handler": handler.name, "change_id": change.change_id, "attempt": attempt,
                       "retry_in_s": round(delay, 3), "error": _describe(exc)},
            )
            await asyncio.sleep(delay)
            attempt += 1
            started = time.perf_counter()
            try:
                await self._deadlines.run(handler.handle(change))
            except Exception as failure:  # noqa: BLE001
                exc, took_s = failure, time.perf_counter() - started
            else:
                self.stats.handler_succeeded(handler.name, time.perf_counter() - started)
                return

    async def _give_up(
        self, handler: Handler, change: SegmentChange, attempts: int, reason: str, exc: BaseException
    ) -> None:
        log.error(
            "handler gave up, change sent to the dead letter",
            extra={"handler": handler.name, "change_id": change.change_id, "attempts": attempts,
                   "error": _describe(exc)},
        )
        await self.dead_letter.failed_change(
            change.to_dict(), handler=handler.name, attempts=attempts, reason=reason,
            detail=_describe(exc), partition=change.partition, position=change.position,
        )
        self.stats.dead_lettered("failed_change")

    async def flush(self) -> None:
        for handler in self.handlers:
            await handler.flush()

    async def close(self) -> None:
        await self._deadlines.close()
        for handler in self.handlers:
            try:
                await handler.close()
            except Exception:  # noqa: BLE001 - one bad close must not keep the others open
                log.exception("handler close failed", extra={"handler": handler.name})


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
