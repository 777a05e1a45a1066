"""Order and bounds: per-profile lanes, in-flight limits, low-watermark acknowledgement."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class PartitionWatermark:
    """Tracks records of one partition in arrival order; the watermark is the last
    position before which every record is finished.

    Records finish out of order (different profiles run concurrently); the
    checkpoint may only move over a contiguous finished prefix.
    """

    __slots__ = ("_next_ticket", "_base", "_positions", "_finished", "committed", "watermark")

    def __init__(self) -> None:
        self._next_ticket = 0
        self._base = 0  # ticket of _positions[0], the oldest unfinished record
        self._positions: deque[Any] = deque()
        self._finished: set[int] = set()  # finished tickets above the base
        self.watermark: Any = None  # position of the last record of the finished prefix
        self.committed: Any = None  # last watermark handed to the source

    def register(self, position: Any) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._positions.append(position)
        return ticket

    def finish(self, ticket: int) -> None:
        if ticket != self._base:
            self._finished.add(ticket)
            return
        positions = self._positions
        finished = self._finished
        self._advance(positions.popleft())
        while self._base in finished:
            finished.remove(self._base)
            self._advance(positions.popleft())

    def _advance(self, position: Any) -> None:
        self._base += 1
        # Several records may share a position (the sub-records of one KPL aggregate): the
        # watermark reaches it only when the last of them is finished.
        if not self._positions or self._positions[0] != position:
            self.watermark = position

    @property
    def in_flight(self) -> int:
        return len(self._positions)


class InFlightLimit:
    """Bounds the records and bytes admitted but not yet finished (memory is bounded
    by configuration, not by backlog). A single record larger than the byte bound is
    admitted alone rather than never.

    A full limit lets the reader in again only once a tenth of it has drained: waking it
    for every finished record would cost an event-loop round trip per record exactly when
    the relay is busiest (a backlog keeps the limit full), which halved throughput.
    """

    def __init__(self, max_records: int, max_bytes: int) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("in-flight limits must be positive")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.resume_records = max_records - max(1, max_records // 10)
        self.resume_bytes = max_bytes - max(1, max_bytes // 10)
        self.records = 0
        self.bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    def fits(self, size: int) -> bool:
        if self.records == 0:
            return True
        return self.records < self.max_records and self.bytes + size <= self.max_bytes

    def take(self, size: int) -> None:
        """Admit without waiting; only after ``fits`` said yes."""
        self.records += 1
        self.bytes += size

    async def acquire(self, size: int) -> None:
        while not self.fits(size):
            self._room.clear()
            await self._room.wait()
        self.take(size)

    def release(self, size: int) -> None:
        self.records -= 1
        self.bytes -= size
        room = self._room
        if not room.is_set() and (
            self.records <= self.resume_records and self.bytes <= self.resume_bytes or self.records == 0
        ):
            room.set()


class ProfileLanes(Generic[T]):
    """Runs work items with bounded concurrency, strictly in order per key.

    A fixed pool of workers takes ready keys; a worker drains its key's queue
    before taking another, so items of one key never overlap or reorder, and no
    task is created per item (this is on the hot path).
    """

    def __init__(
        self,
        process: Callable[[T], Awaitable[None]],
        concurrency: int,
        *,
        retry_backoff_s: float = 0.1,
        max_retry_backoff_s: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.retry_backoff_s = retry_backoff_s
        self.max_retry_backoff_s = max_retry_backoff_s
        self._failures: dict[Hashable, int] = {}
        self._process = process
        self._concurrency = concurrency
        self._queues: dict[Hashable, deque[T]] = {}
        self._ready: asyncio.Queue[Hashable] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"lane-worker-{i}") for i in range(self._concurrency)
        ]

    def submit(self, key: Hashable, item: T) -> None:
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque((item,))
            self._ready.put_nowait(key)
            self._idle.clear()
        else:
            queue.append(item)

    @property
    def active_keys(self) -> int:
        return len(self._queues)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def _work(self) -> None:
        process = self._process
        while True:
            key = await self._ready.get()
            queue = self._queues[key]
            try:
                while queue:
                    await process(queue[0])
                    queue.popleft()
            except Exception:  # noqa: BLE001 - e.g. the dead letter cannot be written
                self._park(key)
                continue
            self._failures.pop(key, None)
            del self._queues[key]
            if not self._queues:
                self._idle.set()

    def _park(self, key: Hashable) -> None:
        """An item failed: keep it (dropping it would lose a record), free the worker for other
        keys, and offer the key again after a growing backoff. The item stays unfinished, so
        the checkpoint cannot pass it."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self.max_retry_backoff_s, self.retry_backoff_s * 2 ** (failures - 1))
        log.exception("processing failed; will retry", extra={"attempt": failures, "retry_in_s": delay})
        asyncio.get_running_loop().call_later(delay, self._ready.put_nowait, key)

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
