"""Low watermarks, in-flight bounds, and per-profile lanes."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segment_relay.consumer.ordering import InFlightLimit, PartitionWatermark, ProfileLanes


async def spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(predicate, what: str, spins: int = 10_000) -> None:  # type: ignore[no-untyped-def]
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for {what}")


# --- PartitionWatermark ------------------------------------------------------------------


def test_watermark_contiguous_with_out_of_order_finishes() -> None:
    mark = PartitionWatermark()
    tickets = [mark.register(pos) for pos in (10, 20, 30, 40, 50)]
    assert mark.watermark is None and mark.in_flight == 5
    mark.finish(tickets[2])
    mark.finish(tickets[1])
    assert mark.watermark is None  # 10 is not finished
    mark.finish(tickets[0])
    assert mark.watermark == 30 and mark.in_flight == 2
    mark.finish(tickets[4])
    assert mark.watermark == 30
    mark.finish(tickets[3])
    assert mark.watermark == 50 and mark.in_flight == 0
    later = mark.register(60)
    assert mark.watermark == 50
    mark.finish(later)
    assert mark.watermark == 60


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.permutations(range(n))), st.data())
def test_watermark_is_the_end_of_the_finished_prefix(order: list[int], data: st.DataObject) -> None:
    mark = PartitionWatermark()
    positions = sorted(data.draw(st.sets(st.integers(0, 10_000), min_size=len(order), max_size=len(order))))
    tickets = [mark.register(p) for p in positions]
    done: set[int] = set()
    for index in order:
        mark.finish(tickets[index])
        done.add(index)
        prefix = 0
        while prefix in done:
            prefix += 1
        assert mark.watermark == (positions[prefix - 1] if prefix else None)
        assert mark.in_flight == len(order) - prefix


# --- InFlightLimit ----------------------------------------------------------------------------


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InFlightLimit(0, 10)
    with pytest.raises(ValueError):
        InFlightLimit(10, 0)


async def test_blocks_at_the_record_bound() -> None:
    limit = InFlightLimit(max_records=3, max_bytes=10_000)
    for _ in range(3):
        await limit.acquire(1)
    fourth = asyncio.create_task(limit.acquire(1))
    await spin()
    assert not fourth.done() and limit.records == 3
    limit.release(1)
    await asyncio.wait_for(fourth, 5)
    assert limit.records == 3 and limit.bytes == 3


async def test_blocks_at_the_byte_bound() -> None:
    limit = InFlightLimit(max_records=100, max_bytes=100)
    await limit.acquire(60)
    await limit.acquire(40)  # exactly at the bound is allowed
    blocked = asyncio.create_task(limit.acquire(1))
    await spin()
    assert not blocked.done()
    limit.release(40)
    await asyncio.wait_for(blocked, 5)
    big = asyncio.create_task(limit.acquire(50))  # 61 + 50 > 100
    await spin()
    assert not big.done()
    limit.release(60)
    await asyncio.wait_for(big, 5)
    assert (limit.records, limit.bytes) == (2, 51)


async def test_oversize_record_is_admitted_alone() -> None:
    limit = InFlightLimit(max_records=10, max_bytes=100)
    await limit.acquire(10_000)  # nothing in flight: admitted rather than never
    assert (limit.records, limit.bytes) == (1, 10_000)
    small = asyncio.create_task(limit.acquire(1))
    await spin()
    assert not small.done()  # nothing else while the oversize one is in flight
    limit.release(10_000)
    await asyncio.wait_for(small, 5)
    oversize = asyncio.create_task(limit.acquire(500))
    await spin()
    assert not oversize.done()  # waits until it would be alone
    limit.release(1)
    await asyncio.wait_for(oversize, 5)
    assert (limit.records, limit.bytes) == (1, 500)


async def test_never_exceeds_the_bounds_under_churn() -> None:
    limit = InFlightLimit(max_records=4, max_bytes=50)
    rng = random.Random(3)
    peak = {"records": 0, "bytes": 0}

    async def one(size: int) -> None:
        await limit.acquire(size)
        peak["records"] = max(peak["records"], limit.records)
        if limit.records > 1:
            peak["bytes"] = max(peak["bytes"], limit.bytes)
        await spin(rng.randrange(5))
        limit.release(size)

    await asyncio.wait_for(asyncio.gather(*(one(rng.randrange(1, 30)) for _ in range(200))), 10)
    assert peak["records"] <= 4 and peak["bytes"] <= 50
    assert (limit.records, limit.bytes) == (0, 0)


# --- ProfileLanes --------------------------------------------------------------------------------


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ProfileLanes(lambda item: asyncio.sleep(0), 0)


async def test_lane_order_exclusivity_and_concurrency() -> None:
    rng = random.Random(11)
    running_per_key: dict[str, int] = defaultdict(int)
    seen: dict[str, list[int]] = defaultdict(list)
    running = 0
    peak = 0
    overlaps: list[str] = []

    async def process(item: tuple[str, int]) -> None:
        nonlocal running, peak
        key, seq = item
        running_per_key[key] += 1
        running += 1
        peak = max(peak, running)
        if running_per_key[key] > 1:
            overlaps.append(key)
        for _ in range(rng.randrange(8)):
            await asyncio.sleep(0)
        seen[key].append(seq)
        running_per_key[key] -= 1
        running -= 1

    lanes: ProfileLanes[tuple[str, int]] = ProfileLanes(process, concurrency=4)
    lanes.start()
    try:
        expected: dict[str, list[int]] = defaultdict(list)
        for seq in range(400):
            key = f"k{rng.randrange(12)}"
            lanes.submit(key, (key, seq))
            expected[key].append(seq)
            if rng.random() < 0.2:
                await asyncio.sleep(0)
        await asyncio.wait_for(lanes.wait_idle(), 10)
    finally:
        await lanes.stop()
    assert overlaps == []
    assert dict(seen) == dict(expected)
    assert 1 < peak <= 4
    assert lanes.active_keys == 0


async def test_one_key_blocked_does_not_block_others() -> None:
    gates = {"a": asyncio.Event()}
    started: list[tuple[str, int]] = []
    finished: list[tuple[str, int]] = []

    async def process(item: tuple[str, int]) -> None:
        started.append(item)
        gate = gates.get(item[0])
        if gate is not None:
            await gate.wait()
        finished.append(item)

    lanes: ProfileLanes[tuple[str, int]] = ProfileLanes(process, concurrency=2)
    lanes.start()
    try:
        lanes.submit("a", ("a", 1))
        lanes.submit("a", ("a", 2))
        lanes.submit("b", ("b", 1))
        lanes.submit("b", ("b", 2))
        await until(lambda: ("b", 2) in finished, "key b to finish while a is blocked")
        assert ("a", 1) in started and ("a", 2) not in started  # a's second item waits for its first
        assert not lanes._idle.is_set()
        idle = asyncio.create_task(lanes.wait_idle())
        await spin()
        assert not idle.done()
        gates["a"].set()
        await asyncio.wait_for(idle, 5)
    finally:
        await lanes.stop()
    assert [i for i in finished if i[0] == "a"] == [("a", 1), ("a", 2)]


async def test_concurrency_bound_respected() -> None:
    release = asyncio.Event()
    running: set[str] = set()
    peak = 0

    async def process(key: str) -> None:
        nonlocal peak
        running.add(key)
        peak = max(peak, len(running))
        await release.wait()
        running.discard(key)

    lanes: ProfileLanes[str] = ProfileLanes(process, concurrency=3)
    lanes.start()
    try:
        for i in range(10):
            lanes.submit(f"k{i}", f"k{i}")
        await until(lambda: len(running) == 3, "three keys running")
        await spin(50)
        assert len(running) == 3 and peak == 3
        release.set()
        await asyncio.wait_for(lanes.wait_idle(), 5)
    finally:
        await lanes.stop()
    assert peak == 3


async def test_submit_while_key_is_running_keeps_order() -> None:
    gate = asyncio.Event()
    done: list[int] = []

    async def process(n: int) -> None:
        if n == 0:
            await gate.wait()
        done.append(n)

    lanes: ProfileLanes[int] = ProfileLanes(process, concurrency=8)
    lanes.start()
    try:
        lanes.submit("k", 0)
        await spin()
        for n in range(1, 6):
            lanes.submit("k", n)
        await spin()
        assert done == []
        gate.set()
        await asyncio.wait_for(lanes.wait_idle(), 5)
        lanes.submit("k", 6)  # the key is gone after draining; a new item starts it again
        await asyncio.wait_for(lanes.wait_idle(), 5)
        await until(lambda: 6 in done, "item 6")
    finally:
        await lanes.stop()
    assert done == [0, 1, 2, 3, 4, 5, 6]


async def test_a_failing_item_does_not_stall_other_keys_and_is_retried() -> None:
    # An exception from `process` (e.g. the dead letter cannot be written) must neither shrink
    # the worker pool nor drop the item: the key steps aside, others run, the item is retried.
    done: list[int] = []
    failures = 0

    async def process(item: int) -> None:
        nonlocal failures
        if item == 0 and failures < 2:
            failures += 1
            raise RuntimeError("boom")
        done.append(item)

    lanes: ProfileLanes[int] = ProfileLanes(process, concurrency=1, retry_backoff_s=0.01)
    lanes.start()
    try:
        lanes.submit("k", 0)
        lanes.submit("k", 2)
        lanes.submit("j", 1)
        await until(lambda: 1 in done, "key j to run after key k's item failed")
        await asyncio.wait_for(lanes.wait_idle(), 5)
    finally:
        await lanes.stop()
    assert failures == 2
    assert done == [1, 0, 2]  # k's items still in order, after j


def test_records_sharing_a_position_move_the_watermark_only_together() -> None:
    # The sub-records of one KPL aggregate share the parent's sequence number: a checkpoint
    # at that number claims all of them, so it must wait for the last one.
    mark = PartitionWatermark()
    first = mark.register("100")
    aggregate = [mark.register("200") for _ in range(3)]
    last = mark.register("300")
    mark.finish(first)
    mark.finish(aggregate[0])
    assert mark.watermark == "100"
    mark.finish(aggregate[2])
    assert mark.watermark == "100"
    mark.finish(aggregate[1])
    assert mark.watermark == "200"
    mark.finish(last)
    assert mark.watermark == "300"


async def test_a_full_limit_resumes_only_after_a_tenth_has_drained() -> None:
    # Waking the reader for every finished record would cost a loop round trip per record
    # exactly when the relay is busiest.
    limit = InFlightLimit(max_records=20, max_bytes=10**9)
    for _ in range(20):
        await limit.acquire(1)
    waiter = asyncio.create_task(limit.acquire(1))
    await asyncio.sleep(0)  # the waiter finds the limit full and waits
    limit.release(1)
    await asyncio.sleep(0)
    assert not waiter.done()  # 19 in flight: above the resume mark of 18
    limit.release(1)
    await asyncio.wait_for(waiter, 1)
    assert limit.records == 19
