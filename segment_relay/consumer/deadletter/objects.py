"""Dead letters in object storage (S3, Azure Blob): durable beyond the pod, and written in batches.

Entries are held in memory per partition and written at ``flush`` (the pipeline flushes before
every checkpoint, so an entry is durable before the checkpoint that passes its record): one
object per partition and flush, never one per entry, named

    PREFIX/PARTITION/YYYYMMDDTHHMMSSZ-WORKER-RUN-N-LOW-HIGH.jsonl

(the time of the flush, the worker, a random id of this run, a sequence number and the lowest and
highest position it holds, each made safe for an object name): replicas, restarts and flushes never
collide, and a partition's objects list in time order. Each object is JSON lines, one entry per
line (see entries.py).

A replica that dies (or loses a partition) after a flush and before the checkpoint that passes
those records leaves entries that its partition's next owner produces again when it reads the
records once more. So when the pipeline starts reading a partition (``resume``), this reads back
the partition's objects of the last ``resume_lookback_s`` that hold positions from there on, and
does not write those entries again. Entries held for a partition that is taken away are dropped
(``discard``): they are all past its checkpoint, and its next owner writes them.

Past ``max_buffer_bytes`` held, a write waits for a flush, so a sink that is down pauses the
pipeline (its records wait in flight, then reading stops) instead of filling memory; nothing held
is dropped, and a failed flush keeps every object it could not write for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson

from .base import LineDeadLetter
from .entries import entry_identity

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFER_BYTES = 8 * 1024 * 1024
DEFAULT_RESUME_LOOKBACK_S = 6 * 3600.0
_STAMP = "%Y%m%dT%H%M%SZ"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class ObjectStore(Protocol):
    """Where the objects go: a bucket or container, under a prefix."""

    def describe(self) -> str:
        """Where, for logs and errors (never a secret)."""

    async def check(self, probe_name: str) -> None:
        """Raise StartupError (one line: what is wrong and what to do) unless objects can be written."""

    async def put(self, name: str, data: bytes) -> None:
        """Write the object ``name`` (under the prefix), replacing one of that name."""

    def names(self, under: str = "") -> AsyncIterator[str]:
        """The objects' names (relative to the prefix) that start with ``under``, in name order."""

    async def get(self, name: str) -> bytes: ...

    async def close(self) -> None: ...


def safe_name(text: str, limit: int = 120) -> str:
    """``text`` as one object-name segment: no "/", nothing a store treats specially."""
    return (_UNSAFE.sub("_", text) or "_")[:limit]


def _order(position: str) -> int | None:
    """Where a position sorts in its partition: every source's positions are decimal numbers
    (sequence numbers, line numbers); None for one that is not."""
    return int(position) if position.isdigit() else None


@dataclass
class _Held:
    lines: list[bytes] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    size: int = 0
    low: str = ""
    high: str = ""

    def add(self, line: bytes, position: str) -> None:
        if not self.lines or _sorts_before(position, self.low):
            self.low = position
        if not self.lines or _sorts_before(self.high, position):
            self.high = position
        self.lines.append(line)
        self.positions.append(position)
        self.size += len(line)


def _sorts_before(a: str, b: str) -> bool:
    order_a, order_b = _order(a), _order(b)
    return order_a is not None and order_b is not None and order_a < order_b


def _may_hold_from(name: str, position: str) -> bool:
    """Whether the object ``name`` may hold entries at ``position`` or later (its name ends in
    its LOW-HIGH positions); True when that cannot be told."""
    from_order = _order(position)
    high = name.removesuffix(".jsonl").rsplit("-", 1)[-1]
    return from_order is None or _order(high) is None or int(high) >= from_order


