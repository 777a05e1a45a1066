"""Kinesis read without leases, for ``segment-relay run --dry-run``: every shard, nothing written.

A dry run must not disturb the replicas running on the stream, so it takes no lease (the lease
table is read once, never written, never created) and commits nothing. Each shard starts after
its lease's checkpoint, where a real run would resume, or at ``initial_position`` when it has
none; a shard checkpointed at SHARD_END is skipped. Parents are read before their children, as
the leased source does: a child starts once every parent known here has ended, at its
beginning. The stream's open shards are read until the dry run is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ..base import Batch, PartitionListener, ReadAhead, SourceSnapshot, get_unless_stopped
from .aws import AwsError, check_stream, dynamodb_client, error_code, explain, kinesis_client
from .leases import LeaseTable
from .settings import SHARD_END, InitialPosition, KinesisSettings
from .shard_reader import SequenceNumber, ShardReader

log = logging.getLogger(__name__)

__all__ = ["KinesisReadOnlySource"]


class KinesisReadOnlySource:
    def __init__(self, settings: KinesisSettings) -> None:
        self.settings = settings
        self.name = f"kinesis:{settings.stream_name}"
        self._exit = contextlib.AsyncExitStack()
        self._listener: PartitionListener | None = None
        self._read_ahead = ReadAhead(settings.read_ahead_records)
        self._queue: asyncio.Queue[tuple[Batch[SequenceNumber], int]] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._kinesis: Any = None
        self._parents: dict[str, list[str]] = {}  # shard -> its parents that are still to be read
        self._checkpoints: dict[str, str] = {}  # shard -> its lease's checkpoint
        self._readers: dict[str, ShardReader] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ended: set[str] = set()
        self._failure: BaseException | None = None

    def __repr__(self) -> str:
        return f"KinesisReadOnlySource({self.settings.stream_name!r})"

    async def start(self, listener: PartitionListener) -> None:
        self._listener = listener
        try:
            await self._start()
        except (ClientError, BotoCoreError) as exc:
            await self._exit.aclose()
            raise AwsError(explain(exc, self.settings), code=error_code(exc)) from exc
        except BaseException:
            await self._exit.aclose()
            raise

    async def _start(self) -> None:
        self._kinesis = await self._exit.enter_async_context(kinesis_client(self.settings))
        shards = {str(shard["ShardId"]): shard for shard in await check_stream(self._kinesis, self.settings)}
        self._checkpoints = await self._lease_checkpoints()
        for shard_id, shard in shards.items():
            if self._checkpoints.get(shard_id) == SHARD_END:
                self._ended.add(shard_id)
                continue
            parents = [str(parent) for parent in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId"))
                       if parent and str(parent) in shards]
            self._parents[shard_id] = parents
        self._start_ready()
        log.info("kinesis read without leases (dry run)", extra={
            "stream": self.settings.stream_name, "shards": len(shards), "checkpoints": len(self._checkpoints)})

    async def _lease_checkpoints(self) -> dict[str, str]:
        """Each shard's checkpoint from the lease table, read once; none if the table does not exist."""
        async with dynamodb_client(self.settings) as dynamodb:
            try:
                leases = await LeaseTable(dynamodb, self.settings.lease_table).list_leases()
            except ClientError as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
                log.warning("no lease table: every shard starts at the initial position", extra={
                    "table": self.settings.lease_table, "initial_position": self.settings.initial_position.value})
                return {}
        return {lease.shard_id: lease.checkpoint for lease in leases if lease.checkpoint}

    def _start_ready(self) -> None:
        """Start a reader for every shard whose parents have all ended."""
        for shard_id, parents in list(self._parents.items()):
            if shard_id in self._tasks or self._stopping.is_set():
                continue
            if all(parent in self._ended for parent in parents):
                del self._parents[shard_id]
                self._start_reader(shard_id, child=bool(parents))

    def _start_reader(self, shard_id: str, *, child: bool) -> None:
        start_at = InitialPosition.TRIM_HORIZON if child else self.settings.initial_position
        reader = ShardReader(self._kinesis, self.settings, shard_id, start_after=self._checkpoints.get(shard_id),
                             start_at=start_at, read_ahead=self._read_ahead)
        assert self._listener is not None
        self._listener.assigned(shard_id, 1)  # never revoked: nobody takes it away
        self._readers[shard_id] = reader
        self._tasks[shard_id] = asyncio.create_task(self._read(reader), name=f"kinesis-dry-run-{shard_id}")

    async def _read(self, reader: ShardReader) -> None:
        shard_id = reader.shard_id
        try:
            async for records, reserved in reader.batches():
                self._queue.put_nowait((Batch(shard_id, 1, records), reserved))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the dry run's figures would be incomplete: end it
            if error_code(exc) == "ResourceNotFoundException":  # trimmed past retention: nothing left
                reader.ended = True
            else:
                log.exception("shard reader failed; ending the dry run", extra={"shard": shard_id})
                self._failure = exc
                self.stop()
                return
        if reader.ended:
            self._ended.add(shard_id)
            self._start_ready()

    async def batches(self) -> AsyncIterator[Batch[SequenceNumber]]:
        while (item := await get_unless_stopped(self._queue, self._stopping)) is not None:
            batch, reserved = item
            self._read_ahead.release(reserved)
            yield batch
        if self._failure is not None:
            raise self._failure

    async def commit(self, partition: str, position: SequenceNumber) -> None:
        pass  # a dry run moves no checkpoint

    def stop(self) -> None:
        self._stopping.set()
        for reader in self._readers.values():
            reader.stop()

    async def close(self) -> None:
        self.stop()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._exit.aclose()

    def snapshot(self) -> SourceSnapshot:
        return SourceSnapshot(owned=tuple(sorted(self._readers)))
