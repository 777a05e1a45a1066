"""Reading a dead letter back (``segment-relay dead-letter list|show|replay``): every entry with a
stable id, and which ids were replayed already.

An id is ``OBJECT#LINE``: the file or object the entry is in and its line (from 1). Replayed ids
are kept beside the entries, so that replaying twice re-drives nothing twice: in
``PATH.replayed`` (one id per line) for a file, in ``PREFIX/_replayed/*.json`` objects for S3 and
Blob storage. Entries are never deleted or rewritten.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import orjson

from .file import JsonlDeadLetter
from .objects import ObjectDeadLetter, ObjectStore

CHECKS, REPLAYED = "_checks/", "_replayed/"


class StoredEntry(NamedTuple):
    id: str
    entry: dict[str, Any]


class DeadLetterReader(Protocol):
    def entries(self) -> AsyncIterator[StoredEntry]: ...

    async def replayed(self) -> set[str]: ...

    async def mark_replayed(self, ids: Iterable[str]) -> None: ...

    async def close(self) -> None: ...


def _entries_of(name: str, data: bytes) -> Iterable[StoredEntry]:
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:  # a line torn by a crash: show it, never replay it
            entry = {"kind": "unreadable", "line": line.decode(errors="replace")[:200]}
        yield StoredEntry(f"{name}#{number}", entry)


class FileReader:
    """A JSONL dead letter and the files rotated from it, oldest first."""

    def __init__(self, sink: JsonlDeadLetter) -> None:
        self.sink = sink
        self._marks = sink.path.with_name(sink.path.name + ".replayed")

    async def entries(self) -> AsyncIterator[StoredEntry]:
        files = [path for path in self.sink.rotated() if path != self._marks]
        for path in [*files, self.sink.path]:
            if path.exists():
                for stored in _entries_of(path.name, path.read_bytes()):
                    yield stored

    async def replayed(self) -> set[str]:
        return set(self._marks.read_text().split()) if self._marks.exists() else set()

    async def mark_replayed(self, ids: Iterable[str]) -> None:
        with open(self._marks, "a") as marks:
            marks.write("".join(f"{entry_id}\n" for entry_id in ids))
            marks.flush()
            os.fsync(marks.fileno())

    async def close(self) -> None:
        pass


class ObjectReader:
    """The objects of an S3 or Blob dead letter, in name order (per partition, then time)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def entries(self) -> AsyncIterator[StoredEntry]:
        async for name in self.store.names():
            if not name.startswith((CHECKS, REPLAYED)):
                for stored in _entries_of(name, await self.store.get(name)):
                    yield stored

    async def replayed(self) -> set[str]:
        done: set[str] = set()
        async for name in self.store.names(REPLAYED):
            done.update(orjson.loads(await self.store.get(name)))
        return done

    async def mark_replayed(self, ids: Iterable[str]) -> None:
        marked = sorted(ids)
        if marked:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            await self.store.put(f"{REPLAYED}{stamp}-{secrets.token_hex(4)}.json", orjson.dumps(marked))

    async def close(self) -> None:
        await self.store.close()


def reader_for(sink: object) -> DeadLetterReader:
    """The reader of a dead letter built from the config (build_dead_letter)."""
    if isinstance(sink, JsonlDeadLetter):
        return FileReader(sink)
    if isinstance(sink, ObjectDeadLetter):
        return ObjectReader(sink.store)
    raise ValueError("this dead letter cannot be read back (stdout goes to your log pipeline): "
                     "use a file:, s3:// or azblob:// dead letter")


def matches(entry: dict[str, Any], *, kind: str | None = None, reason: str | None = None,
            partition: str | None = None, since: datetime | None = None) -> bool:
    """Whether ``entry`` passes the ``list``/``replay`` filters."""
    if kind is not None and entry.get("kind") != kind:
        return False
    if reason is not None and entry.get("reason") != reason:
        return False
    if partition is not None and entry.get("partition") != partition:
        return False
    if since is not None:
        try:
            at = datetime.fromisoformat(str(entry.get("at")))
        except ValueError:
            return False
        if at < since:
            return False
    return True


__all__ = ["DeadLetterReader", "FileReader", "ObjectReader", "StoredEntry", "matches", "reader_for"]

