"""What every dead letter does, whatever it writes to: the protocol the pipeline and the router
use, and a base class that turns the three kinds of entry into JSON lines for ``_put``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ...model import IdentityItem, SegmentChange
from .entries import encode_entry, failed_change_entry, invalid_entry_entry, invalid_record_entry


class DeadLetter(Protocol):
    async def start(self) -> None:
        """Check that entries can be written (raise StartupError with one line saying why not)."""

    async def invalid_record(self, raw: bytes, *, reason: str, detail: str, partition: str, position: str) -> None: ...

    async def invalid_entry(self, entry: Any, *, path: str, reason: str, detail: str, partition: str,
                            position: str, identities: Mapping[str, Sequence[IdentityItem]] | None = None) -> None:
        """``identities``: the record's, so that a replay can put the entry through as its profile's."""

    async def failed_change(
        self, change: SegmentChange, *, handler: str, attempts: int, reason: str, detail: str,
        partition: str, position: str,
    ) -> None: ...

    async def flush(self) -> None:
        """Make every entry written so far durable: the pipeline checkpoints right after."""

    async def resume(self, partition: str, position: str) -> None:
        """The pipeline starts reading ``partition`` at ``position`` (the record after its
        checkpoint): entries an earlier owner wrote from there on need not be written again."""

    def discard(self, partition: str) -> None:
        """``partition`` was taken away: entries held for it, not yet durable, may be dropped
        (they lie past its checkpoint; its next owner writes them)."""

    async def close(self) -> None: ...


class LineDeadLetter:
    """A dead letter that stores entries as JSON lines: subclasses implement ``_put``. A call
    that raises stored nothing, so that the caller can simply call again."""

    count = 0  # entries stored

    async def start(self) -> None:
        pass

    async def _put(self, line: bytes, *, partition: str, position: str) -> None:
        raise NotImplementedError

    async def _store(self, entry: dict[str, Any]) -> None:
        await self._put(encode_entry(entry), partition=entry["partition"], position=entry["position"])
        self.count += 1

    async def invalid_record(self, raw: bytes, *, reason: str, detail: str, partition: str, position: str) -> None:
        await self._store(invalid_record_entry(raw, reason=reason, detail=detail, partition=partition,
                                               position=position))

    async def invalid_entry(self, entry: Any, *, path: str, reason: str, detail: str, partition: str,
                            position: str, identities: Mapping[str, Sequence[IdentityItem]] | None = None) -> None:
        await self._store(invalid_entry_entry(entry, path=path, reason=reason, detail=detail, partition=partition,
                                              position=position, identities=identities))

    async def failed_change(
        self, change: SegmentChange, *, handler: str, attempts: int, reason: str, detail: str,
        partition: str, position: str,
    ) -> None:
        await self._store(failed_change_entry(change, handler=handler, attempts=attempts, reason=reason,
                                              detail=detail, partition=partition, position=position))

    async def flush(self) -> None:
        pass

    async def resume(self, partition: str, position: str) -> None:
        pass  # a line sink writes at once: an entry may be written again after a crash (see the README)

    def discard(self, partition: str) -> None:
        pass

    async def close(self) -> None:
        await self.flush()
