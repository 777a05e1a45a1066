"""``segment-relay dead-letter replay``: put dead letters through the relay again, after a fix.

- invalid records go through the pipeline as they were read: the same validation, the same
  state store (so nothing older than what is stored re-applies) and the configured handlers;
- an invalid audience entry goes through the pipeline as a record of its profile with that one
  entry;
- a failed change is handed to its handler again (or to the handlers named with ``--handler``),
  with the relay's retries.

An entry that succeeds is marked replayed (see reader.py) once the pipeline has checkpointed past
it, or its change was handled: a second replay re-drives nothing twice, and one that is
interrupted re-drives only what it had not finished. An entry that fails again (a record still
invalid, a change its handler still refuses) stays as it is, unmarked, and is not written twice;
a change of a replayed record that fails is dead-lettered as usual.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from .app import Relay, build_dead_letter, build_handlers
from .config import RelayConfig
from .consumer.deadletter import DeadLetter, MemoryDeadLetter
from .consumer.deadletter.reader import StoredEntry, matches, reader_for
from .consumer.export import IdentityItem, InvalidRecord, parse_export
from .consumer.sources.base import Batch, PartitionListener, SourceRecord, SourceSnapshot
from .handlers.router import RetryPolicy, Router
from .model import ChangeType, SegmentChange, SegmentStatus

RECORD_KINDS = ("invalid_record", "invalid_entry")


@dataclass
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do)."""

    records: int = 0  # invalid records and entries put through the pipeline
    now_valid: int = 0  # dry run: of those, the ones the relay now accepts
    invalid_again: int = 0  # records (by position) still invalid: their entries stay, unmarked
    changes: int = 0  # failed changes handed to a handler again
    failed_again: int = 0  # of those, refused again: their entries stay, unmarked
    already_replayed: int = 0
    not_replayable: int = 0  # e.g. a torn line
    handlers: dict[str, int] = field(default_factory=dict)  # changes per handler
    summary: dict[str, Any] | None = None  # the pipeline's, for the records

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True)
class ReplayPosition:
    """A record's place in the replay; it shows (in changes and new entries) as the original one."""

    index: int
    original: str

    def __str__(self) -> str:
        return self.original


class ReplaySource:
    """The dead-lettered records, one partition per original partition; a commit marks them replayed."""

    name = "dead-letter-replay"

    def __init__(self, records: dict[str, list[tuple[StoredEntry, bytes]]], mark: Any,
                 still_invalid: set[tuple[str, str]]) -> None:
        self._records = records
        self._mark = mark
        self._still_invalid = still_invalid  # (partition, position) of records invalid again: not marked
        self._marked: dict[str, int] = {}
        self._stopped = False

    async def start(self, listener: PartitionListener) -> None:
        for epoch, partition in enumerate(self._records, start=1):
            listener.assigned(partition, epoch)
        self._epochs = {partition: epoch for epoch, partition in enumerate(self._records, start=1)}

    async def batches(self) -> AsyncIterator[Batch[ReplayPosition]]:
        for partition, items in self._records.items():
            if self._stopped:
                return
            records = [SourceRecord(ReplayPosition(index, str(stored.entry.get("position", ""))), data)
                       for index, (stored, data) in enumerate(items)]
            yield Batch(partition, self._epochs[partition], records)

    async def commit(self, partition: str, position: ReplayPosition) -> None:
        start = self._marked.get(partition, 0)
        await self._mark(stored.id for stored, _ in self._records[partition][start:position.index + 1]
                         if (partition, str(stored.entry.get("position", ""))) not in self._still_invalid)
        self._marked[partition] = position.index + 1

    def stop(self) -> None:
        self._stopped = True

    async def close(self) -> None:
        pass

    def snapshot(self) -> SourceSnapshot:
        return SourceSnapshot()


class _InvalidAgain:
    """The replay pipeline's dead letter: a record or entry invalid again keeps its first entry
    (it is noted, not written twice); a failed change of a replayed record is written as usual."""

    def __init__(self, sink: DeadLetter) -> None:
        self.sink = sink
        self.positions: set[tuple[str, str]] = set()

    async def start(self) -> None:
        await self.sink.start()

    async def invalid_record(self, raw: bytes, *, partition: str, position: str, **_: Any) -> None:
        self.positions.add((partition, position))

    async def invalid_entry(self, entry: Any, *, partition: str, position: str, **_: Any) -> None:
        self.positions.add((partition, position))

    async def failed_change(self, change: SegmentChange, **fields: Any) -> None:
        await self.sink.failed_change(change, **fields)

    async def flush(self) -> None:
        await self.sink.flush()

    async def resume(self, partition: str, position: str) -> None:
        pass  # the replay marks keep it from writing anything twice

    def discard(self, partition: str) -> None:
        pass

    async def close(self) -> None:
        await self.sink.close()


def record_of(entry: dict[str, Any]) -> bytes | None:
    """The record to put through the pipeline for an invalid record or entry (None: none can be made)."""
    if entry.get("kind") == "invalid_record":
        if "raw" in entry:
            return str(entry["raw"]).encode()
        if "raw_base64" in entry:
            return base64.b64decode(entry["raw_base64"])
        return None
    parts = str(entry.get("path", "")).split(".", 2)
    identities = entry.get("identities")
    if entry.get("kind") != "invalid_entry" or not identities or parts[0] != "segmentMembership" or len(parts) < 2:
        return None
    membership = {parts[1]: {parts[2]: entry.get("entry")}} if len(parts) == 3 else {parts[1]: entry.get("entry")}
    return orjson.dumps({"identityMap": identities, "segmentMembership": membership})


