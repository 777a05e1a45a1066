"""Profile claims: replicas sharing a store never diff one profile at the same time.

Two pipelines in one process share one MemoryStore here, as two replicas share DynamoDB or redis
(the race between real replicas on Kinesis and DynamoDB is in test_kinesis_replicas.py; each
store's claims are in test_state.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import orjson
from test_pipeline import record

from segment_relay import SegmentChange
from segment_relay.consumer.claims import ProfileClaimer
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.consumer.identity import IdentityResolver
from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
from segment_relay.consumer.state import MemoryStore
from segment_relay.handlers.api import FunctionHandler
from segment_relay.handlers.router import Router
from segment_relay.testing.pipeline import FAST_RETRY, RecordsSource

DEADLINE_S = 20
Handler = Callable[[SegmentChange], Awaitable[None]]


class CountingStore(MemoryStore):
    """A MemoryStore that counts its claim requests."""

    def __init__(self) -> None:
        super().__init__()
        self.claim_requests: list[list[str]] = []
        self.release_requests: list[list[str]] = []

    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]:
        self.claim_requests.append(sorted(keys))
        return await super().claim_profiles(keys, owner, ttl_s)

    async def release_profiles(self, keys: Collection[str], owner: str) -> None:
        self.release_requests.append(sorted(keys))
        await super().release_profiles(keys, owner)


def replica(store: MemoryStore, records: list[bytes], handler: Handler, owner: str, *,
            link: bool = False, ttl_s: float = 60.0, batch_size: int = 500) -> Pipeline:
    dead = MemoryDeadLetter()
    return Pipeline(
        RecordsSource(records, partition=f"shard-{owner}", batch_size=batch_size), store,
        Router([FunctionHandler(handler)], dead, retry=FAST_RETRY), dead,
        identity=IdentityResolver(store, ["*"]) if link else None,
        claims=ProfileClaimer(store, ttl_s, owner=owner),
        settings=PipelineSettings(checkpoint_interval_s=3600.0),
    )


async def test_a_profile_another_replica_is_working_on_waits_and_then_fires_nothing_twice() -> None:
    store = MemoryStore()
    exports = [record("p", ("gold", "realized", 1)), record("q", ("gold", "realized", 1))]
    fired: list[tuple[str, str]] = []
    a_is_handling, a_may_return = asyncio.Event(), asyncio.Event()

    async def slow(change: SegmentChange) -> None:  # replica a: stuck in its handler for p
        fired.append(("a", change.profile_key))
        if change.profile_key == "ecid:p":
            a_is_handling.set()
            await a_may_return.wait()

    async def quick(change: SegmentChange) -> None:
        fired.append(("b", change.profile_key))

    a = asyncio.create_task(replica(store, exports[:1], slow, "a").run())
    await asyncio.wait_for(a_is_handling.wait(), DEADLINE_S)
    b_replica = replica(store, exports, quick, "b")
    b = asyncio.create_task(b_replica.run())
    # b finishes q, which nobody else holds, while p waits for a.
    async def q_done() -> None:
        while ("b", "ecid:q") not in fired:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(q_done(), DEADLINE_S)
    assert ("b", "ecid:p") not in fired and not b.done()
    assert b_replica.snapshot().records_finished == 1
    a_may_return.set()  # a saves p's state and gives its claim back
    await asyncio.wait_for(asyncio.gather(a, b), DEADLINE_S)
    assert Counter(key for _, key in fired) == {"ecid:p": 1, "ecid:q": 1}
    assert b_replica.claims is not None and b_replica.claims.waits >= 1
    assert store._claims == {}  # both gave everything back


async def test_a_claim_left_by_a_dead_replica_is_waited_for_until_it_expires() -> None:
    store = MemoryStore()
    assert await store.claim_profiles(["ecid:p"], "dead", 0.3) == {"ecid:p"}
    fired: list[str] = []

    async def handler(change: SegmentChange) -> None:
        fired.append(change.profile_key)

    await asyncio.wait_for(replica(store, [record("p", ("gold", "realized", 1))], handler, "alive").run(),
                           DEADLINE_S)
    assert fired == ["ecid:p"]


async def test_the_next_records_of_a_busy_profile_need_no_new_claim_request() -> None:
    store = CountingStore()
    fired: list[str] = []

    async def handler(change: SegmentChange) -> None:
        fired.append(change.segment_id)

    # One record per batch: p's records form consecutive steps, each one taking the claim back
    # from the one before before the sweep frees it (or claiming it again after).
    exports = [record("p", (f"s{i}", "realized", i)) for i in range(20)]
    await asyncio.wait_for(replica(store, exports, handler, "me", batch_size=1).run(), DEADLINE_S)
    assert fired == [f"s{i}" for i in range(20)]
    assert len(store.claim_requests) <= 20 and all(keys == ["ecid:p"] for keys in store.claim_requests)
    assert store._claims == {}


async def test_the_claimer_counts_steps_renews_what_is_in_use_and_frees_everything_at_close() -> None:
    store = CountingStore()
    claimer = ProfileClaimer(store, ttl_s=0.3, owner="me")
    sweep = asyncio.create_task(claimer.run())
    try:
        assert await claimer.take(["p", "q"]) == {"p", "q"}
        assert await claimer.take(["p"]) == {"p"}  # a second step (a merge) using p
        assert store.claim_requests == [["p", "q"]]  # held already: no request
        claimer.give_back(["p"])
        claimer.give_back(["q"])

        async def q_freed() -> None:
            while "q" in store._claims:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(q_freed(), DEADLINE_S)
        assert "p" in store._claims  # still used by one step

        async def renewed() -> None:  # p outlives its 0.3 s TTL: renewed every 0.1 s
            while len(store.claim_requests) < 3:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(renewed(), DEADLINE_S)
        assert await store.claim_profiles(["p"], "other", 60) == set()
        assert await claimer.take(["q"]) == {"q"}
    finally:
        sweep.cancel()
        await claimer.close()
    assert store._claims == {}


async def test_a_merge_waits_until_it_holds_both_profiles() -> None:
    store = CountingStore()
    fired: list[tuple[str, str]] = []

    async def handler(change: SegmentChange) -> None:
        fired.append((change.change.value, change.profile_key))

    def both(segment: str) -> bytes:  # one export carrying both profiles' identities: Adobe merged them
        return orjson.dumps({"identityMap": {"ecid": [{"id": "a"}], "phone": [{"id": "b"}]},
                             "segmentMembership": {"ups": {segment: {"status": "realized",
                                                                     "lastQualificationTime": "2026-11-01T10:00:00Z"}}}})

    await replica(store, [record("a", ("gold", "realized", 1))], handler, "me", link=True).run()
    await replica(store, [orjson.dumps({"identityMap": {"phone": [{"id": "b"}]}, "segmentMembership": {
        "ups": {"silver": {"status": "realized", "lastQualificationTime": "2026-11-01T10:00:00Z"}}}})],
        handler, "me", link=True).run()
    assert await store.claim_profiles(["phone:b"], "other", 0.3) == {"phone:b"}  # another replica's, then it dies
    await asyncio.wait_for(replica(store, [both("gold")], handler, "me", link=True).run(), DEADLINE_S)
    assert len(fired) == 2  # nothing new: gold was ecid:a's already (a plain handler gets no merge events)
    assert await store.aliases_of("ecid:a") == ["ecid:a", "phone:b"]
    assert {segment for _, segment in await store.load("ecid:a")} == {"gold", "silver"}
    # Asked for whole, refused while the other replica held phone:b, asked again until it expired.
    merging = len(store.claim_requests) - store.claim_requests.index(["ecid:a", "phone:b"])
    assert merging >= 2, store.claim_requests
    assert store._claims == {}


async def test_a_profile_merged_away_by_another_replica_meanwhile_sends_its_records_to_the_survivor() -> None:
    # Replica b looks a record up while replica a is merging its profile (phone:b) into ecid:a,
    # and waits for a's claim. When a is done, phone:b's state is gone and it redirects to
    # ecid:a: b's record must be diffed there (where its gold already is), not against nothing.
    store = MemoryStore()
    fired: list[tuple[str, str, str]] = []

    def export(identities: dict[str, str], segment: str) -> bytes:
        return orjson.dumps({"identityMap": {ns: [{"id": i}] for ns, i in identities.items()},
                             "segmentMembership": {"ups": {segment: {
                                 "status": "realized", "lastQualificationTime": "2026-11-01T10:00:00Z"}}}})

    async def setup(change: SegmentChange) -> None:
        pass

    await replica(store, [export({"ecid": "a"}, "silver")], setup, "setup", link=True).run()
    await replica(store, [export({"phone": "b"}, "gold")], setup, "setup", link=True).run()
    a_is_merging, a_may_return = asyncio.Event(), asyncio.Event()

    async def merging(change: SegmentChange) -> None:  # replica a, holding ecid:a and phone:b
        fired.append(("a", change.profile_key, change.segment_id))
        a_is_merging.set()
        await a_may_return.wait()

    async def other(change: SegmentChange) -> None:
        fired.append(("b", change.profile_key, change.segment_id))

    a = asyncio.create_task(replica(store, [export({"ecid": "a", "phone": "b"}, "bronze")], merging, "a",
                                    link=True).run())
    await asyncio.wait_for(a_is_merging.wait(), DEADLINE_S)
    b_replica = replica(store, [export({"phone": "b"}, "gold")], other, "b", link=True)  # a re-export
    b = asyncio.create_task(b_replica.run())

    async def b_waits() -> None:
        while b_replica.claims is None or not b_replica.claims.waits:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(b_waits(), DEADLINE_S)
    a_may_return.set()  # a saves the merged ecid:a, redirects phone:b to it and gives its claims back
    await asyncio.wait_for(asyncio.gather(a, b), DEADLINE_S)
    assert fired == [("a", "ecid:a", "bronze")]  # b's gold was known: nothing fired again
    assert await store.load("phone:b") == {}
    assert {segment for _, segment in await store.load("ecid:a")} == {"gold", "silver", "bronze"}
    assert b_replica.snapshot().records_finished == 1
    assert store._claims == {}


def test_the_claim_metrics_are_exported_and_documented() -> None:
    from test_deploy import exported_metric_names

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in ("segment_relay_profile_claims_held", "segment_relay_profile_claim_waits_total"):
        assert name in exported_metric_names()
        assert f"`{name}`" in readme


async def test_the_sweep_ends_when_stopped_even_as_it_is_woken() -> None:
    # Python 3.11's wait_for can swallow a cancel that arrives as the awaited event is set; a
    # swallowed cancel once kept a relay from exiting. stop() ends the loop whatever happens.
    store = MemoryStore()
    claimer = ProfileClaimer(store, ttl_s=60.0, owner="me")
    sweep = asyncio.create_task(claimer.run())
    await asyncio.sleep(0)
    assert await claimer.take(["p"]) == {"p"}
    claimer.give_back(["p"])  # wakes the sweep...
    claimer.stop()
    sweep.cancel()  # ...as it is cancelled
    await asyncio.wait_for(asyncio.gather(sweep, return_exceptions=True), DEADLINE_S)
    await claimer.close()
    assert store._claims == {}
