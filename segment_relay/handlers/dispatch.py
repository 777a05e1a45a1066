"""Delivering changes to ONE handler: order per profile, retries, batches, outages, poison.

The router hands each handler *chains*: one profile's changes of one pipeline step, in the
order they must be handled. A chain is in exactly one place at a time:

    ready (may be called now) -> in flight (a worker calls the handler) -> done
                    ^                          |
                    +---- waiting (backoff) <--+  a change failed: the chain waits, in order

Workers are long-lived tasks (``workers`` of them), never one per change: a single-change
handler gets up to ``workers`` calls in flight, one per profile; a batch handler gets up to
``workers`` ``handle_batch`` calls in flight, each gathering up to ``max_changes`` changes from
the chains that are ready, waiting at most ``max_wait_s`` for more. A chain in a batch call
is not touched by another call until that one returned, so a profile's changes keep their
order even with several batch calls in flight.

What a failure means is decided with the handler's ``CircuitBreaker`` (see circuit.py):

* while the handler is *healthy* (most of its calls succeed), a failed change is retried with
  backoff and, after ``max_attempts`` counted failures, dead-lettered: it fails while others
  succeed, so it is poison. ``PermanentHandlerError`` goes to the dead letter at once;
* when the handler fails for most of what it is given, its circuit opens: no more calls, every
  change is kept (the pipeline's in-flight bound then stops reading), and one *probe* change
  is sent on an exponential schedule. Probes rotate over the waiting profiles, so one poison
  change cannot keep the circuit open. When a probe succeeds, everything resumes at once, in
  order. Failures while unhealthy never count toward ``max_attempts``;
* a change older than ``max_age_s`` (since the oldest record of its pipeline step was read)
  that fails, or that is still held by an open circuit, is dead-lettered: the stream may not
  keep it much longer. A change whose partition was revoked is dropped instead, as always.

A batch call may report per-change failures (``BatchResult``): only those are retried, and a
profile's later changes of the same call are sent again after its failed one, so the last
change a handler sees for a profile is always its latest. A batch call that raises as a whole
is ambiguous (one bad change, or an outage): it is split in halves, level by level, until the
failure is pinned on single changes; two failing halves are an outage signal and count for
the circuit, which stops the splitting once it opens. A whole batch that asks for an explicit
wait (``HandlerRetry(after=...)``, a 429 or 503 with Retry-After) is retried whole instead.

Only calls with a change never tried before feed the circuit's failures: a poison change
failing on each retry must not look like an outage (at the end of a stream it may be all that
is left), while an outage fails the fresh changes too.

A change whose claim was revoked (its partition moved to another replica) is dropped before
any call, and never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from ..histogram import LATENCY_BUCKETS, SIZE_BUCKETS, Histogram
from ..model import Claim, SegmentChange
from .api import (
    BatchResult,
    Handler,
    HandlerContext,
    HandlerMetrics,
    HandlerRetry,
    PermanentHandlerError,
    batch_call,
    change_call,
    is_batch_handler,
)
from .circuit import CircuitBreaker, CircuitSettings, CircuitState
from .deadlines import CallDeadlines

__all__ = ["BatchSettings", "Delivery", "Dispatcher", "FailedChangeSink", "HandlerSnapshot", "RetryPolicy"]

log = logging.getLogger(__name__)


class FailedChangeSink(Protocol):
    """Where changes a handler gave up on go (the dead letter implements it)."""

    async def failed_change(
        self, change: SegmentChange, *, handler: str, attempts: int, reason: str, detail: str,
        partition: str, position: str,
    ) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per handler and change; backoff doubles from ``initial_backoff_s`` up to
    ``max_backoff_s`` with jitter. A handler's own Retry-After (``HandlerRetry.after``)
    wins over the backoff, up to ``max_retry_after_s``. ``max_age_s``: a change read longer
    ago than this is dead-lettered instead of retried (or held) any further."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0
    handler_timeout_s: float = 30.0  # one call; a timeout is a failed attempt
    max_age_s: float = 6 * 3600.0

    def delay(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return min(max(after, 0.0), self.max_retry_after_s)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** min(attempt - 1, 62))
        return ceiling * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class BatchSettings:
    """How a batch handler's calls are gathered."""

    max_changes: int = 500
    max_wait_s: float = 0.05
    concurrency: int = 1  # handle_batch calls in flight per handler

    def __post_init__(self) -> None:
        if self.max_changes < 1 or self.concurrency < 1 or self.max_wait_s < 0:
            raise ValueError("batch max_changes and concurrency must be >= 1, max_wait_s >= 0")


