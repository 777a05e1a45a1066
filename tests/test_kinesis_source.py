"""The Kinesis source end to end against kinesalite and dynalite: one replica in process."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from segment_relay import SegmentChange
from segment_relay.app import Relay
from segment_relay.config import load_config
from segment_relay.handlers.api import FunctionHandler
from segment_relay.testing.aws import Emulator
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, iso_utc
from segment_relay.testing.kinesis import create_stream, put_records

Change = tuple[str, str, str, str]


async def poll(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Collector:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def handler(self) -> FunctionHandler:
        async def collect(change: SegmentChange) -> None:
            self.changes.append((change.profile_key, change.segment_id, change.change.value,
                                 iso_utc(change.qualified_at)))

        return FunctionHandler(collect, name="collector")


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


async def test_every_change_of_a_four_shard_stream_reaches_the_handlers_once(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=41, profiles=150, records=2000, invalid_rate=0.005)))
    truth = expected_changes(records)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 4)
        await put_records(client, stream_name, records, in_flight=1)

    collector = Collector()
    config = relay_config(stream_name, tmp_path, kinesalite, dynalite)
    relay = Relay(config, extra_handlers=[collector.handler()])
    run = asyncio.create_task(relay.run())
    try:
        await poll(lambda: relay.stats.records_finished == len(records) or run.done(), "every record")
        assert not run.done(), run
        assert relay.stats.owned_partitions is not None and len(relay.stats.owned_partitions()) == 4
    finally:
        relay.stop()
        await asyncio.wait_for(run, 30)

    assert Counter(collector.changes) == Counter(truth.changes)
    assert relay.stats.summary()["invalid"] == truth.invalid > 0  # poison records: dead-lettered, shards moved on
    # The graceful stop checkpointed every shard at its last record and released the leases.
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as client:
        items = (await client.scan(TableName=f"{config.kinesis.application}-leases", ConsistentRead=True))["Items"]
    assert len(items) == 4
    assert all("leaseOwner" not in item or "NULL" in item["leaseOwner"] for item in items), items
    assert all(item["checkpoint"]["S"].isdigit() for item in items), items
