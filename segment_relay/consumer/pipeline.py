"""Batches in, handled changes and checkpoints out.

    source batch -> admit (in-flight bound) -> decode + validate + key, one tight loop
      -> a *step*: the batch's profiles that are free (a busy profile's records wait for it)
           load their state (one store call) -> diff -> ChangeSink.deliver (the handlers)
           -> save their new state (one store call) -> finish the records
      -> the profiles' waiting records, if any, form the next step
    every checkpoint interval: flush handlers, dead letter and store, then commit each
    partition's contiguous low watermark to the source.

A profile is in at most one step at a time (``ProfileGate``), so its records are diffed, handed
to handlers and saved strictly in order, across batches and partitions, while different
profiles' steps run concurrently. There is one task per step (a slice of a batch), none per
record or change.

State is saved only after every handler returned for every change of the step: a crash in
between repeats those changes, never loses them.

Partitions come and go (``PartitionListener``): each assignment is a ``_Partition`` with its own
watermark, which is also the claim every change read under it carries. A revoke marks it: its
records still waiting for a step are dropped at once, a step that had not dispatched them yet
drops them, the handlers' dispatchers drop the changes not yet handed over, and nothing is
committed for it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from types import MappingProxyType
from typing import Any, cast

import msgspec

from ..histogram import AGE_BUCKETS, Histogram
from ..model import (
    ChangeSink,
    ChangeType,
    IdentityItem,
    PendingChange,
    SegmentChange,
    SegmentStatus,
    change_id_for,
    merge_id_for,
)
from .claims import ClaimsSnapshot, ProfileClaimer
from .deadletter import DeadLetter
from .export import InvalidEntry, InvalidRecord, LazyAttributes, ProfileExport, parse_export
from .identity import IdentityResolver, IdentityStats, Merge, Resolved
from .membership import diff_membership
from .ordering import InFlightLimit, PartitionWatermark, ProfileGate
from .profile_key import ProfileKeyRule
from .sources.base import Batch, Source, SourceRecord
from .state.base import AliasIndex, MembershipStore, ProfileState
from .stored import SegmentKey, StoredMembership

log = logging.getLogger(__name__)

_EAGER_CHECKPOINTS_S = 10.0  # how long checkpoint_soon() makes every finished step checkpoint

IdentityMap = Mapping[str, Sequence[IdentityItem]]

__all__ = ["Pipeline", "PipelineSettings", "PipelineSnapshot"]


def _claim_backoff_s(attempt: int) -> float:
    """How long a step waits for profiles another replica holds: 20 ms, doubling to 1 s, jittered."""
    return min(1.0, 0.02 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class PipelineSettings:
    max_in_flight_records: int = 10_000
    max_in_flight_bytes: int = 64 * 1024 * 1024
    checkpoint_interval_s: float = 5.0
    checkpoint_every_records: int | None = None  # also checkpoint once this many records finished
    shutdown_timeout_s: float = 30.0
    record_retry_backoff_s: float = 0.1  # first wait before a store call that failed is retried
    step_max_records: int = 1000  # a bigger batch is split into steps of at most this many records
    segment_filter: frozenset[str] | None = None
    strict_entries: bool = False  # a malformed audience entry rejects its record (else: dead-lettered alone)
    track_profiles: bool = False  # count distinct profiles (demo); unbounded memory

    def __post_init__(self) -> None:
        if self.step_max_records < 1:
            raise ValueError("step_max_records must be at least 1")


@dataclass(frozen=True)
class PipelineSnapshot:
    """What the pipeline has done so far (read-only, for metrics and the summary)."""

    records_read: int
    records_finished: int
    records_dropped: int  # read under an assignment that was revoked before they were handled
    invalid: Mapping[str, int]  # by reason
    changes: Mapping[tuple[str, str], int]  # by (segment id, enter|exit)
    stale: int
    duplicate: int
    filtered: int
    dead_letters: int  # invalid records written to the dead letter
    in_flight_records: int
    in_flight_bytes: int
    profiles_waiting: int  # records waiting for a step of their profile to end
    checkpoints: Mapping[str, Any] = field(default_factory=dict)  # partition -> last committed position
    checkpoints_written: Mapping[str, int] = field(default_factory=dict)  # partition -> commits so far
    checkpointed_at: Mapping[str, float] = field(default_factory=dict)  # partition -> last commit, Unix time
    # End to end: a record from being read to being finished (changes handled, state saved), and a
    # change from its lastQualificationTime (Adobe's clock) to being handled.
    record_latency: Histogram = field(default_factory=Histogram)
    change_age: Histogram = field(default_factory=lambda: Histogram(AGE_BUCKETS))
    identity: IdentityStats | None = None  # identity linking (None: identity.mode "key")
    profiles_seen: int | None = None
    invalid_entries: Mapping[str, int] = field(default_factory=dict)  # audience entries dead-lettered alone, by reason
    claims: ClaimsSnapshot | None = None  # profile claims (None: claims.mode off)

    @property
    def enters(self) -> int:
        return sum(n for (_, change), n in self.changes.items() if change == "enter")

    @property
    def exits(self) -> int:
        return sum(n for (_, change), n in self.changes.items() if change == "exit")


class _Partition:
    """One assignment of one partition: its watermark, and the claim its changes carry."""

    __slots__ = ("epoch", "name", "read", "revoked", "watermark")

    def __init__(self, name: str, epoch: int) -> None:
        self.name = name
        self.epoch = epoch
        self.watermark = PartitionWatermark()
        self.revoked = False
        self.read = False  # a batch of this assignment arrived


class _Item(msgspec.Struct, gc=False):
    """One valid record on its way through a step (a Struct: one is built per record).
    ``record`` and ``export`` are dropped (None) once the step's diff has used them."""

    record: SourceRecord[Any]
    partition: _Partition
    ticket: int
    export: ProfileExport
    key: str
    size: int
    read_at: float  # time.monotonic() when it was admitted: where the age of its changes starts
    merge: Merge | None = None  # identity linking: profiles this record joins to its own


