"""The Kinesis source end to end against kinesalite and dynalite: one replica in process."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiobotocore.session import get_session
from prometheus_client import generate_latest
from support import Change, Collector, Takeover, poll, run_until_finished

from segment_relay.app import Relay
from segment_relay.config import load_config
from segment_relay.ops.metrics import metrics_registry
from segment_relay.testing.aws import Emulator
from segment_relay.testing.exports import StreamSpec, expected_changes, generate
from segment_relay.testing.kinesis import create_stream, put_records


@pytest.fixture
def stream_name() -> Iterator[str]:
    yield f"exports-{uuid.uuid4().hex[:8]}"


def relay_config(stream: str, tmp_path: Path, kinesalite: Emulator, dynalite: Emulator, **kinesis: object):
    settings = {
        "endpoint_url": kinesalite.endpoint, "dynamodb_endpoint_url": dynalite.endpoint,
        "application": f"app-{uuid.uuid4().hex[:8]}", "idle_wait_s": 0.05,
        "lease_duration_s": 2.0, "shard_sync_interval_s": 1.0, **kinesis,
    }
    return load_config(
        None, source=f"kinesis:{stream}", state="memory", handlers=[f"jsonl:{tmp_path / 'changes.jsonl'}"],
        dead_letter=str(tmp_path / "dead-letter.jsonl"), kinesis=settings,
        pipeline={"checkpoint_interval_s": 0.2},
    )


@pytest.mark.parametrize("state", ["memory", "dynamodb"])
async def test_every_change_of_a_four_shard_stream_reaches_the_handlers_once(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path, state: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = list(generate(StreamSpec(seed=41, profiles=150, records=2000, invalid_rate=0.005)))
    truth = expected_changes(records)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 4)
        await put_records(client, stream_name, records, in_flight=1)

    collector = Collector()
    config = relay_config(stream_name, tmp_path, kinesalite, dynalite)
    if state == "dynamodb":  # membership shared through DynamoDB, as replicas on many hosts do
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynalite.endpoint)
        config = config.model_copy(update={"state": f"dynamodb:state-{uuid.uuid4().hex[:8]}"})
    relay = Relay(config, extra_handlers=[collector.handler()])
    run = asyncio.create_task(relay.run())
    try:
        await poll(lambda: relay.pipeline.records_finished == len(records) or run.done(), "every record")
        assert not run.done(), run
        source = relay.snapshot().source
        assert source.owned is not None and len(source.owned) == 4
        assert len(source.lag_ms) == 4  # MillisBehindLatest per shard, for the lag gauge
        metrics = generate_latest(metrics_registry(relay.snapshot)).decode()
        assert "segment_relay_partitions_owned 4.0" in metrics
        assert metrics.count("segment_relay_partition_lag_seconds{") == 4
    finally:
        relay.stop()
        await asyncio.wait_for(run, 30)

    assert Counter(collector.changes) == Counter(truth.changes)
    assert relay.snapshot().summary()["invalid"] == truth.invalid > 0  # poison records: dead-lettered, shards moved on
    # The graceful stop checkpointed every shard at its last record and released the leases.
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as client:
        items = (await client.scan(TableName=f"{config.kinesis.application}-leases", ConsistentRead=True))["Items"]
    assert len(items) == 4
    assert all("leaseOwner" not in item or "NULL" in item["leaseOwner"] for item in items), items
    assert all(item["checkpoint"]["S"].isdigit() for item in items), items


class _FaultResponse:
    """What a before-call hook returns to botocore instead of a real HTTP response."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: dict[str, str] = {}


class FaultInjector:
    """Fails GetRecords calls through botocore's before-call event: kinesalite never throttles
    and expires iterators only after 300 s, so these faults are injected at the client layer,
    on the real client talking to the real emulator."""

    def __init__(self, throttle_first: int, expire_at_call: int) -> None:
        self.throttle_first = throttle_first
        self.expire_at_call = expire_at_call
        self.calls = 0
        self.throttled = 0
        self.expired = 0

    def attach(self, service: str, client: object) -> None:
        if service == "kinesis":
            client.meta.events.register("before-call.kinesis.GetRecords", self._before_get_records)  # type: ignore[attr-defined]

    def _before_get_records(self, **_: object) -> tuple[_FaultResponse, dict] | None:
        self.calls += 1
        if self.calls <= self.throttle_first:
            self.throttled += 1
            return _FaultResponse(400), {"Error": {"Code": "ProvisionedThroughputExceededException",
                                                   "Message": "Rate exceeded for shard (injected)"}}
        if self.calls == self.expire_at_call:
            self.expired += 1
            return _FaultResponse(400), {"Error": {"Code": "ExpiredIteratorException",
                                                   "Message": "Iterator expired (injected)"}}
        return None


async def test_throttling_and_an_expired_iterator_are_recovered_with_nothing_lost_or_repeated(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=43, profiles=80, records=800)))
    truth = expected_changes(records)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 2)
        await put_records(client, stream_name, records, in_flight=1)

    faults = FaultInjector(throttle_first=6, expire_at_call=12)
    collector = Collector()
    config = relay_config(stream_name, tmp_path, kinesalite, dynalite, get_records_limit=100,
                          max_backoff_s=0.05)
    await run_until_finished(Relay(config, extra_handlers=[collector.handler()], on_client=faults.attach),
                             len(records), stop_timeout_s=30)
    assert faults.throttled == 6 and faults.expired == 1
    assert Counter(collector.changes) == Counter(truth.changes)  # exactly once: no loss, no repeat


