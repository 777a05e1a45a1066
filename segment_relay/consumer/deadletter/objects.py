"""Dead letters in object storage (S3, Azure Blob): durable beyond the pod, and written in batches.

Entries are held in memory per partition and written at ``flush`` (the pipeline flushes before
every checkpoint, so an entry is durable before the checkpoint that passes its record): one
object per partition and flush, never one per entry, named

    PREFIX/PARTITION/YYYYMMDDTHHMMSSZ-WORKER-RUN-N-FIRST-LAST.jsonl

(the time of the flush, the worker, a random id of this run, a sequence number and the first and
last position it holds, each made safe for an object name): replicas, restarts and flushes never
collide, and a partition's objects list in time order. Each object is JSON lines, one entry per
line (see entries.py).

Past ``max_buffer_bytes`` held, a write waits for a flush, so a sink that is down pauses the
pipeline (its records wait in flight, then reading stops) instead of filling memory; nothing held
is dropped, and a failed flush keeps every object it could not write for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from .base import LineDeadLetter

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFER_BYTES = 8 * 1024 * 1024
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


@dataclass
class _Held:
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    first: str = ""
    last: str = ""


class ObjectDeadLetter(LineDeadLetter):
    """Holds entries per partition and writes one object per partition at each flush."""

    def __init__(self, store: ObjectStore, *, worker: str, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES) -> None:
        self.store = store
        self.worker = safe_name(worker, 60)
        self.run_id = secrets.token_hex(4)
        self.max_buffer_bytes = max_buffer_bytes
        self._held: dict[str, _Held] = {}
        self._held_bytes = 0
        self._sequence = 0
        self._flushing = asyncio.Lock()
        self.objects_written = 0

    def __repr__(self) -> str:
        return f"ObjectDeadLetter({self.store.describe()})"

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    async def start(self) -> None:
        await self.store.check(f"_checks/{self.worker}.json")

    async def _put(self, line: bytes, *, partition: str, position: str) -> None:
        while self._held_bytes and self._held_bytes + len(line) > self.max_buffer_bytes:
            await self.flush()  # raises while the store is down: this entry is not taken, the caller retries
        held = self._held.get(partition)
        if held is None:
            held = self._held[partition] = _Held(first=position)
        held.lines.append(line)
        held.size += len(line)
        held.last = position
        self._held_bytes += len(line)

    async def flush(self) -> None:
        async with self._flushing:
            for partition in list(self._held):
                held = self._held[partition]
                self._sequence += 1
                name = self._name(partition, held)
                await self.store.put(name, b"".join(held.lines))  # raises: the rest stays held
                del self._held[partition]
                self._held_bytes -= held.size
                self.objects_written += 1
                log.info("dead letters written", extra={"object": name, "entries": len(held.lines)})

    def _name(self, partition: str, held: _Held) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return (f"{safe_name(partition)}/{stamp}-{self.worker}-{self.run_id}-{self._sequence:06d}-"
                f"{safe_name(held.first, 60)}-{safe_name(held.last, 60)}.jsonl")

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            await self.store.close()