class _Wanted(Mapping[str, "frozenset[SegmentKey] | None"]):
    """The segments each profile of a step mentions, worked out only if a store asks (DynamoDB);
    ``whole``: profiles loaded with all their segments (the two sides of a merge)."""

    def __init__(self, groups: dict[str, list[_Item]], whole: frozenset[str] = frozenset()) -> None:
        self._groups = groups
        self._whole = whole
        self._extra = [key for key in whole if key not in groups]

    def __getitem__(self, key: str) -> frozenset[SegmentKey] | None:
        if key in self._whole:
            return None
        return frozenset(e.key for item in self._groups[key] for e in item.export.segments)

    def __iter__(self) -> Iterator[str]:
        yield from self._groups
        yield from self._extra

    def __len__(self) -> int:
        return len(self._groups) + len(self._extra)


class _Completion:
    """The profiles of a step whose changes are all done, as the sink reports them."""

    __slots__ = ("_keys", "_ready", "_waiter")

    def __init__(self, keys: list[str], ready: list[str]) -> None:
        self._keys = keys  # the sink's profile index -> profile key
        self._ready = ready
        self._waiter: asyncio.Future[None] | None = None

    def done(self, index: int) -> None:
        self._ready.append(self._keys[index])
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[str]:
        ready, self._ready = self._ready, []
        return ready

    async def wait(self) -> None:
        if not self._ready:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


_EMPTY: ProfileState = {}
_REVOKED: Any = object()  # what a store call returns when its step has nothing left to do
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _combine(key: str, state: ProfileState, states: Mapping[str, ProfileState], merge: Merge, item: _Item,
             pending: list[PendingChange]) -> tuple[ProfileState, dict[SegmentKey, StoredMembership]]:
    """The survivor's state with the absorbed profiles' combined into it, per segment by the newer
    qualification time (a tie keeps the survivor's: the same result in any arrival order), the
    values it gains (to save), and the ``merge`` change appended to ``pending`` if it names any."""
    combined = dict(state)
    gained: dict[SegmentKey, StoredMembership] = {}
    for absorbed in merge.absorbed:  # sorted: the same order every time
        for segment, value in states.get(absorbed, _EMPTY).items():
            old = combined.get(segment)
            if old is None or value.qualified_at_us > old.qualified_at_us:
                combined[segment] = gained[segment] = value
    if merge.announced:
        newest = max((value.qualified_at_us for value in combined.values()), default=0)
        export = item.export
        change = SegmentChange(
            ChangeType.MERGE, "", "", None, key,
            MappingProxyType(export.identity_map) if export is not None else MappingProxyType({}),
            LazyAttributes(export) if export is not None else MappingProxyType({}),
            _EPOCH + timedelta(microseconds=newest), SegmentStatus.REALIZED,
            merge_id_for(key, merge.announced), item.partition.name,
            str(item.record.position) if item.record is not None else "", merge.announced)
        pending.append((change, item.partition))
    return combined, gained


