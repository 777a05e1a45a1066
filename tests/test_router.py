"""Routing, retries, timeouts and the dead letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from support import poll

from segment_relay import (
    ChangeType,
    Handler,
    HandlerRetry,
    PermanentHandlerError,
    SegmentChange,
    SegmentStatus,
    on_change,
    on_enter,
    on_exit,
)
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.handlers.api import FunctionHandler, IdentityItem, change_id_for
from segment_relay.handlers.circuit import CircuitSettings
from segment_relay.handlers.dispatch import HandlerSnapshot
from segment_relay.handlers.router import RetryPolicy, Router

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.0005, max_backoff_s=0.001, handler_timeout_s=5.0)
ENTER, EXIT = ChangeType.ENTER, ChangeType.EXIT


class Live:
    """The claim of a partition that is still ours."""

    revoked = False


LIVE = Live()
_STARTED: list[Router] = []


@pytest.fixture(autouse=True)
async def close_routers() -> AsyncIterator[None]:
    yield
    while _STARTED:
        await _STARTED.pop().close()


async def dispatch(router: Router, *changes: SegmentChange) -> None:
    """Deliver ``changes`` as one profile's, in order (starting the router the first time)."""
    await dispatch_profiles(router, list(changes))


async def dispatch_profiles(router: Router, *profiles: list[SegmentChange]) -> None:
    """Deliver several profiles' changes in one step."""
    if not router._started:
        await router.start()
        _STARTED.append(router)
    await asyncio.wait_for(delivered(router, [[(c, LIVE) for c in changes] for changes in profiles]), 10)


async def delivered(router: Router, profiles: list[list[tuple[SegmentChange, Live]]],
                    read_at: float | None = None) -> None:
    """router.deliver, until every profile is done."""
    remaining = set(range(len(profiles)))
    finished = asyncio.Event()

    def done(index: int) -> None:
        remaining.remove(index)
        if not remaining:
            finished.set()

    router.deliver(profiles, done, read_at)
    if remaining:
        await finished.wait()


def handler_stats(router: Router, name: str) -> HandlerSnapshot:
    return next(snapshot for snapshot in router.snapshot() if snapshot.name == name)


def good_traffic(n: int = 20) -> list[list[SegmentChange]]:
    """Changes of other profiles that a poison-change test handler handles fine."""
    return [[change(ENTER, "fine", profile=f"ecid:other-{i}")] for i in range(n)]


def change(kind: ChangeType, segment_id: str = "gold", profile: str = "ecid:1") -> SegmentChange:  # noqa: D103
    status = SegmentStatus.REALIZED if kind is ENTER else SegmentStatus.EXITED
    at = datetime(2024, 1, 1, tzinfo=UTC)
    return SegmentChange(
        change=kind, segment_id=segment_id, segment_namespace="ups", segment_name=None, profile_key=profile,
        identities={"ecid": [IdentityItem(id="1")]}, attributes={"person": {"x": 1}}, qualified_at=at,
        status=status, change_id=change_id_for(profile, "ups", segment_id, status.value, 0),
        partition="p0", position="7",
    )


# --- routing ----------------------------------------------------------------------------------


async def test_function_routes_by_segment_and_change_type() -> None:
    calls: list[tuple[str, str, str]] = []

    @on_enter("gold", "silver")
    async def welcome(c: SegmentChange) -> None:
        calls.append(("welcome", c.segment_id, c.change.value))

    @on_exit("gold")
    async def goodbye(c: SegmentChange) -> None:
        calls.append(("goodbye", c.segment_id, c.change.value))

    @on_change("bronze")
    async def any_bronze(c: SegmentChange) -> None:
        calls.append(("bronze", c.segment_id, c.change.value))

    @on_exit()
    async def every_exit(c: SegmentChange) -> None:
        calls.append(("every_exit", c.segment_id, c.change.value))

    async def everything(c: SegmentChange) -> None:  # undecorated: all changes
        calls.append(("everything", c.segment_id, c.change.value))

    handlers = [FunctionHandler(f) for f in (welcome, goodbye, any_bronze, every_exit, everything)]
    router = Router(handlers, MemoryDeadLetter(), retry=FAST)
    assert [h.name.split(":")[-1].split(".")[-1] for h in router.handlers_for(ENTER, "gold")] == ["welcome", "everything"]
    for kind, segment in [(ENTER, "gold"), (EXIT, "gold"), (ENTER, "silver"), (EXIT, "silver"), (ENTER, "bronze"),
                          (EXIT, "bronze"), (ENTER, "other")]:
        await dispatch(router, change(kind, segment))
    assert calls == [
        ("welcome", "gold", "enter"), ("everything", "gold", "enter"),
        ("goodbye", "gold", "exit"), ("every_exit", "gold", "exit"), ("everything", "gold", "exit"),
        ("welcome", "silver", "enter"), ("everything", "silver", "enter"),
        ("every_exit", "silver", "exit"), ("everything", "silver", "exit"),
        ("bronze", "bronze", "enter"), ("everything", "bronze", "enter"),
        ("bronze", "bronze", "exit"), ("every_exit", "bronze", "exit"), ("everything", "bronze", "exit"),
        ("everything", "other", "enter"),
    ]


