"""Stream helpers for tests, benchmarks and the demo: create a stream, load exports into it.

Records are put with the profile's key as the partition key, as a producer that cares about
per-profile order would; each profile's records then stay in one shard, in order.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable
from typing import Any

import orjson

from .exports import reference_profile_key

PUT_BATCH = 500  # the PutRecords maximum


def partition_key_of(record: bytes) -> str:
    """The person's email address attribute when the record has one (it stays the same when the
    person logs in, and the generator gives both profiles of a person it later merges the same
    one: one person, one partition, so their records keep their order); else the profile key;
    else a stable key of the bytes (garbage)."""
    try:
        document = orjson.loads(record)
        email = document.get("personalEmail", {}).get("address")
        if isinstance(email, str) and email:
            return email[:256]
        return reference_profile_key(document["identityMap"])[:256]
    except Exception:  # noqa: BLE001 - invalid records still need a partition key
        return f"invalid-{zlib.crc32(record) & 0xFFFF}"  # the same in every process, unlike hash()


async def create_stream(client: Any, name: str, shards: int, *, timeout_s: float = 30.0) -> None:
    await client.create_stream(StreamName=name, ShardCount=shards)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        summary = await client.describe_stream_summary(StreamName=name)
        if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        if loop.time() > deadline:
            raise TimeoutError(f"stream {name} not ACTIVE after {timeout_s} s")
        await asyncio.sleep(0.05)


async def put_records(client: Any, stream: str, records: Iterable[bytes], *, in_flight: int = 4) -> int:
    """Put every record (retrying the ones a batch reports as failed); returns how many."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    for record in records:
        batch.append(record)
        if len(batch) == PUT_BATCH:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    # Batches go out in order, several at a time; a profile's records are ordered within a
    # batch, and a profile's consecutive batches never overlap with in_flight=1.
    semaphore = asyncio.Semaphore(in_flight)

    async def put(chunk: list[bytes]) -> None:
        async with semaphore:
            pending = [{"Data": data, "PartitionKey": partition_key_of(data)} for data in chunk]
            while pending:
                response = await client.put_records(StreamName=stream, Records=pending)
                if not response.get("FailedRecordCount"):
                    return
                pending = [entry for entry, result in zip(pending, response["Records"], strict=True)
                           if "ErrorCode" in result]

    await asyncio.gather(*(put(chunk) for chunk in batches))
    return sum(len(chunk) for chunk in batches)