class Delivery:
    """One ``deliver()`` of the router: tells ``done(i)`` once every chain of profile ``i``, for
    every handler, is done."""

    __slots__ = ("done", "remaining", "started")

    def __init__(self, done: Callable[[int], None], started: float, profiles: int) -> None:
        self.done = done
        self.remaining = [0] * profiles  # chains not done yet, per profile
        self.started = started  # monotonic time its oldest record was read: the age of its changes

    def chain_done(self, profile: int) -> None:
        remaining = self.remaining
        remaining[profile] -= 1
        if remaining[profile] == 0:
            self.done(profile)


class Chain(msgspec.Struct, gc=False):
    """One profile's changes of one delivery, for one handler, in order (a Struct: one is built
    per profile and handler).

    ``items[:start]`` are done (handled, dead-lettered or dropped): what is done is always a
    prefix, because a profile's change is only tried once every earlier one is done. The failure
    counters belong to the head, ``items[start]``, the only change of the chain that can be
    waiting for a retry; they start afresh for the next one."""

    delivery: Delivery
    profile: int  # its index in the delivery
    items: Sequence[tuple[SegmentChange, Claim]]
    start: int = 0
    attempts: int = 0  # the head's failures counted toward max_attempts (while the handler was healthy)
    tries: int = 0  # the head's failed tries (backoff grows with them)
    retry_in: float | None = None  # set by the head's failure: wait this long before the next try

    @property
    def done(self) -> bool:
        return self.start >= len(self.items)

    def advance(self) -> None:
        self.start += 1
        self.attempts = self.tries = 0
        self.retry_in = None


@dataclass(frozen=True)
class HandlerSnapshot:
    """What one handler's dispatcher has done so far (read-only, for metrics and the summary)."""

    name: str
    batch: bool
    calls: int
    failed_calls: int
    failures: int  # changes that failed a try
    dead_letters: int
    dropped: int  # changes of revoked partitions, never handed over
    pending: int  # changes handed to the dispatcher, not done
    circuit: str
    circuit_opened: int
    latency: dict[str, Histogram] = field(default_factory=dict)  # by outcome: ok, error
    batch_sizes: Histogram | None = None
    counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)
    gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)


_Item = tuple[Chain, int]  # a chain and the index of one of its items


