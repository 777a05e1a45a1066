"""Low watermarks, in-flight bounds, and per-profile lanes."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segment_relay.consumer.ordering import InFlightLimit, PartitionWatermark, ProfileGate


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
        await limit.acquire(1, 1)
    fourth = asyncio.create_task(limit.acquire(1, 1))
    await spin()
    assert not fourth.done() and limit.records == 3
    limit.release(1, 1)
    await asyncio.wait_for(fourth, 5)
    assert limit.records == 3 and limit.bytes == 3


async def test_blocks_at_the_byte_bound() -> None:
    limit = InFlightLimit(max_records=100, max_bytes=100)
    await limit.acquire(1, 60)
    await limit.acquire(1, 40)  # exactly at the bound is allowed
    blocked = asyncio.create_task(limit.acquire(1, 1))
    await spin()
    assert not blocked.done()
    limit.release(1, 40)
    await asyncio.wait_for(blocked, 5)
    big = asyncio.create_task(limit.acquire(1, 50))  # 61 + 50 > 100
    await spin()
    assert not big.done()
    limit.release(1, 60)
    await asyncio.wait_for(big, 5)
    assert (limit.records, limit.bytes) == (2, 51)


async def test_oversize_record_is_admitted_alone() -> None:
    limit = InFlightLimit(max_records=10, max_bytes=100)
    await limit.acquire(1, 10_000)  # nothing in flight: admitted rather than never
    assert (limit.records, limit.bytes) == (1, 10_000)
    small = asyncio.create_task(limit.acquire(1, 1))
    await spin()
    assert not small.done()  # nothing else while the oversize one is in flight
    limit.release(1, 10_000)
    await asyncio.wait_for(small, 5)
    oversize = asyncio.create_task(limit.acquire(1, 500))
    await spin()
    assert not oversize.done()  # waits until it would be alone
    limit.release(1, 1)
    await asyncio.wait_for(oversize, 5)
    assert (limit.records, limit.bytes) == (1, 500)


async def test_never_exceeds_the_bounds_under_churn() -> None:
    limit = InFlightLimit(max_records=4, max_bytes=50)
    rng = random.Random(3)
    peak = {"records": 0, "bytes": 0}

    async def one(size: int) -> None:
        await limit.acquire(1, size)
        peak["records"] = max(peak["records"], limit.records)
        if limit.records > 1:
            peak["bytes"] = max(peak["bytes"], limit.bytes)
        await spin(rng.randrange(5))
        limit.release(1, size)

    await asyncio.wait_for(asyncio.gather(*(one(rng.randrange(1, 30)) for _ in range(200))), 10)
    assert peak["records"] <= 4 and peak["bytes"] <= 50
    assert (limit.records, limit.bytes) == (0, 0)


async def test_a_group_of_records_is_admitted_at_once_or_waits_whole() -> None:
    limit = InFlightLimit(max_records=10, max_bytes=10_000)
    await limit.acquire(6, 600)
    group = asyncio.create_task(limit.acquire(5, 500))  # 11 records: it waits, as a whole
    await spin()
    assert not group.done() and (limit.records, limit.bytes) == (6, 600)
    limit.release(6, 600)
    await asyncio.wait_for(group, 5)
    assert (limit.records, limit.bytes) == (5, 500)
    limit.release(5, 500)
    await asyncio.wait_for(limit.acquire(25, 5), 5)  # bigger than the bound: admitted alone, never refused
    assert limit.records == 25


# --- ProfileGate --------------------------------------------------------------------------------


def test_gate_lets_a_free_profile_in_and_queues_behind_a_busy_one() -> None:
    gate: ProfileGate[str] = ProfileGate()
    assert gate.admit("a", "a1") is True  # free: the caller processes a1 now
    assert gate.admit("b", "b1") is True
    assert gate.admit("a", "a2") is False  # busy: a2 waits behind a1
    assert gate.admit("a", "a3") is False
    assert (gate.busy, gate.waiting) == (2, 2)
    assert gate.release("b") is None  # nothing waited: b is free again
    assert gate.release("a") == ["a2", "a3"]  # in arrival order; a stays busy for them
    assert gate.admit("a", "a4") is False
    assert gate.release("a") == ["a4"]
    assert gate.release("a") is None
    assert (gate.busy, gate.waiting) == (0, 0)
    assert gate.admit("a", "a5") is True


def test_gate_drop_removes_only_the_matching_waiting_items_and_keeps_the_order() -> None:
    gate: ProfileGate[tuple[str, int]] = ProfileGate()
    gate.admit("a", ("p0", 0))
    for item in [("p1", 1), ("p0", 2), ("p1", 3), ("p0", 4)]:
        gate.admit("a", item)
    assert gate.drop(lambda item: item[0] == "p1") == [("p1", 1), ("p1", 3)]
    assert gate.release("a") == [("p0", 2), ("p0", 4)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans()), max_size=60))
def test_gate_keeps_each_profile_in_order_whatever_the_interleaving(script: list[tuple[str, bool]]) -> None:
    """Arrivals and step ends interleaved at random: each profile's items are processed in
    arrival order, one step at a time, and nothing is lost."""
    gate: ProfileGate[int] = ProfileGate()
    in_step: dict[str, list[int]] = {}  # profile -> the items of its running step
    processed: dict[str, list[int]] = defaultdict(list)
    arrived: dict[str, list[int]] = defaultdict(list)
    for number, (key, ends_a_step) in enumerate(script):
        if ends_a_step and key in in_step:
            processed[key].extend(in_step.pop(key))
            following = gate.release(key)
            if following is not None:
                in_step[key] = following
            continue
        arrived[key].append(number)
        if gate.admit(key, number):
            assert key not in in_step
            in_step[key] = [number]
    while in_step:
        key, items = in_step.popitem()
        processed[key].extend(items)
        following = gate.release(key)
        if following is not None:
            in_step[key] = following
    assert dict(processed) == {key: items for key, items in arrived.items()}
    assert gate.busy == 0


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
        await limit.acquire(1, 1)
    waiter = asyncio.create_task(limit.acquire(1, 1))
    await asyncio.sleep(0)  # the waiter finds the limit full and waits
    limit.release(1, 1)
    await asyncio.sleep(0)
    assert not waiter.done()  # 19 in flight: above the resume mark of 18
    limit.release(1, 1)
    await asyncio.wait_for(waiter, 1)
    assert limit.records == 19