async def test_handler_subclass_methods_route() -> None:
    calls: list[tuple[str, str, str]] = []

    class Crm(Handler):
        @on_enter("gold")
        async def welcome(self, c: SegmentChange) -> None:
            calls.append(("welcome", c.segment_id, c.change.value))

        @on_exit()
        async def goodbye(self, c: SegmentChange) -> None:
            calls.append(("goodbye", c.segment_id, c.change.value))

        @on_change("vip")
        async def vip(self, c: SegmentChange) -> None:
            calls.append(("vip", c.segment_id, c.change.value))

    assert Crm.name == "Crm"
    router = Router([Crm()], MemoryDeadLetter(), retry=FAST)
    assert router.handlers_for(ENTER, "silver") == ()  # no method wants it: the handler is not called
    for kind, segment in [(ENTER, "gold"), (EXIT, "gold"), (ENTER, "vip"), (EXIT, "vip"), (ENTER, "silver")]:
        await dispatch(router, change(kind, segment))
    assert calls == [
        ("welcome", "gold", "enter"),
        ("goodbye", "gold", "exit"),
        ("vip", "vip", "enter"),
        ("goodbye", "vip", "exit"), ("vip", "vip", "exit"),
    ]


async def test_handler_subclass_overriding_handle_uses_class_routes() -> None:
    from segment_relay import Route

    seen: list[str] = []

    class Exits(Handler):
        name = "exits"
        routes = (Route(changes=frozenset({EXIT})),)

        async def handle(self, c: SegmentChange) -> None:
            seen.append(c.segment_id)

    router = Router([Exits()], MemoryDeadLetter(), retry=FAST)
    await dispatch(router, change(ENTER, "a"))
    await dispatch(router, change(EXIT, "b"))
    assert seen == ["b"]


# Regression (found by this suite, fixed in c0ffd30): a method decorated with overlapping routes
# (e.g. @on_enter("gold") and @on_change()) used to be called once per matching route by
# Handler.handle, so twice for one change; a function handler with the same decorators runs once.
async def test_method_with_overlapping_routes_is_called_once() -> None:
    method_calls: list[str] = []
    function_calls: list[str] = []

    class Crm(Handler):
        @on_enter("gold")
        @on_change()
        async def both(self, c: SegmentChange) -> None:
            method_calls.append(c.change_id)

    @on_enter("gold")
    @on_change()
    async def both(c: SegmentChange) -> None:
        function_calls.append(c.change_id)

    router = Router([Crm(), FunctionHandler(both, name="fn")], MemoryDeadLetter(), retry=FAST)
    await dispatch(router, change(ENTER, "gold"))
    assert len(function_calls) == 1
    assert len(method_calls) == 1  # was 2 before the fix


def test_decorators_reject_bad_segment_ids() -> None:
    with pytest.raises(TypeError):
        on_enter("")
    with pytest.raises(TypeError):
        on_exit(5)  # type: ignore[arg-type]


def test_handler_names_must_be_unique() -> None:
    async def f(c: SegmentChange) -> None: ...

    with pytest.raises(ValueError, match="unique"):
        Router([FunctionHandler(f, name="x"), FunctionHandler(f, name="x")], MemoryDeadLetter())


# --- retries and the dead letter ------------------------------------------------------------


async def test_fails_twice_then_succeeds() -> None:
    calls = 0

    async def flaky(c: SegmentChange) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError("temporarily down")

    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(flaky, name="flaky")], dead, retry=FAST)
    await dispatch(router, change(ENTER))
    assert calls == 3
    assert dead.entries == []
    assert handler_stats(router, "flaky").failures == 2


