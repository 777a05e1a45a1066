"""The fake platform's export simulator: enabling a mapped destination flow makes Adobe-shaped
profile exports arrive in the project's Event Hubs emulator (real azure-eventhub producer) or in
kinesalite (real aiobotocore client), and the simulation's truth is exactly what the delivered
records mean under ``expected_changes``."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson
import pytest
from aiobotocore.session import get_session
from support import poll
from test_platform_fake import A1, A2, A3, FS, SAS_KEY, Api, provision

from segment_relay.testing.aws import Emulator
from segment_relay.testing.eventhubs.server import EventHubsEmulator
from segment_relay.testing.exports import Change, StreamTruth, expected_changes
from segment_relay.testing.kinesis import create_stream
from segment_relay.testing.platform import DEFAULT_AUDIENCES, ExportSettings, FakePlatform, SimulationFailed

HUB = "exports"
NAMES = {a.id: a.name for a in DEFAULT_AUDIENCES}
ATTRIBUTES = ("person.name.lastName", "personalEmail.address", "loyalty.points")


@pytest.fixture
async def emulator() -> AsyncIterator[EventHubsEmulator]:
    async with EventHubsEmulator({HUB: 4}) as server:
        yield server


def hub_records(emulator: EventHubsEmulator) -> list[bytes]:
    """Every event body, partition after partition (each partition in its own order)."""
    return [b"".join(m.data) for pid in "0123" for m in emulator.events(HUB, pid)]


def per_profile(changes: Iterable[Change]) -> dict[str, list[Change]]:
    grouped: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        grouped[change[0]].append(change)
    return dict(grouped)


def assert_same_truth(delivered: list[bytes], truth: StreamTruth) -> StreamTruth:
    """What a consumer reading the target would derive equals the simulation's truth: the same
    changes, in the same order for every profile (partitions keep each profile's order)."""
    seen = expected_changes(delivered)
    assert Counter(seen.changes) == Counter(truth.changes)
    assert per_profile(seen.changes) == per_profile(truth.changes)
    assert (seen.enters, seen.exits, seen.stale, seen.duplicates) == (truth.enters, truth.exits, truth.stale,
                                                                      truth.duplicates)
    return seen


async def start(fake: FakePlatform) -> tuple[Api, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    return Api(fake, session), session


async def test_an_enabled_event_hubs_flow_with_two_audiences_exports_exactly_its_truth(
        emulator: EventHubsEmulator) -> None:
    settings = ExportSettings(records=800, profiles=80, seed=11)
    async with FakePlatform(exports=settings) as fake, aiohttp.ClientSession() as session:
        api = Api(fake, session)
        toggles_on = {"eventHubName": HUB, "includeSegmentNames": True, "includeSegmentTimestamps": True}
        destination = await provision(api, "eventhubs", audiences=(A1, A2), attributes=ATTRIBUTES,
                                      namespace=f"127.0.0.1:{emulator.port}", target_params=toggles_on)
        simulation = await fake.simulation(destination.flow)
        truth = await simulation.wait(timeout_s=30)
        assert simulation.state == "completed" and simulation.sent == len(simulation.records) == 800
        assert simulation.target == f"eventhubs:127.0.0.1:{emulator.port}/{HUB}"
        assert simulation.audiences == ((A1, NAMES[A1]), (A2, NAMES[A2]))

        delivered = hub_records(emulator)
        assert Counter(delivered) == Counter(simulation.records)
        assert_same_truth(delivered, truth)
        # the stream is as messy as Adobe's: entries, exits, exits seen first, duplicates, late records
        assert truth.enters > 0 and truth.exits > 0 and truth.stale > 0 and truth.duplicates > 0
        first: dict[tuple[str, str], str] = {}
        for profile, segment, kind, _ in truth.changes:
            first.setdefault((profile, segment), kind)
        assert "exit" in first.values()
        assert len(delivered) > len(set(delivered))  # byte-identical re-deliveries

        documents = [orjson.loads(r) for r in delivered]
        for document in documents:
            assert set(document) <= {"person", "personalEmail", "loyalty", "segmentMembership", "identityMap"}
            assert set(document.get("person", {"name": {}})) == {"name"}
            assert set(document.get("person", {}).get("name", {})) <= {"lastName"}
            assert set(document.get("loyalty", {})) <= {"points"}
            ups = document["segmentMembership"]["ups"]
            assert ups and set(ups) <= {A1, A2}
            for audience, membership in ups.items():
                assert membership["name"] == NAMES[audience]  # Include Segment Names
                assert membership["status"] in ("realized", "exited")  # no legacy "existing" today
                assert {"createdAt", "mappingCreatedAt"} <= set(membership)
        # attribute re-exports: same memberships, changed mapped attribute
        last: dict[str, tuple[str, Any]] = {}
        reexports = 0
        for document in documents:
            key = orjson.dumps(document["identityMap"]).decode()
            membership = orjson.dumps(document["segmentMembership"]).decode()
            points = document.get("loyalty", {}).get("points")
            if key in last and last[key][0] == membership and last[key][1] != points:
                reexports += 1
            last[key] = (membership, points)
        assert reexports > 0

        runs = await api.get(f"{FS}/runs", params={"property": f"flowId=={destination.flow}"})
        summary = runs.items[0]["metrics"]["recordSummary"]
        assert summary["outputRecordCount"] == 800
        assert {e["id"] for e in summary["targetSummaries"][0]["entitySummaries"]} == {f"segment:{A1}", f"segment:{A2}"}


async def test_a_kinesis_flow_exports_to_kinesalite_with_the_base_connections_keys(kinesalite: Emulator) -> None:
    stream = f"exports-{uuid.uuid4().hex[:8]}"
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream, 2)
    settings = ExportSettings(records=500, profiles=60, seed=5, batch_size=250)
    async with FakePlatform(exports=settings, kinesis_endpoint=kinesalite.endpoint) as fake, \
            aiohttp.ClientSession() as session:
        api = Api(fake, session)
        destination = await provision(api, "kinesis", audiences=(A2, A3),
                                      target_params={"stream": stream, "region": "us-east-1"})
        simulation = await fake.simulation(destination.flow)
        truth = await simulation.wait(timeout_s=30)
        assert simulation.target == f"kinesis:{kinesalite.endpoint}/{stream}"

    delivered: list[bytes] = []
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        shards = (await client.list_shards(StreamName=stream))["Shards"]
        for shard in shards:
            iterator = (await client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                                        ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
            while iterator:
                page = await client.get_records(ShardIterator=iterator, Limit=1000)
                delivered += [r["Data"] for r in page["Records"]]
                if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                    break
                iterator = page.get("NextShardIterator")
    assert len(delivered) == simulation.sent == 500
    assert_same_truth(delivered, truth)
    assert {a for d in map(orjson.loads, delivered) for a in d["segmentMembership"]["ups"]} == {A2, A3}


async def test_remapping_starts_a_new_phase_and_disabling_stops_at_a_batch_boundary(
        emulator: EventHubsEmulator) -> None:
    async with FakePlatform(exports=ExportSettings(records=150, profiles=40)) as fake, \
            aiohttp.ClientSession() as session:
        api = Api(fake, session)
        destination = await provision(api, "eventhubs", audiences=(A1,), attributes=(),
                                      namespace=f"127.0.0.1:{emulator.port}")
        simulation = await fake.simulation(destination.flow)
        await simulation.wait()
        assert simulation.phase == 1 and {a for a, _ in simulation.audiences} == {A1}
        phase_one = len(simulation.records)

        # map a second audience: a new phase, with a fresh population, exporting both
        flow = (await api.get(f"{FS}/flows/{destination.flow}")).items[0]
        fake.exports = ExportSettings(records=3000, profiles=40, rate=400)
        await api.patch(f"{FS}/flows/{destination.flow}", [{
            "op": "add", "path": "/transformations/0/params/segmentSelectors/selectors/-",
            "value": {"type": "PLATFORM_SEGMENT", "value": {"id": A2}}}], flow["etag"])
        assert simulation.phase == 2 and not simulation.finished
        await poll(lambda: simulation.phase_sent >= 60, "exports of the second phase")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await api.post(f"{FS}/flows/{destination.flow}/action", params={"op": "disable"})
        truth = await simulation.wait(timeout_s=10)
        assert loop.time() - started < 2 and simulation.state == "stopped"
        assert phase_one + 60 <= len(simulation.records) < phase_one + 3000
        assert Counter(hub_records(emulator)) == Counter(simulation.records)  # nothing half-sent
        assert_same_truth(hub_records(emulator), truth)
        second = [orjson.loads(r) for r in simulation.records[phase_one:]]
        assert any(A2 in d["segmentMembership"]["ups"] for d in second)
        assert all(set(d) == {"segmentMembership", "identityMap"} for d in second)  # no attributes mapped

        # enabling again resumes with a third phase; deleting the flow stops it
        await api.post(f"{FS}/flows/{destination.flow}/action", params={"op": "enable"})
        assert simulation.phase == 3
        await poll(lambda: simulation.phase_sent > 0, "exports of the third phase")
        assert (await api.delete(f"{FS}/flows/{destination.flow}")).status == 202
        await simulation.wait(timeout_s=10)
        assert simulation.state == "stopped"
        assert_same_truth(hub_records(emulator), simulation.truth)


async def test_the_rate_paces_exports_and_progress_is_visible(emulator: EventHubsEmulator) -> None:
    async with FakePlatform(exports=ExportSettings(records=90, profiles=30, rate=150)) as fake, \
            aiohttp.ClientSession() as session:
        api = Api(fake, session)
        destination = await provision(api, "eventhubs", namespace=f"127.0.0.1:{emulator.port}")
        simulation = await fake.simulation(destination.flow)
        await poll(lambda: simulation.state == "running", "the phase to start")
        loop = asyncio.get_running_loop()
        started = loop.time()
        progress: set[int] = set()

        def finished() -> bool:
            progress.add(simulation.sent)
            return simulation.finished

        await poll(finished, "the end of the phase")
        assert simulation.state == "completed" and simulation.sent == 90
        assert loop.time() - started >= 0.4  # 90 records at 150/s, the first batch immediately
        assert len([n for n in progress if 0 < n < 90]) >= 3  # seen part-way, several times


async def test_names_and_timestamps_are_off_until_the_target_turns_them_on(emulator: EventHubsEmulator) -> None:
    async with FakePlatform(exports=ExportSettings(records=120, profiles=30)) as fake, \
            aiohttp.ClientSession() as session:
        api = Api(fake, session)
        destination = await provision(api, "eventhubs", audiences=(A3,), namespace=f"127.0.0.1:{emulator.port}",
                                      target_params={"eventHubName": HUB})  # as Adobe's UI leaves them: off
        truth = await (await fake.simulation(destination.flow)).wait()
        documents = [orjson.loads(r) for r in hub_records(emulator)]
        assert documents and truth.enters > 0
        for document in documents:
            ((audience, membership),) = document["segmentMembership"]["ups"].items()
            assert audience == A3 and set(membership) == {"status", "lastQualificationTime"}


async def test_targets_the_fake_must_not_or_cannot_reach_fail_with_a_reason(emulator: EventHubsEmulator) -> None:
    async with FakePlatform(exports=ExportSettings(records=50)) as fake, aiohttp.ClientSession() as session:
        api = Api(fake, session)
        azure = await provision(api, "eventhubs", name="azure", namespace="contoso.servicebus.windows.net")
        simulation = fake.simulations[azure.flow]  # decided at once: no connection is attempted
        with pytest.raises(SimulationFailed, match="not a local emulator"):
            await simulation.wait()
        kinesis = await provision(api, "kinesis", name="aws")
        with pytest.raises(SimulationFailed, match="no local kinesis_endpoint"):
            await fake.simulations[kinesis.flow].wait()
        missing = await provision(api, "eventhubs", name="missing", namespace=f"127.0.0.1:{emulator.port}",
                                  target_params={"eventHubName": "no-such-hub"})
        with pytest.raises(SimulationFailed) as failure:
            await (await fake.simulation(missing.flow)).wait(timeout_s=30)
        assert SAS_KEY not in str(failure.value) and fake.simulations[missing.flow].sent == 0
        fake.advance_clock(3600)
        runs = await api.get(f"{FS}/runs", params={"property": f"flowId=={azure.flow}"})
        failed = [r for r in runs.items if r["metrics"]["statusSummary"]["status"] == "Failed"]
        assert failed and "not a local emulator" in failed[0]["metrics"]["statusSummary"]["errors"][0]["message"]


async def test_flows_without_export_settings_or_audiences_export_nothing(emulator: EventHubsEmulator) -> None:
    async with FakePlatform() as fake, aiohttp.ClientSession() as session:
        destination = await provision(Api(fake, session), "eventhubs", namespace=f"127.0.0.1:{emulator.port}")
        assert destination.flow not in fake.simulations
    async with FakePlatform(exports=ExportSettings()) as fake, aiohttp.ClientSession() as session:
        destination = await provision(Api(fake, session), "eventhubs", audiences=(),
                                      namespace=f"127.0.0.1:{emulator.port}")
        assert destination.flow not in fake.simulations
    assert hub_records(emulator) == []
