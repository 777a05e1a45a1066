"""Order and bounds: low-watermark acknowledgement, in-flight limits, one step per profile at a time."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["InFlightLimit", "PartitionWatermark", "ProfileGate"]


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
        return self.register_many((position,))

    def register_many(self, positions: Sequence[Any]) -> int:
        """Records read in this order; returns the first one's ticket (the next ones follow)."""
        ticket = self._next_ticket
        self._next_ticket += len(positions)
        self._positions.extend(positions)
        return ticket

    def finish(self, ticket: int) -> None:
        self.finish_many((ticket,))

    def finish_many(self, tickets: Iterable[int]) -> None:
        """These records are finished (in any order); the watermark moves over what is contiguous."""
        finished = self._finished
        finished.update(tickets)
        base = self._base
        if base not in finished:
            return
        positions = self._positions
        watermark = self.watermark
        while base in finished:
            finished.remove(base)
            base += 1
            position = positions.popleft()
            # Several records may share a position (the sub-records of one KPL aggregate): the
            # watermark reaches it only when the last of them is finished.
            if not positions or positions[0] != position:
                watermark = position
        self._base = base
        self.watermark = watermark

    @property
    def in_flight(self) -> int:
        return len(self._positions)


class InFlightLimit:
    """Bounds the records and bytes admitted but not yet finished (memory is bounded
    by configuration, not by backlog). A group of records larger than the bounds is
    admitted alone rather than never.

    A full limit lets the reader in again only once a tenth of it has drained: waking it
    for every finished record would cost an event-loop round trip per record exactly when
    the relay is busiest (a backlog keeps the limit full).
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

    def fits(self, records: int, size: int) -> bool:
        if self.records == 0:
            return True
        return self.records + records <= self.max_records and self.bytes + size <= self.max_bytes

    def take(self, records: int, size: int) -> None:
        """Admit without waiting; only after ``fits`` said yes."""
        self.records += records
        self.bytes += size

    async def acquire(self, records: int, size: int) -> None:
        while not self.fits(records, size):
            self._room.clear()
            await self._room.wait()
        self.take(records, size)

    def release(self, records: int, size: int) -> None:
        self.records -= records
        self.bytes -= size
        room = self._room
        if not room.is_set() and (
            self.records <= self.resume_records and self.bytes <= self.resume_bytes or self.records == 0
        ):
            room.set()


class ProfileGate(Generic[T]):
    """Lets each profile into at most one pipeline step at a time.

    ``admit(key, item)`` says True when the profile is free (it is now busy, and the caller
    processes ``item`` in its step); otherwise ``item`` waits behind what the profile already
    has in flight, in arrival order. ``release(key)`` ends the profile's step: the items that
    waited meanwhile come back (the profile stays busy for them), or None (the profile is free).
    This is what keeps a profile's records in order across steps and batches while different
    profiles run concurrently, with no task or queue per profile.
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[Hashable, list[T]] = {}  # busy profiles -> items waiting for them

    def admit(self, key: Hashable, item: T) -> bool:
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = []
            return True
        waiting.append(item)
        return False

    def release(self, key: Hashable) -> list[T] | None:
        waiting = self._waiting.pop(key)
        if waiting:
            self._waiting[key] = []
            return waiting
        return None

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove (and return) every waiting item for which ``predicate`` holds."""
        dropped: list[T] = []
        for key, waiting in self._waiting.items():
            if any(predicate(item) for item in waiting):
                dropped.extend(item for item in waiting if predicate(item))
                self._waiting[key] = [item for item in waiting if not predicate(item)]
        return dropped

    def is_busy(self, key: Hashable) -> bool:
        return key in self._waiting

    @property
    def busy(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> int:
        return sum(map(len, self._waiting.values()))

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._waiting)
