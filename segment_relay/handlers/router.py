"""Routes each change to the handlers that want it; each handler's dispatcher delivers it.

The router is the pipeline's ``ChangeSink`` (segment_relay.model): ``deliver`` takes one
pipeline step's changes, one ordered sequence per profile, splits each profile's sequence by
handler (a change goes to every handler whose routes match it), hands the pieces to the
handlers' dispatchers (dispatch.py) and returns when every piece is done: handled,
dead-lettered, or dropped because its partition was revoked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from ..model import MEMBERSHIP_CHANGES, ChangeType, PendingChange, SegmentChange
from .api import Handler
from .circuit import CircuitSettings
from .dispatch import BatchSettings, Chain, Delivery, Dispatcher, FailedChangeSink, HandlerSnapshot, RetryPolicy

__all__ = ["BatchSettings", "CircuitSettings", "RetryPolicy", "Router"]


class _NeverRevoked:
    revoked = False


_NEVER_REVOKED = _NeverRevoked()

log = logging.getLogger(__name__)


_MERGE = ChangeType.MERGE


class Router:
    def __init__(
        self,
        handlers: Sequence[Handler],
        dead_letter: FailedChangeSink,
        *,
        retry: RetryPolicy | None = None,
        batch: BatchSettings | None = None,
        circuit: CircuitSettings | None = None,
        concurrency: int = 64,
    ) -> None:
        """``concurrency``: calls in flight per single-change handler (profiles handled at once)."""
        names = [handler.name for handler in handlers]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"handler names must be unique, got {sorted(duplicates)} more than once")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.handlers = tuple(handlers)
        self.retry = retry or RetryPolicy()
        self._dispatchers = tuple(
            Dispatcher(handler, dead_letter, policy=self.retry, circuit=circuit or CircuitSettings(),
                       concurrency=concurrency, batch=batch or BatchSettings())
            for handler in self.handlers
        )
        self._by_handler = {id(d.handler): d for d in self._dispatchers}
        self._routes: dict[tuple[ChangeType, str], tuple[Dispatcher, ...]] = {}
        # One handler that takes every membership change: no routing needed (merges, which come
        # first in a profile's changes when there is one, are dropped here unless it takes them).
        everything = len(self._dispatchers) == 1 and any(
            route.changes >= MEMBERSHIP_CHANGES and not route.segments for route in self.handlers[0].routes)
        self._everything = self._dispatchers[0] if everything else None
        self._everything_merges = everything and any(
            route.matches(ChangeType.MERGE, "") for route in self.handlers[0].routes)
        self._started = False

    def handlers_for(self, change: ChangeType, segment_id: str) -> tuple[Handler, ...]:
        return tuple(dispatcher.handler for dispatcher in self._dispatchers_for(change, segment_id))

    def _dispatchers_for(self, change: ChangeType, segment_id: str) -> tuple[Dispatcher, ...]:
        key = (change, segment_id)
        selected = self._routes.get(key)
        if selected is None:
            selected = tuple(
                dispatcher for dispatcher in self._dispatchers
                if any(route.matches(change, segment_id) for route in dispatcher.handler.routes)
            )
            if len(self._routes) < 100_000:  # segments are few; the bound only guards odd streams
                self._routes[key] = selected
        return selected

    async def start(self) -> None:
        for handler in self.handlers:
            await handler.start()
        for dispatcher in self._dispatchers:
            dispatcher.start()
        self._started = True

    def deliver(self, profiles: Sequence[Sequence[PendingChange]], done: Callable[[int], None],
                read_at: float | None = None) -> None:
        """Hand over the changes of ``profiles``; ``done(i)`` is called once every change of
        profile ``i`` was handled by every handler that wants it, dead-lettered, or dropped
        (revoked). A profile no handler wants is done at once. ``read_at`` (monotonic; default
        now): when the oldest of their records was read, where their age starts."""
        delivery = Delivery(done, time.monotonic() if read_at is None else read_at, len(profiles))
        remaining = delivery.remaining
        everything = self._everything
        if everything is not None:  # one handler that takes every change: no routing needed
            if not self._everything_merges:
                profiles = [pending[1:] if pending and pending[0][0].change is _MERGE else pending
                            for pending in profiles]
            chains = [Chain(delivery, profile, pending) for profile, pending in enumerate(profiles) if pending]
            for chain in chains:
                remaining[chain.profile] = 1
            if len(chains) < len(profiles):
                for profile, pending in enumerate(profiles):
                    if not pending:
                        done(profile)
            everything.submit(chains)
            return
        by_handler: dict[Dispatcher, list[Chain]] = {}
        routes = self._dispatchers_for
        for profile, pending in enumerate(profiles):
            parts: dict[Dispatcher, list[PendingChange]] = {}
            for item in pending:
                change = item[0]
                for dispatcher in routes(change.change, change.segment_id):
                    part = parts.get(dispatcher)
                    if part is None:
                        parts[dispatcher] = [item]
                    else:
                        part.append(item)
            remaining[profile] = len(parts)
            for dispatcher, part in parts.items():
                by_handler.setdefault(dispatcher, []).append(Chain(delivery, profile, part))
        for profile, count in enumerate(remaining):
            if not count:
                done(profile)  # no handler wants any of its changes
        for dispatcher, chains in by_handler.items():
            dispatcher.submit(chains)

    async def dispatch(self, *changes: SegmentChange) -> None:
        """Deliver ``changes`` as one profile's, in order, and wait until they are done: for tools,
        tests and embedding the router without a pipeline (the claim is never revoked)."""
        finished = asyncio.get_running_loop().create_future()
        self.deliver([[(change, _NEVER_REVOKED) for change in changes]], lambda _: finished.set_result(None))
        await finished

    async def flush(self) -> None:
        for handler in self.handlers:
            await handler.flush()

    async def close(self) -> None:
        for dispatcher in self._dispatchers:
            await dispatcher.close()
        for handler in self.handlers:
            try:
                await handler.close()
            except Exception:  # noqa: BLE001 - one bad close must not keep the others open
                log.exception("handler close failed", extra={"handler": handler.name})

    # --- what operations see ---------------------------------------------------------------------
    def snapshot(self) -> tuple[HandlerSnapshot, ...]:
        return tuple(dispatcher.snapshot() for dispatcher in self._dispatchers)

    def held_handlers(self) -> list[str]:
        """Handlers whose circuit is open (their changes are kept, not delivered, until a probe succeeds)."""
        return [dispatcher.name for dispatcher in self._dispatchers if dispatcher.held]
