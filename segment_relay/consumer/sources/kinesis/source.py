"""The Kinesis source: shard readers for the leases this replica owns, one stream of batches.

    ListShards -> lease per shard (DynamoDB) -> LeaseCoordinator takes this replica's share
      -> one ShardReader task per owned shard -> queue (bounded by the read-ahead) -> Pipeline
    Pipeline.commit(shard, seq) -> lease checkpoint (only while the lease is ours)

Every lease taken is an assignment with a new epoch (``PartitionListener.assigned``); a lease
lost, released or finished is a revoke, told to the pipeline before anything else happens, so
what it still holds of the shard never reaches a handler. A shard read to its end is marked
SHARD_END once its last record is checkpointed, which frees its children for reading (parents
first, as KCL does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ..base import Batch, PartitionListener, ReadAhead, SourceSnapshot, get_unless_stopped
from .aws import AwsError, check_stream, dynamodb_client, error_code, explain, kinesis_client
from .coordinator import LeaseCoordinator
from .leases import Lease, LeaseTable
from .settings import SHARD_END, InitialPosition, KinesisSettings
from .shard_reader import SequenceNumber, ShardReader

log = logging.getLogger(__name__)

def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class KinesisSource:
    def __init__(
        self,
        settings: KinesisSettings,
        *,
        on_client: Callable[[str, Any], None] | None = None,
    ) -> None:
        """``on_client(service, client)`` sees each aiobotocore client once it exists: the seam
        for tests that inject faults (throttling, expired iterators) through botocore's
        event hooks, since the emulators never produce them."""
        self.settings = settings
        self._on_client = on_client
        self.name = f"kinesis:{settings.stream_name}"
        self.worker_id = settings.worker_id or default_worker_id()
        self._exit = contextlib.AsyncExitStack()
        self._kinesis: Any = None
        self._coordinator: LeaseCoordinator | None = None
        self._listener: PartitionListener | None = None
        self._epoch = 0  # one per lease taken, across shards
        self._epochs: dict[str, int] = {}  # shard -> epoch of the lease we hold
        # Batches read, not yet taken by the pipeline: bounded by the read-ahead (in records),
        # which every reader reserves before its GetRecords call.
        self._read_ahead = ReadAhead(settings.read_ahead_records)
        self._queue: asyncio.Queue[tuple[Batch[SequenceNumber], int]] = asyncio.Queue()
        self._lag_ms: dict[str, float] = {}
        self._readers: dict[str, ShardReader] = {}
        self._reader_tasks: dict[str, asyncio.Task[None]] = {}
        self._shard_ends: dict[str, str | None] = {}  # shard -> last sequence read, once it ended
        self._handoffs: dict[str, str | None] = {}  # shard -> last sequence read, while handing it over
        self._committed: dict[str, str] = {}  # shard -> the lease's checkpoint as we know it
        self._stopping = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self.running = False

    def __repr__(self) -> str:
        return f"KinesisSource({self.settings.stream_name!r}, worker={self.worker_id!r})"

    # --- lifecycle ------------------------------------------------------------------
    async def start(self, listener: PartitionListener) -> None:
        self._listener = listener
        try:
            await self._start()
        except (ClientError, BotoCoreError) as exc:  # e.g. the lease table: access denied, no credentials
            await self._exit.aclose()
            raise AwsError(explain(exc, self.settings), code=error_code(exc)) from exc
        except BaseException:
            await self._exit.aclose()
            raise

    async def _start(self) -> None:
        self._kinesis = await self._exit.enter_async_context(kinesis_client(self.settings))
        dynamodb = await self._exit.enter_async_context(dynamodb_client(self.settings))
        if self._on_client is not None:
            self._on_client("kinesis", self._kinesis)
            self._on_client("dynamodb", dynamodb)
        shards = await check_stream(self._kinesis, self.settings)
        table = LeaseTable(dynamodb, self.settings.lease_table)
        await table.ensure_table()
        self._coordinator = LeaseCoordinator(
            table, self.settings, self.worker_id, on_acquired=self._on_acquired, on_lost=self._on_lost,
            on_handoff=self._on_handoff,
        )
        await self._coordinator.sync_shards(shards)
        await self._coordinator.start()
        self._sync_task = asyncio.create_task(self._sync_shards_periodically(), name="kinesis-shard-sync")
        self.running = True
        log.info("kinesis source started", extra={"stream": self.settings.stream_name, "shards": len(shards),
                                                   "worker": self.worker_id})

    def stop(self) -> None:
        """Read no more. Leases stay ours until close(), so the drained work can still be checkpointed."""
        self._stopping.set()
        if self._coordinator is not None:
            self._coordinator.stop_taking()
        for reader in self._readers.values():
            reader.stop()

    async def close(self) -> None:
        self.running = False
        self.stop()
        if self._sync_task is not None:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)
        await self._cancel_readers(list(self._reader_tasks))
        if self._coordinator is not None:
            await self._coordinator.stop(release=True)  # graceful hand-off: others take them at once
        await self._exit.aclose()

    # --- reading ----------------------------------------------------------------------
    async def batches(self) -> AsyncIterator[Batch[SequenceNumber]]:
        while (item := await get_unless_stopped(self._queue, self._stopping)) is not None:
            batch, reserved = item
            self._read_ahead.release(reserved)  # the pipeline has it now: its own bound applies
            yield batch

    async def _on_acquired(self, lease: Lease) -> None:
        shard_id = lease.shard_id
        if self._stopping.is_set() or shard_id in self._reader_tasks:
            return
        checkpoint = lease.checkpoint
        if checkpoint == SHARD_END:
            return
        start_after = checkpoint if checkpoint else None
        if start_after is not None:
            self._committed[shard_id] = start_after
        else:
            self._committed.pop(shard_id, None)
        # A child shard starts at its beginning, whatever the configured position: its parents
        # were read to their ends, so everything after them is in the children.
        start_at = InitialPosition.TRIM_HORIZON if lease.parent_shard_ids else self.settings.initial_position
        reader = ShardReader(self._kinesis, self.settings, shard_id, start_after=start_after, start_at=start_at,
                             on_lag=self._on_lag, read_ahead=self._read_ahead)
        self._epoch += 1
        epoch = self._epochs[shard_id] = self._epoch
        assert self._listener is not None
        self._listener.assigned(shard_id, epoch)
        self._readers[shard_id] = reader
        self._reader_tasks[shard_id] = asyncio.create_task(self._read_shard(reader, epoch), name=f"kinesis-{shard_id}")
        self._shard_ends.pop(shard_id, None)
        log.info("reading shard", extra={"shard": shard_id, "after": start_after or start_at.value})

    async def _read_shard(self, reader: ShardReader, epoch: int) -> None:
        shard_id = reader.shard_id
        try:
            async for records, reserved in reader.batches():
                self._queue.put_nowait((Batch(shard_id, epoch, records), reserved))  # bounded by the read-ahead
            if reader.ended:
                self._shard_ends[shard_id] = reader.last_sequence
                await self._maybe_finish_shard(shard_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - give the shard back so that a replica can retry it
            if self._coordinator is None:
                raise
            if error_code(exc) == "ResourceNotFoundException":
                # Trimmed past retention: nothing is left to read, and its children must not wait.
                log.warning("shard no longer exists; marking it finished", extra={"shard": shard_id})
                await self._coordinator.mark_shard_end(shard_id)
            else:
                log.exception("shard reader failed; releasing its lease", extra={"shard": shard_id})
                self._revoke(shard_id)  # first: nothing it read may be handled or committed now
                await self._coordinator.release(shard_id)
        finally:
            self._readers.pop(shard_id, None)
            self._reader_tasks.pop(shard_id, None)

    async def _on_handoff(self, shard_id: str) -> None:
        """Another replica asked for the shard: read no more of it, let the pipeline finish and
        checkpoint what was read, then release the lease (commit() does, see _maybe_hand_off), so
        that the new owner starts exactly after it. If that takes longer than a lease duration, the
        asker steals the lease (and the pipeline is told through on_lost, as for any loss)."""
        reader = self._readers.get(shard_id)
        last = None
        if reader is not None:
            reader.stop()
            task = self._reader_tasks.get(shard_id)
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            last = reader.last_sequence
        self._handoffs[shard_id] = last
        self._shard_ends.pop(shard_id, None)
        if self._listener is not None:
            self._listener.checkpoint_soon()
        await self._maybe_hand_off(shard_id)

    async def _maybe_hand_off(self, shard_id: str) -> None:
        """Release a shard being handed over once everything read of it is checkpointed."""
        if shard_id not in self._handoffs or self._coordinator is None:
            return
        committed = self._committed.get(shard_id)
        if self._committed_through(shard_id, self._handoffs[shard_id]):
            del self._handoffs[shard_id]
            self._revoke(shard_id)  # everything of it is committed: the partition goes
            await self._coordinator.release(shard_id)
            log.info("shard handed over", extra={"shard": shard_id, "checkpoint": committed})
        elif self._listener is not None:
            self._listener.checkpoint_soon()  # the rest is still in flight: check again at the next commit

    async def _on_lost(self, shard_id: str) -> None:
        log.warning("lease lost: no longer reading the shard", extra={"shard": shard_id})
        self._handoffs.pop(shard_id, None)
        self._revoke(shard_id)  # at once, before the reader is even stopped
        await self._cancel_readers([shard_id])
        self._shard_ends.pop(shard_id, None)

    def _revoke(self, shard_id: str) -> None:
        """Tell the pipeline the shard is no longer ours (once per lease we held)."""
        if self._epochs.pop(shard_id, None) is not None and self._listener is not None:
            self._listener.revoked(shard_id)
        self._lag_ms.pop(shard_id, None)

    async def _cancel_readers(self, shard_ids: list[str]) -> None:
        tasks = []
        for shard_id in shard_ids:
            reader = self._readers.get(shard_id)
            if reader is not None:
                reader.stop()
            task = self._reader_tasks.get(shard_id)
            if task is not None:
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_lag(self, shard_id: str, millis: int) -> None:
        self._lag_ms[shard_id] = millis

    async def _sync_shards_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.shard_sync_interval_s)
            try:
                assert self._coordinator is not None
                await self._coordinator.sync_shards(await check_stream(self._kinesis, self.settings))
            except Exception:  # noqa: BLE001 - try again at the next interval
                log.exception("shard sync failed; will retry")

    # --- checkpoints ------------------------------------------------------------------
    async def commit(self, partition: str, position: SequenceNumber) -> None:
        coordinator = self._coordinator
        if coordinator is None or partition not in coordinator.held:
            return  # the lease moved on: its new owner checkpoints from now on
        sequence = str(position)
        known = self._committed.get(partition)
        if known is not None and int(sequence) <= int(known):
            # Records still in flight from before the lease was lost and taken back: the lease
            # (maybe moved on by another replica meanwhile) must not go back in time.
            return
        if await coordinator.checkpoint(partition, sequence):
            self._committed[partition] = sequence
            await self._maybe_finish_shard(partition)
            await self._maybe_hand_off(partition)

    def _committed_through(self, shard_id: str, last: str | None) -> bool:
        """Whether everything read of the shard, up to ``last`` (None: nothing), is checkpointed."""
        committed = self._committed.get(shard_id)
        return last is None or (committed is not None and int(committed) >= int(last))

    async def _maybe_finish_shard(self, shard_id: str) -> None:
        """Mark SHARD_END once the shard ended and its last record is checkpointed."""
        if shard_id not in self._shard_ends or self._coordinator is None:
            return
        if self._committed_through(shard_id, self._shard_ends[shard_id]):
            if await self._coordinator.mark_shard_end(shard_id):  # also releases the lease
                log.info("shard finished", extra={"shard": shard_id})
                self._shard_ends.pop(shard_id, None)
                self._revoke(shard_id)  # done: everything of it is committed, the partition goes

    @property
    def owned_shards(self) -> list[str]:
        return sorted(self._coordinator.held) if self._coordinator is not None else []

    def snapshot(self) -> SourceSnapshot:
        return SourceSnapshot(owned=tuple(self.owned_shards), lag_ms=dict(self._lag_ms))