def change_of(entry: dict[str, Any]) -> SegmentChange | None:
    """The change of a failed_change entry (its attributes from the record, if they were summarised)."""
    fields = entry.get("change")
    if entry.get("kind") != "failed_change" or not isinstance(fields, dict):
        return None
    attributes = fields.get("attributes") or {}
    if "not_encodable" in attributes and "raw" in entry:
        try:
            attributes = parse_export(str(entry["raw"]).encode()).attributes
        except InvalidRecord:
            return None
    try:
        source = fields.get("source") or {}
        return SegmentChange(
            ChangeType(fields["change"]), fields["segment_id"], fields["segment_namespace"], fields.get("segment_name"),
            fields["profile_key"],
            {namespace: [IdentityItem(**item) for item in items] for namespace, items in fields["identities"].items()},
            attributes, datetime.fromisoformat(fields["qualified_at"]), SegmentStatus(fields["status"]),
            fields["change_id"], str(source.get("partition", entry.get("partition", ""))),
            str(source.get("position", entry.get("position", ""))),
        )
    except (KeyError, TypeError, ValueError):
        return None


async def replay_dead_letter(
    config: RelayConfig, *, handler_specs: list[str] | None = None, dry_run: bool = False,
    kind: str | None = None, reason: str | None = None, partition: str | None = None, since: datetime | None = None,
) -> ReplayReport:
    """Replay the dead letter ``config.dead_letter`` names (see the module docstring)."""
    if handler_specs:
        config = config.model_copy(update={"handlers": handler_specs})
    reader = reader_for(build_dead_letter(config))
    report = ReplayReport()
    try:
        done = await reader.replayed()
        records: dict[str, list[tuple[StoredEntry, bytes]]] = {}
        changes: list[tuple[StoredEntry, SegmentChange]] = []
        async for stored in reader.entries():
            if not matches(stored.entry, kind=kind, reason=reason, partition=partition, since=since):
                continue
            if stored.id in done:
                report.already_replayed += 1
                continue
            if stored.entry.get("kind") in RECORD_KINDS:
                data = record_of(stored.entry)
                if data is None:
                    report.not_replayable += 1
                    continue
                records.setdefault(str(stored.entry.get("partition", "")), []).append((stored, data))
            else:
                change = change_of(stored.entry)
                if change is None:
                    report.not_replayable += 1
                    continue
                changes.append((stored, change))
        report.records = sum(len(items) for items in records.values())
        report.changes = len(changes)
        if dry_run:
            report.now_valid = sum(_valid(data, config, stored.entry) for items in records.values()
                                   for stored, data in items)
            for stored, _ in changes:
                for name in _targets(stored, config, handler_specs):
                    report.handlers[name] = report.handlers.get(name, 0) + 1
            return report
        if records:
            invalid_again = _InvalidAgain(build_dead_letter(config))
            relay = Relay(config, source=ReplaySource(records, reader.mark_replayed, invalid_again.positions),
                          dead_letter=invalid_again)
            await relay.pipeline.run()
            report.summary = relay.snapshot().summary()
            report.invalid_again = len(invalid_again.positions)
        if changes:
            await _redrive(changes, config, handler_specs, reader.mark_replayed, report)
    finally:
        await reader.close()
    return report


def _valid(data: bytes, config: RelayConfig, entry: dict[str, Any]) -> bool:
    """Whether the relay now accepts the record, and every entry it was dead-lettered for."""
    try:
        export = parse_export(data, strict_entries=config.pipeline.strict_entries)
    except InvalidRecord:
        return False
    return not export.invalid_entries and (entry.get("kind") != "invalid_entry" or bool(export.segments))


def _targets(stored: StoredEntry, config: RelayConfig, handler_specs: list[str] | None) -> list[str]:
    if handler_specs:
        return [handler.name for handler in build_handlers(config)]
    return [str(stored.entry.get("handler"))]


async def _redrive(changes: list[tuple[StoredEntry, SegmentChange]], config: RelayConfig,
                   handler_specs: list[str] | None, mark: Any, report: ReplayReport) -> None:
    """Each change to its handler (or to the ``--handler`` ones), with the relay's retries."""
    handlers = {handler.name: handler for handler in build_handlers(config)}
    refused = MemoryDeadLetter()  # a change refused again keeps its first entry
    retry = RetryPolicy(**config.retry.model_dump())
    routers: dict[str, Router] = {}
    try:
        for stored, change in changes:
            before = len(refused.entries)
            names: Iterable[str] = list(handlers) if handler_specs else [str(stored.entry.get("handler"))]
            for name in names:
                handler = handlers.get(name)
                if handler is None:
                    raise ValueError(f"entry {stored.id}: its handler {name!r} is not configured; "
                                     "name one with --handler")
                router = routers.get(name)
                if router is None:
                    router = routers[name] = Router([handler], refused, retry=retry, concurrency=1)
                    await router.start()
                await router.dispatch(change)  # handled, or refused again
                report.handlers[name] = report.handlers.get(name, 0) + 1
            if len(refused.entries) > before:
                report.failed_again += 1
                continue
            for used in routers.values():  # what the handlers wrote is durable before the entry is marked
                await used.flush()
            await mark([stored.id])
    finally:
        for router in routers.values():
            await router.close()