async def test_a_change_failing_while_others_succeed_is_dead_lettered_after_max_attempts() -> None:
    calls = 0

    async def broken(c: SegmentChange) -> None:
        nonlocal calls
        if c.segment_id == "gold":  # poison: only this change fails
            calls += 1
            raise RuntimeError("boom")

    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(broken, name="broken")], dead, retry=FAST)
    the_change = change(EXIT, "gold")
    await dispatch_profiles(router, [the_change], *good_traffic())
    assert calls == FAST.max_attempts
    (entry,) = dead.entries
    assert entry["kind"] == "failed_change"
    assert entry["handler"] == "broken"
    assert entry["attempts"] == FAST.max_attempts
    assert entry["reason"] == "handler_failed"
    assert entry["detail"] == "RuntimeError: boom"
    assert (entry["partition"], entry["position"]) == ("p0", "7")
    assert entry["change"] == the_change.to_dict()
    assert entry["change"]["change_id"] == the_change.change_id
    assert handler_stats(router, "broken").dead_letters == 1


async def test_the_age_that_max_age_limits_starts_when_the_record_was_read() -> None:
    """A change whose record was read longer ago than max_age_s is dead-lettered at its first
    failure, even if it was handed to the router just now (it waited for its profile meanwhile)."""
    calls = 0

    async def broken(c: SegmentChange) -> None:
        nonlocal calls
        if c.segment_id == "gold":
            calls += 1
            raise RuntimeError("boom")

    dead = MemoryDeadLetter()
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.0005, max_backoff_s=0.001, max_age_s=60.0)
    router = Router([FunctionHandler(broken, name="broken")], dead, retry=policy)
    await router.start()
    _STARTED.append(router)
    profiles = [[(change(EXIT, "gold"), LIVE)], *[[(c, LIVE) for c in p] for p in good_traffic()]]
    await asyncio.wait_for(delivered(router, profiles, read_at=time.monotonic() - 61), 10)
    assert calls == 1
    assert [(e["reason"], e["attempts"]) for e in dead.entries] == [("max_age", 1)]

    calls = 0
    await asyncio.wait_for(delivered(router, profiles, read_at=time.monotonic() - 1), 10)  # young: retried
    assert calls == policy.max_attempts and dead.entries[-1]["reason"] == "handler_failed"


class Claim:
    """The claim of a partition that the test takes away."""

    revoked = False


class DownInBatches(Handler):
    name = "down"

    async def handle_batch(self, changes: list[SegmentChange]) -> None:
        raise RuntimeError("503")


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
async def test_changes_held_past_max_age_are_dead_lettered_unless_their_partition_was_revoked(batch: bool) -> None:
    """While the circuit is open, a revoked partition's changes are dropped, not dead-lettered,
    and a probe whose change was dropped before its call does not leave the circuit stuck."""
    async def down(c: SegmentChange) -> None:
        raise RuntimeError("503")

    dead = MemoryDeadLetter()
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.0005, max_backoff_s=0.001, max_age_s=0.5)
    handler = DownInBatches() if batch else FunctionHandler(down, name="down")
    router = Router([handler], dead, retry=policy,
                    circuit=CircuitSettings(open_initial_s=0.05, open_max_s=0.1))
    await router.start()
    _STARTED.append(router)
    kept, lost = Claim(), Claim()
    profiles = [[(change(ENTER, profile=f"ecid:{i}"), kept if i % 2 else lost)] for i in range(30)]
    delivering = asyncio.create_task(delivered(router, profiles))
    try:
        await poll(lambda: handler_stats(router, "down").circuit != "closed", "the circuit to open")
        lost.revoked = True  # its changes are now another replica's
        await asyncio.wait_for(asyncio.shield(delivering), 10)  # every profile done: swept or dropped
    finally:
        delivering.cancel()
    lost_ids = {profile[0][0].change_id for profile in profiles if profile[0][1] is lost}
    assert dead.entries and not {e["change"]["change_id"] for e in dead.entries} & lost_ids
    assert {e["reason"] for e in dead.entries} <= {"max_age", "handler_failed"}
    assert handler_stats(router, "down").dropped == len(lost_ids)


async def test_one_failing_handler_does_not_stop_the_others() -> None:
    seen: list[str] = []

    async def broken(c: SegmentChange) -> None:
        raise PermanentHandlerError("refused")

    async def fine(c: SegmentChange) -> None:
        seen.append(c.change_id)

    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(broken, name="broken"), FunctionHandler(fine, name="fine")], dead, retry=FAST)
    await dispatch(router, change(ENTER))
    assert len(seen) == 1
    assert [e["handler"] for e in dead.entries] == ["broken"]


