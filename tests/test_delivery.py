"""Delivery to handlers through the whole pipeline: downstream outages, poison changes, batch
handlers with partial failure, mixed handlers, order per profile, durability, the handler context.

The downstream is a real HTTP server on 127.0.0.1 (the relay's own webhook handlers talk to it)
or an in-process handler where the test needs to script failures change by change.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support import poll

from segment_relay import BatchResult, Handler, HandlerContext, PermanentHandlerError, SegmentChange, on_exit
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
from segment_relay.consumer.state.memory import MemoryStore
from segment_relay.handlers.api import FunctionHandler
from segment_relay.handlers.builtin import WebhookBatchHandler, WebhookHandler
from segment_relay.handlers.circuit import CircuitSettings
from segment_relay.handlers.router import BatchSettings, RetryPolicy, Router
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, iso_utc
from segment_relay.testing.pipeline import RecordsSource

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.005, max_backoff_s=0.05, max_retry_after_s=0.05,
                   handler_timeout_s=5.0)
QUICK_PROBES = CircuitSettings(open_initial_s=0.05, open_max_s=0.2)
Change = tuple[str, str, str, str]  # the reference model's shape


def shape(change: SegmentChange | dict[str, Any]) -> Change:
    if isinstance(change, dict):
        return change["profile_key"], change["segment_id"], change["change"], change["qualified_at"]
    return change.profile_key, change.segment_id, change.change.value, iso_utc(change.qualified_at)


def per_profile(changes: Sequence[Change]) -> dict[str, list[Change]]:
    grouped: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        grouped[change[0]].append(change)
    return dict(grouped)


# --- a downstream over HTTP ------------------------------------------------------------------------
@dataclass
class Downstream:
    """A webhook receiver: ``down`` answers 503 to everything, ``refuse`` picks changes it
    answers 500 to (any request carrying one); what it accepts is kept in arrival order."""

    server: TestServer | None = None
    down: bool = False
    refuse: Callable[[dict[str, Any]], bool] = lambda change: False  # noqa: E731
    received: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    refused: int = 0

    def url(self, fragment: str = "") -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/hook{fragment}"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = orjson.loads(await request.read())
        changes = body if isinstance(body, list) else [body]
        if self.down:
            return web.Response(status=503)
        if any(self.refuse(change) for change in changes):
            self.refused += 1
            return web.Response(status=500)
        self.received.extend(changes)
        return web.Response(status=200)


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    hook = Downstream()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    hook.server = TestServer(app, host="127.0.0.1", port=0)
    await hook.server.start_server()
    try:
        yield hook
    finally:
        await hook.server.close()


def relay(records: list[bytes], handlers: list[Handler], dead: MemoryDeadLetter, *, store: Any = None,
          max_in_flight_records: int = 10_000, concurrency: int = 16, batch: BatchSettings | None = None,
          circuit: CircuitSettings = QUICK_PROBES, retry: RetryPolicy = FAST) -> tuple[Pipeline, Router]:
    router = Router(handlers, dead, retry=retry, circuit=circuit, batch=batch, concurrency=concurrency)
    pipeline = Pipeline(RecordsSource(records, batch_size=100), store if store is not None else MemoryStore(), router, dead,
                        settings=PipelineSettings(max_in_flight_records=max_in_flight_records,
                                                  checkpoint_interval_s=3600.0))
    return pipeline, router


def webhook(downstream: Downstream, mode: str) -> WebhookHandler:
    if mode == "single":
        return WebhookHandler(downstream.url())
    return WebhookBatchHandler(downstream.url(), batch=50)


@pytest.mark.parametrize("mode", ["single", "batch"])
async def test_a_downstream_outage_holds_every_change_and_delivers_them_all_in_order_after_it(
    downstream: Downstream, mode: str
) -> None:
    records = list(generate(StreamSpec(seed=61, profiles=200, records=3000)))
    truth = expected_changes(records)
    dead = MemoryDeadLetter()
    bound = 300
    pipeline, router = relay(records, [webhook(downstream, mode)], dead, max_in_flight_records=bound)
    downstream.down = True
    run = asyncio.create_task(pipeline.run())
    try:
        await poll(lambda: router.held_handlers() == ["webhook"], "the circuit to open", timeout_s=20)
        # Reading stops at the in-flight bound: memory does not grow with the backlog.
        await poll(lambda: pipeline.in_flight == bound, "the in-flight bound to fill", timeout_s=20)
        read = pipeline.records_read
        for _ in range(20):
            await asyncio.sleep(0.01)  # the relay would read on now if it were going to
            assert pipeline.in_flight <= bound and pipeline.records_read == read
        assert read < len(records) and not downstream.received
        probes = downstream.requests
        await poll(lambda: downstream.requests > probes, "a probe while the downstream is down")
        downstream.down = False
        await asyncio.wait_for(run, 60)
    finally:
        downstream.down = False
        if not run.done():
            run.cancel()
    assert dead.entries == []  # an outage is not poison: nothing was dead-lettered
    received = [shape(change) for change in downstream.received]
    assert Counter(received) == Counter(truth.changes)  # every change, once
    assert per_profile(received) == per_profile(truth.changes)  # each profile in order
    stats = router.snapshot()[0]
    assert stats.circuit == "closed" and stats.circuit_opened >= 1 and stats.dead_letters == 0


@pytest.mark.parametrize("mode", ["single", "batch"])
async def test_a_poison_change_among_good_ones_is_dead_lettered_promptly(downstream: Downstream, mode: str) -> None:
    records = list(generate(StreamSpec(seed=62, profiles=200, records=2000)))
    truth = expected_changes(records)
    downstream.refuse = lambda change: change["change_id"].startswith("00")  # about one in 256, always
    dead = MemoryDeadLetter()
    pipeline, router = relay(records, [webhook(downstream, mode)], dead)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(pipeline.run(), 30)
    assert loop.time() - started < 15  # a few retries with backoff each, not a stall
    poison = {shape(entry["change"]) for entry in dead.entries}
    assert poison and all(entry["change"]["change_id"].startswith("00") for entry in dead.entries)
    assert {entry["reason"] for entry in dead.entries} == {"handler_failed"}
    received = [shape(change) for change in downstream.received]
    kept = [change for change in truth.changes if change not in poison]
    # A profile's later changes in the same array are sent again after its failed one: at least once.
    assert set(received) == set(kept) and Counter(received) >= Counter(kept)
    assert {p: c[-1] for p, c in per_profile(received).items()} == {p: c[-1] for p, c in per_profile(kept).items()}
    assert router.snapshot()[0].circuit_opened == 0  # the handler stayed healthy throughout


# --- batch handlers ----------------------------------------------------------------------------------
class ScriptedBatches(Handler):
    """A batch handler that reports the changes ``fails(change, attempt)`` picks as failed (its
    attempt counts its own calls with that change) and records every call."""

    name = "batches"

    def __init__(self, fails: Callable[[SegmentChange, int], bool] = lambda change, attempt: False, *,
                 yields: int = 0, seed: int = 0) -> None:
        self.fails = fails
        self.calls: list[list[SegmentChange]] = []
        self.tries: Counter[str] = Counter()
        self.done: list[SegmentChange] = []  # reported successful, in call order
        self._yields = yields
        self._rng = random.Random(seed)

    async def handle_batch(self, changes: Sequence[SegmentChange]) -> BatchResult | None:
        self.calls.append(list(changes))
        for _ in range(self._rng.randrange(self._yields + 1)):
            await asyncio.sleep(0)  # let other calls interleave
        result = BatchResult()
        for change in changes:
            self.tries[change.change_id] += 1
            if self.fails(change, self.tries[change.change_id]):
                result.fail(change, RuntimeError("downstream said no"))
            else:
                self.done.append(change)
        return result if result.failures else None


async def test_batch_calls_are_bounded_and_a_partial_failure_retries_only_what_failed() -> None:
    records = list(generate(StreamSpec(seed=63, profiles=150, records=1500)))
    truth = expected_changes(records)
    flaky = {change for change in truth.changes if hash(change) % 10 == 0}  # fail twice, then succeed

    handler = ScriptedBatches(lambda change, attempt: shape(change) in flaky and attempt <= 2)
    dead = MemoryDeadLetter()
    pipeline, router = relay(records, [handler], dead, batch=BatchSettings(max_changes=40, max_wait_s=0.01))
    await asyncio.wait_for(pipeline.run(), 30)
    assert dead.entries == []
    assert max(len(call) for call in handler.calls) == 40 and len(handler.calls) < len(truth.changes) / 10
    done = [shape(change) for change in handler.done]
    assert Counter(done) >= Counter(truth.changes) and set(done) == set(truth.changes)
    # A change is sent again only if it failed, or if an earlier change of its profile in the same
    # call failed (it must come after that one again): profiles without failures see each change once.
    failing_profiles = {change[0] for change in flaky}
    assert all(n == 1 for change, n in Counter(done).items() if change[0] not in failing_profiles)
    assert {handler.tries[c.change_id] for c in handler.done if shape(c) in flaky} == {3}
    # The last change each profile's handler saw is its latest: nothing older overtook it.
    assert {p: c[-1] for p, c in per_profile(done).items()} == {p: c[-1] for p, c in per_profile(truth.changes).items()}


async def test_a_change_a_batch_keeps_failing_while_others_succeed_is_dead_lettered() -> None:
    records = list(generate(StreamSpec(seed=64, profiles=150, records=1500)))
    truth = expected_changes(records)
    handler = ScriptedBatches(lambda change, attempt: change.change_id.startswith("0"))
    dead = MemoryDeadLetter()
    pipeline, _ = relay(records, [handler], dead, batch=BatchSettings(max_changes=50, max_wait_s=0.01))
    await asyncio.wait_for(pipeline.run(), 30)
    poison = {shape(entry["change"]) for entry in dead.entries}
    assert poison and {entry["attempts"] for entry in dead.entries} == {FAST.max_attempts}
    assert all(entry["change"]["change_id"].startswith("0") for entry in dead.entries)
    assert set(map(shape, handler.done)) == set(truth.changes) - poison


async def test_a_batch_that_fails_whole_for_one_bad_change_is_split_until_that_one_is_found() -> None:
    records = list(generate(StreamSpec(seed=65, profiles=300, records=1000)))
    truth = expected_changes(records)
    bad = truth.changes[len(truth.changes) // 2]
    calls = 0
    succeeded: list[Change] = []

    class AllOrNothing(Handler):
        """A bulk API that refuses a whole array when one item is bad (an HTTP 400 for the request)."""

        name = "bulk"

        async def handle_batch(self, changes: Sequence[SegmentChange]) -> None:
            nonlocal calls
            calls += 1
            if any(shape(change) == bad for change in changes):
                raise PermanentHandlerError("400: one item of the array is invalid")
            succeeded.extend(map(shape, changes))

    dead = MemoryDeadLetter()
    pipeline, router = relay(records, [AllOrNothing()], dead,
                             batch=BatchSettings(max_changes=500, max_wait_s=0.05))
    await asyncio.wait_for(pipeline.run(), 30)
    assert [shape(entry["change"]) for entry in dead.entries] == [bad]
    assert dead.entries[0]["reason"] == "handler_rejected"
    assert Counter(succeeded) == Counter(change for change in truth.changes if change != bad)  # each once
    assert calls < len(truth.changes) / 20  # halving, not one call per change
    assert router.snapshot()[0].circuit_opened == 0


async def test_batches_keep_each_profile_in_order_with_several_calls_in_flight() -> None:
    records = list(generate(StreamSpec(seed=66, profiles=60, records=2000)))  # many changes per profile
    truth = expected_changes(records)
    handler = ScriptedBatches(yields=8, seed=3)
    dead = MemoryDeadLetter()
    pipeline, _ = relay(records, [handler], dead,
                        batch=BatchSettings(max_changes=7, max_wait_s=0, concurrency=4))
    await asyncio.wait_for(pipeline.run(), 30)
    done = [shape(change) for change in handler.done]
    assert per_profile(done) == per_profile(truth.changes)  # exactly once, in order, per profile
    assert dead.entries == []


async def test_single_and_batch_handlers_on_one_relay_each_get_their_routes() -> None:
    records = list(generate(StreamSpec(seed=67, profiles=100, records=1200)))
    truth = expected_changes(records)
    singles: list[Change] = []

    @on_exit()
    async def exits(change: SegmentChange) -> None:
        await asyncio.sleep(0)
        singles.append(shape(change))

    batches = ScriptedBatches(yields=2)
    dead = MemoryDeadLetter()
    pipeline, router = relay(records, [FunctionHandler(exits, name="exits"), batches], dead)
    await asyncio.wait_for(pipeline.run(), 30)
    assert per_profile(singles) == per_profile([c for c in truth.changes if c[2] == "exit"])
    assert per_profile([shape(c) for c in batches.done]) == per_profile(truth.changes)
    assert {s.name: s.batch for s in router.snapshot()} == {"exits": False, "batches": True}


async def test_state_is_saved_only_after_every_handler_returned_for_the_profile() -> None:
    records = list(generate(StreamSpec(seed=68, profiles=20, records=200)))
    gate = asyncio.Event()
    store = MemoryStore()
    fast_calls = 0

    class Slow(Handler):
        name = "slow"

        async def handle_batch(self, changes: Sequence[SegmentChange]) -> None:
            await gate.wait()

    async def fast(change: SegmentChange) -> None:
        nonlocal fast_calls
        fast_calls += 1

    dead = MemoryDeadLetter()
    pipeline, _ = relay(records, [FunctionHandler(fast, name="fast"), Slow()], dead, store=store)
    run = asyncio.create_task(pipeline.run())
    try:
        # Every profile's first record has a change (a first sighting), so no profile may have any
        # state while the slow handler holds its first call, however far the fast one got.
        await poll(lambda: fast_calls >= 20, "the fast handler to handle the first changes")
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert len(store) == 0, "state was saved before every handler returned"
        gate.set()
        await asyncio.wait_for(run, 30)
    finally:
        gate.set()
    assert len(store) == 20 and pipeline.records_finished == len(records)


async def test_a_handler_that_asks_for_it_gets_a_context_with_attempts_deadline_logger_and_metrics() -> None:
    records = list(generate(StreamSpec(seed=69, profiles=30, records=200)))
    seen: list[tuple[int, float, str]] = []
    failed_once: set[str] = set()

    async def with_context(change: SegmentChange, context: HandlerContext) -> None:
        seen.append((context.attempt, context.time_left(), context.log.name))
        context.metrics.count("tries", outcome="first" if context.attempt == 1 else "retry")
        if change.change_id not in failed_once and change.change_id.startswith(("0", "1", "2")):
            failed_once.add(change.change_id)
            raise RuntimeError("once")

    dead = MemoryDeadLetter()
    pipeline, router = relay(records, [FunctionHandler(with_context, name="ctx")], dead)
    await asyncio.wait_for(pipeline.run(), 30)
    assert dead.entries == [] and failed_once
    attempts = Counter(attempt for attempt, _, _ in seen)
    assert attempts[2] == len(failed_once) and set(attempts) == {1, 2}
    assert all(0 < left <= FAST.handler_timeout_s for _, left, _ in seen)
    assert {name for _, _, name in seen} == {"segment_relay.handler.ctx"}
    counters = router.snapshot()[0].counters["tries"]
    assert counters == {(("outcome", "first"),): len(seen) - len(failed_once), (("outcome", "retry"),): len(failed_once)}
