"""The DynamoDB lease table and the lease coordinator, against dynalite.

Timing tests use short leases (0.5 s, renewed every 0.15 s) and never sleep a fixed time to
wait for something: they poll the expected state with a deadline. Negative assertions ("child
not taken yet") drive the balancer by hand (``balance_once``) instead of waiting.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiobotocore.session import get_session

from segment_relay.consumer.sources.kinesis.coordinator import LeaseCoordinator
from segment_relay.consumer.sources.kinesis.leases import Lease, LeaseTable
from segment_relay.consumer.sources.kinesis.settings import SHARD_END, KinesisSettings
from segment_relay.testing.aws import Emulator

LEASE = 0.5
RENEW = 0.15
SETTINGS = KinesisSettings(stream="segments", lease_duration_s=LEASE, renew_interval_s=RENEW)
# Scheduling and scan/write latency on a busy CI box, on top of the protocol's own bound.
SLACK = 0.3
SETUP_S = 30.0  # waits that only reach a test's starting point


@pytest.fixture
async def ddb(dynalite: Emulator) -> AsyncIterator[Any]:
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as client:
        yield client


@pytest.fixture
async def table(ddb: Any) -> AsyncIterator[LeaseTable]:
    leases = LeaseTable(ddb, f"leases-{uuid.uuid4().hex[:12]}")
    await leases.ensure_table()
    yield leases
    await ddb.delete_table(TableName=leases.table_name)


class Recorder:
    """on_acquired / on_lost / on_handoff callbacks that remember what happened. A hand-over
    is answered by releasing the lease at once, unless ``answer_handoffs`` is False (an owner
    that never answers, like an older version)."""

    def __init__(self) -> None:
        self.acquired: list[str] = []
        self.lost: list[str] = []
        self.handed_off: list[str] = []
        self.answer_handoffs = True
        self.coordinator: LeaseCoordinator | None = None

    async def on_handoff(self, shard_id: str) -> None:
        self.handed_off.append(shard_id)
        if self.answer_handoffs and self.coordinator is not None:
            await self.coordinator.release(shard_id)

    async def on_acquired(self, lease: Lease) -> None:
        self.acquired.append(lease.shard_id)

    def on_lost(self, shard_id: str) -> None:  # a plain function works too
        self.lost.append(shard_id)


@pytest.fixture
async def fleet(table: LeaseTable) -> AsyncIterator[Callable[..., Awaitable[tuple[LeaseCoordinator, Recorder]]]]:
    """Factory of started coordinators on the test's table; all are stopped at the end."""
    made: list[LeaseCoordinator] = []

    async def make(
        worker: str, settings: KinesisSettings = SETTINGS, start: bool = True
    ) -> tuple[LeaseCoordinator, Recorder]:
        recorder = Recorder()
        coordinator = LeaseCoordinator(
            table, settings, worker, on_acquired=recorder.on_acquired, on_lost=recorder.on_lost,
            on_handoff=recorder.on_handoff,
        )
        recorder.coordinator = coordinator
        made.append(coordinator)
        if start:
            await coordinator.start()
        return coordinator, recorder

    yield make
    for coordinator in made:
        await coordinator.stop(release=False)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll ``check`` until it is true; fail after ``within`` seconds. Returns the time taken."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within:.2f} s: {what}")
        await asyncio.sleep(0.02)


async def owners(table: LeaseTable) -> dict[str, str | None]:
    return {lease.shard_id: lease.owner for lease in await table.list_leases()}


def balanced(coordinators: list[LeaseCoordinator], table_owners: dict[str, str | None]) -> bool:
    """Every lease owned, each held set agrees with the table, and counts differ by at most one."""
    if any(owner is None for owner in table_owners.values()):
        return False
    for coordinator in coordinators:
        in_table = {shard for shard, owner in table_owners.items() if owner == coordinator.worker_id}
        if set(coordinator.held) != in_table:
            return False
    counts = [len(coordinator.held) for coordinator in coordinators]
    return sum(counts) == len(table_owners) and max(counts) - min(counts) <= 1


