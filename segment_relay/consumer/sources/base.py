from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class SourceRecord:
    """One raw record and where it came from. ``position`` orders records within a
    partition (a line number, a sequence number, an offset)."""

    partition: str
    position: Any
    data: bytes


class Source(Protocol):
    """Reads batches of records and takes checkpoints back.

    ``batches`` yields until the source is exhausted or ``stop`` was called.
    ``commit(partition, position)`` means every record of that partition up to and
    including ``position`` is finished; the pipeline only commits contiguous
    finished prefixes, in increasing order.
    """

    name: str

    async def start(self) -> None: ...

    def batches(self) -> AsyncIterator[Sequence[SourceRecord]]: ...

    async def commit(self, partition: str, position: Any) -> None: ...

    def stop(self) -> None: ...

    async def close(self) -> None: ...


async def get_unless_stopped(queue: asyncio.Queue[T], stopping: asyncio.Event) -> T | None:
    """The next item of ``queue``, or None as soon as ``stopping`` is set: a source whose
    readers feed a queue uses this so that a stop request ends its ``batches()`` at once."""
    if stopping.is_set():
        return None
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
