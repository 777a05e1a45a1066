"""Batches in, handled changes and checkpoints out.

    source -> decode + validate -> key -> per-profile lane:
        load state -> diff -> handlers -> save state -> finish record
    every checkpoint interval: flush store, dead letter and handlers, then commit
    each partition's contiguous low watermark to the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from types import MappingProxyType

from ..handlers.api import SegmentChange, change_id_for
from ..handlers.router import Router
from ..ops.stats import RelayStats
from .deadletter import DeadLetter
from .export import InvalidRecord, ProfileExport, parse_export
from .membership import Transition, diff_membership
from .ordering import InFlightLimit, PartitionWatermark, ProfileLanes
from .profile_key import ProfileKeyRule
from .sources.base import Source, SourceRecord
from .state.base import MembershipStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    concurrency: int = 64  # profiles processed at once
    max_in_flight_records: int = 10_000
    max_in_flight_bytes: int = 64 * 1024 * 1024
    checkpoint_interval_s: float = 5.0
    checkpoint_every_records: int | None = None  # also checkpoint once this many records finished
    shutdown_timeout_s: float = 30.0
    record_retry_backoff_s: float = 0.1  # first wait before a record whose processing raised is retried
    segment_filter: frozenset[str] | None = None
    track_profiles: bool = False  # count distinct profiles (demo); unbounded memory


@dataclass(slots=True)
class _Work:
    record: SourceRecord
    ticket: int
    export: ProfileExport
    profile_key: str


class Pipeline:
    def __init__(
        self,
        source: Source,
        store: MembershipStore,
        router: Router,
        dead_letter: DeadLetter,
        *,
        key_rule: ProfileKeyRule | None = None,
        settings: PipelineSettings | None = None,
        stats: RelayStats | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.router = router
        self.dead_letter = dead_letter
        self.key_rule = key_rule or ProfileKeyRule()
        self.settings = settings or PipelineSettings()
        self.stats = stats or router.stats
        if self.settings.track_profiles and self.stats.profiles_seen is None:
            self.stats.profiles_seen = set()
        self._watermarks: dict[str, PartitionWatermark] = {}
        self._limit = InFlightLimit(self.settings.max_in_flight_records, self.settings.max_in_flight_bytes)
        self.stats.in_flight = self._limit  # read at scrape time
        self._lanes: ProfileLanes[_Work] = ProfileLanes(
            self._process, self.settings.concurrency, retry_backoff_s=self.settings.record_retry_backoff_s
        )
        self._checkpoint_lock = asyncio.Lock()
        self._checkpoint_due = asyncio.Event()  # set when checkpoint_every_records finished since the last one
        self._finished_since_checkpoint = 0
        self._checkpoint_every = self.settings.checkpoint_every_records or 0  # 0: never reached, off
        self._stopping = asyncio.Event()
        self.running = False

    # --- lifecycle --------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop: read no more, finish what is in flight, checkpoint, return from run()."""
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight records")
            self._stopping.set()
            self.source.stop()

    async def run(self) -> RelayStats:
        await self.store.open()
        try:
            await self.router.start()
            await self.source.start()
            self._lanes.start()
            checkpointer = asyncio.create_task(self._checkpoint_periodically(), name="checkpointer")
            self.running = True
            try:
                await self._read()
                await self._drain()
            finally:
                self.running = False
                async with self._checkpoint_lock:  # never cancel it halfway through a commit
                    checkpointer.cancel()
                await asyncio.gather(checkpointer, return_exceptions=True)
                await self._lanes.stop()
            await self._final_checkpoint()
        finally:
            await self._close()
        return self.stats

    async def _final_checkpoint(self, attempts: int = 3) -> None:
        # A failure here loses nothing (what is unacknowledged is read again), so it is retried
        # briefly, then reported, and the shutdown goes on: leases must still be handed over.
        for attempt in range(1, attempts + 1):
            try:
                await self.checkpoint()
                return
            except Exception:  # noqa: BLE001
                if attempt == attempts:
                    log.exception("final checkpoint failed; records after the last one will be read again")
                    return
                log.warning("final checkpoint failed; retrying", exc_info=True, extra={"attempt": attempt})
                await asyncio.sleep(0.5 * attempt)

    async def _read(self) -> None:
        stopping = self._stopping
        limit = self._limit
        for_room = limit.acquire
        admit = self._admit
        async for batch in self.source.batches():
            for record in batch:
                if stopping.is_set():  # unadmitted records are simply read again next time
                    return
                size = len(record.data)
                if limit.fits(size):  # the usual case, without a coroutine per record
                    limit.take(size)
                else:
                    await for_room(size)
                invalid = admit(record)
                if invalid is not None:
                    await self._reject(*invalid)

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._lanes.wait_idle(), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.error(
                "in-flight records did not finish in time; they are not checkpointed and will be read again",
                extra={"in_flight": self._limit.records, "timeout_s": self.settings.shutdown_timeout_s},
            )

    async def _close(self) -> None:
        for closer in (self.router.close, self.source.close, self.dead_letter.close, self.store.close):
            try:
                await closer()
            except Exception:  # noqa: BLE001 - close everything we can, then report
                log.exception("error while closing", extra={"part": getattr(closer, "__qualname__", "?")})

    # --- per record ---------------------------------------------------------------
    def _admit(self, record: SourceRecord) -> tuple[SourceRecord, int, InvalidRecord] | None:
        """Register a record (room already taken), decode it and hand it to its profile's lane.
        Returns what to dead-letter if it is invalid."""
        self.stats.records_read += 1
        watermark = self._watermarks.get(record.partition)
        if watermark is None:
            watermark = self._watermarks[record.partition] = PartitionWatermark()
        ticket = watermark.register(record.position)
        try:
            export = parse_export(record.data)
            profile_key = self.key_rule.key_for(export.identity_map)
        except InvalidRecord as invalid:
            return record, ticket, invalid
        self._lanes.submit(profile_key, _Work(record, ticket, export, profile_key))
        return None

    async def _reject(self, record: SourceRecord, ticket: int, invalid: InvalidRecord) -> None:
        self.stats.invalid[invalid.reason.value] += 1
        position = str(record.position)
        log.warning(
            "invalid record sent to the dead letter",
            extra={"reason": invalid.reason.value, "detail": invalid.detail,
                   "partition": record.partition, "position": position},
        )
        attempt = 0
        while True:
            try:
                await self.dead_letter.invalid_record(
                    record.data, reason=invalid.reason.value, detail=invalid.detail,
                    partition=record.partition, position=position,
                )
                break
            except Exception:  # noqa: BLE001 - e.g. a full disk: wait (reading pauses), never drop
                attempt += 1
                delay = min(30.0, self.settings.record_retry_backoff_s * 2 ** (attempt - 1))
                log.exception("cannot write the dead letter; will retry", extra={"attempt": attempt})
                await asyncio.sleep(delay)
        self.stats.dead_lettered("invalid_record")
        self._finish(record, ticket)

    def _finish(self, record: SourceRecord, ticket: int) -> None:
        self._watermarks[record.partition].finish(ticket)
        self._limit.release(len(record.data))
        self.stats.records_finished += 1
        self._finished_since_checkpoint += 1
        if self._finished_since_checkpoint == self._checkpoint_every:  # once per interval, not per record
            self._checkpoint_due.set()

    @staticmethod
    def _changes(work: _Work, transitions: list[Transition]) -> list[SegmentChange]:
        record = work.record
        position = str(record.position)
        # Read-only views: every change of the record, for every handler, shares them.
        identities = MappingProxyType(work.export.identity_map)
        attributes = MappingProxyType(work.export.attributes)
        changes = []
        for transition in transitions:
            entry = transition.entry
            change_id = change_id_for(  # status is a StrEnum; .value would cost an attribute descriptor
                work.profile_key, entry.namespace, entry.segment_id, entry.status, entry.qualified_at_us
            )
            changes.append(SegmentChange(
                change=transition.change,
                segment_id=entry.segment_id,
                segment_namespace=entry.namespace,
                segment_name=entry.name,
                profile_key=work.profile_key,
                identities=identities,
                attributes=attributes,
                qualified_at=entry.qualified_at,
                status=entry.status,
                change_id=change_id,
                partition=record.partition,
                position=position,
            ))
        return changes

    async def _process(self, work: _Work) -> None:
        """One record of one profile; its lane guarantees nothing else of this profile runs now."""
        stats = self.stats
        export = work.export
        record = work.record
        # Any exception here (store down, dead letter unwritable) leaves the record unfinished:
        # its lane steps aside and retries it with backoff, and the checkpoint waits for it.
        state = await self.store.load(work.profile_key)
        diff = diff_membership(state, export, self.settings.segment_filter)
        stats.stale += diff.stale
        stats.duplicate += diff.duplicate
        stats.filtered += diff.filtered
        if stats.profiles_seen is not None:
            stats.profiles_seen.add(work.profile_key)
        if diff.transitions:
            for change in self._changes(work, diff.transitions):
                stats.changes[(change.segment_id, change.change)] += 1  # a StrEnum: keys compare as str
                await self.router.dispatch(change)
        if diff.updates:
            # State after handlers: a crash before this line repeats the changes, never loses them.
            await self.store.save(work.profile_key, diff.updates)
        self._finish(record, work.ticket)

    # --- checkpoints ------------------------------------------------------------------
    async def _checkpoint_periodically(self) -> None:
        while True:
            # The interval, or earlier once checkpoint_every_records have finished.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._checkpoint_due.wait(), self.settings.checkpoint_interval_s)
            self._checkpoint_due.clear()
            try:
                await self.checkpoint()
            except Exception:  # noqa: BLE001 - the next interval tries again
                log.exception("checkpoint failed; will retry")

    async def checkpoint(self) -> None:
        """Commit every partition's low watermark, after making what lies below it durable."""
        async with self._checkpoint_lock:
            self._finished_since_checkpoint = 0
            due = {
                partition: mark.watermark
                for partition, mark in self._watermarks.items()
                if mark.watermark is not None and mark.watermark != mark.committed
            }
            if not due:
                return
            # Everything below these watermarks was handled, dead-lettered and saved before now.
            # Handlers first: state must never be durable ahead of the effects it records, or a
            # crash in between would make a replay skip changes as duplicates.
            await self.router.flush()
            await self.dead_letter.flush()
            await self.store.flush()
            for partition, position in due.items():
                await self.source.commit(partition, position)
                self._watermarks[partition].committed = position
                self.stats.partitions.setdefault(partition, {})["checkpoint"] = position
            log.debug("checkpointed", extra={"positions": {p: str(v) for p, v in due.items()}})

    @property
    def in_flight(self) -> int:
        return self._limit.records