async def create_leases(table: LeaseTable, count: int) -> list[str]:
    shard_ids = [f"shardId-{index:012d}" for index in range(count)]
    for shard_id in shard_ids:
        assert await table.create_if_missing(shard_id, [])
    return shard_ids


# -- LeaseTable -----------------------------------------------------------------------------------


async def test_ensure_table_tolerates_concurrent_creators_and_existing_table(ddb: Any) -> None:
    name = f"leases-{uuid.uuid4().hex[:12]}"
    await asyncio.gather(*(LeaseTable(ddb, name).ensure_table() for _ in range(3)))
    await LeaseTable(ddb, name).ensure_table()  # already there
    description = (await ddb.describe_table(TableName=name))["Table"]
    assert description["TableStatus"] == "ACTIVE"
    assert description["KeySchema"] == [{"AttributeName": "leaseKey", "KeyType": "HASH"}]
    await ddb.delete_table(TableName=name)


async def test_create_if_missing_creates_once_and_one_scan_shows_plain_attributes(table: LeaseTable, ddb: Any) -> None:
    assert await table.create_if_missing("shardId-1", [])
    assert await table.create_if_missing("shardId-2", ["shardId-0", "shardId-1"])
    assert not await table.create_if_missing("shardId-1", ["ignored"])
    lease = await table.get("shardId-1")
    assert lease is not None
    taken = await table.take(lease, "worker-a")
    assert taken is not None
    assert await table.checkpoint(taken, "worker-a", "49590338271490256608559692538361571095921575989136588898")

    items = {item["leaseKey"]["S"]: item for item in (await ddb.scan(TableName=table.table_name))["Items"]}
    assert items["shardId-1"]["leaseOwner"] == {"S": "worker-a"}
    assert items["shardId-1"]["leaseCounter"] == {"N": "1"}
    assert items["shardId-1"]["checkpoint"] == {"S": "49590338271490256608559692538361571095921575989136588898"}
    assert items["shardId-1"]["lastRenewedAt"]["S"].endswith("Z")
    assert items["shardId-1"]["ownerSwitchesSinceCheckpoint"] == {"N": "0"}
    assert items["shardId-2"]["parentShardIds"] == {"L": [{"S": "shardId-0"}, {"S": "shardId-1"}]}
    assert "leaseOwner" not in items["shardId-2"] and "checkpoint" not in items["shardId-2"]

    free = await table.get("shardId-2")
    assert free == Lease("shardId-2", owner=None, counter=0, checkpoint=None, parent_shard_ids=["shardId-0", "shardId-1"])


async def test_take_renew_checkpoint_release(table: LeaseTable) -> None:
    await table.create_if_missing("s1", [])
    free = await table.get("s1")
    assert free is not None and free.is_free

    mine = await table.take(free, "a")
    assert mine is not None
    assert (mine.owner, mine.counter, mine.owner_switches) == ("a", 1, 1)
    assert await table.take(free, "b") is None  # stale view: counter moved

    renewed = await table.renew(mine)
    assert renewed is not None and renewed.counter == 2 and renewed.owner == "a"
    assert await table.renew(mine) is None  # stale counter
    assert renewed.last_renewed_at is not None

    assert await table.checkpoint("s1", "a", "100")
    assert not await table.checkpoint("s1", "b", "200")  # not the owner
    after = await table.get("s1")
    assert after is not None and after.checkpoint == "100" and after.owner_switches == 0
    assert after.counter == 2  # a checkpoint never races with renewals

    assert not await table.release(mine)  # stale counter
    assert await table.release(renewed)
    released = await table.get("s1")
    assert released is not None
    assert (released.owner, released.counter, released.checkpoint) == (None, 3, "100")
    assert await table.renew(renewed) is None
    assert not await table.checkpoint("s1", "a", "300")  # a released lease takes no checkpoints

    again = await table.take(released, "a")  # free leases are taken without waiting
    assert again is not None and again.counter == 4 and again.owner_switches == 1


async def test_checkpoint_and_renew_of_a_missing_lease_fail_quietly(table: LeaseTable) -> None:
    assert not await table.checkpoint("nope", "a", "1")
    assert await table.renew(Lease("nope", owner="a", counter=3)) is None
    assert await table.take(Lease("nope"), "a") is None
    assert not await table.release(Lease("nope", owner="a", counter=3))


