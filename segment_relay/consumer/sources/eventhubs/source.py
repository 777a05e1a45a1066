"""The Event Hubs source: the SDK receives, the pipeline decides what is done.

    EventHubConsumerClient.receive_batch (one task per owned partition, load balanced across
    replicas through ownership blobs) -> on_event_batch -> queue (bounded by the read-ahead)
    -> Pipeline
    Pipeline.commit(partition, position) -> checkpoint blob (only while the partition is ours)

A partition claimed (``on_partition_initialize``) is an assignment with a new epoch; a
partition closed (``on_partition_close``: ownership lost, or shutdown) is a revoke, told to the
pipeline at once, which drops whatever of it is still queued or not yet handed to a handler.

The SDK's own pattern (``update_checkpoint`` per event or per batch) writes a blob per call
and checkpoints events before they are handled. Here the pipeline commits the low watermark
of finished events on its interval, one blob write per partition at most.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from azure.eventhub.amqp import AmqpMessageBodyType

from ....errors import StartupError
from ..base import Batch, PartitionListener, ReadAhead, SourceRecord, SourceSnapshot, get_unless_stopped
from .connection import Clients, explain, open_clients
from .received import ReceivedEvent
from .settings import EventHubsSettings, EventPosition, StartingPosition

log = logging.getLogger(__name__)

_DATA = AmqpMessageBodyType.DATA


@dataclass(slots=True)
class _Owned:
    """A partition this replica reads now."""

    context: Any  # the SDK's PartitionContext: names the checkpoint blob
    epoch: int
    committed: int | None = None  # sequence number of our last checkpoint in this ownership


def event_body(event: Any) -> bytes:
    """The raw bytes of an event: Adobe sends JSON as a data body; a string or other AMQP value
    or sequence body is turned into bytes so that the parser (not this source) judges it. Never
    raises: an event whose body cannot be read must still reach the dead letter, not stall its
    partition."""
    if type(event) is ReceivedEvent:  # the usual case: see received.py
        data = event.body_bytes()
        if data is not None:
            return data
        event = event.as_event_data()
    body = event.body
    if type(body) is not bytes and event.body_type is _DATA:
        return b"".join(body)  # the usual case: data sections
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    try:
        return orjson.dumps(_plain(body), default=str)
    except (TypeError, orjson.JSONEncodeError, RecursionError):
        return repr(body).encode()


def _plain(value: Any) -> Any:
    """An AMQP value as JSON can hold it: binary as text, map keys as strings, sequences as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(_plain(key)): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple) or inspect.isgenerator(value):
        return [_plain(item) for item in value]
    return value