class ObjectDeadLetter(LineDeadLetter):
    """Holds entries per partition and writes one object per partition at each flush."""

    def __init__(self, store: ObjectStore, *, worker: str, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
                 resume_lookback_s: float = DEFAULT_RESUME_LOOKBACK_S) -> None:
        self.store = store
        self.worker = safe_name(worker, 60)
        self.run_id = secrets.token_hex(4)
        self.max_buffer_bytes = max_buffer_bytes
        self.resume_lookback_s = resume_lookback_s
        self._held: dict[str, _Held] = {}
        self._held_bytes = 0
        self._sequence = 0
        self._flushing = asyncio.Lock()
        self._written_before: dict[str, set[str]] = {}  # partition -> identities found at its resume
        self.objects_written = 0
        self.repeats_skipped = 0  # entries found already written by an earlier owner of their partition

    def __repr__(self) -> str:
        return f"ObjectDeadLetter({self.store.describe()})"

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    async def start(self) -> None:
        await self.store.check(f"_checks/{self.worker}.json")

    async def resume(self, partition: str, position: str) -> None:
        """Reading of ``partition`` starts at ``position``: find what earlier owners wrote from there
        on, so as not to write it again. A store that cannot be read (down, or no list or read
        permission) costs only that: those entries may then be written twice, never lost."""
        self._written_before[partition] = found = set()
        try:
            async for name in self._recent(partition):
                if _may_hold_from(name, position):
                    for line in (await self.store.get(name)).splitlines():
                        with contextlib.suppress(orjson.JSONDecodeError):
                            found.add(entry_identity(orjson.loads(line)))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not read back this partition's recent dead letters: entries written before a crash "
                        "may be written again", extra={"partition": partition, "error": f"{type(exc).__name__}: {exc}"})
        if found:
            log.info("dead letters already written past the checkpoint will not be written again",
                     extra={"partition": partition, "entries": len(found)})

    async def _recent(self, partition: str) -> AsyncIterator[str]:
        """The partition's objects flushed in the last ``resume_lookback_s``: one listing per hour."""
        now = datetime.now(UTC)
        hour = (now - timedelta(seconds=self.resume_lookback_s)).replace(minute=0, second=0, microsecond=0)
        while hour <= now:
            async for name in self.store.names(f"{safe_name(partition)}/{hour.strftime(_STAMP)[:11]}"):
                yield name
            hour += timedelta(hours=1)

    def discard(self, partition: str) -> None:
        """``partition`` was taken away: what is held of it lies past its checkpoint, and its next
        owner, reading those records again, writes it."""
        held = self._held.pop(partition, None)
        if held is not None:
            self._held_bytes -= held.size
        self._written_before.pop(partition, None)

    async def _store(self, entry: dict[str, Any]) -> None:
        written = self._written_before.get(entry["partition"])
        if written and entry_identity(entry) in written:
            self.repeats_skipped += 1
            return
        await super()._store(entry)

    async def _put(self, line: bytes, *, partition: str, position: str) -> None:
        while self._held_bytes and self._held_bytes + len(line) > self.max_buffer_bytes:
            await self.flush()  # raises while the store is down: this entry is not taken, the caller retries
        held = self._held.get(partition)
        if held is None:
            held = self._held[partition] = _Held()
        held.add(line, position)
        self._held_bytes += len(line)

    async def flush(self) -> None:
        async with self._flushing:
            for partition in list(self._held):
                # Taken out while it is written: entries that arrive meanwhile start a new one.
                held = self._held.pop(partition)
                self._sequence += 1
                name = self._name(partition, held)
                try:
                    await self.store.put(name, b"".join(held.lines))
                except BaseException:
                    self._hold_again(partition, held)  # the rest stays held too, for the next flush
                    raise
                self._held_bytes -= held.size
                self.objects_written += 1
                log.info("dead letters written", extra={"object": name, "entries": len(held.lines)})

    def _hold_again(self, partition: str, held: _Held) -> None:
        """Put entries that could not be written back in front of those held since."""
        since = self._held.get(partition)
        if since is not None:
            for line, position in zip(since.lines, since.positions, strict=True):
                held.add(line, position)
        self._held[partition] = held

    def _name(self, partition: str, held: _Held) -> str:
        stamp = datetime.now(UTC).strftime(_STAMP)
        return (f"{safe_name(partition)}/{stamp}-{self.worker}-{self.run_id}-{self._sequence:06d}-"
                f"{safe_name(held.low, 60)}-{safe_name(held.high, 60)}.jsonl")

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            await self.store.close()