async def test_steal_makes_the_old_owner_lose_renewal_checkpoint_and_release(table: LeaseTable) -> None:
    await table.create_if_missing("s1", [])
    free = await table.get("s1")
    assert free is not None
    held_by_a = await table.take(free, "a")
    assert held_by_a is not None
    assert await table.checkpoint(held_by_a, "a", "10")

    seen_by_b = await table.get("s1")
    assert seen_by_b is not None
    stolen = await table.take(seen_by_b, "b")
    assert stolen is not None
    assert (stolen.owner, stolen.counter, stolen.owner_switches, stolen.checkpoint) == ("b", 2, 1, "10")

    assert await table.renew(held_by_a) is None
    assert not await table.checkpoint("s1", "a", "11")
    assert not await table.release(held_by_a)
    final = await table.get("s1")
    assert final is not None and final.owner == "b" and final.checkpoint == "10"


async def test_taking_your_own_stale_lease_does_not_count_as_an_owner_switch(table: LeaseTable) -> None:
    await table.create_if_missing("s1", [])
    free = await table.get("s1")
    assert free is not None
    first = await table.take(free, "a")
    assert first is not None and first.owner_switches == 1
    again = await table.take(first, "a")  # e.g. a restart with the same worker id
    assert again is not None and again.owner_switches == 1 and again.counter == 2


@pytest.mark.parametrize("seen_owner", [None, "dead-worker"])
async def test_racing_writers_exactly_one_wins(table: LeaseTable, seen_owner: str | None) -> None:
    await table.create_if_missing("s1", [])
    start = await table.get("s1")
    assert start is not None
    if seen_owner is not None:
        start = await table.take(start, seen_owner)
        assert start is not None
    for _round in range(5):
        results = await asyncio.gather(*(table.take(start, f"w{index}") for index in range(8)))
        winners = [result for result in results if result is not None]
        assert len(winners) == 1
        current = await table.get("s1")
        assert current is not None
        assert (current.owner, current.counter) == (winners[0].owner, start.counter + 1)
        start = current


async def test_list_leases_follows_pagination(ddb: Any, table: LeaseTable) -> None:
    class TwoPerPage:
        def __init__(self, client: Any) -> None:
            self.client = client
            self.pages = 0

        async def scan(self, **kwargs: Any) -> Any:
            self.pages += 1
            return await self.client.scan(Limit=2, **kwargs)

    await create_leases(table, 5)
    paged = TwoPerPage(ddb)
    leases = await LeaseTable(paged, table.table_name).list_leases()
    assert sorted(lease.shard_id for lease in leases) == [f"shardId-{index:012d}" for index in range(5)]
    assert paged.pages >= 3


# -- LeaseCoordinator: balancing ------------------------------------------------------------------


@pytest.mark.parametrize(("workers", "leases"), [(2, 4), (3, 6), (3, 4), (2, 5)])
async def test_coordinators_split_leases_evenly_within_two_lease_periods(
    table: LeaseTable, fleet: Any, workers: int, leases: int
) -> None:
    await create_leases(table, leases)
    coordinators = [(await fleet(f"worker-{index}"))[0] for index in range(workers)]

    async def even() -> bool:
        return balanced(coordinators, await owners(table))

    await eventually(even, 2 * LEASE + SLACK, f"{leases} leases split over {workers} workers")
    # ... and it stays that way: nobody keeps stealing once the split is even.
    settled = {coordinator.worker_id: set(coordinator.held) for coordinator in coordinators}
    for coordinator in coordinators:
        await coordinator.balance_once()
    assert {coordinator.worker_id: set(coordinator.held) for coordinator in coordinators} == settled


