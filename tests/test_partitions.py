"""Partitions that are taken away: the pipeline's one mechanism for every source.

A source tells the pipeline ``assigned(partition, epoch)`` and ``revoked(partition)``. After a
revoke nothing read under that assignment may reach a handler (what is already in a handler call
finishes), nothing is committed for it again, and the partition's new owner, reading from the
last checkpoint, gets everything the old one did not finish. Here the source is scripted, so the
revoke lands exactly while the partition's records are queued at every stage; the Kinesis and
Event Hubs tests do the same with real leases and ownership (test_kinesis_source.py,
test_eventhubs_source.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from support import PartitionSpy, poll

from segment_relay import SegmentChange
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
from segment_relay.consumer.sources.base import Batch, PartitionListener, SourceRecord, SourceSnapshot
from segment_relay.consumer.state.memory import MemoryStore
from segment_relay.handlers.api import FunctionHandler
from segment_relay.handlers.router import RetryPolicy, Router
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, iso_utc

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.005, handler_timeout_s=10.0)
Change = tuple[str, str, str, str]


class ScriptedSource:
    """Two partitions of records (positions 1, 2, ...); the test pushes batches and revokes."""

    name = "scripted"

    def __init__(self, partitions: dict[str, list[bytes]], start_after: dict[str, int] | None = None) -> None:
        self.records = partitions
        self.read_to = dict(start_after or dict.fromkeys(partitions, 0))
        self.epochs = dict.fromkeys(partitions, 1)
        self.commits: list[tuple[float, str, int]] = []
        self.listener: PartitionListener | None = None
        self._queue: asyncio.Queue[Batch[int] | None] = asyncio.Queue()

    async def start(self, listener: PartitionListener) -> None:
        self.listener = listener
        for partition in self.records:
            listener.assigned(partition, self.epochs[partition])

    def push(self, partition: str, count: int) -> None:
        start = self.read_to[partition]
        chunk = self.records[partition][start:start + count]
        self.read_to[partition] = start + len(chunk)
        records = [SourceRecord(start + offset + 1, data) for offset, data in enumerate(chunk)]
        self._queue.put_nowait(Batch(partition, self.epochs[partition], records))

    def push_all(self, partition: str, batch_size: int = 50) -> None:
        while self.read_to[partition] < len(self.records[partition]):
            self.push(partition, batch_size)

    def revoke(self, partition: str) -> float:
        assert self.listener is not None
        self.epochs[partition] += 1
        revoked_at = time.monotonic()
        self.listener.revoked(partition)
        return revoked_at

    async def batches(self) -> AsyncIterator[Batch[int]]:
        while (batch := await self._queue.get()) is not None:
            yield batch

    async def commit(self, partition: str, position: int) -> None:
        self.commits.append((time.monotonic(), partition, position))

    def stop(self) -> None:
        self._queue.put_nowait(None)

    async def close(self) -> None:
        pass

    def snapshot(self) -> SourceSnapshot:
        return SourceSnapshot()


def shape(change: SegmentChange) -> Change:
    return change.profile_key, change.segment_id, change.change.value, iso_utc(change.qualified_at)


def split_by_profile(records: list[bytes], partitions: int) -> dict[str, list[bytes]]:
    """Each profile's records on one partition, in order (Adobe keys by profile)."""
    import orjson

    split: dict[str, list[bytes]] = {f"p{n}": [] for n in range(partitions)}
    for record in records:
        ecid = orjson.loads(record)["identityMap"]["ecid"][0]["id"]
        split[f"p{int(ecid) % partitions}"].append(record)
    return split


