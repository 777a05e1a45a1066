"""Conformance: the raw aio SDK's ``BlobCheckpointStore`` on Azurite, consuming from the Event Hubs emulator.

Checks the checkpoint blobs that KEDA's ``blobMetadata`` checkpoint strategy reads
(``{fqns}/{hub}/{consumer group}/checkpoint/{partition}``, lower-case, with ``sequencenumber`` and
``offset`` metadata) and that a new consumer resumes after the checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.eventhub import EventData
from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient
from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore
from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from support import poll

from segment_relay.testing.azure import Azurite
from segment_relay.testing.eventhubs.server import EventHubsEmulator

HUB = "Orders"  # mixed case on purpose: the blob names are lower-cased
CONSUMER_GROUP = "$Default"
DEADLINE = 20.0


@pytest.fixture
async def emulator() -> AsyncIterator[EventHubsEmulator]:
    async with EventHubsEmulator({HUB: 2}) as emu:
        yield emu


@pytest.fixture
async def prod(emulator: EventHubsEmulator) -> AsyncIterator[EventHubProducerClient]:
    # one client for the whole test: it keeps its per-partition links (each new one costs ~0.5 s of SDK handshake)
    async with EventHubProducerClient.from_connection_string(emulator.connection_string(HUB)) as client:
        yield client


@pytest.fixture
async def container(azurite: Azurite) -> AsyncIterator[ContainerClient]:
    name = f"checkpoints-{uuid.uuid4().hex[:12]}"
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        client = await service.create_container(name)
        try:
            yield client
        finally:
            await client.delete_container()


wait_for = functools.partial(poll, timeout_s=DEADLINE)  # the shared helper, with this file's deadline


async def consume_and_checkpoint(emu: EventHubsEmulator, azurite: Azurite, container: str, n: int) -> list[Any]:
    """A checkpoint-store consumer (as the relay runs it) that checkpoints every event; stops after ``n``."""
    store = BlobCheckpointStore.from_connection_string(azurite.connection_string, container)
    client = EventHubConsumerClient.from_connection_string(
        emu.connection_string(HUB),
        consumer_group=CONSUMER_GROUP,
        checkpoint_store=store,
        load_balancing_interval=0.2,
    )
    got: list[Any] = []

    async def on_event(ctx: Any, event: Any) -> None:
        await ctx.update_checkpoint(event)
        got.append(event)  # after the checkpoint is written

    # "-1" only applies where there is no checkpoint yet
    task = asyncio.create_task(client.receive(on_event, starting_position="-1"))
    try:
        await wait_for(lambda: len(got) >= n or task.done(), f"{n} events (got {len(got)})")
    finally:
        await client.close()
        await task
    return got


async def send(prod: EventHubProducerClient, per_partition: dict[str, list[str]]) -> None:
    await asyncio.gather(
        *(prod.send_batch([EventData(b) for b in bodies], partition_id=pid) for pid, bodies in per_partition.items())
    )


async def checkpoint_blobs(container: ContainerClient, prefix: str) -> dict[str, dict[str, str]]:
    return {b.name: dict(b.metadata) async for b in container.list_blobs(name_starts_with=prefix, include=["metadata"])}


async def test_blob_checkpoints_and_resume(
    emulator: EventHubsEmulator, azurite: Azurite, container: ContainerClient, prod: EventHubProducerClient
) -> None:
    await send(prod, {"0": ["a0", "a1", "a2"], "1": ["b0", "b1"]})
    first = await consume_and_checkpoint(emulator, azurite, container.container_name, 5)
    assert sorted(e.body_as_str() for e in first) == ["a0", "a1", "a2", "b0", "b1"]

    # the blobs KEDA's blobMetadata strategy reads: one per partition, names lower-cased
    fqns = f"127.0.0.1:{emulator.port}"
    prefix = f"{fqns}/{HUB}/{CONSUMER_GROUP}/checkpoint/".lower()
    assert prefix == f"127.0.0.1:{emulator.port}/orders/$default/checkpoint/"
    blobs = await checkpoint_blobs(container, prefix)
    last = {p: emulator.events(HUB, p)[-1].message_annotations for p in "01"}
    assert blobs == {
        prefix + p: {
            "sequencenumber": str(last[p]["x-opt-sequence-number"]),  # type: ignore[index]
            "offset": last[p]["x-opt-offset"],  # type: ignore[index]
        }
        for p in "01"
    }
    assert blobs[prefix + "0"]["sequencenumber"] == "2" and blobs[prefix + "1"]["sequencenumber"] == "1"

    # a new consumer resumes after the checkpoints: the old events would come first if it did not
    await send(prod, {"0": ["a3"], "1": ["b2", "b3"]})
    second = await consume_and_checkpoint(emulator, azurite, container.container_name, 3)
    assert sorted(e.body_as_str() for e in second) == ["a3", "b2", "b3"]
    assert sorted((e.body_as_str(), e.sequence_number) for e in second) == [("a3", 3), ("b2", 2), ("b3", 3)]
    blobs = await checkpoint_blobs(container, prefix)
    assert {name: meta["sequencenumber"] for name, meta in blobs.items()} == {prefix + "0": "3", prefix + "1": "3"}
