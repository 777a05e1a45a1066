"""Outages of the real parts under a running relay: kinesalite refusing every call, the redis and
DynamoDB membership stores gone, the S3 dead-letter sink gone, each for a while. A TCP proxy
(segment_relay.testing.faults) stands between the relay and the real server and resets every
connection while it is cut. Each outage starts at a given change and lasts until the relay has
tried the server again several times; then everything must arrive, exactly, and the checkpoint
reach the end. (The Event Hubs emulator's own faults, every connection dropped included, are in
test_eventhubs_source.py.)"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session
from redis.asyncio import Redis
from support import Change, poll, shape
from test_dead_letter_sinks import entries_in, s3_bucket, s3_objects
from test_kinesis_source import relay_config as kinesis_config

from segment_relay.app import Relay
from segment_relay.config import load_config
from segment_relay.handlers.api import FunctionHandler
from segment_relay.model import SegmentChange
from segment_relay.testing.aws import Emulator
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, write_jsonl
from segment_relay.testing.faults import FaultProxy, fault_proxy
from segment_relay.testing.kinesis import create_stream, put_records
from segment_relay.testing.redis import RedisServer
from segment_relay.testing.s3 import S3Server

RETRIES_DURING_THE_OUTAGE = 5  # connections the relay opened (and had reset) before the server comes back


class CutAt:
    """A handler that records every change and cuts ``proxy`` when it is given the ``at``-th."""

    def __init__(self, proxy: FaultProxy, at: int) -> None:
        self.proxy = proxy
        self.at = at
        self.changes: list[Change] = []

    def handler(self) -> FunctionHandler:
        async def handle(change: SegmentChange) -> None:
            self.changes.append(shape(change))
            if len(self.changes) == self.at:
                self.proxy.cut()

        return FunctionHandler(handle, name="recorder")


async def ride_out(relay: Relay, proxy: FaultProxy, until: Any, what: str, records: int) -> None:
    """Run ``relay`` through one outage of ``proxy``: heal it once the relay has retried through
    it (short of its ``records``); then run until ``until()``."""
    run = asyncio.create_task(relay.run())
    try:
        await poll(lambda: proxy.is_cut or run.done(), "the outage to begin")
        began = time.monotonic()
        await poll(lambda: proxy.refused >= RETRIES_DURING_THE_OUTAGE or run.done(), "the relay to retry in the outage")
        assert not run.done(), "the relay ended during the outage"
        finished = relay.pipeline.records_finished
        assert finished < records  # it is waiting on the server, not done
        healed = time.monotonic()
        proxy.heal()
        await poll(lambda: until() or run.done(), what, timeout_s=60)
        print(f"outage of {healed - began:.1f} s: the other {records - finished} records "
              f"finished {time.monotonic() - healed:.1f} s after it")
    finally:
        proxy.heal()
        if not run.done():
            relay.stop()
        await asyncio.wait_for(run, 60)


def file_config(tmp_path: Path, source: Path, **fields: Any) -> Any:
    defaults = {"checkpoint_file": str(tmp_path / "cp.json"), "handlers": [f"jsonl:{tmp_path / 'changes.jsonl'}"],
                "dead_letter": str(tmp_path / "dl.jsonl"), "log_level": "WARNING",
                "pipeline": {"checkpoint_interval_s": 0.2}}
    return load_config(None, source=f"file:{source}", **{**defaults, **fields})


def checkpointed_line(tmp_path: Path) -> int:
    path = tmp_path / "cp.json"
    return int(orjson.loads(path.read_bytes())["line"]) if path.exists() else 0


@pytest.fixture
def exports(tmp_path: Path) -> tuple[Path, Any]:
    path = tmp_path / "exports.jsonl"
    return path, write_jsonl(StreamSpec(seed=61, profiles=200, records=2000, invalid_rate=0.01), path)


@pytest.mark.parametrize("store", ["redis", "dynamodb"])
async def test_a_membership_store_that_goes_away_makes_records_wait_and_loses_nothing(
    store: str, tmp_path: Path, exports: tuple[Path, Any], redis_server: RedisServer, dynalite: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, truth = exports
    port = redis_server.port if store == "redis" else int(dynalite.endpoint.rsplit(":", 1)[1])
    with fault_proxy(port) as proxy:
        if store == "redis":
            state = f"redis://127.0.0.1:{proxy.port}/7"
            async with Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/7") as client:
                await client.flushdb()  # a database of this test's own
        else:
            monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", proxy.endpoint)
            state = f"dynamodb:outage-{uuid.uuid4().hex[:8]}"
        cut = CutAt(proxy, at=len(truth.changes) // 3)
        relay = Relay(file_config(tmp_path, path, state=state), extra_handlers=[cut.handler()])
        await ride_out(relay, proxy, lambda: False, "the run to end", truth.records)  # the file source ends
    assert Counter(cut.changes) == Counter(truth.changes)  # nothing lost, nothing twice
    assert checkpointed_line(tmp_path) == truth.records


async def test_a_dead_letter_sink_that_goes_away_pauses_reading_and_loses_nothing(
    tmp_path: Path, s3_server: S3Server,
) -> None:
    path = tmp_path / "exports.jsonl"
    truth = write_jsonl(StreamSpec(seed=63, profiles=200, records=2000, invalid_rate=0.1), path)
    bucket = await s3_bucket(s3_server)
    with fault_proxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as proxy:
        cut = CutAt(proxy, at=len(truth.changes) // 4)
        # Entries wait for the sink past 1 KiB held; records waiting on them fill the in-flight bound.
        config = file_config(tmp_path, path, state="memory", dead_letter=f"s3://{bucket}/dl",
                             dead_letter_sink={"s3_endpoint_url": proxy.endpoint, "max_buffer_bytes": 1024},
                             pipeline={"checkpoint_interval_s": 0.2, "max_in_flight_records": 100})
        relay = Relay(config, extra_handlers=[cut.handler()])
        run = asyncio.create_task(relay.run())
        try:
            await poll(lambda: proxy.is_cut or run.done(), "the outage to begin")
            at_cut = checkpointed_line(tmp_path)
            await poll(lambda: proxy.refused >= RETRIES_DURING_THE_OUTAGE, "the relay to retry in the outage")
            # The checkpoint waits for the dead letters below it, and the entries held wait for the
            # sink: reading has stopped short of the end.
            read = relay.pipeline.records_read
            assert read < truth.records and not run.done()
            await poll(lambda: proxy.refused >= RETRIES_DURING_THE_OUTAGE + 3, "more retries in the outage")
            assert relay.pipeline.records_read == read
            assert checkpointed_line(tmp_path) <= at_cut + read  # (at most the round in flight at the cut)
            stalled_at = checkpointed_line(tmp_path)
            assert stalled_at < truth.records
            proxy.heal()
            await asyncio.wait_for(run, 60)
        finally:
            proxy.heal()
            if not run.done():
                relay.stop()
                await asyncio.wait_for(run, 60)
    entries = entries_in(await s3_objects(s3_server, bucket, "dl/"))
    assert len(entries) == truth.dead_letters and len({(e["position"], e.get("path")) for e in entries}) == len(entries)
    assert Counter(cut.changes) == Counter(truth.changes)
    assert checkpointed_line(tmp_path) == truth.records


@pytest.fixture
def stream_name() -> Iterator[str]:
    yield f"outage-{uuid.uuid4().hex[:8]}"


async def test_kinesis_refusing_every_call_for_a_while_is_ridden_out_with_nothing_lost(
    kinesalite: Emulator, dynalite: Emulator, stream_name: str, tmp_path: Path,
) -> None:
    records = list(generate(StreamSpec(seed=62, profiles=150, records=2000)))
    truth = expected_changes(records)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream_name, 2)
        await put_records(client, stream_name, records, in_flight=1)
    with fault_proxy(int(kinesalite.endpoint.rsplit(":", 1)[1])) as proxy:
        cut = CutAt(proxy, at=len(truth.changes) // 3)
        config = kinesis_config(stream_name, tmp_path, kinesalite, dynalite, endpoint_url=proxy.endpoint,
                                get_records_limit=50, min_get_records_interval_s=0)
        relay = Relay(config, extra_handlers=[cut.handler()])
        await ride_out(relay, proxy, lambda: relay.pipeline.records_finished >= len(records), "every record",
                       len(records))
    assert Counter(cut.changes) == Counter(truth.changes)
