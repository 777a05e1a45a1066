"""ShardReader and the aws helpers against kinesalite (a real Kinesis API on loopback).

Every test makes its own uniquely named stream and deletes it at the end. Nothing waits a
fixed time: waits poll a condition with a deadline.

Faults kinesalite cannot produce are injected by ``FaultyClient``, a thin proxy around the
REAL aiobotocore client talking to kinesalite: kinesalite enforces no throughput limits
(never ProvisionedThroughputExceededException) and expires iterators only after 300 s,
so those errors are raised by the proxy for chosen GetRecords calls, and every other call
goes through to kinesalite unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ReadTimeoutError,
)

from segment_relay.consumer.sources.base import ReadAhead, SourceRecord
from segment_relay.consumer.sources.kinesis.aws import (
    AwsError,
    Backoff,
    check_stream,
    explain,
    is_expired_iterator,
    is_retryable,
    is_retryable_network,
    is_throttle,
    kinesis_client,
)
from segment_relay.consumer.sources.kinesis.settings import SHARD_END, InitialPosition, KinesisSettings
from segment_relay.consumer.sources.kinesis.shard_reader import ShardReader
from segment_relay.testing.aws import Emulator, free_port

DEADLINE_S = 15.0
SHARD_0 = "shardId-000000000000"


# --- helpers ---------------------------------------------------------------------------
async def until(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def client_error(code: str, operation: str = "GetRecords", status: int = 400, message: str = "injected") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)


def throttled() -> ClientError:
    return client_error("ProvisionedThroughputExceededException", message="Rate exceeded for shard")


def expired() -> ClientError:
    return client_error("ExpiredIteratorException", message="Iterator expired")


class FaultyClient:
    """The real aiobotocore client (talking to kinesalite), except that GetRecords call
    number n (1-based) raises ``faults[n]`` instead of reaching kinesalite. See the module
    docstring for why the faults are injected. Records every GetShardIterator request."""

    def __init__(self, client: Any, faults: dict[int, BaseException] | None = None) -> None:
        self._client = client
        self.faults = faults or {}
        self.get_records_calls = 0
        self.iterator_requests: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def get_records(self, **kwargs: Any) -> Any:
        self.get_records_calls += 1
        fault = self.faults.get(self.get_records_calls)
        if fault is not None:
            raise fault
        return await self._client.get_records(**kwargs)

    async def get_shard_iterator(self, **kwargs: Any) -> Any:
        self.iterator_requests.append(kwargs)
        return await self._client.get_shard_iterator(**kwargs)


class Collector:
    """Iterates ``reader.batches()`` in a task and keeps every record."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader
        self.records: list[tuple[str, SourceRecord]] = []  # (the reader's shard, the record)
        self.batches = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch, kinesis_records in self.reader.batches():
            assert batch and kinesis_records, "batches() must never yield an empty batch"
            assert kinesis_records <= len(batch)  # KPL aggregates hold several records
            self.batches += 1
            self.records.extend((self.reader.shard_id, record) for record in batch)

    async def started(self) -> None:
        """Until the first GetRecords call came back (so a LATEST iterator exists)."""
        await until(lambda: self.reader.calls >= 1 or self.task.done(), "the reader's first GetRecords")

    async def finish(self, count: int) -> list[tuple[str, SourceRecord]]:
        """Until ``count`` records came and one more GetRecords call returned (so a repeated
        record would have shown up), or the reader ended by itself; then stop it."""
        await until(lambda: len(self.records) >= count or self.task.done(), f"{count} records")
        calls = self.reader.calls
        await until(lambda: self.reader.calls > calls or self.task.done(), "one more GetRecords call")
        self.reader.stop()
        await asyncio.wait_for(self.task, DEADLINE_S)
        return self.records