async def test_a_new_coordinator_gets_its_share_handed_over_within_two_lease_periods(
    table: LeaseTable, fleet: Any
) -> None:
    shard_ids = await create_leases(table, 4)
    first, first_events = await fleet("worker-a")
    await eventually(lambda: _held_count(first, 4), 2 * LEASE + SLACK, "the only worker takes all 4 leases")
    assert sorted(first_events.acquired) == shard_ids

    second, second_events = await fleet("worker-b")
    joined = time.monotonic()

    async def split() -> bool:
        return balanced([first, second], await owners(table)) and len(second.held) == 2

    await eventually(split, 2 * LEASE + SLACK, "the newcomer holds 2 of 4 leases")
    assert time.monotonic() - joined <= 2 * LEASE + SLACK
    assert sorted(second_events.acquired) == sorted(second.held)
    # Asked, not stolen: the old owner handed each over (and so lost none), and the newcomer
    # took them free, as one owner switch each.
    assert sorted(first_events.handed_off) == sorted(second.held) and first_events.lost == []
    leases = {lease.shard_id: lease for lease in await table.list_leases()}
    assert all(leases[shard].owner_switches == 2 and leases[shard].handoff_to is None for shard in second.held)


async def test_an_owner_that_does_not_answer_a_hand_over_has_the_lease_stolen_after_a_lease_duration(
    table: LeaseTable, fleet: Any
) -> None:
    await create_leases(table, 2)
    first, first_events = await fleet("worker-a")
    first_events.answer_handoffs = False  # an older version, or one stuck in its drain
    await eventually(lambda: _held_count(first, 2), 2 * LEASE + SLACK, "the only worker takes both leases")
    second, second_events = await fleet("worker-b")
    asked = time.monotonic()
    await eventually(lambda: _held_count(second, 1), 3 * LEASE + SLACK, "the newcomer steals its share")
    assert time.monotonic() - asked >= LEASE  # it waited a lease duration for the hand-over first
    assert first_events.handed_off == list(second.held)  # asked first...
    await eventually(lambda: _is(first_events.lost == list(second.held)), LEASE + SLACK, "...then stolen: on_lost")


async def test_a_crashed_coordinators_leases_are_taken_within_two_lease_periods(
    table: LeaseTable, fleet: Any
) -> None:
    await create_leases(table, 6)
    coordinators = [(await fleet(f"worker-{index}"))[0] for index in range(3)]

    async def even() -> bool:
        return balanced(coordinators, await owners(table))

    # Set-up, not the bound under test: three coordinators starting together take a few
    # balancing passes to split the leases (a loaded CI machine once needed more than 1.3 s).
    await eventually(even, SETUP_S, "6 leases split over 3 workers")
    crashed, survivors = coordinators[0], coordinators[1:]
    orphaned = set(crashed.held)
    await crashed.stop(release=False)  # a crash: nothing released, the leases must expire
    crashed_at = time.monotonic()
    table_owners = await owners(table)
    assert {shard for shard, owner in table_owners.items() if owner == crashed.worker_id} == orphaned

    async def taken_over() -> bool:
        return balanced(survivors, await owners(table))

    # Bound: a survivor first sees the last counter at most one balancing pass after the last
    # renewal, and calls it expired one lease duration later: under 2 lease periods.
    await eventually(taken_over, 2 * LEASE + SLACK, "survivors hold every lease")
    elapsed = time.monotonic() - crashed_at
    assert elapsed >= LEASE - RENEW  # not before the lease could have expired
    assert all(len(survivor.held) == 3 for survivor in survivors)


async def test_graceful_stop_hands_leases_over_before_a_lease_duration(table: LeaseTable, fleet: Any) -> None:
    settings = KinesisSettings(stream="segments", lease_duration_s=1.0, renew_interval_s=0.3)
    await create_leases(table, 4)
    leaving, _ = await fleet("worker-a", settings)
    staying, staying_events = await fleet("worker-b", settings)

    async def even() -> bool:
        return balanced([leaving, staying], await owners(table))

    await eventually(even, 2 * settings.lease_duration_s + SLACK, "4 leases split over 2 workers")
    handed = set(leaving.held)
    await leaving.stop(release=True)
    stopped_at = time.monotonic()
    assert leaving.held == {}
    table_owners = await owners(table)
    assert all(table_owners[shard] is None for shard in handed)  # free at once

    async def all_with_staying() -> bool:
        return set(staying.held) == set(table_owners) and set((await owners(table)).values()) == {"worker-b"}

    await eventually(all_with_staying, settings.lease_duration_s, "the remaining worker holds all 4")
    assert time.monotonic() - stopped_at < settings.lease_duration_s
    assert handed <= set(staying_events.acquired)


