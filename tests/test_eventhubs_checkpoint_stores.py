"""The relay's Event Hubs checkpoint stores (Blob storage on Azurite, and sqlite): a checkpoint
never moves back, whichever replica writes last.

After a steal the old owner can still commit for a moment while the new owner commits its
own progress; a lower figure written last must not win (see blob_checkpoints.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore
from azure.storage.blob.aio import BlobServiceClient

from segment_relay.consumer.sources.eventhubs.blob_checkpoints import (
    ForwardOnlyBlobCheckpointStore,
    checkpoint_blob_name,
)
from segment_relay.consumer.sources.eventhubs.sqlite_checkpoints import SqliteCheckpointStore
from segment_relay.testing.azure import Azurite

WHERE = {"fully_qualified_namespace": "ns.example", "eventhub_name": "Exports", "consumer_group": "$Default"}

OpenStore = Callable[[], Any]


@pytest.fixture(params=["blob", "sqlite"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens a store client on one shared place, as each replica does; closes them all at the end."""
    opened: list[Any] = []
    if request.param == "blob":
        azurite: Azurite = request.getfixturevalue("azurite")
        container: str = request.getfixturevalue("container")

        def make() -> Any:
            return ForwardOnlyBlobCheckpointStore.from_connection_string(azurite.connection_string, container)
    else:
        def make() -> Any:
            return SqliteCheckpointStore(str(tmp_path / "checkpoints.sqlite"))

    def open_one() -> Any:
        opened.append(store := make())
        return store

    yield open_one
    for store in opened:
        await store.close()


def checkpoint(partition: str, sequence: int) -> dict[str, Any]:
    return {**WHERE, "partition_id": partition, "sequence_number": sequence, "offset": str(sequence * 100)}


async def stored(store: Any) -> dict[str, tuple[int, str]]:
    found = await store.list_checkpoints(WHERE["fully_qualified_namespace"], WHERE["eventhub_name"], WHERE["consumer_group"])
    return {c["partition_id"]: (int(c["sequence_number"]), str(c["offset"])) for c in found}


async def test_a_lower_checkpoint_written_last_does_not_move_it_back(open_store: OpenStore) -> None:
    new_owner, old_owner = open_store(), open_store()
    await old_owner.update_checkpoint(checkpoint("1", 40))
    await new_owner.update_checkpoint(checkpoint("1", 284))
    await old_owner.update_checkpoint(checkpoint("1", 82))  # the old owner, behind, commits after the steal
    assert await stored(new_owner) == {"1": (284, "28400")}
    await old_owner.update_checkpoint(checkpoint("1", 300))  # a higher figure still moves it, from anyone
    await new_owner.update_checkpoint(checkpoint("1", 299))
    assert await stored(old_owner) == {"1": (300, "30000")}


async def test_writers_racing_on_one_partition_leave_the_highest_figure(open_store: OpenStore) -> None:
    writers = [open_store() for _ in range(3)]
    figures = list(range(1, 61))

    async def write(store: Any, sequences: list[int]) -> None:
        for sequence in sequences:
            await store.update_checkpoint(checkpoint("0", sequence))

    # Each writer goes forward on its own, as each owner does, but they interleave.
    await asyncio.gather(*(write(store, figures[i::3]) for i, store in enumerate(writers)),
                         write(writers[0], [7, 3, 1]))
    assert (await stored(writers[1]))["0"] == (60, "6000")


async def test_partitions_are_kept_apart(open_store: OpenStore) -> None:
    store = open_store()
    await store.update_checkpoint(checkpoint("0", 9))
    await store.update_checkpoint(checkpoint("1", 3))
    await store.update_checkpoint(checkpoint("0", 5))
    assert await stored(store) == {"0": (9, "900"), "1": (3, "300")}


async def with_stores(azurite: Azurite, container: str,
                      body: Callable[[ForwardOnlyBlobCheckpointStore, BlobCheckpointStore], Awaitable[None]]) -> None:
    ours = ForwardOnlyBlobCheckpointStore.from_connection_string(azurite.connection_string, container)
    sdk = BlobCheckpointStore.from_connection_string(azurite.connection_string, container)
    try:
        await body(ours, sdk)
    finally:
        await ours.close()
        await sdk.close()


async def test_the_blobs_are_the_sdks_own_both_ways(azurite: Azurite, container: str) -> None:
    async def body(ours: ForwardOnlyBlobCheckpointStore, sdk: BlobCheckpointStore) -> None:
        await sdk.update_checkpoint(checkpoint("2", 50))  # written before the relay used its own store
        await ours.update_checkpoint(checkpoint("2", 20))
        assert await stored(sdk) == {"2": (50, "5000")}
        await ours.update_checkpoint(checkpoint("2", 70))
        assert await stored(sdk) == {"2": (70, "7000")}  # the SDK (and KEDA's blobMetadata) read ours
        async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
            names = [b.name async for b in service.get_container_client(container).list_blobs()]
        assert names == [checkpoint_blob_name(checkpoint("2", 0))] == ["ns.example/exports/$default/checkpoint/2"]

    await with_stores(azurite, container, body)


async def test_a_checkpoint_blob_deleted_by_hand_is_written_again(azurite: Azurite, container: str) -> None:
    async def body(ours: ForwardOnlyBlobCheckpointStore, sdk: BlobCheckpointStore) -> None:
        await ours.update_checkpoint(checkpoint("3", 10))  # cached: the next write skips the read
        async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
            await service.get_container_client(container).delete_blob(checkpoint_blob_name(checkpoint("3", 0)))
        await ours.update_checkpoint(checkpoint("3", 11))
        assert await stored(sdk) == {"3": (11, "1100")}

    await with_stores(azurite, container, body)