class EventHubsSource:
    def __init__(self, settings: EventHubsSettings) -> None:
        self.settings = settings
        self.name = f"eventhubs:{settings.hub}"
        self._clients: Clients | None = None
        self._listener: PartitionListener | None = None
        self._read_ahead = ReadAhead(settings.read_ahead_events)
        self._queue: asyncio.Queue[Batch[EventPosition]] = asyncio.Queue()  # bounded by the read-ahead
        self._owned: dict[str, _Owned] = {}
        self._epoch = 0  # one per partition claimed, across partitions
        self._last_read: dict[str, tuple[int, datetime | None]] = {}  # sequence number, enqueued time
        self._newest: dict[str, tuple[int, datetime | None] | None] = {}  # from the lag poll; None: empty
        self._lag_poll: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._receiving: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        self.running = False

    def __repr__(self) -> str:
        return f"EventHubsSource({self.settings.hub!r}, consumer_group={self.settings.consumer_group!r})"

    # --- lifecycle ------------------------------------------------------------------
    async def start(self, listener: PartitionListener) -> None:
        self._listener = listener
        clients = self._clients = await open_clients(self.settings)
        starting = StartingPosition.for_sdk(self.settings.starting_position)
        # Receiving starts at once, beside the check: the check's management call opens a
        # connection of its own (about 0.4 s), and the SDK's load balancer needs the same time.
        self._receiving = asyncio.create_task(self._receive(clients, starting), name="eventhubs-receive")
        try:
            await self._check(clients)
        except BaseException:
            self._stopping.set()
            self._receiving.cancel()
            await asyncio.gather(self._receiving, return_exceptions=True)
            self._receiving = None
            await clients.aclose()
            self._clients = None
            raise
        self.running = True
        self._lag_poll = asyncio.create_task(self._poll_lag(clients), name="eventhubs-lag")
        log.info("event hubs source started", extra={
            "hub": self.settings.hub, "consumer_group": self.settings.consumer_group,
            "checkpoints": self.settings.checkpoint_path or self.settings.checkpoint_container,
            "starting_position": starting.isoformat() if isinstance(starting, datetime) else starting,
        })

    async def _check(self, clients: Clients) -> None:
        """Fail at start, with a reason, on what would otherwise only be retried and logged forever."""
        try:
            partitions = await clients.probe.get_partition_ids()
        except Exception as exc:  # noqa: BLE001 - every SDK error becomes one line
            raise StartupError(explain(exc, self.settings, part="event hub")) from None
        try:
            await clients.checkpoint_store.list_ownership(
                self._namespace(clients), self.settings.hub, self.settings.consumer_group
            )
        except Exception as exc:  # noqa: BLE001
            raise StartupError(explain(exc, self.settings, part="checkpoint store")) from None
        log.info("event hub found", extra={"hub": self.settings.hub, "partitions": len(partitions)})

    @staticmethod
    def _namespace(clients: Clients) -> str:
        # The name the SDK's own load balancer keys ownership blobs by (it reads the same attribute).
        return str(clients.consumer._address.hostname)

    async def _receive(self, clients: Clients, starting: str | datetime) -> None:
        settings = self.settings
        try:
            position: Any = starting
            if settings.read_only_consumer_group is not None:
                position = await self._after_checkpoints(clients, starting)
            await clients.consumer.receive_batch(
                self._on_batch,
                max_batch_size=settings.max_batch_size,
                max_wait_time=None,
                prefetch=settings.prefetch,
                starting_position=position,
                starting_position_inclusive=False,  # also applies to checkpoints: resume after, not at, them
                on_partition_initialize=self._on_initialize,
                on_partition_close=self._on_close,
                on_error=self._on_error,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the SDK retries inside; reaching here means it gave up
            log.exception("event hubs receive loop ended")
            self._failure = exc  # batches() raises it: the relay must not end as if the hub had
            self._stopping.set()

    async def _after_checkpoints(self, clients: Clients, starting: str | datetime) -> dict[str, Any]:
        """A dry run's start per partition: after the checkpoint of ``consumer_group`` (where a
        real run resumes; a sequence number), or ``starting`` where there is none."""
        checkpoints = await clients.checkpoint_store.list_checkpoints(
            self._namespace(clients), self.settings.hub, self.settings.consumer_group)
        after = {str(c["partition_id"]): int(c["sequence_number"]) for c in checkpoints
                 if c.get("sequence_number") is not None}
        partitions = await clients.probe.get_partition_ids()
        return {pid: after.get(pid, starting) for pid in partitions}

    def stop(self) -> None:
        """Read no more. Partitions stay ours until close(), so the drained work can be checkpointed."""
        self._stopping.set()

    async def close(self) -> None:
        self.running = False
        self._stopping.set()
        if self._lag_poll is not None:
            await _cancel_until_done(self._lag_poll, "lag poll")
            self._lag_poll = None
        if self._clients is not None:
            # Closing the client releases our ownerships: other replicas take them at their next cycle.
            await self._clients.aclose()
            self._clients = None
        if self._receiving is not None:
            await asyncio.gather(self._receiving, return_exceptions=True)

    # --- SDK callbacks ------------------------------------------------------------------
    async def _on_initialize(self, context: Any) -> None:
        pid = context.partition_id
        self._epoch += 1
        owned = self._owned[pid] = _Owned(context, self._epoch)
        assert self._listener is not None
        self._listener.assigned(pid, self._epoch)
        log.info("partition claimed", extra={"partition": pid})
        if self.settings.starting_position == StartingPosition.LATEST and self.settings.read_only_consumer_group is None:
            await self._checkpoint_the_start(owned)

    async def _checkpoint_the_start(self, owned: _Owned) -> None:
        """A partition with no checkpoint, started at the latest event: check it in there at once.
        Without a checkpoint, KEDA's blobMetadata strategy counts the partition's whole retention
        as unprocessed and scales to the maximum until the first event arrives. The SDK awaits
        this callback before it receives from the partition, so no commit of ours can race it."""
        context = owned.context
        pid = context.partition_id
        assert self._clients is not None
        store = self._clients.checkpoint_store
        try:
            existing = await store.list_checkpoints(context.fully_qualified_namespace, context.eventhub_name,
                                                    context.consumer_group)
            if any(str(checkpoint.get("partition_id")) == pid for checkpoint in existing):
                return
            newest = await self._clients.probe.get_partition_properties(pid)
            if newest.get("is_empty"):
                return  # nothing retained: no lag to misread
            await self._write_checkpoint(owned, EventPosition(int(newest["last_enqueued_sequence_number"]),
                                                              str(newest["last_enqueued_offset"])))
            log.info("first checkpoint at the latest event", extra={"partition": pid, "sequence_number": owned.committed})
        except Exception as exc:  # noqa: BLE001 - the claim stands; only the scaler's view waits for the first commit
            log.warning("could not write the first checkpoint of a partition", extra={
                "partition": pid, "error": f"{type(exc).__name__}: {exc}"})

    async def _on_close(self, context: Any, reason: Any) -> None:
        pid = context.partition_id
        if self._owned.pop(pid, None) is not None and self._listener is not None:
            self._listener.revoked(pid)  # its queued events are dropped, nothing more is committed
        self._last_read.pop(pid, None)
        self._newest.pop(pid, None)
        level = logging.INFO if self._stopping.is_set() else logging.WARNING
        log.log(level, "partition closed", extra={"partition": pid, "reason": getattr(reason, "name", str(reason))})

    async def _on_error(self, context: Any, error: Exception) -> None:
        pid = getattr(context, "partition_id", None)
        # The SDK recovers by itself (reconnects, re-claims); this is for the operator.
        log.warning("event hubs error; the SDK retries", extra={"partition": pid, "error": f"{type(error).__name__}: {error}"})

    async def _on_batch(self, context: Any, events: list[Any]) -> None:
        if not events or self._stopping.is_set():
            return  # not checkpointed: read again by whoever owns the partition next
        pid = context.partition_id
        owned = self._owned.get(pid)
        if owned is None:
            return
        records = [
            SourceRecord(EventPosition(event.sequence_number, event.offset), event_body(event)) for event in events
        ]
        last = events[-1]
        self._last_read[pid] = (last.sequence_number, last.enqueued_time)
        read_ahead = self._read_ahead
        if read_ahead.held and read_ahead.held + len(records) > read_ahead.max_records:
            # Back-pressure: this partition's receive task waits (its prefetch fills, then the
            # service stops sending); a stop request must not leave it waiting forever.
            reserving = asyncio.ensure_future(read_ahead.reserve(len(records)))
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait((reserving, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not reserving.done():
                    reserving.cancel()
            if not reserving.done() or reserving.cancelled():
                return  # stopping: not checkpointed, read again by whoever owns the partition next
        else:
            await read_ahead.reserve(len(records))  # room: returns at once
        self._queue.put_nowait(Batch(pid, owned.epoch, records))

    async def _poll_lag(self, clients: Clients) -> None:
        """Every lag_interval_s, each owned partition's newest event, for the lag figures.

        One management call per partition and interval instead of the SDK's
        track_last_enqueued_event_properties, which makes the service annotate every event and the
        SDK decode one more map per event (a few percent of its cost per event). The figures are
        worked out when they are read (snapshot()), against the last event read by then: they
        fall as the relay catches up and rise at the next poll."""
        while True:
            for pid in list(self._owned):
                try:
                    newest = await clients.probe.get_partition_properties(pid)
                except Exception as exc:  # noqa: BLE001 - a metric: try again next time
                    log.debug("partition properties not read", extra={"partition": pid, "error": type(exc).__name__})
                    continue
                if pid in self._owned:
                    sequence = newest.get("last_enqueued_sequence_number")
                    empty = newest.get("is_empty") or sequence is None or sequence < 0
                    self._newest[pid] = None if empty else (sequence, newest.get("last_enqueued_time_utc"))
            await asyncio.sleep(self.settings.lag_interval_s)

    def _lag(self) -> tuple[dict[str, float], dict[str, int]]:
        """Time and events behind the newest event seen by the last poll, per partition. A partition
        with nothing read since its claim has no figure (where it starts is its checkpoint's business),
        unless it is empty."""
        lag_ms: dict[str, float] = {}
        lag_events: dict[str, int] = {}
        for pid, newest in self._newest.items():
            read = self._last_read.get(pid)
            if newest is None:
                lag_ms[pid], lag_events[pid] = 0.0, 0
            elif read is not None:
                behind = lag_events[pid] = max(0, newest[0] - read[0])
                newest_time, read_time = newest[1], read[1]
                lag_ms[pid] = 0.0 if behind == 0 or newest_time is None or read_time is None else \
                    max(0.0, (newest_time - read_time).total_seconds() * 1000)
        return lag_ms, lag_events

    # --- reading ----------------------------------------------------------------------
    async def batches(self) -> AsyncIterator[Batch[EventPosition]]:
        while (first := await get_unless_stopped(self._queue, self._stopping)) is not None:
            for batch in self._with_waiting(first):
                self._read_ahead.release(len(batch.records))  # the pipeline has it now: its own bound applies
                yield batch
        if self._failure is not None:
            raise self._failure

    def _with_waiting(self, first: Batch[EventPosition]) -> list[Batch[EventPosition]]:
        """``first`` and the batches queued behind it, joined per partition and epoch (in order).

        The SDK hands over whatever its buffer holds when its callback task looks, often a few
        dozen events; when the pipeline falls behind, joining them makes its steps (one store
        call, one hand-over, one save each) as big as a busy partition would make them anyway."""
        queue = self._queue
        if queue.empty():
            return [first]
        # All of it: the read-ahead bounds what can be queued, the pipeline splits big batches into steps.
        joined = {(first.partition, first.epoch): list(first.records)}
        while not queue.empty():
            batch = queue.get_nowait()
            joined.setdefault((batch.partition, batch.epoch), []).extend(batch.records)
        return [Batch(partition, epoch, records) for (partition, epoch), records in joined.items()]

    # --- checkpoints ------------------------------------------------------------------
    async def commit(self, partition: str, position: EventPosition) -> None:
        if self.settings.read_only_consumer_group is not None:
            return  # a dry run writes nothing
        owned = self._owned.get(partition)
        if owned is None:
            return  # not ours any more: the new owner checkpoints (the pipeline checks the epoch first)
        if owned.committed is not None and position.sequence_number <= owned.committed:
            return
        await self._write_checkpoint(owned, position)

    async def _write_checkpoint(self, owned: _Owned, position: EventPosition) -> None:
        """The SDK's checkpoint blob (the layout KEDA reads) for ``owned``'s partition at ``position``."""
        context = owned.context
        assert self._clients is not None
        await self._clients.checkpoint_store.update_checkpoint({
            "fully_qualified_namespace": context.fully_qualified_namespace,
            "eventhub_name": context.eventhub_name,
            "consumer_group": context.consumer_group,
            "partition_id": context.partition_id,
            "offset": position.offset,
            "sequence_number": position.sequence_number,
        })
        owned.committed = position.sequence_number

    @property
    def owned_partitions(self) -> list[str]:
        return sorted(self._owned)

    def snapshot(self) -> SourceSnapshot:
        lag_ms, lag_events = self._lag()
        return SourceSnapshot(owned=tuple(self.owned_partitions), lag_ms=lag_ms, lag_events=lag_events)


async def _cancel_until_done(task: asyncio.Task[Any], what: str, timeout_s: float = 10.0) -> None:
    """Cancel ``task`` until it ends, for up to ``timeout_s``. One cancel is not always enough for
    a task inside the SDK: its AMQP transport reads frames under ``asyncio.wait_for`` and turns a
    timeout into "no frame", and on Python 3.11 a cancel that lands as that timeout fires is
    swallowed; the management call then polls for a ready link for ever, and close() with it
    (seen in the suite: a relay that never stopped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.done():
        log.warning("an SDK task did not stop when cancelled; leaving it", extra={"task": what})
    elif not task.cancelled() and task.exception() is not None:
        log.debug("task ended with an error", extra={"task": what, "error": repr(task.exception())})