async def test_stop_without_release_keeps_the_leases_owned_until_they_expire(table: LeaseTable, fleet: Any) -> None:
    await create_leases(table, 2)
    coordinator, _ = await fleet("worker-a")
    await eventually(lambda: _held_count(coordinator, 2), 2 * LEASE + SLACK, "takes both leases")
    await coordinator.stop(release=False)
    assert set((await owners(table)).values()) == {"worker-a"}
    # A restarted worker with the same id takes its old leases back at once (no expiry wait).
    restarted, events = await fleet("worker-a", start=False)
    await restarted.balance_once()
    assert len(restarted.held) == 2 and len(events.acquired) == 2


# -- LeaseCoordinator: checkpoints, loss, release -------------------------------------------------


async def test_checkpoint_only_while_held_and_loss_is_reported(table: LeaseTable, fleet: Any) -> None:
    await create_leases(table, 1)
    coordinator, events = await fleet("worker-a")
    await eventually(lambda: _held_count(coordinator, 1), 2 * LEASE + SLACK, "takes the lease")
    [shard] = coordinator.held
    assert await coordinator.checkpoint(shard, "42")
    assert coordinator.held[shard].checkpoint == "42"
    assert not await coordinator.checkpoint("shardId-unknown", "1")

    # Someone steals it directly in the table: the next renewal notices and reports the loss.
    current = await table.get(shard)
    assert current is not None
    assert await table.take(current, "thief") is not None
    await eventually(lambda: _is(events.lost == [shard]), 2 * RENEW + SLACK, "on_lost after a steal")
    assert shard not in coordinator.held
    assert not await coordinator.checkpoint(shard, "43")
    stored = await table.get(shard)
    assert stored is not None and stored.owner == "thief" and stored.checkpoint == "42"


async def test_a_failed_checkpoint_reports_the_loss(table: LeaseTable, fleet: Any) -> None:
    await create_leases(table, 1)
    coordinator, events = await fleet("worker-a", start=False)
    await coordinator.balance_once()
    [shard] = coordinator.held
    current = await table.get(shard)
    assert current is not None and await table.take(current, "thief") is not None
    assert not await coordinator.checkpoint(shard, "7")  # no renewal ran: the checkpoint finds out
    assert events.lost == [shard] and coordinator.held == {}


async def test_release_of_one_shard_frees_it_at_once(table: LeaseTable, fleet: Any) -> None:
    await create_leases(table, 2)
    coordinator, events = await fleet("worker-a", start=False)
    await coordinator.balance_once()
    assert len(coordinator.held) == 2
    shard = sorted(coordinator.held)[0]
    assert await coordinator.release(shard)
    assert shard not in coordinator.held and events.lost == []
    released = await table.get(shard)
    assert released is not None and released.owner is None
    assert not await coordinator.release(shard)  # not held any more
    other, _ = await fleet("worker-b", start=False)
    await other.balance_once()  # free: taken without waiting for any expiry
    assert shard in other.held


async def test_renewal_keeps_the_counter_moving(table: LeaseTable, fleet: Any) -> None:
    await create_leases(table, 1)
    coordinator, _ = await fleet("worker-a")
    await eventually(lambda: _held_count(coordinator, 1), 2 * LEASE + SLACK, "takes the lease")
    [shard] = coordinator.held
    first = coordinator.held[shard].counter

    async def renewed_twice() -> bool:
        lease = await table.get(shard)
        return lease is not None and lease.counter >= first + 2 and lease.owner == "worker-a"

    await eventually(renewed_twice, 3 * RENEW + SLACK, "two renewals")


async def test_on_acquired_failure_releases_the_lease(table: LeaseTable) -> None:
    await create_leases(table, 1)
    lost: list[str] = []

    def broken(lease: Lease) -> None:
        raise RuntimeError("reader failed to start")

    coordinator = LeaseCoordinator(table, SETTINGS, "worker-a", on_acquired=broken, on_lost=lost.append)
    await coordinator.balance_once()
    assert coordinator.held == {}
    [lease] = await table.list_leases()
    assert lease.owner is None and lease.counter == 2  # taken, then handed back


