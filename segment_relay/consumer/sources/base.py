"""The Source protocol: batches of records in, checkpoints out, and partitions that come and go.

A source reads one or more *partitions* (a file, Kinesis shards, Event Hubs partitions). Each
time this replica gets a partition (a lease taken, an ownership claimed, a file opened) the
source tells its listener ``assigned(partition, epoch)`` with a new epoch, and stamps every
batch it reads under that assignment with it. When the partition is taken away (a lease lost,
an ownership moved) it calls ``revoked(partition)`` at once, before anything else of it is
read; the pipeline then drops every record of that epoch it has not handed to a handler yet,
and never commits for it again. Every revoke of a partition comes before its next assign (the
contract of aiokafka's ``ConsumerRebalanceListener`` and KCL's ``leaseLost``).

Positions are the source's own type (a line number, a sequence number, an event position);
the pipeline only compares them for equality and hands them back to ``commit``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["Batch", "PartitionListener", "ReadAhead", "Source", "SourceRecord", "SourceSnapshot", "get_unless_stopped"]

T = TypeVar("T")
P = TypeVar("P")


@dataclass(slots=True)
class SourceRecord(Generic[P]):
    """One raw record and where it is in its partition (``position`` orders records within it)."""

    position: P
    data: bytes


@dataclass(slots=True)
class Batch(Generic[P]):
    """Records of one partition, in order, read under one assignment (``epoch``)."""

    partition: str
    epoch: int
    records: Sequence[SourceRecord[P]]


class PartitionListener(Protocol):
    """What a source tells the pipeline about the partitions it reads (see the module docstring)."""

    def assigned(self, partition: str, epoch: int) -> None: ...

    def revoked(self, partition: str) -> None: ...

    def checkpoint_soon(self) -> None:
        """Commit what is finished now and as more finishes, for a while (a partition being
        handed over: its source releases it once its last record read is committed)."""


@dataclass(frozen=True)
class SourceSnapshot:
    """What a source reports to operations: the partitions it owns and how far behind they are."""

    owned: tuple[str, ...] | None = None  # None: the source does not share work between replicas
    lag_ms: Mapping[str, float] = field(default_factory=dict)  # time behind the newest record
    lag_events: Mapping[str, int] = field(default_factory=dict)  # records behind the newest one


class Source(Protocol[P]):
    """Reads batches of records and takes checkpoints back.

    ``start(listener)`` begins; ``batches`` yields until the source is exhausted or ``stop``
    was called. ``commit(partition, position)`` means every record of that partition up to and
    including ``position`` is finished; the pipeline only commits contiguous finished prefixes,
    in increasing order, and only for the current assignment of the partition.
    """

    name: str

    async def start(self, listener: PartitionListener) -> None: ...

    def batches(self) -> AsyncIterator[Batch[P]]: ...

    async def commit(self, partition: str, position: P) -> None: ...

    def stop(self) -> None: ...

    async def close(self) -> None: ...

    def snapshot(self) -> SourceSnapshot: ...


class ReadAhead:
    """Bounds how many records a source holds read but not yet taken by the pipeline.

    A reader ``reserve``s room for what one call may return *before* the call (so no response
    sits in memory waiting for room), gives back what the call did not use, and the source
    ``release``s a batch's records when the pipeline takes it. With the pipeline's own in-flight
    bound this keeps memory within the configured figures at any GetRecords limit or prefetch.
    One reservation larger than the bound is let through when nothing is held, never refused.

    Readers that size their own calls (Kinesis GetRecords) ``join`` and ask ``share()`` for the
    most one call should reserve: half the bound split among them, so that every reader can have
    a call in flight while its previous batch waits for the pipeline. A call sized to the whole
    bound would leave every other reader waiting, and the emulator or the service idle.
    """

    def __init__(self, max_records: int) -> None:
        if max_records < 1:
            raise ValueError("read-ahead must allow at least one record")
        self.max_records = max_records
        self.held = 0
        self.readers = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def join(self) -> None:
        self.readers += 1

    def leave(self) -> None:
        self.readers -= 1

    def share(self) -> int:
        return max(1, self.max_records // (2 * max(1, self.readers)))

    async def reserve(self, records: int) -> None:
        while self.held and self.held + records > self.max_records:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                waiter.cancel()  # no-op once done; a cancelled reserve leaves no waiter behind
        self.held += records

    def release(self, records: int) -> None:
        self.held -= records
        waiters = self._waiters
        while waiters:  # wake them all: each checks the room again (there are a few readers at most)
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


async def get_unless_stopped(queue: asyncio.Queue[T], stopping: asyncio.Event) -> T | None:
    """The next item of ``queue``, or None as soon as ``stopping`` is set: a source whose
    readers feed a queue uses this so that a stop request ends its ``batches()`` at once."""
    if stopping.is_set():
        return None
    if not queue.empty():  # the usual case under load: no tasks, no waiting
        return queue.get_nowait()
    getting = asyncio.ensure_future(queue.get())
    waiting = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((getting, waiting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if getting.done():
        return getting.result()
    getting.cancel()
    return None
