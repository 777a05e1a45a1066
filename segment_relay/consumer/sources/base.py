from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


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