async def test_a_revoked_partition_reaches_no_handler_after_the_revoke_and_its_new_owner_gets_the_rest() -> None:
    records = list(generate(StreamSpec(seed=71, profiles=120, records=1600)))
    truth = expected_changes(records)
    partitions = split_by_profile(records, 2)
    gate = asyncio.Event()
    calls: list[tuple[float, SegmentChange]] = []  # when each call started, and with what
    blocked: set[str] = set()  # a few of p0's profiles, whose later records then pile up behind them

    async def handler(change: SegmentChange) -> None:
        calls.append((time.monotonic(), change))
        if change.partition == "p0" and not gate.is_set() and (len(blocked) < 3 or change.profile_key in blocked):
            blocked.add(change.profile_key)
            await gate.wait()

    old_source = ScriptedSource(partitions)
    dead = MemoryDeadLetter()
    store = MemoryStore()  # shared with the new owner, as replicas share a membership store
    old = Pipeline(old_source, store, Router([FunctionHandler(handler, name="h")], dead, retry=FAST, concurrency=8),
                   dead, settings=PipelineSettings(checkpoint_interval_s=0.05))
    spy = PartitionSpy(old, old_source)
    run = asyncio.create_task(old.run())
    try:
        old_source.push_all("p0")
        old_source.push_all("p1")
        await poll(lambda: old.records_read == len(records), "every record to be read")
        await poll(lambda: old.snapshot().profiles_waiting > 0, "p0's records to queue up behind busy profiles")
        p1_total = len(partitions["p1"])
        await poll(lambda: old.snapshot().checkpoints.get("p1") == p1_total, "p1 to be done and checkpointed")
        committed_p0 = max((position for _, partition, position in old_source.commits if partition == "p0"),
                           default=0)
        revoked_at = old_source.revoke("p0")
        gate.set()  # the calls in flight at the revoke finish; nothing else of p0 may start
        await poll(lambda: old.in_flight == 0, "the old owner to let go of p0")
        await spy.checkpoint_rounds_pass(3)  # none of them may commit p0
    finally:
        gate.set()
        old.stop()
        await asyncio.wait_for(run, 30)
    late = [change for started, change in calls if change.partition == "p0" and started > revoked_at]
    assert late == [], f"{len(late)} changes of the revoked partition reached a handler after the revoke"
    assert all(at < revoked_at for at, partition, _ in old_source.commits if partition == "p0")
    snapshot = old.snapshot()
    assert snapshot.records_dropped > 0 and "p0" not in snapshot.checkpoints

    # The new owner reads p0 from the last checkpoint and delivers the rest.
    new_calls: list[SegmentChange] = []

    async def new_handler(change: SegmentChange) -> None:
        new_calls.append(change)

    new_source = ScriptedSource({"p0": partitions["p0"]}, start_after={"p0": committed_p0})
    new = Pipeline(new_source, store, Router([FunctionHandler(new_handler, name="h")], dead, retry=FAST), dead,
                   settings=PipelineSettings(checkpoint_interval_s=0.05))
    run = asyncio.create_task(new.run())
    try:
        new_source.push_all("p0")
        await poll(lambda: new.records_finished == len(partitions["p0"]) - committed_p0, "the new owner's run")
    finally:
        new.stop()
        await asyncio.wait_for(run, 30)
    assert new_source.commits[-1][1:] == ("p0", len(partitions["p0"]))
    handled = Counter(shape(change) for _, change in calls) + Counter(shape(change) for change in new_calls)
    assert set(handled) == set(truth.changes)  # nothing lost across the hand-over
    assert dead.entries == []


async def test_records_of_a_revoked_assignment_still_queued_in_the_source_are_dropped_unread() -> None:
    records = list(generate(StreamSpec(seed=72, profiles=40, records=300)))
    seen: list[SegmentChange] = []

    async def handler(change: SegmentChange) -> None:
        seen.append(change)

    source = ScriptedSource({"p0": records})
    dead = MemoryDeadLetter()
    pipeline = Pipeline(source, MemoryStore(), Router([FunctionHandler(handler, name="h")], dead, retry=FAST), dead,
                        settings=PipelineSettings(checkpoint_interval_s=3600))
    run = asyncio.create_task(pipeline.run())
    try:
        await poll(lambda: source.listener is not None, "the source to start")
        source.push("p0", 100)  # read under epoch 1 ...
        source.revoke("p0")  # ... revoked before the pipeline took the batch
        await poll(lambda: pipeline.snapshot().records_dropped == 100, "the stale batch to be dropped")
    finally:
        pipeline.stop()
        await asyncio.wait_for(run, 30)
    assert seen == [] and pipeline.records_read == 0 and source.commits == []


async def test_a_new_assignment_without_a_revoke_ends_the_old_one() -> None:
    """A source that assigns a partition again (it re-took a lease it had lost): what was read
    under the old assignment is dropped, and the new one starts a fresh watermark."""
    pipeline = Pipeline(ScriptedSource({"p0": []}), MemoryStore(), Router([], MemoryDeadLetter()), MemoryDeadLetter())
    pipeline.assigned("p0", 1)
    first: Any = pipeline._partitions["p0"]
    pipeline.assigned("p0", 2)
    assert first.revoked and pipeline._partitions["p0"].epoch == 2 and not pipeline._partitions["p0"].revoked
    pipeline.revoked("p0")
    pipeline.revoked("p0")  # twice: harmless
    assert "p0" not in pipeline._partitions