# -- resharding: parents before children ----------------------------------------------------------


def _shard(shard_id: str, parent: str | None = None, adjacent: str | None = None) -> dict[str, Any]:
    shard: dict[str, Any] = {"ShardId": shard_id, "HashKeyRange": {}, "SequenceNumberRange": {}}
    if parent:
        shard["ParentShardId"] = parent
    if adjacent:
        shard["AdjacentParentShardId"] = adjacent
    return shard


async def test_children_wait_for_their_parents_to_reach_shard_end(table: LeaseTable, fleet: Any) -> None:
    # shard-0 split into 1 and 2, which were merged into 3; shard-9 is an unrelated open shard.
    shards = [_shard("shard-3", "shard-1", "shard-2"), _shard("shard-1", "shard-0"), _shard("shard-2", "shard-0"),
              _shard("shard-0"), _shard("shard-9")]
    coordinator, events = await fleet("worker-a", start=False)
    assert await coordinator.sync_shards(shards) == ["shard-0", "shard-1", "shard-2", "shard-3", "shard-9"]
    assert await coordinator.sync_shards(shards) == []  # idempotent
    leases = {lease.shard_id: lease for lease in await table.list_leases()}
    assert leases["shard-3"].parent_shard_ids == ["shard-1", "shard-2"]

    for _pass in range(3):
        await coordinator.balance_once()
    assert set(coordinator.held) == {"shard-0", "shard-9"}

    assert await coordinator.mark_shard_end("shard-0")
    assert "shard-0" not in coordinator.held
    finished = await table.get("shard-0")
    assert finished is not None and finished.checkpoint == SHARD_END and finished.owner is None
    await coordinator.balance_once()
    assert set(coordinator.held) == {"shard-1", "shard-2", "shard-9"}

    assert await coordinator.mark_shard_end("shard-1")
    for _pass in range(2):
        await coordinator.balance_once()
    assert "shard-3" not in coordinator.held  # one of its two parents is still open

    assert await coordinator.mark_shard_end("shard-2")
    await coordinator.balance_once()
    assert set(coordinator.held) == {"shard-3", "shard-9"}
    assert set(events.acquired[:2]) == {"shard-0", "shard-9"}
    assert set(events.acquired[2:4]) == {"shard-1", "shard-2"} and events.acquired[4:] == ["shard-3"]
    assert events.lost == []


async def test_children_are_picked_up_by_running_coordinators_after_the_parent_ends(
    table: LeaseTable, fleet: Any
) -> None:
    coordinator_a, _ = await fleet("worker-a")
    coordinator_b, _ = await fleet("worker-b")
    await coordinator_a.sync_shards([_shard("shard-0"), _shard("shard-1", "shard-0"), _shard("shard-2", "shard-0")])

    async def parent_taken() -> bool:
        return "shard-0" in coordinator_a.held or "shard-0" in coordinator_b.held

    await eventually(parent_taken, 2 * LEASE + SLACK, "the parent is taken")
    holder = coordinator_a if "shard-0" in coordinator_a.held else coordinator_b
    for coordinator in (coordinator_a, coordinator_b):  # extra passes: children stay free
        await coordinator.balance_once()
    table_owners = await owners(table)
    assert table_owners["shard-1"] is None and table_owners["shard-2"] is None

    assert await holder.mark_shard_end("shard-0")

    async def children_split() -> bool:
        current = await owners(table)
        return current["shard-0"] is None and balanced([coordinator_a, coordinator_b], {
            shard: owner for shard, owner in current.items() if shard != "shard-0"
        })

    await eventually(children_split, 2 * LEASE + SLACK, "each worker reads one child")


async def test_a_child_whose_parent_lease_is_gone_is_eligible(table: LeaseTable, fleet: Any) -> None:
    coordinator, _ = await fleet("worker-a", start=False)
    await table.create_if_missing("shard-5", ["shard-trimmed-long-ago"])
    await coordinator.balance_once()
    assert set(coordinator.held) == {"shard-5"}


async def _held_count(coordinator: LeaseCoordinator, count: int) -> bool:
    return len(coordinator.held) == count


async def _is(value: bool) -> bool:
    return value