async def test_split_and_merge_mid_run_keep_every_profile_in_order(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=44, profiles=120, records=2400)))
    first, second = records[:1200], records[1200:]
    truth = expected_changes(records)
    collector = Collector()
    config = relay_config(stream_name, tmp_path, kinesalite, dynalite, shard_sync_interval_s=0.2)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 3)
        await put_records(client, stream_name, first, in_flight=1)
        relay = Relay(config, extra_handlers=[collector.handler()])
        run = asyncio.create_task(relay.run())
        try:
            await poll(lambda: relay.pipeline.records_finished == len(first) or run.done(), "the first half")
            shards = (await client.list_shards(StreamName=stream_name))["Shards"]
            zero, one, two = sorted(shards, key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
            low, high = int(zero["HashKeyRange"]["StartingHashKey"]), int(zero["HashKeyRange"]["EndingHashKey"])
            await client.split_shard(StreamName=stream_name, ShardToSplit=zero["ShardId"],
                                     NewStartingHashKey=str((low + high) // 2))
            await _wait_active(client, stream_name)
            await client.merge_shards(StreamName=stream_name, ShardToMerge=one["ShardId"],
                                      AdjacentShardToMerge=two["ShardId"])
            await _wait_active(client, stream_name)
            await put_records(client, stream_name, second, in_flight=1)  # lands in the children
            await poll(lambda: relay.pipeline.records_finished == len(records) or run.done(), "the second half")
            assert not run.done(), run
        finally:
            relay.stop()
            await asyncio.wait_for(run, 30)

    assert Counter(collector.changes) == Counter(truth.changes)
    by_profile: dict[str, list[Change]] = {}
    for change in collector.changes:
        by_profile.setdefault(change[0], []).append(change)
    expected_by_profile: dict[str, list[Change]] = {}
    for change in truth.changes:
        expected_by_profile.setdefault(change[0], []).append(change)
    assert by_profile == expected_by_profile  # parents were finished before their children were read
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as ddb:
        items = (await ddb.scan(TableName=f"{config.kinesis.application}-leases", ConsistentRead=True))["Items"]
    checkpoints = {item["leaseKey"]["S"]: item["checkpoint"]["S"] for item in items if "checkpoint" in item}
    for parent in (zero, one, two):
        assert checkpoints[parent["ShardId"]] == "SHARD_END"
    assert len(items) == 6  # 3 parents, 2 split children, 1 merged child


async def _wait_active(client: object, stream: str) -> None:
    async def status() -> str:
        summary = await client.describe_stream_summary(StreamName=stream)  # type: ignore[attr-defined]
        return summary["StreamDescriptionSummary"]["StreamStatus"]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await status() != "ACTIVE":
        assert loop.time() < deadline, "stream did not become ACTIVE"
        await asyncio.sleep(0.02)


async def test_get_records_is_paced_per_shard(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path
) -> None:
    # AWS allows 5 GetRecords per second per shard; kinesalite enforces nothing, so the calls are
    # timed through botocore's before-call hook on the real client.
    records = list(generate(StreamSpec(seed=45, profiles=30, records=300)))
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 1)
        await put_records(client, stream_name, records, in_flight=1)
    loop = asyncio.get_running_loop()
    calls: list[float] = []

    def attach(service: str, client: object) -> None:
        if service == "kinesis":
            client.meta.events.register(  # type: ignore[attr-defined]
                "before-call.kinesis.GetRecords", lambda **_: calls.append(loop.time()))

    config = relay_config(stream_name, tmp_path, kinesalite, dynalite, get_records_limit=50,
                          min_get_records_interval_s=0.1)
    await run_until_finished(Relay(config, on_client=attach), len(records), stop_timeout_s=30)
    assert len(calls) >= 6  # 300 records, 50 a call
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= 0.1 - 0.005, gaps


async def test_a_lease_lost_while_its_records_are_queued_reaches_no_handler_after_the_loss(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path
) -> None:
    """Replica A holds both shards and is stuck on a few profiles, so records of both shards wait
    in its pipeline; replica B starts and steals one shard. Once A learns the lease is gone (its
    renewal fails), nothing of that shard may reach A's handler or be committed by A, and B,
    reading from A's last checkpoint, delivers what A did not finish."""
    records = list(generate(StreamSpec(seed=45, profiles=120, records=1500)))
    truth = expected_changes(records)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 2)
        await put_records(client, stream_name, records, in_flight=1)
    takeover = Takeover()
    config = relay_config(stream_name, tmp_path, kinesalite, dynalite, get_records_limit=100)
    config = config.model_copy(update={"state": f"sqlite:{tmp_path / 'state.sqlite'}", "handlers": []})
    relays = {
        worker: Relay(config.model_copy(update={"kinesis": config.kinesis.model_copy(update={"worker_id": worker})}),
                      extra_handlers=[takeover.handler(worker)])
        for worker in ("a", "b")
    }
    spy = await takeover.run(relays, 2, set(truth.changes))
    lost = spy.revoked[0][1]
    late, commits = spy.after_loss(takeover.calls["a"])
    assert late == [], f"{len(late)} changes of the lost shard reached A's handler after the loss"
    assert commits == []
    pipeline_a = relays["a"].pipeline
    assert pipeline_a.snapshot().records_dropped > 0  # what A still held of the lost shard
    assert any(c.partition == lost for _, c in takeover.calls["b"])  # the new owner carried on with it
    assert takeover.handled() == set(truth.changes)  # nothing lost; nothing the rules do not produce