async def put(client: Any, stream: str, payloads: list[bytes], hash_key: str | None = None) -> list[tuple[str, str]]:
    """PutRecords in order; returns (shard id, sequence number) per payload."""
    entries: list[dict[str, Any]] = []
    for payload in payloads:
        entry: dict[str, Any] = {"Data": payload, "PartitionKey": "p"}
        if hash_key is not None:
            entry["ExplicitHashKey"] = hash_key
        entries.append(entry)
    response = await client.put_records(StreamName=stream, Records=entries)
    assert response.get("FailedRecordCount", 0) == 0, response
    return [(r["ShardId"], r["SequenceNumber"]) for r in response["Records"]]


def expected(stream_puts: list[tuple[str, str]], payloads: list[bytes]) -> list[tuple[str, str, bytes]]:
    return [(shard, seq, data) for (shard, seq), data in zip(stream_puts, payloads, strict=True)]


def triples(records: list[tuple[str, SourceRecord]]) -> list[tuple[str, str, bytes]]:
    return [(shard, r.position, r.data) for shard, r in records]


async def wait_active(client: Any, stream: str) -> None:
    async def active() -> bool:
        summary = await client.describe_stream_summary(StreamName=stream)
        return bool(summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")

    await until(active, f"stream {stream} to be ACTIVE")


# --- fixtures --------------------------------------------------------------------------
@pytest.fixture
async def kinesis(kinesalite: Emulator) -> AsyncIterator[Any]:
    async with kinesis_client(KinesisSettings(stream="unused", endpoint_url=kinesalite.endpoint)) as client:
        yield client


@pytest.fixture
async def make_stream(kinesis: Any) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    names: list[str] = []

    async def make(shards: int = 1) -> str:
        name = f"reader-{uuid.uuid4().hex[:12]}"
        await kinesis.create_stream(StreamName=name, ShardCount=shards)
        names.append(name)
        await wait_active(kinesis, name)
        return name

    yield make
    for name in names:
        with contextlib.suppress(ClientError):
            await kinesis.delete_stream(StreamName=name)


@pytest.fixture
def settings_for(kinesalite: Emulator) -> Callable[..., KinesisSettings]:
    def settings(stream: str, **overrides: Any) -> KinesisSettings:
        values: dict[str, Any] = {"endpoint_url": kinesalite.endpoint, "get_records_limit": 10, "idle_wait_s": 0.05,
                                  "max_backoff_s": 0.2}
        values.update(overrides)
        return KinesisSettings(stream=stream, **values)

    return settings


def payloads(prefix: str, n: int) -> list[bytes]:
    return [f'{{"{prefix}": {i}}}'.encode() for i in range(n)]


# --- reading ---------------------------------------------------------------------------
async def test_reads_every_record_of_a_one_shard_stream_in_order(kinesis: Any, make_stream: Any,
                                                                 settings_for: Any) -> None:
    stream = await make_stream(1)
    data = payloads("a", 25)
    puts = await put(kinesis, stream, data)
    lags: list[tuple[str, int]] = []
    reader = ShardReader(kinesis, settings_for(stream), SHARD_0, start_after=None,
                         on_lag=lambda shard, millis: lags.append((shard, millis)))
    got = await Collector(reader).finish(25)
    assert triples(got) == expected(puts, data)
    assert all(isinstance(r.position, str) for _, r in got)
    assert [int(r.position) for _, r in got] == sorted(int(r.position) for _, r in got)
    assert reader.last_sequence == puts[-1][1]
    assert reader.records == 25 and not reader.ended
    assert reader.throttled == reader.errors == reader.expired == 0
    assert lags and all(shard == SHARD_0 and isinstance(millis, int) for shard, millis in lags)


async def test_reads_each_shard_of_a_two_shard_stream(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    stream = await make_stream(2)
    shards = sorted((await kinesis.list_shards(StreamName=stream))["Shards"], key=lambda s: s["ShardId"])
    assert len(shards) == 2
    per_shard: dict[str, list[tuple[str, str, bytes]]] = {}
    for shard in shards:
        data = payloads(shard["ShardId"], 15)
        puts = await put(kinesis, stream, data, hash_key=shard["HashKeyRange"]["StartingHashKey"])
        assert {s for s, _ in puts} == {shard["ShardId"]}
        per_shard[shard["ShardId"]] = expected(puts, data)
    collectors = {shard_id: Collector(ShardReader(kinesis, settings_for(stream), shard_id, start_after=None))
                  for shard_id in per_shard}
    for shard_id, collector in collectors.items():
        assert triples(await collector.finish(15)) == per_shard[shard_id]


class LimitsSeen(FaultyClient):
    """The real client; notes the Limit of every GetRecords call and the read-ahead held then."""

    def __init__(self, client: Any, read_ahead: ReadAhead) -> None:
        super().__init__(client)
        self.read_ahead = read_ahead
        self.calls: list[tuple[int, int]] = []  # (Limit, records held by the read-ahead)

    async def get_records(self, **kwargs: Any) -> Any:
        self.calls.append((kwargs["Limit"], self.read_ahead.held))
        return await super().get_records(**kwargs)


async def test_shards_sharing_a_read_ahead_ask_for_their_share(kinesis: Any, make_stream: Any,
                                                               settings_for: Any) -> None:
    """With get_records_limit 10,000 and a read-ahead of 400 shared by two shards, a call asks for
    100 records while both read (half the bound split between the readers), so both keep a call
    in flight; nothing is lost, and the read-ahead never holds more than its bound."""
    stream = await make_stream(2)
    shards = sorted((await kinesis.list_shards(StreamName=stream))["Shards"], key=lambda s: s["ShardId"])
    read_ahead = ReadAhead(400)
    client = LimitsSeen(kinesis, read_ahead)
    wanted: dict[str, list[tuple[str, str, bytes]]] = {}
    for shard in shards:
        data = payloads(shard["ShardId"], 250)
        for start in range(0, len(data), 125):
            part = data[start:start + 125]
            puts = await put(kinesis, stream, part, hash_key=shard["HashKeyRange"]["StartingHashKey"])
            wanted.setdefault(shard["ShardId"], []).extend(expected(puts, part))

    class Releasing(Collector):  # the pipeline's part: give the room back once a batch is taken
        async def _run(self) -> None:
            async for batch, kinesis_records in self.reader.batches():
                self.records.extend((self.reader.shard_id, record) for record in batch)
                read_ahead.release(kinesis_records)

    settings = settings_for(stream, get_records_limit=10_000)
    collectors = {shard_id: Releasing(ShardReader(client, settings, shard_id, start_after=None, read_ahead=read_ahead))
                  for shard_id in wanted}
    for shard_id, collector in collectors.items():
        assert triples(await collector.finish(250)) == wanted[shard_id]
    # 100 while both read; 200 for one reading alone (before the other joined, after it stopped)
    limits = [limit for limit, _ in client.calls]
    assert limits.count(100) >= 4 and set(limits) <= {100, 200}
    assert all(held <= 400 for _, held in client.calls)
    assert read_ahead.readers == 0 and read_ahead.held == 0


async def test_read_ahead_reserves_waits_and_lets_an_oversized_call_through_alone() -> None:
    read_ahead = ReadAhead(10)
    assert read_ahead.share() == 5  # no reader joined yet: counts as one
    read_ahead.join()
    read_ahead.join()
    assert read_ahead.share() == 2
    await read_ahead.reserve(6)
    waiting = asyncio.create_task(read_ahead.reserve(6))  # 12 > 10: waits for room
    await asyncio.sleep(0)
    assert not waiting.done()
    read_ahead.release(6)
    await asyncio.wait_for(waiting, 5)
    assert read_ahead.held == 6
    read_ahead.release(6)
    await asyncio.wait_for(read_ahead.reserve(50), 5)  # larger than the bound, nothing held: let through
    assert read_ahead.held == 50
    read_ahead.release(50)
    read_ahead.leave()
    read_ahead.leave()
    assert read_ahead.share() == 5 and ReadAhead(1).share() == 1


@pytest.mark.parametrize("position", ["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "AFTER_CHECKPOINT"])
async def test_start_positions(kinesis: Any, make_stream: Any, settings_for: Any, position: str) -> None:
    stream = await make_stream(1)
    a_data = payloads("a", 8)
    a_puts = await put(kinesis, stream, a_data)
    overrides: dict[str, Any] = {}
    if position == "AT_TIMESTAMP":
        # Let the clock pass the last 'a' arrival (ms resolution), so that T splits a from b.
        iterator = (await kinesis.get_shard_iterator(StreamName=stream, ShardId=SHARD_0,
                                                     ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
        arrivals = [r["ApproximateArrivalTimestamp"] for r in (await kinesis.get_records(ShardIterator=iterator))["Records"]]
        # Our Kinesis client keeps timestamps as epoch floats (see kinesis_client in aws.py).
        last_ms = int(max(float(arrival) for arrival in arrivals) * 1000)
        await until(lambda: int(time.time() * 1000) > last_ms, "the clock to pass the last arrival")
        overrides["initial_timestamp"] = datetime.fromtimestamp(int(time.time() * 1000) / 1000, UTC)
    b_data = payloads("b", 7)
    settings = settings_for(stream, **overrides)
    if position == "LATEST":
        reader = ShardReader(kinesis, settings, SHARD_0, start_after=None, start_at=InitialPosition.LATEST)
        collector = Collector(reader)
        await collector.started()  # the LATEST iterator exists: later puts are after it
        b_puts = await put(kinesis, stream, b_data)
        assert triples(await collector.finish(7)) == expected(b_puts, b_data)
        return
    b_puts = await put(kinesis, stream, b_data)
    if position == "TRIM_HORIZON":
        reader = ShardReader(kinesis, settings, SHARD_0, start_after=None, start_at=InitialPosition.TRIM_HORIZON)
        want = expected(a_puts, a_data) + expected(b_puts, b_data)
    elif position == "AT_TIMESTAMP":
        reader = ShardReader(kinesis, settings, SHARD_0, start_after=None, start_at=InitialPosition.AT_TIMESTAMP)
        want = expected(b_puts, b_data)
    else:  # resume after a checkpoint: the 5th 'a' record was the last one finished
        reader = ShardReader(kinesis, settings, SHARD_0, start_after=a_puts[4][1],
                             start_at=InitialPosition.LATEST)  # the checkpoint wins over any start position
        want = expected(a_puts, a_data)[5:] + expected(b_puts, b_data)
    assert triples(await Collector(reader).finish(len(want))) == want


def test_bad_starts_are_refused(settings_for: Any) -> None:
    with pytest.raises(ValueError, match="SHARD_END"):
        ShardReader(object(), settings_for("s"), SHARD_0, start_after=SHARD_END)
    with pytest.raises(ValueError, match="initial_timestamp"):
        ShardReader(object(), settings_for("s"), SHARD_0, start_after=None, start_at=InitialPosition.AT_TIMESTAMP)


# --- faults ----------------------------------------------------------------------------
async def test_throttling_is_retried_without_loss_or_repeat(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    stream = await make_stream(1)
    data = payloads("t", 25)
    puts = await put(kinesis, stream, data)
    client = FaultyClient(kinesis, {1: throttled(), 2: throttled(), 3: throttled()})
    reader = ShardReader(client, settings_for(stream), SHARD_0, start_after=None)
    assert triples(await Collector(reader).finish(25)) == expected(puts, data)
    assert reader.throttled == 3 and reader.errors == 0
    assert len(client.iterator_requests) == 1  # the same iterator was retried


@pytest.mark.parametrize("fail_on_call", [1, 2, 3], ids=["before-any-record", "after-one-batch", "after-two-batches"])
async def test_an_expired_iterator_resumes_after_the_last_record_yielded(
        kinesis: Any, make_stream: Any, settings_for: Any, fail_on_call: int) -> None:
    stream = await make_stream(1)
    data = payloads("e", 25)
    puts = await put(kinesis, stream, data)
    client = FaultyClient(kinesis, {fail_on_call: expired()})
    reader = ShardReader(client, settings_for(stream), SHARD_0, start_after=None)
    assert triples(await Collector(reader).finish(25)) == expected(puts, data)
    assert reader.expired == 1
    assert len(client.iterator_requests) == 2
    again = client.iterator_requests[1]
    yielded = (fail_on_call - 1) * 10  # get_records_limit=10
    if yielded == 0:
        assert again["ShardIteratorType"] == "TRIM_HORIZON"  # nothing yielded: the original start
    else:
        assert again["ShardIteratorType"] == "AFTER_SEQUENCE_NUMBER"
        assert again["StartingSequenceNumber"] == puts[yielded - 1][1]


async def test_network_errors_are_retried(kinesalite: Emulator, kinesis: Any, make_stream: Any,
                                          settings_for: Any) -> None:
    stream = await make_stream(1)
    data = payloads("n", 12)
    puts = await put(kinesis, stream, data)
    faults: dict[int, BaseException] = {
        1: EndpointConnectionError(endpoint_url=kinesalite.endpoint),
        2: ConnectionClosedError(endpoint_url=kinesalite.endpoint),
        3: client_error("InternalFailure", status=500),
        5: ReadTimeoutError(endpoint_url=kinesalite.endpoint),
    }
    reader = ShardReader(FaultyClient(kinesis, faults), settings_for(stream), SHARD_0, start_after=None)
    assert triples(await Collector(reader).finish(12)) == expected(puts, data)
    assert reader.errors == 4 and reader.throttled == 0


async def test_other_errors_end_the_reader(kinesis: Any, settings_for: Any) -> None:
    reader = ShardReader(kinesis, settings_for(f"missing-{uuid.uuid4().hex[:8]}"), SHARD_0, start_after=None)
    with pytest.raises(ClientError) as caught:
        async for _ in reader.batches():
            pass
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert any(reader.settings.stream_name in note and SHARD_0 in note for note in caught.value.__notes__)


@pytest.mark.parametrize("before_split", [20, 0])
async def test_a_closed_shard_ends(kinesis: Any, make_stream: Any, settings_for: Any, before_split: int) -> None:
    stream = await make_stream(1)
    data = payloads("c", before_split)
    puts = await put(kinesis, stream, data) if data else []
    await kinesis.split_shard(StreamName=stream, ShardToSplit=SHARD_0, NewStartingHashKey=str(2**127))
    await wait_active(kinesis, stream)
    after = await put(kinesis, stream, payloads("child", 5))
    assert SHARD_0 not in {shard for shard, _ in after}  # new records go to the children
    shards = await check_stream(kinesis, settings_for(stream))
    assert len(shards) == 3
    assert "EndingSequenceNumber" in next(s for s in shards if s["ShardId"] == SHARD_0)["SequenceNumberRange"]

    reader = ShardReader(kinesis, settings_for(stream, idle_wait_s=0.01), SHARD_0, start_after=None)
    collector = Collector(reader)
    await asyncio.wait_for(collector.task, DEADLINE_S)  # finishes by itself
    assert triples(collector.records) == expected(puts, data)
    assert reader.ended
    assert reader.last_sequence == (puts[-1][1] if puts else None)


# --- stop ------------------------------------------------------------------------------
async def test_stop_ends_an_idle_reader_at_once(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    stream = await make_stream(1)
    reader = ShardReader(kinesis, settings_for(stream, idle_wait_s=60), SHARD_0, start_after=None)
    collector = Collector(reader)
    await collector.started()  # the empty answer came: the reader is in its 60 s idle wait
    started = time.monotonic()
    reader.stop()
    await asyncio.wait_for(collector.task, 5)
    assert time.monotonic() - started < 1.0
    assert collector.records == [] and not reader.ended


async def test_stop_interrupts_a_call_in_flight(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    stream = await make_stream(1)
    entered = asyncio.Event()

    class Hanging(FaultyClient):
        async def get_records(self, **kwargs: Any) -> Any:
            entered.set()
            await asyncio.Event().wait()  # a peer that never answers

    reader = ShardReader(Hanging(kinesis), settings_for(stream), SHARD_0, start_after=None)
    collector = Collector(reader)
    await until(entered.is_set, "the GetRecords call to start")
    reader.stop()
    await asyncio.wait_for(collector.task, 5)
    assert reader.calls == 0


async def test_cancelling_the_reading_task_still_cancels(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    stream = await make_stream(1)
    reader = ShardReader(kinesis, settings_for(stream, idle_wait_s=60), SHARD_0, start_after=None)
    collector = Collector(reader)
    await collector.started()
    collector.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(collector.task, 5)


# --- check_stream and explain ----------------------------------------------------------
async def test_check_stream_lists_every_shard(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    stream = await make_stream(3)
    shards = await check_stream(kinesis, settings_for(stream))
    assert sorted(s["ShardId"] for s in shards) == [f"shardId-00000000000{i}" for i in range(3)]


async def test_check_stream_follows_list_shards_pages(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    """kinesalite never paginates ListShards, so this proxy cuts its real answer into pages
    of one shard, the way AWS pages: later pages take NextToken alone."""
    stream = await make_stream(3)
    calls: list[dict[str, Any]] = []

    class Paging(FaultyClient):
        async def list_shards(self, **kwargs: Any) -> Any:
            calls.append(kwargs)
            if "NextToken" in kwargs:
                assert "StreamName" not in kwargs, "AWS rejects StreamName together with NextToken"
                index = int(kwargs["NextToken"])
            else:
                index = 0
            everything = (await kinesis.list_shards(StreamName=stream))["Shards"]
            page: dict[str, Any] = {"Shards": everything[index:index + 1]}
            if index + 1 < len(everything):
                page["NextToken"] = str(index + 1)
            return page

    shards = await check_stream(Paging(kinesis), settings_for(stream))
    assert len(shards) == 3 and len({s["ShardId"] for s in shards}) == 3
    assert len(calls) == 3


async def test_check_stream_names_a_missing_stream(kinesis: Any, settings_for: Any) -> None:
    name = f"no-such-stream-{uuid.uuid4().hex[:8]}"
    with pytest.raises(AwsError) as caught:
        await check_stream(kinesis, settings_for(name))
    message = str(caught.value)
    assert name in message and "us-east-1" in message and "not found" in message
    assert caught.value.code == "ResourceNotFoundException"
    assert isinstance(caught.value.__cause__, ClientError)


async def test_check_stream_names_an_unreachable_endpoint(aws_env: None) -> None:
    settings = KinesisSettings(stream="s", endpoint_url=f"http://127.0.0.1:{free_port()}", max_backoff_s=0.05)
    async with kinesis_client(settings) as client:
        with pytest.raises(AwsError) as caught:
            await check_stream(client, settings, attempts=2)
    assert str(settings.endpoint_url) in str(caught.value)
    assert "Could not reach" in str(caught.value)


def test_explain_names_the_missing_permission() -> None:
    # No emulator can deny access (kinesalite and dynalite accept any credentials), so these
    # ClientErrors are built by hand the way botocore builds them from AWS's answer.
    settings = KinesisSettings(stream="arn:aws:kinesis:eu-west-1:123456789012:stream/exports", region="eu-west-1")
    denied = client_error("AccessDeniedException", "GetRecords",
                          message="User: arn:aws:sts::123456789012:assumed-role/relay is not authorized")
    message = explain(denied, settings)
    assert "kinesis:GetRecords" in message and "'exports'" in message and "arn:aws:kinesis" not in message
    message = explain(client_error("AccessDeniedException", "UpdateItem"), settings)
    assert "dynamodb:UpdateItem" in message and "segment-relay-leases" in message
    message = explain(client_error("UnrecognizedClientException", "ListShards"), settings)
    assert "kinesis:ListShards" in message and "credentials" in message
    message = explain(client_error("KMSAccessDeniedException", "GetRecords"), settings)
    assert "kms:Decrypt" in message


def test_explain_credentials_region_and_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    settings = KinesisSettings(stream="exports", endpoint_url="https://AKIDEXAMPLE:" + secret + "@kinesis.local:8443/")
    messages = [
        explain(NoCredentialsError(), settings),
        explain(NoRegionError(), settings),
        explain(EndpointConnectionError(endpoint_url=settings.endpoint_url), settings),
        explain(client_error("ResourceNotFoundException", "DescribeStreamSummary"), settings),
        explain(client_error("InvalidSignatureException", "GetShardIterator"), settings),
        # An unknown code shows AWS's message, first line only: what follows in a signature
        # error is the canonical request, which can hold a session-token header.
        explain(client_error("SomeNewException", "GetRecords",
                             message=f"Something new happened\n\nx-amz-security-token:{secret}"), settings),
    ]
    assert "credentials" in messages[0]
    assert "region" in messages[1]
    assert "https://kinesis.local:8443/" in messages[2]
    assert "'exports'" in messages[3]
    assert "Something new happened" in messages[5] and "SomeNewException" in messages[5]
    for message in messages:
        assert secret not in message and "AKIDEXAMPLE" not in message


def test_error_classification() -> None:
    for code in ("ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException",
                 "RequestLimitExceeded"):
        assert is_throttle(client_error(code)) and is_retryable(client_error(code))
        assert not is_expired_iterator(client_error(code))
    assert is_expired_iterator(expired()) and not is_retryable(expired())
    for exc in (EndpointConnectionError(endpoint_url="x"), ConnectionClosedError(endpoint_url="x"),
                ReadTimeoutError(endpoint_url="x"), TimeoutError(), ConnectionResetError(), OSError()):
        assert is_retryable_network(exc) and is_retryable(exc) and not is_throttle(exc)
    assert is_retryable_network(aiohttp.ServerDisconnectedError())
    assert is_retryable(client_error("InternalFailure", status=500))
    for code in ("ResourceNotFoundException", "AccessDeniedException", "InvalidArgumentException"):
        assert not is_retryable(client_error(code))
    assert not is_retryable(ValueError())


def test_backoff_is_exponential_with_full_jitter_and_a_ceiling() -> None:
    backoff = Backoff(1.0, rng=random.Random(7))
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    delays = [backoff.next_delay() for _ in caps]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    many = [Backoff(1.0).next_delay() for _ in range(200)]
    assert max(many) <= 0.1 and min(many) < 0.05  # jitter reaches down towards 0
    for _ in range(100):
        assert backoff.next_delay() <= 1.0
    backoff.reset()
    assert backoff.next_delay() <= 0.1


# --- KPL de-aggregation ----------------------------------------------------------------
def test_deaggregate_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                             settings_for: Any) -> None:
    monkeypatch.setitem(sys.modules, "aws_kinesis_agg", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install aws-kinesis-agg"):
        ShardReader(object(), settings_for("s", deaggregate=True), SHARD_0, start_after=None)


async def test_deaggregates_kpl_records(kinesis: Any, make_stream: Any, settings_for: Any) -> None:
    pytest.importorskip("aws_kinesis_agg", reason="aws-kinesis-agg is not installed (optional extra, "
                                                  "pip install aws-kinesis-agg): KPL de-aggregation not tested")
    from aws_kinesis_agg.aggregator import RecordAggregator

    aggregator = RecordAggregator()
    subs = payloads("sub", 3)
    for index, sub in enumerate(subs):
        aggregator.add_user_record(f"pk{index}", sub)
    _, _, aggregated = aggregator.clear_and_get().get_contents()
    stream = await make_stream(1)
    puts = await put(kinesis, stream, [aggregated, b'{"plain": 1}'])
    reader = ShardReader(kinesis, settings_for(stream, deaggregate=True), SHARD_0, start_after=None)
    got = triples(await Collector(reader).finish(4))
    parent, plain = puts[0][1], puts[1][1]
    assert got == [(SHARD_0, parent, subs[0]), (SHARD_0, parent, subs[1]), (SHARD_0, parent, subs[2]),
                   (SHARD_0, plain, b'{"plain": 1}')]
    assert reader.records == 2 and reader.last_sequence == plain



async def test_fast_get_records_parsing_matches_botocores(kinesis: Any, make_stream: Any, kinesalite: Emulator) -> None:
    # Our client parses successful GetRecords with msgspec; a stock aiobotocore client uses
    # botocore's shape walk. Both read the same iterator (kinesalite allows reuse).
    from aiobotocore.session import get_session

    stream = await make_stream(1)
    data = [b"{}", b"\x00\xffbinary", "ünïcode".encode(), b"x" * 5000]
    for index, payload in enumerate(data):
        await kinesis.put_record(StreamName=stream, Data=payload, PartitionKey=f"k{index}")
    iterator = (await kinesis.get_shard_iterator(StreamName=stream, ShardId=SHARD_0,
                                                 ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
    fast = await kinesis.get_records(ShardIterator=iterator, Limit=10)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as stock_client:
        stock = await stock_client.get_records(ShardIterator=iterator, Limit=10)
    assert [r["Data"] for r in fast["Records"]] == data == [r["Data"] for r in stock["Records"]]
    for ours, theirs in zip(fast["Records"], stock["Records"], strict=True):
        assert ours["SequenceNumber"] == theirs["SequenceNumber"]
        assert ours["PartitionKey"] == theirs["PartitionKey"]
        assert float(ours["ApproximateArrivalTimestamp"]) == pytest.approx(
            theirs["ApproximateArrivalTimestamp"].timestamp(), abs=0.001)
    assert fast["NextShardIterator"] and stock["NextShardIterator"]
    assert fast["MillisBehindLatest"] == stock["MillisBehindLatest"]
    assert fast["ResponseMetadata"]["HTTPStatusCode"] == 200
    # Errors still go through botocore: a bad iterator is a ClientError with its code.
    with pytest.raises(ClientError) as info:
        await kinesis.get_records(ShardIterator="not-an-iterator", Limit=10)
    assert info.value.response["Error"]["Code"] == "InvalidArgumentException"


async def test_a_get_records_body_msgspec_does_not_expect_goes_to_botocore(kinesis: Any) -> None:
    """The fast parser only takes what it knows; anything else (here ``Records`` that is not a list)
    is botocore's to parse, as it would be without us (here a MillisBehindLatest sent as a string)."""
    from aiobotocore.parsers import AioJSONParser

    from segment_relay.consumer.sources.kinesis.aws import _FastGetRecordsParser

    shape = kinesis.meta.service_model.operation_model("GetRecords").output_shape
    odd = {"body": b'{"Records": [], "MillisBehindLatest": "5"}', "headers": {}, "status_code": 200}
    stock = await AioJSONParser().parse(dict(odd), shape)
    ours = await _FastGetRecordsParser().parse(dict(odd), shape)
    assert ours == stock and ours["MillisBehindLatest"] == "5"
    good = {"body": b'{"Records": [{"SequenceNumber": "7", "Data": "e30=", "PartitionKey": "p"}]}', "headers": {},
            "status_code": 200}
    assert (await _FastGetRecordsParser().parse(good, shape))["Records"] == [
        {"SequenceNumber": "7", "Data": b"{}", "PartitionKey": "p"}]


async def test_at_debug_botocore_request_logs_keep_no_session_token_or_signature(
    kinesalite: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Temporary credentials (IRSA, an assumed role) sign every request with a session token that
    # botocore.endpoint prints in the request headers at DEBUG. It is not in the configuration,
    # and is not given to the logging here: the secret shapes alone must catch it.
    import io
    import logging
    import re

    from segment_relay.ops.logging import configure_logging

    token = "IQoJb3JpZ2luX2VjEXAMPLE" + uuid.uuid4().hex + "/+=="
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        async with kinesis_client(KinesisSettings(stream="unused", endpoint_url=kinesalite.endpoint)) as client:
            await client.list_streams()
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        configure_logging("WARNING", stream=io.StringIO())  # the libraries back to WARNING
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    output = stream.getvalue()
    assert "X-Amz-Security-Token" in output and "Signature" in output  # botocore did log them
    assert token not in output and token[:20] not in output
    assert not re.search(r"Signature=[0-9a-f]{16}", output) and not re.search(r"Signature:\\n[0-9a-f]{16}", output)
