"""Load exports into an event hub for tests, benchmarks and the demo, with the real SDK producer.

Each profile's records go to the partition its key hashes to (the SDK's own partition-key
hash), in order: what a producer that cares about per-profile order does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ..kinesis import partition_key_of
from .server import partition_for_key


async def send_exports(connection_string: str, hub: str, records: Iterable[bytes]) -> int:
    """Send every record; returns how many. Partitions are filled concurrently, one batch at a time each."""
    from azure.eventhub import EventData
    from azure.eventhub.aio import EventHubProducerClient

    producer = EventHubProducerClient.from_connection_string(connection_string, eventhub_name=hub)
    async with producer:
        partition_ids = await producer.get_partition_ids()
        by_partition: dict[str, list[bytes]] = {pid: [] for pid in partition_ids}
        for record in records:
            by_partition[partition_for_key(partition_key_of(record), partition_ids)].append(record)

        async def send(pid: str, items: list[bytes]) -> None:
            batch = await producer.create_batch(partition_id=pid)
            for item in items:
                try:
                    batch.add(EventData(item))
                except ValueError:  # the batch is full (1 MB): send it, start the next
                    await producer.send_batch(batch)
                    batch = await producer.create_batch(partition_id=pid)
                    batch.add(EventData(item))
            if len(batch):
                await producer.send_batch(batch)

        await asyncio.gather(*(send(pid, items) for pid, items in by_partition.items() if items))
    return sum(len(items) for items in by_partition.values())