class Dispatcher:
    def __init__(
        self,
        handler: Handler,
        dead_letter: FailedChangeSink,
        *,
        policy: RetryPolicy,
        circuit: CircuitSettings,
        concurrency: int,
        batch: BatchSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handler = handler
        self.name = handler.name
        self.policy = policy
        self.batching = is_batch_handler(handler)
        self.batch = batch
        self.max_changes = (handler.batch_max_changes or batch.max_changes) if self.batching else 1
        self.workers = batch.concurrency if self.batching else concurrency
        self.circuit = CircuitBreaker(circuit, clock=clock)
        self._clock = clock
        self._dead_letter = dead_letter
        self._deadlines = CallDeadlines(policy.handler_timeout_s)
        self._call: Callable[..., Any]
        self._call, self._with_context = batch_call(handler) if self.batching else change_call(handler)
        self.metrics = HandlerMetrics(handler.name)
        self.log = logging.getLogger(f"segment_relay.handler.{handler.name}")
        # Ready chains, in two queues: heads never tried, and heads that failed before. A batch
        # is gathered from one of them only, so a change that keeps failing a whole batch does not
        # take fresh changes down with it on every retry.
        self._ready: deque[Chain] = deque()
        self._retry: deque[Chain] = deque()
        self._waiting: list[tuple[float, int, Chain]] = []  # (due, tie-breaker, chain): a heap
        self._sequence = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._sweeping = False
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for work
        self._woken = 0  # workers woken that have not run yet: they will take what is ready
        self._arrived = asyncio.Event()  # a batch being gathered waits on it for more
        self._tasks: list[asyncio.Task[None]] = []
        # counters, read through snapshot()
        self._calls = 0
        self._failed_calls = 0
        self._failures = 0
        self._dead_letters = 0
        self._dropped = 0
        self._pending = 0
        self._latency = {"ok": Histogram(LATENCY_BUCKETS), "error": Histogram(LATENCY_BUCKETS)}
        self._batch_sizes = Histogram(SIZE_BUCKETS) if self.batching else None

    def __repr__(self) -> str:
        return f"Dispatcher({self.name!r}, {'batch' if self.batching else 'single'}, circuit={self.circuit.state})"

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        work = self._batch_worker if self.batching else self._single_worker
        self._tasks = [asyncio.create_task(work(), name=f"handler-{self.name}-{i}") for i in range(self.workers)]

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._deadlines.close()

    def submit(self, chains: list[Chain]) -> None:
        """New chains (fresh, never tried): ready now. Wakes one idle worker; a worker that takes
        a chain and leaves more behind wakes the next (see ``_single_worker``), so a handler that
        never waits is not woken 64 times for one step, and one that does still gets every
        worker it can use within as many turns of the event loop."""
        self._pending += sum(len(chain.items) for chain in chains)
        self._ready.extend(chains)
        if self.batching:
            for _ in range(min(len(chains), len(self._idle))):
                self._wake()
        elif chains:
            self._wake()

    def _queue(self, chain: Chain, *, front: bool = False) -> None:
        queue = self._retry if chain.tries else self._ready
        if front:
            queue.appendleft(chain)
        else:
            queue.append(chain)

    @property
    def held(self) -> bool:
        """True while the circuit is open: changes are kept, not handed to the handler."""
        return not self.circuit.closed

    def snapshot(self) -> HandlerSnapshot:
        return HandlerSnapshot(
            name=self.name, batch=self.batching, calls=self._calls, failed_calls=self._failed_calls,
            failures=self._failures, dead_letters=self._dead_letters, dropped=self._dropped,
            pending=self._pending, circuit=self.circuit.state.value, circuit_opened=self.circuit.opened,
            latency={outcome: histogram.copy() for outcome, histogram in self._latency.items()},
            batch_sizes=self._batch_sizes.copy() if self._batch_sizes is not None else None,
            counters={name: dict(series) for name, series in self.metrics.counters.items()},
            gauges={name: dict(series) for name, series in self.metrics.gauges.items()},
        )

    # --- scheduling ----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.batching:
            self._arrived.set()  # a batch being gathered may want this chain
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1
                return

    def _wake_all(self) -> None:
        for _ in range(len(self._idle)):
            self._wake()

    def _later(self, chain: Chain, delay: float) -> None:
        self._sequence += 1
        due = self._clock() + delay
        heapq.heappush(self._waiting, (due, self._sequence, chain))
        self._arm(due)

    def _arm(self, due: float) -> None:
        """Make sure the timer fires by ``due`` (clock time); an earlier one already set stays."""
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock()
        waiting = self._waiting
        while waiting and waiting[0][0] <= now:
            self._queue(heapq.heappop(waiting)[2])
            self._wake()
        if waiting:
            self._arm(waiting[0][0])
        if self.circuit.state is CircuitState.OPEN:
            if self.circuit.probe_due():
                self._wake()
            else:
                self._arm(self.circuit.probe_at)

    def _resume_all(self) -> None:
        """The circuit closed: what waited out the outage may go at once, in order."""
        while self._waiting:
            self._queue(heapq.heappop(self._waiting)[2])
        self._wake_all()

    async def _next(self) -> tuple[Chain, bool]:
        """The next chain to work on, and whether its call is the circuit's probe."""
        loop = asyncio.get_running_loop()
        while True:
            circuit = self.circuit
            if circuit.state is CircuitState.CLOSED:
                if self._retry:  # the older ones first
                    return self._retry.popleft(), False
                if self._ready:
                    return self._ready.popleft(), False
            elif circuit.probe_due():
                await self._sweep_too_old()
                # Probe with a fresh change where there is one: it is the likeliest to be good.
                queue = self._ready or self._retry
                if queue and circuit.probe_due():
                    circuit.start_probe()
                    return queue.popleft(), True
            waiter = loop.create_future()
            self._idle.append(waiter)
            try:
                await waiter
            finally:
                if waiter.done() and not waiter.cancelled():
                    self._woken -= 1
                else:
                    waiter.cancel()

    def _opened(self) -> None:
        log.warning("handler circuit open: holding its changes, probing with one", extra={
            "handler": self.name, "probe_in_s": round(self.circuit.seconds_to_probe(), 3)})
        self._arm(self.circuit.probe_at)

    def _probe_not_sent(self) -> None:
        """The probe's change was dropped before the call (revoked): another change probes now."""
        self.circuit.probe_abandoned()
        self._arm(self.circuit.probe_at)

    def _probe_finished(self, failed: bool) -> None:
        self.circuit.probe_result(failed)
        if failed:
            self._arm(self.circuit.probe_at)
        else:
            log.warning("handler circuit closed: the probe succeeded, resuming", extra={"handler": self.name})
            self._resume_all()

    def _record(self, failed: bool) -> None:
        """One call's outcome, for the circuit. Failures count only for calls with a change that
        was never tried before: a poison change failing on every retry must not look like an
        outage (at the end of a stream it may be all that is left), while an outage fails the
        fresh changes too."""
        if self.circuit.record(failed):
            self._opened()

    # --- outcomes ------------------------------------------------------------------------------
    def _advance(self, chain: Chain) -> None:
        """The chain's head is done."""
        chain.advance()
        self._pending -= 1

    def _drop_revoked(self, chain: Chain) -> None:
        """Drop the head changes whose partition was revoked: never handed over, never retried."""
        items = chain.items
        while chain.start < len(items) and items[chain.start][1].revoked:
            self._dropped += 1
            self._advance(chain)

    async def _fail(self, chain: Chain, error: BaseException) -> None:
        """A try of the chain's head failed with ``error``: dead-letter it (the head moves on), or
        set when to try it again (``chain.retry_in``)."""
        self._failures += 1
        chain.tries += 1
        if isinstance(error, PermanentHandlerError):
            await self._give_up(chain, "handler_rejected", error)
            return
        if self.circuit.healthy:  # failing while others succeed: it counts
            chain.attempts += 1
        if chain.attempts >= self.policy.max_attempts:
            await self._give_up(chain, "handler_failed", error)
            return
        if self._clock() - chain.delivery.started >= self.policy.max_age_s:
            await self._give_up(chain, "max_age", error)
            return
        chain.retry_in = self.policy.delay(chain.tries, error.after if isinstance(error, HandlerRetry) else None)
        log.warning("handler failed, will retry", extra={
            "handler": self.name, "change_id": chain.items[chain.start][0].change_id, "attempt": chain.tries,
            "counted": chain.attempts, "retry_in_s": round(chain.retry_in, 3), "error": describe(error)})

    async def _give_up(self, chain: Chain, reason: str, error: BaseException | None) -> None:
        """The chain's head goes to the dead letter (never dropped, even if writing it fails)."""
        change = chain.items[chain.start][0]
        detail = describe(error) if error is not None else "held longer than retry.max_age_s"
        log.error("handler gave up, change sent to the dead letter", extra={
            "handler": self.name, "change_id": change.change_id, "attempts": chain.tries, "reason": reason,
            "error": detail})
        delay = 0.1
        while True:
            try:
                await self._dead_letter.failed_change(
                    change, handler=self.name, attempts=chain.tries, reason=reason, detail=detail,
                    partition=change.partition, position=change.position,
                )
                break
            except Exception:  # noqa: BLE001 - e.g. a full disk: keep the change, try again
                log.exception("cannot write the dead letter; will retry", extra={"handler": self.name})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
        self._dead_letters += 1
        self._advance(chain)

    async def _sweep_too_old(self) -> None:
        """While the circuit is open: dead-letter what has been held longer than max_age_s."""
        if self._sweeping:
            return
        now = self._clock()
        limit = self.policy.max_age_s

        def old(chain: Chain) -> bool:
            return now - chain.delivery.started >= limit

        queued = [*self._ready, *self._retry, *(chain for _, _, chain in self._waiting)]
        if not any(map(old, queued)):
            return
        self._sweeping = True
        try:
            ready, retry, waiting = self._ready, self._retry, self._waiting
            self._ready, self._retry, self._waiting = deque(), deque(), []
            for chain in [chain for chain in queued if old(chain)]:
                while True:
                    self._drop_revoked(chain)  # a revoked partition's changes are its new owner's
                    if chain.done:
                        break
                    await self._give_up(chain, "max_age", None)
                chain.delivery.chain_done(chain.profile)
            # What was queued meanwhile comes after the older chains.
            added_ready, added_retry, added_waiting = self._ready, self._retry, self._waiting
            self._ready = deque(chain for chain in ready if not old(chain))
            self._ready.extend(added_ready)
            self._retry = deque(chain for chain in retry if not old(chain))
            self._retry.extend(added_retry)
            self._waiting = [item for item in waiting if not old(item[2])] + added_waiting
            heapq.heapify(self._waiting)
        finally:
            self._sweeping = False

    def _settle(self, chain: Chain, *, probe: bool) -> None:
        """After a call: put the chain where it belongs (done, waiting for a retry, or ready)."""
        self._drop_revoked(chain)
        if chain.done:
            chain.delivery.chain_done(chain.profile)
            return
        delay, chain.retry_in = chain.retry_in, None
        if delay is not None and not probe:
            self._later(chain, delay)
        else:
            self._queue(chain)  # a failed probe rotates to the back: the next probe tries another
            self._wake()

    def _context(self, attempt: int) -> HandlerContext:
        return HandlerContext(self.name, attempt, time.monotonic() + self.policy.handler_timeout_s, self.log,
                              self.metrics)

    # --- single-change handlers ------------------------------------------------------------------
    async def _single_worker(self) -> None:
        """Take a chain, call the handler with its changes in order until one fails or the circuit
        opens, take the next. The hot path of single-change handlers: everything it needs per
        change is bound once per worker, and the circuit hears of successes once per chain."""
        task = asyncio.current_task()
        assert task is not None
        handle = self._call
        with_context = self._with_context
        deadlines = self._deadlines
        deadlines.start()
        running, expired, timeout_s = deadlines.running, deadlines.expired, deadlines.timeout_s
        ok = self._latency["ok"]
        ok_counts, ok_bounds = ok.counts, ok.bounds
        clock = time.perf_counter
        circuit = self.circuit
        closed = CircuitState.CLOSED
        ready, retry = self._ready, self._retry
        while True:
            if circuit.state is closed and (retry or ready):  # the usual case, without awaiting
                chain, probe = (retry or ready).popleft(), False
            else:
                chain, probe = await self._next()
                ready, retry = self._ready, self._retry  # a sweep may have replaced them
            if not self._woken and (ready or retry) and self._idle and not probe:
                self._wake()  # more to do: the next worker takes it if this one's call waits
            items = chain.items
            successes = 0
            try:
                while chain.start < len(items):
                    change, claim = items[chain.start]
                    if claim.revoked:
                        self._dropped += 1
                        self._advance(chain)
                        if probe:
                            self._probe_not_sent()
                            probe = False
                        continue
                    if not probe and circuit.state is not closed:
                        self._queue(chain, front=True)  # another call opened the circuit: hold, in order
                        break
                    self._calls += 1
                    started = clock()
                    running[task] = started + timeout_s  # the deadlines' clock is perf_counter too
                    try:
                        if with_context:
                            await handle(change, self._context(chain.tries + 1))
                        else:
                            await handle(change)
                    except asyncio.CancelledError:
                        del running[task]
                        if task not in expired:
                            raise
                        deadlines.took_back(task)
                        error: BaseException | None = deadlines.timeout_error()
                    except Exception as exc:  # noqa: BLE001 - any handler error is a failed try
                        del running[task]
                        if task in expired:
                            deadlines.took_back(task)
                        error = exc
                    else:
                        del running[task]
                        if task in expired:  # it ran over but returned all the same: done
                            deadlines.took_back(task)
                        error = None
                    took = clock() - started
                    if error is None:
                        ok_counts[bisect_left(ok_bounds, took)] += 1
                        ok.total += took
                        chain.start += 1
                        self._pending -= 1
                        if chain.tries:
                            chain.attempts = chain.tries = 0
                            chain.retry_in = None
                        if probe:
                            self._probe_finished(failed=False)
                            probe = False
                        else:
                            successes += 1
                        continue
                    if successes:
                        circuit.record_successes(successes)
                        successes = 0
                    if not await self._failed_call(chain, error, took, probe):
                        break  # to be retried: the chain waits (or, a failed probe, rotates)
                    probe = False
                else:
                    delivery = chain.delivery  # Delivery.chain_done(), inlined: once per chain
                    remaining = delivery.remaining
                    left = remaining[chain.profile] = remaining[chain.profile] - 1
                    if not left:
                        delivery.done(chain.profile)
            finally:
                if successes:
                    circuit.record_successes(successes)

    async def _failed_call(self, chain: Chain, error: BaseException, took: float, probe: bool) -> bool:
        """The chain's head failed: tell the circuit, judge the failure. True if the head is done
        with (dead-lettered) and the chain goes on; False if the chain was put aside to retry."""
        self._latency["error"].observe(took)
        self._failed_calls += 1
        fresh = chain.tries == 0
        # A permanent error is the handler's verdict on this change: it is up and answering.
        outage = not isinstance(error, PermanentHandlerError)
        if probe:
            self._probe_finished(failed=outage)
        elif fresh or not outage:
            self._record(outage)  # a retry failing again tells nothing new (see _record)
        head = chain.start
        await self._fail(chain, error)
        if chain.start == head:
            self._settle(chain, probe=probe)
            return False
        return True

    # --- batch handlers --------------------------------------------------------------------------
    async def _batch_worker(self) -> None:
        while True:
            taken, probe = await self._gather()
            try:
                await self._deliver_batch(taken, probe)
                if probe and self.circuit.state is CircuitState.PROBING:
                    self._probe_not_sent()  # its only change was dropped (revoked) before the call
            finally:
                for chain in {id(chain): chain for chain, _ in taken}.values():
                    self._settle(chain, probe=probe)

    async def _gather(self) -> tuple[list[_Item], bool]:
        """Up to max_changes changes from the ready chains (whole chains where they fit)."""
        chain, probe = await self._next()
        if probe:
            return [(chain, chain.start)], True
        cap = self.max_changes
        taken: list[_Item] = []
        self._take(chain, taken, cap)
        queue = self._retry if chain.tries else self._ready  # fresh and failed heads are not mixed
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while len(taken) < cap:
            if queue and self.circuit.state is CircuitState.CLOSED:
                self._take(queue.popleft(), taken, cap)
                continue
            if queue is self._retry:
                break  # retries go as soon as they are due, without waiting for company
            wait = self.batch.max_wait_s
            if wait <= 0:
                break
            if deadline is None:
                deadline = loop.time() + wait
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return taken, False

    @staticmethod
    def _take(chain: Chain, taken: list[_Item], cap: int) -> None:
        end = min(len(chain.items), chain.start + cap - len(taken))
        taken.extend((chain, index) for index in range(chain.start, end))

    def _eligible(self, part: list[_Item]) -> list[_Item]:
        """The items of ``part`` that may be called now: each is its chain's head, or follows it
        in this same call. A head of a revoked partition is dropped here (never handed over)."""
        out: list[_Item] = []
        expected: dict[int, int] = {}  # chain -> the index its next item in this call must have
        for chain, index in part:
            key = id(chain)
            wanted = expected.get(key)
            if wanted is None:
                self._drop_revoked(chain)
                wanted = chain.start
            if index != wanted:
                expected[key] = -1  # an earlier change of this profile is not done: the rest waits
                continue
            if chain.items[index][1].revoked:  # behind its head: drop it once it is the head
                expected[key] = -1
                continue
            out.append((chain, index))
            expected[key] = index + 1
        return out

    async def _deliver_batch(self, taken: list[_Item], probe: bool) -> None:
        level = [taken]
        top = True
        fresh = any(index != chain.start or chain.tries == 0 for chain, index in taken)
        while level:
            split: list[list[_Item]] = []
            for group in level:
                failed_parts = 0
                parts = [group] if top else _halves(group)
                for raw in parts:
                    part = self._eligible(raw)
                    if not part:
                        continue
                    if not top and self.circuit.state is not CircuitState.CLOSED:
                        return  # the circuit opened while splitting: the rest waits for it
                    whole = await self._call_batch(part, probe=probe, top=top, fresh=fresh)
                    if whole is not None and len(part) > 1:
                        split.append(part)
                        failed_parts += 1
                if not top and failed_parts == 2 and fresh:
                    self._record(True)  # both halves failed: more than one bad change, or an outage
                    self._record(True)
            level = split
            top = False

    async def _call_batch(self, part: list[_Item], *, probe: bool, top: bool, fresh: bool) -> BaseException | None:
        """One handle_batch call. Returns the exception when the whole call failed and ``part``
        should be split; settles every other outcome itself."""
        changes = [chain.items[index][0] for chain, index in part]
        self._calls += 1
        assert self._batch_sizes is not None
        self._batch_sizes.observe(len(changes))
        started = time.perf_counter()
        error: BaseException | None = None
        failures: dict[str, BaseException] = {}
        try:
            if self._with_context:
                attempt = 1 + max(chain.tries for chain, index in part if index == chain.start)
                result = await self._deadlines.run(self._call(changes, self._context(attempt)))
            else:
                result = await self._deadlines.run(self._call(changes))
            if isinstance(result, BatchResult):
                failures = result.failures
            elif result is not None:
                raise TypeError(f"handle_batch returned {type(result).__name__}; return None or a BatchResult")
        except Exception as exc:  # noqa: BLE001 - any handler error is a failed try
            error = exc
        took = time.perf_counter() - started
        all_failed = error is not None or len(failures) >= len(part)
        self._latency["error" if all_failed else "ok"].observe(took)
        if all_failed:
            self._failed_calls += 1
        # A permanent error is the handler's verdict on the change(s): it is up and answering.
        if error is not None:
            outage = not isinstance(error, PermanentHandlerError)
        else:
            outage = all_failed and not all(isinstance(e, PermanentHandlerError) for e in failures.values())
        split = error is not None and len(part) > 1 and not probe and not _explicit_wait(error)
        if probe:
            self._probe_finished(failed=outage)
        elif not outage or (fresh and not split):
            # A call that fails whole and is split is ambiguous: its halves decide, counting for
            # the circuit only when both fail (_deliver_batch). Counting the whole call too made
            # every batch holding one poison change an outage signal, and a stream with a few
            # opened the circuit of a healthy handler.
            self._record(outage)
        if split:
            return error  # ambiguous (one bad change, or an outage): split it
        blocked: set[int] = set()
        for chain, index in part:
            if id(chain) in blocked or index != chain.start:
                continue  # after a failed change of its profile: sent again after it
            failure = error if error is not None else failures.get(chain.items[index][0].change_id)
            if failure is None:
                self._advance(chain)
                continue
            await self._fail(chain, failure)
            if chain.start == index:  # to be retried: the rest of this profile waits for it
                blocked.add(id(chain))
        return None


def _explicit_wait(error: BaseException) -> bool:
    """A whole batch asked to come back later (a 429 or 503 with Retry-After): splitting it would
    only multiply the calls the receiver asked us not to make."""
    return isinstance(error, HandlerRetry) and error.after is not None


def _halves(items: list[_Item]) -> list[list[_Item]]:
    middle = (len(items) + 1) // 2
    return [items[:middle], items[middle:]]


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