async def test_permanent_error_dead_letters_after_one_attempt() -> None:
    calls = 0

    async def rejects(c: SegmentChange) -> None:
        nonlocal calls
        calls += 1
        raise PermanentHandlerError("HTTP 400: bad payload")

    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(rejects, name="rejects")], dead, retry=FAST)
    await dispatch(router, change(ENTER))
    assert calls == 1
    (entry,) = dead.entries
    assert (entry["handler"], entry["attempts"], entry["reason"]) == ("rejects", 1, "handler_rejected")
    assert entry["detail"] == "PermanentHandlerError: HTTP 400: bad payload"


async def test_handler_retry_after_is_honoured() -> None:
    attempts: list[float] = []

    async def throttled(c: SegmentChange) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise HandlerRetry("429", after=0.05)

    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.0001, max_backoff_s=0.0001, handler_timeout_s=5.0)
    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(throttled, name="throttled")], dead, retry=policy)
    await dispatch(router, change(ENTER))
    assert len(attempts) == 2 and dead.entries == []
    assert attempts[1] - attempts[0] >= 0.045  # the backoff alone would be ~0.1 ms


async def test_handler_retry_counts_as_an_attempt() -> None:
    calls = 0

    async def always_retry(c: SegmentChange) -> None:
        nonlocal calls
        if c.segment_id == "gold":
            calls += 1
            raise HandlerRetry("later", after=0)

    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(always_retry, name="r")], dead, retry=FAST)
    await dispatch_profiles(router, [change(ENTER)], *good_traffic())
    assert calls == FAST.max_attempts
    assert dead.entries[0]["detail"] == "HandlerRetry: later"


def test_policy_delay() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, max_retry_after_s=2.0)
    assert policy.delay(1, 0.75) == 0.75
    assert policy.delay(3, 0.0) == 0.0
    assert policy.delay(1, -5.0) == 0.0
    assert policy.delay(1, 60.0) == 2.0  # capped
    for _ in range(50):
        assert 0.05 <= policy.delay(1, None) <= 0.1
        assert 0.1 <= policy.delay(2, None) <= 0.2
        assert 0.2 <= policy.delay(3, None) <= 0.4
        assert 0.25 <= policy.delay(4, None) <= 0.5  # ceiling
        assert 0.25 <= policy.delay(30, None) <= 0.5


async def test_timeout_counts_as_a_failure() -> None:
    calls = 0
    never = asyncio.Event()

    async def hangs(c: SegmentChange) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            await never.wait()

    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.0001, max_backoff_s=0.0001, handler_timeout_s=0.02)
    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(hangs, name="hangs")], dead, retry=policy)
    await dispatch(router, change(ENTER))
    assert calls == 3 and dead.entries == []
    assert handler_stats(router, "hangs").failures == 2


async def test_timeout_every_time_is_dead_lettered() -> None:
    never = asyncio.Event()

    async def hangs(c: SegmentChange) -> None:
        if c.segment_id == "gold":
            await never.wait()

    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.0001, max_backoff_s=0.0001, handler_timeout_s=0.02)
    dead = MemoryDeadLetter()
    router = Router([FunctionHandler(hangs, name="hangs")], dead, retry=policy)
    await dispatch_profiles(router, [change(ENTER)], *good_traffic())
    (entry,) = dead.entries
    assert (entry["handler"], entry["attempts"], entry["reason"], entry["detail"]) == ("hangs", 2, "handler_failed", "timed out")


async def test_class_handler_failures_use_its_name() -> None:
    class Webhook(Handler):
        name = "webhook"

        @on_enter()
        async def post(self, c: SegmentChange) -> None:
            raise PermanentHandlerError("410 gone")

    dead = MemoryDeadLetter()
    await dispatch(Router([Webhook()], dead, retry=FAST), change(ENTER))
    assert dead.entries[0]["handler"] == "webhook"


async def test_every_worker_is_used_when_calls_wait() -> None:
    """Workers wake one another as work is taken (not all at once per delivery): a handler whose
    calls wait still gets ``concurrency`` calls in flight."""
    release = asyncio.Event()
    in_flight = peak = 0

    async def slow(change: SegmentChange) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1

    router = Router([FunctionHandler(slow, name="slow")], MemoryDeadLetter(), retry=FAST, concurrency=6)
    task = asyncio.create_task(dispatch_profiles(router, *[[change(ENTER, profile=f"ecid:{i}")] for i in range(20)]))
    deadline = time.monotonic() + 5
    while peak < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    assert peak == 6
    release.set()
    await task
    assert handler_stats(router, "slow").calls == 20