class Pipeline:
    def __init__(
        self,
        source: Source[Any],
        store: MembershipStore,
        sink: ChangeSink,
        dead_letter: DeadLetter,
        *,
        key_rule: ProfileKeyRule | None = None,
        settings: PipelineSettings | None = None,
        identity: IdentityResolver | None = None,
        claims: ProfileClaimer | None = None,
    ) -> None:
        """``identity``: link profiles through their identities (identity.mode "link"); without
        it a profile is its key by ``key_rule`` alone. ``claims``: claim each profile in the
        store before loading it (claims.mode), for replicas sharing the store."""
        self.source = source
        self.store = store
        self.sink = sink
        self.dead_letter = dead_letter
        self.key_rule = key_rule or ProfileKeyRule()
        self.settings = settings or PipelineSettings()
        self.identity = identity
        self.claims = claims
        self._merge_waiting = False  # the reader waits for profiles a merge absorbs to be free
        self._released = asyncio.Event()  # set whenever profiles are released while it waits
        self._partitions: dict[str, _Partition] = {}
        self._limit = InFlightLimit(self.settings.max_in_flight_records, self.settings.max_in_flight_bytes)
        self._gate: ProfileGate[_Item] = ProfileGate()
        self._steps: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._checkpoint_lock = asyncio.Lock()
        self._checkpoint_due = asyncio.Event()  # set when checkpoint_every_records finished since the last one
        self._finished_since_checkpoint = 0
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None
        self._closing = False  # in-flight steps are being cancelled: start no more
        self._eager_until = 0.0  # checkpoint_soon(): monotonic time until which every finish checkpoints
        self._revocations = 0  # revokes so far: a step that saw none since it began skips looking
        self.running = False
        # counters, read through snapshot()
        self._records_read = 0
        self._records_finished = 0
        self._records_dropped = 0
        self._invalid: Counter[str] = Counter()
        self._invalid_entries: Counter[str] = Counter()
        self._changes: dict[tuple[str, str], int] = {}
        self._stale = 0
        self._duplicate = 0
        self._filtered = 0
        self._dead_letters = 0
        self._checkpoints: dict[str, Any] = {}
        self._checkpoints_written: dict[str, int] = {}  # kept after a revoke: a counter only grows
        self._checkpointed_at: dict[str, float] = {}
        self._record_latency = Histogram()
        self._change_age = Histogram(AGE_BUCKETS)
        self._profiles_seen: set[str] | None = set() if self.settings.track_profiles else None

    # --- lifecycle --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful stop: read no more, finish what is in flight, checkpoint, return from run()."""
        if not self._stopping.is_set():
            log.info("stopping: draining in-flight records")
            self._stopping.set()
            self.source.stop()

    async def run(self) -> PipelineSnapshot:
        await self.store.open()
        try:
            await self.dead_letter.start()  # a sink it cannot write to stops the start, with a reason
            await self.sink.start()
            await self.source.start(self)
            checkpointer = asyncio.create_task(self._checkpoint_periodically(), name="checkpointer")
            sweeper = asyncio.create_task(self.claims.run(), name="claims") if self.claims is not None else None
            self.running = True
            try:
                await self._read()
                await self._drain()
            finally:
                self.running = False
                async with self._checkpoint_lock:  # never cancel it halfway through a commit
                    checkpointer.cancel()
                await asyncio.gather(checkpointer, return_exceptions=True)
                await self._cancel_steps()
                if sweeper is not None:
                    assert self.claims is not None
                    self.claims.stop()
                    sweeper.cancel()
                    await asyncio.gather(sweeper, return_exceptions=True)
            if self._failure is None:
                await self._final_checkpoint()
        finally:
            await self._close()
        if self._failure is not None:
            raise self._failure
        return self.snapshot()

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

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.error(
                "in-flight records did not finish in time; they are not checkpointed and will be read again",
                extra={"in_flight": self._limit.records, "timeout_s": self.settings.shutdown_timeout_s},
            )

    async def _cancel_steps(self) -> None:
        self._closing = True
        steps = list(self._steps)
        for step in steps:
            step.cancel()
        await asyncio.gather(*steps, return_exceptions=True)

    async def _close(self) -> None:
        closers = [self.sink.close, self.source.close, self.dead_letter.close, self.store.close]
        if self.claims is not None:
            closers.insert(3, self.claims.close)  # before the store: it frees them in the store
        for closer in closers:
            try:
                await closer()
            except Exception:  # noqa: BLE001 - close everything we can, then report
                log.exception("error while closing", extra={"part": getattr(closer, "__qualname__", "?")})

    def _fail(self, exc: BaseException) -> None:
        """A bug, not an outage (those are retried where they happen): stop the relay with it.
        Nothing more is checkpointed, so whatever was in flight is read again after a restart."""
        if self._failure is None:
            log.error("pipeline step failed; stopping", exc_info=exc)
            self._failure = exc
            self._closing = True
        self.stop()

    # --- partitions (PartitionListener) ----------------------------------------------------------
    def assigned(self, partition: str, epoch: int) -> None:
        old = self._partitions.get(partition)
        if old is not None:
            self._revoke(old)  # a source that assigns again without a revoke: the old one is over
        self._partitions[partition] = _Partition(partition, epoch)
        log.debug("partition assigned", extra={"partition": partition, "epoch": epoch})

    def revoked(self, partition: str) -> None:
        old = self._partitions.pop(partition, None)
        if old is not None:
            self._revoke(old)

    def checkpoint_soon(self) -> None:
        """Checkpoint now, and after every step that finishes records for a while (a source
        handing a partition over waits for its last records to be checkpointed)."""
        self._eager_until = time.monotonic() + _EAGER_CHECKPOINTS_S
        self._checkpoint_due.set()

    def _revoke(self, part: _Partition) -> None:
        part.revoked = True
        self._revocations += 1
        self._checkpoints.pop(part.name, None)
        self.dead_letter.discard(part.name)
        dropped = self._gate.drop(lambda item: item.partition is part)
        if dropped:
            self._limit.release(len(dropped), sum(item.size for item in dropped))
            self._records_dropped += len(dropped)
        log.info("partition revoked: its unhandled records are dropped", extra={
            "partition": part.name, "epoch": part.epoch, "dropped_waiting": len(dropped)})

    # --- reading ----------------------------------------------------------------------------------
    async def _read(self) -> None:
        stopping = self._stopping
        limit = self._limit
        batch: Batch[Any]
        async for batch in self.source.batches():
            part = self._partitions.get(batch.partition)
            if part is None or part.epoch != batch.epoch:
                self._records_dropped += len(batch.records)  # read under an assignment that has ended
                continue
            if not part.read and batch.records:
                part.read = True
                await self.dead_letter.resume(part.name, str(batch.records[0].position))
            for chunk, size in self._chunks(batch.records):
                if stopping.is_set():  # unadmitted records are simply read again next time
                    return
                if limit.fits(len(chunk), size):  # the usual case, without waiting
                    limit.take(len(chunk), size)
                else:
                    await limit.acquire(len(chunk), size)
                    if part.revoked:  # taken away while we waited for room
                        limit.release(len(chunk), size)
                        self._records_dropped += len(chunk)
                        continue
                if self.identity is None:
                    self._admit(chunk, part)
                else:
                    await self._admit_linked(chunk, part)
            if stopping.is_set():
                return

    def _chunks(self, records: Sequence[SourceRecord[Any]]) -> Iterator[tuple[Sequence[SourceRecord[Any]], int]]:
        """A batch in steps that each fit the in-flight bounds (and step_max_records), with their size."""
        most = min(self.settings.step_max_records, self._limit.max_records)
        max_bytes = self._limit.max_bytes
        sizes = [len(record.data) for record in records]
        total = sum(sizes)
        if len(records) <= most and total <= max_bytes:  # the usual case: the batch is one step
            yield records, total
            return
        start = size = 0
        for index, length in enumerate(sizes):
            if index > start and (index - start >= most or size + length > max_bytes):
                yield records[start:index], size
                start, size = index, 0
            size += length
        if start < len(records):
            yield records[start:], size

    def _admit(self, records: Sequence[SourceRecord[Any]], part: _Partition,
               linked: list[_Item] | None = None) -> None:
        """Decode, validate and key ``records`` (room already taken), and start their step.
        ``linked``: collect the valid records there instead (identity linking groups them once
        their profiles are known, ``_admit_linked``); their step starts with the invalid ones."""
        self._records_read += len(records)
        key_for = self.key_rule.key_for
        admit = self._gate.admit
        groups: dict[str, list[_Item]] = {}
        invalid: list[tuple[SourceRecord[Any], int, InvalidRecord]] = []
        entries: list[tuple[SourceRecord[Any], InvalidEntry, IdentityMap]] = []
        strict = self.settings.strict_entries
        first = part.watermark.register_many([record.position for record in records])
        now = time.monotonic()
        for ticket, record in enumerate(records, first):
            data = record.data
            try:
                export = parse_export(data, strict_entries=strict)
                key = key_for(export.identity_map)
            except InvalidRecord as problem:
                invalid.append((record, ticket, problem))
                continue
            if export.invalid_entries:
                entries.extend((record, entry, export.identity_map) for entry in export.invalid_entries)
            item = _Item(record, part, ticket, export, key, len(data), now)
            if linked is not None:
                linked.append(item)
                continue
            group = groups.get(key)
            if group is not None:
                group.append(item)
            elif admit(key, item):
                groups[key] = [item]
            # else: the profile is in another step; the item waits in the gate
        if groups or invalid or entries:
            self._start_step(groups, invalid, part, entries)

    async def _admit_linked(self, records: Sequence[SourceRecord[Any]], part: _Partition) -> None:
        """``_admit`` with identity linking: the records' profiles are looked up (and their new
        identities claimed) before they are grouped, in read order (the reader waits for it).

        A record that merges profiles splits the chunk: the records before it start first, and
        it waits until the profiles it absorbs have no step left here, so that the merge loads
        their final state. Every record is then diffed under the profile it had when it came, and
        the merge is carried out just before its own record: the changes are the same however
        the records were batched."""
        items: list[_Item] = []
        self._admit(records, part, items)
        if not items:
            return
        resolved = await self._resolve(items, part)
        start = 0
        if resolved is not None:
            for item, key in zip(items, resolved.keys, strict=True):
                item.key = key
            for index, merge in resolved.merges.items():  # in read order
                item = items[index]
                item.merge = merge
                if index > start:
                    self._group_and_start(items[start:index], part)
                    start = index
                await self._wait_until_free(merge.absorbed)
                if part.revoked:
                    break
        if resolved is None or part.revoked:  # taken away meanwhile: its new owner reads them
            rest = items[start:]
            self._limit.release(len(rest), sum(item.size for item in rest))
            self._records_dropped += len(rest)
            return
        self._group_and_start(items[start:], part)

    def _group_and_start(self, items: Sequence[_Item], part: _Partition | None) -> None:
        groups: dict[str, list[_Item]] = {}
        admit = self._gate.admit
        for item in items:
            group = groups.get(item.key)
            if group is not None:
                group.append(item)
            elif admit(item.key, item):
                groups[item.key] = [item]
        if groups:
            self._start_step(groups, [], part)

    async def _wait_until_free(self, keys: Sequence[str]) -> None:
        is_busy = self._gate.is_busy
        self._merge_waiting = True
        try:
            while any(is_busy(key) for key in keys):
                self._released.clear()
                await self._released.wait()
        finally:
            self._merge_waiting = False

    async def _resolve(self, items: list[_Item], part: _Partition) -> Resolved | None:
        """The items' profiles, retried with backoff while the store fails; None if ``part`` is
        revoked meanwhile."""
        assert self.identity is not None
        records = [(item.export.identity_map, item.key) for item in items]
        delay = self.settings.record_retry_backoff_s
        attempt = 0
        while True:
            try:
                return await self.identity.resolve(records)
            except Exception:  # noqa: BLE001 - the store is down: wait, reading waits too
                attempt += 1
                log.exception("identity lookup failed; will retry", extra={
                    "attempt": attempt, "retry_in_s": round(delay, 3)})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
                if part.revoked:
                    return None

    def _start_step(self, groups: dict[str, list[_Item]],
                    invalid: list[tuple[SourceRecord[Any], int, InvalidRecord]], part: _Partition | None,
                    entries: list[tuple[SourceRecord[Any], InvalidEntry, IdentityMap]] | None = None,
                    claim_attempt: int = 0) -> None:
        task = asyncio.create_task(self._run_step(groups, invalid, part, entries, claim_attempt), name="pipeline-step")
        self._steps.add(task)
        self._idle.clear()
        task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[None]) -> None:
        self._steps.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]
        if not self._steps:
            self._idle.set()

    # --- a step -----------------------------------------------------------------------------------
    async def _run_step(self, groups: dict[str, list[_Item]],
                        invalid: list[tuple[SourceRecord[Any], int, InvalidRecord]], part: _Partition | None,
                        entries: list[tuple[SourceRecord[Any], InvalidEntry, IdentityMap]] | None = None,
                        claim_attempt: int = 0) -> None:
        """``claim_attempt``: how often these profiles were found claimed by another replica."""
        released: set[str] = set()
        claimed: dict[str, list[str]] = {}  # profile -> the claims it gives back when it is done
        shared: list[str] = []  # claims several of the step's profiles need: given back at its end
        try:
            if claim_attempt:
                await asyncio.sleep(_claim_backoff_s(claim_attempt))
                self._drop_revoked(groups)
            if invalid:
                assert part is not None
                await self._reject(invalid, part)
            if entries:
                # Written before their records finish, so before a checkpoint passes them.
                assert part is not None
                await self._reject_entries(entries, part)
            if groups and self.claims is not None:
                await self._claim(groups, claimed, shared, claim_attempt)
                if groups and self.identity is not None:
                    await self._follow_merges(groups, claimed)
            if groups:
                await self._process(groups, released, claimed)
        finally:
            if self.claims is not None:
                self.claims.give_back([*shared, *(key for keys in claimed.values() for key in keys)])
            if len(released) < len(groups):  # cancelled or failed: free the profiles all the same
                self._continue([key for key in groups if key not in released])

    async def _claim(self, groups: dict[str, list[_Item]], claimed: dict[str, list[str]], shared: list[str],
                     attempt: int) -> None:
        """Claim the step's profiles (and those its merges absorb) in the shared store. A profile
        another replica holds leaves ``groups`` for a later step that tries again (its records
        keep their place: the profile stays busy here, so its next records queue behind them)."""
        claims = self.claims
        assert claims is not None
        needs = {key: [key, *{k for item in items if item.merge is not None for k in item.merge.absorbed}]
                 for key, items in groups.items() if items}
        wanted = {k for keys in needs.values() for k in keys}
        taken = await self._retry_store("claim", lambda: claims.take(wanted), groups, groups.keys())
        if taken is _REVOKED:
            return
        blocked = {key: groups.pop(key) for key, keys in needs.items() if not all(k in taken for k in keys)}
        users = Counter(k for key, keys in needs.items() if key not in blocked for k in keys)
        claims.give_back(k for k in taken if k not in users)  # partly claimed merges: try again whole
        for key, keys in needs.items():
            if key not in blocked:
                claimed[key] = [k for k in keys if users[k] == 1]
        shared.extend(k for k, count in users.items() if count > 1)
        if blocked and not self._closing:
            self._start_step(blocked, [], None, claim_attempt=attempt + 1)

    async def _follow_merges(self, groups: dict[str, list[_Item]], claimed: dict[str, list[str]]) -> None:
        """Send on to their survivor the profiles another replica merged away between their
        records' lookup and their claim: that replica claimed them for the merge, so once the
        claim is here its redirect is stored, and diffing the absorbed key (whose state the merge
        dropped) would fire its memberships again."""
        index = cast(AliasIndex, self.store)  # linking is only built on a store with one
        moved = await self._retry_store("redirect lookup", lambda: index.survivors_of(list(groups)), groups,
                                        groups.keys())
        if moved is _REVOKED or not moved:
            return
        assert self.claims is not None
        items: list[_Item] = []
        for key, survivor in moved.items():
            for item in groups.pop(key):
                item.key = survivor
                items.append(item)
            self.claims.give_back(claimed.pop(key, ()))
        log.info("profiles merged by another replica meanwhile; their records go to the survivor",
                 extra={"profiles": len(moved)})
        self._group_and_start(items, None)  # first: the records queued behind them come after these
        self._continue(list(moved))  # (they find the redirect in their own step)

    def _continue(self, keys: list[str]) -> None:
        """These profiles are free again; the records that waited for them form the next step."""
        following: dict[str, list[_Item]] = {}
        release = self._gate.release
        for key in keys:
            waiting = release(key)
            if waiting is not None:
                following[key] = waiting
        if self._merge_waiting:
            self._released.set()  # a merge may wait for one of these
        if following and not self._closing:
            self._start_step(following, [], None)

    async def _process(self, groups: dict[str, list[_Item]], released: set[str],
                       claimed: dict[str, list[str]]) -> None:
        """Load, diff, hand over; then, profile by profile as each one's changes are done, save
        its new state and finish its records (a slow profile holds up nobody else)."""
        seen = self._revocations
        # A merge loads both sides whole (rare: only with identity linking, when an export joins profiles).
        whole = frozenset(k for items in groups.values() for item in items if item.merge is not None
                          for k in (item.key, *item.merge.absorbed)) if self.identity is not None else frozenset()
        states = await self._retry_store("load", lambda: self.store.load_many(_Wanted(groups, whole)), groups,
                                         groups.keys())
        if states is not _REVOKED:
            if self._revocations != seen:
                self._drop_revoked(groups)  # records of a revoked partition not dispatched yet are dropped here
            keys, profiles, saves = self._diff(groups, states)
            changed = set(keys)
            completion = _Completion(keys, [key for key in groups if key not in changed])  # nothing to hand over
            if keys:
                # The age retry.max_age_s limits starts at the oldest record's admission (a group
                # lists its profile's records in read order).
                read_at = min(groups[key][0].read_at for key in keys)
                self.sink.deliver(profiles, completion.done, read_at)
            changes_of: dict[str, list[PendingChange]] | None = None
            while True:
                ready = completion.take()
                if ready:
                    if keys:
                        if changes_of is None:
                            changes_of = dict(zip(keys, profiles, strict=True))
                        self._observe_ages(ready, changes_of)
                    await self._save_and_finish(ready, groups, saves, seen)
                    released.update(ready)
                    if claimed:  # saved: another replica may load these profiles now
                        self.claims.give_back(k for key in ready for k in claimed.pop(key, ()))  # type: ignore[union-attr]
                    self._continue(ready)
                if len(released) == len(groups):
                    return
                await completion.wait()
        released.update(groups)
        self._continue(list(groups))  # (revoked while loading: the claims are given back by the step)

    def _observe_ages(self, keys: list[str], changes_of: Mapping[str, list[PendingChange]]) -> None:
        """How old each handled change is, counted from when Adobe qualified it (clamped at 0:
        Adobe's clock may be ahead of ours)."""
        now = time.time()
        age = self._change_age
        for key in keys:
            for change, _ in changes_of.get(key, ()):
                if change.change is not ChangeType.MERGE:
                    age.observe(max(0.0, now - change.qualified_at.timestamp()))

    async def _save_and_finish(self, keys: list[str], groups: dict[str, list[_Item]],
                               saves: dict[str, dict[SegmentKey, StoredMembership]], seen: int) -> None:
        """Save the new state of profiles whose changes are all done, then finish their records.
        State after handlers: a crash before this repeats the changes, never loses them. A merge
        is redirected in the store after the survivor's combined state is saved."""
        updates = {key: saves[key] for key in keys if key in saves}
        if updates and self._revocations != seen:
            # A profile with a record revoked meanwhile saves nothing: its new owner reads it again.
            updates = {key: value for key, value in updates.items()
                       if not any(item.partition.revoked for item in groups[key])}
        if updates:
            if await self._retry_store("save", lambda: self.store.save_many(updates), groups, keys) is _REVOKED:
                return
        if self.identity is not None:
            # A profile with a record revoked saved nothing (above): its merges are not redirected
            # either. A merge dropped so is decided again by the next record of the absorbed
            # profile (IdentityResolver._plan), here or at the partition's new owner.
            redirects = {absorbed: key for key in keys for item in groups[key] if item.merge is not None
                         and not any(other.partition.revoked for other in groups[key])
                         for absorbed in item.merge.absorbed}
            if redirects:
                index = cast(AliasIndex, self.store)  # linking is only built on a store with one
                if await self._retry_store("redirect", lambda: index.redirect_profiles(redirects), groups,
                                           keys) is _REVOKED:
                    return
                assert self.identity is not None
                self.identity.redirected(redirects)
        self._finish(groups[key] for key in keys)

    def _drop_revoked(self, groups: dict[str, list[_Item]]) -> None:
        for key in [key for key, items in groups.items() if any(item.partition.revoked for item in items)]:
            items = groups[key]
            live = [item for item in items if not item.partition.revoked]
            dropped = len(items) - len(live)
            self._limit.release(dropped, sum(item.size for item in items if item.partition.revoked))
            self._records_dropped += dropped
            groups[key] = live  # an emptied group stays: its profile is released when it is done

    async def _retry_store(self, what: str, call: Any, groups: dict[str, list[_Item]], keys: Iterable[str]) -> Any:
        """A store call for the profiles ``keys`` of ``groups``, retried with backoff until it
        succeeds (an outage delays records, never drops them); ``_REVOKED`` when every record it
        was for was revoked meanwhile."""
        delay = self.settings.record_retry_backoff_s
        attempt = 0
        while True:
            try:
                return await call()
            except Exception:  # noqa: BLE001 - the store is down: wait, the checkpoint waits too
                attempt += 1
                log.exception("membership store call failed; will retry", extra={
                    "call": what, "attempt": attempt, "retry_in_s": round(delay, 3)})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)
                subset = {key: groups[key] for key in keys}
                self._drop_revoked(subset)
                groups.update(subset)
                if not any(subset.values()):
                    return _REVOKED

    def _diff(self, groups: dict[str, list[_Item]], states: dict[str, ProfileState],
              ) -> tuple[list[str], list[list[PendingChange]], dict[str, dict[SegmentKey, StoredMembership]]]:
        """Every profile's records against its state, in order: the profiles with changes and
        their changes (for the sink), and the new state per profile (saved after the sink)."""
        segment_filter = self.settings.segment_filter
        changes_seen = self._changes
        keys: list[str] = []
        profiles: list[list[PendingChange]] = []
        saves: dict[str, dict[SegmentKey, StoredMembership]] = {}
        stale = duplicate = filtered = 0
        for key, items in groups.items():
            state = states.get(key, _EMPTY)
            pending: list[PendingChange] = []
            updates: dict[SegmentKey, StoredMembership] | None = None
            for item in items:
                if item.merge is not None:  # the profiles this record joins, just before it
                    state, gained = _combine(key, state, states, item.merge, item, pending)
                    if updates is None:
                        updates = gained
                    else:
                        updates.update(gained)
                export, record = item.export, item.record
                # Nothing after the diff needs them (a change keeps what it uses): a record is
                # freed here, while it is still in the CPU cache, not with the whole step.
                item.export = item.record = None  # type: ignore[assignment]
                diff = diff_membership(state, export, segment_filter)
                stale += diff.stale
                duplicate += diff.duplicate
                filtered += diff.filtered
                if diff.updates:
                    if updates is None:
                        updates = diff.updates
                    else:
                        updates.update(diff.updates)
                    if len(items) > 1:  # the profile's next record sees this one's outcome
                        state = {**state, **diff.updates}
                if diff.transitions:
                    partition = item.partition
                    # Read-only views: every change of the record, for every handler, shares them;
                    # the attributes are decoded only if a handler reads them.
                    identities = MappingProxyType(export.identity_map)
                    attributes = LazyAttributes(export)
                    position = str(record.position)
                    for entry, kind in diff.transitions:
                        status = entry.status
                        segment_id = entry.segment_id
                        change = SegmentChange(
                            kind, segment_id, entry.namespace, entry.name, key, identities, attributes,
                            entry.qualified_at, status,
                            # status is a StrEnum; .value would cost an attribute descriptor
                            change_id_for(key, entry.namespace, segment_id, status, entry.qualified_at_us),
                            partition.name, position,
                        )
                        counted = (segment_id, kind)  # a StrEnum: keys compare as str
                        changes_seen[counted] = changes_seen.get(counted, 0) + 1
                        pending.append((change, partition))
            if pending:
                keys.append(key)
                profiles.append(pending)
            if updates:
                saves[key] = updates
        self._stale += stale
        self._duplicate += duplicate
        self._filtered += filtered
        if self._profiles_seen is not None:
            self._profiles_seen.update(groups)
        return keys, profiles, saves

    def _finish(self, profiles: Iterable[list[_Item]]) -> None:
        total = size = 0
        tickets: dict[_Partition, list[int]] = {}
        now = time.monotonic()
        latency = self._record_latency
        bounds, counts = latency.bounds, latency.counts  # Histogram.observe, inlined: once per record
        spent = 0.0
        for items in profiles:
            total += len(items)
            for item in items:
                size += item.size
                part = item.partition
                if part.revoked:
                    self._records_dropped += 1  # handled, but not committed: its new owner reads it again
                    continue
                elapsed = now - item.read_at
                counts[bisect_left(bounds, elapsed)] += 1
                spent += elapsed
                mine = tickets.get(part)
                if mine is None:
                    tickets[part] = [item.ticket]
                else:
                    mine.append(item.ticket)
        latency.total += spent
        finished = 0
        for part, numbers in tickets.items():
            part.watermark.finish_many(numbers)
            finished += len(numbers)
        self._limit.release(total, size)
        self._finished(finished)

    def _finished(self, count: int) -> None:
        self._records_finished += count
        self._finished_since_checkpoint += count
        every = self.settings.checkpoint_every_records
        if (every and self._finished_since_checkpoint >= every) or (
                self._eager_until and time.monotonic() < self._eager_until):
            self._checkpoint_due.set()

    async def _reject(self, invalid: list[tuple[SourceRecord[Any], int, InvalidRecord]], part: _Partition) -> None:
        for record, ticket, problem in invalid:
            self._invalid[problem.reason.value] += 1
            position = str(record.position)
            log.warning("invalid record sent to the dead letter", extra={
                "reason": problem.reason.value, "detail": problem.detail, "partition": part.name,
                "position": position})
            await self._write_dead_letter(partial(
                self.dead_letter.invalid_record, record.data, reason=problem.reason.value, detail=problem.detail,
                partition=part.name, position=position))
            self._dead_letters += 1
            self._limit.release(1, len(record.data))
            if not part.revoked:
                part.watermark.finish(ticket)
                self._finished(1)

    async def _reject_entries(self, entries: list[tuple[SourceRecord[Any], InvalidEntry, IdentityMap]],
                              part: _Partition) -> None:
        """Audience entries dropped from records that are processed without them."""
        for record, entry, identities in entries:
            self._invalid_entries[entry.reason.value] += 1
            position = str(record.position)
            log.warning("invalid audience entry sent to the dead letter; the rest of its record is processed", extra={
                "reason": entry.reason.value, "path": entry.path, "detail": entry.detail, "partition": part.name,
                "position": position})
            await self._write_dead_letter(partial(
                self.dead_letter.invalid_entry, entry.entry, path=entry.path, reason=entry.reason.value,
                detail=entry.detail, partition=part.name, position=position, identities=identities))

    async def _write_dead_letter(self, write: Callable[[], Awaitable[None]]) -> None:
        """Until it is written: e.g. a full disk waits (reading pauses), never drops."""
        delay = self.settings.record_retry_backoff_s
        while True:
            try:
                await write()
                return
            except Exception:  # noqa: BLE001
                log.exception("cannot write the dead letter; will retry", extra={"retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    # --- checkpoints ----------------------------------------------------------------------------------
    async def _checkpoint_periodically(self) -> None:
        while True:
            # The interval, or earlier once checkpoint_every_records have finished.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._checkpoint_due.wait(), self.settings.checkpoint_interval_s)
            if not self.running:
                # run() is ending. Python 3.11's wait_for can swallow the cancel run() sends when the
                # event is set at that same moment, so the loop must not rely on the cancel alone.
                return
            self._checkpoint_due.clear()
            try:
                await self.checkpoint()
            except Exception:  # noqa: BLE001 - the next interval tries again
                log.exception("checkpoint failed; will retry")

    async def checkpoint(self) -> None:
        """Commit every partition's low watermark, after making what lies below it durable."""
        async with self._checkpoint_lock:
            self._finished_since_checkpoint = 0
            due = [
                (part, part.watermark.watermark) for part in self._partitions.values()
                if part.watermark.watermark is not None and part.watermark.watermark != part.watermark.committed
            ]
            if not due:
                return
            # Everything below these watermarks was handled, dead-lettered and saved before now.
            # Handlers first: state must never be durable ahead of the effects it records, or a
            # crash in between would make a replay skip changes as duplicates.
            await self.sink.flush()
            await self.dead_letter.flush()
            await self.store.flush()
            for part, position in due:
                if part.revoked:
                    continue  # taken away meanwhile: its new owner checkpoints from now on
                await self.source.commit(part.name, position)
                part.watermark.committed = position
                self._checkpoints_written[part.name] = self._checkpoints_written.get(part.name, 0) + 1
                self._checkpointed_at[part.name] = time.time()
                if not part.revoked:
                    self._checkpoints[part.name] = position
            log.debug("checkpointed", extra={"positions": {part.name: str(p) for part, p in due}})

    # --- what operations see ---------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._limit.records

    @property
    def records_finished(self) -> int:
        return self._records_finished

    @property
    def records_read(self) -> int:
        return self._records_read

    def snapshot(self) -> PipelineSnapshot:
        return PipelineSnapshot(
            records_read=self._records_read,
            records_finished=self._records_finished,
            records_dropped=self._records_dropped,
            invalid=dict(self._invalid),
            changes=dict(self._changes),
            stale=self._stale,
            duplicate=self._duplicate,
            filtered=self._filtered,
            dead_letters=self._dead_letters,
            in_flight_records=self._limit.records,
            in_flight_bytes=self._limit.bytes,
            profiles_waiting=self._gate.waiting,
            checkpoints=dict(self._checkpoints),
            checkpoints_written=dict(self._checkpoints_written),
            checkpointed_at=dict(self._checkpointed_at),
            record_latency=self._record_latency.copy(),
            change_age=self._change_age.copy(),
            identity=replace(self.identity.stats) if self.identity is not None else None,
            profiles_seen=len(self._profiles_seen) if self._profiles_seen is not None else None,
            invalid_entries=dict(self._invalid_entries),
            claims=self.claims.snapshot() if self.claims is not None else None,
        )
