"""Which replica reads which shard: KCL-style lease taking, renewal, stealing and hand-off.

Two loops per worker:

* **renewal**, every ``renew_interval_s``: renew every held lease (a conditional counter bump).
  A failed renewal means the lease was taken by someone else: it is dropped and ``on_lost`` is
  called. A lease whose renewals keep *erroring* (network) for a whole lease duration, counted
  from the sending of its last successful renewal on our own clock, is given up the same way,
  because by then other workers may consider it expired.
* **balancing**, at once on start and then every ``balance_interval_s`` (by default half the
  lease duration, so at most one lease duration apart): scan the table and

  1. note, per lease, when *this* worker first saw its current counter (own monotonic clock).
     An owned lease is EXPIRED once its counter has not moved for ``lease_duration_s`` since
     then, so clock skew between machines never matters. A free lease is available at once;
  2. keep only ELIGIBLE leases: checkpoint is not SHARD_END and every parent shard's lease is
     either absent or at SHARD_END (children are read only after their parents are finished);
  3. live workers = owners of non-expired leases, plus me; target = ceil(eligible / live);
  4. below target: take available leases (free or expired, or ours from an earlier incarnation
     with the same worker id), those of dead owners first, then free ones, then expired ones of
     still-live owners, in random order within each group; a lost race moves on to the next one;
  5. still below target and nothing available: ask the most loaded worker for ONE lease, if
     it holds more than target, or exactly target while we are at least two below it (KCL's
     rule; without it 3 workers over 4 leases would stay at 2/2/0). Asking is a hand-over
     request on the lease (``handoffTo``): the owner sees it at its next renewal or scan, calls
     ``on_handoff``, finishes and checkpoints what it read, and releases the lease, which the
     asker takes at a later pass, free: nothing it finished is read again. An owner that does
     not release within a lease duration of the request (an older version, a stuck one) has
     the lease stolen, as KCL 2 always does.

``stop(release=True)`` releases every held lease (owner removed, counter bumped): the others
take them at their next balancing pass instead of waiting for expiry.
``stop(release=False)`` just stops, like a crash: the leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from .leases import Lease, LeaseTable
from .settings import SHARD_END

__all__ = ["LeaseCoordinator", "LeaseSettings"]

log = logging.getLogger(__name__)


class LeaseSettings(Protocol):
    """The part of KinesisSettings the coordinator reads."""

    @property
    def lease_duration_s(self) -> float: ...

    @property
    def renew_interval_s(self) -> float: ...


AcquiredCallback = Callable[[Lease], Awaitable[None] | None]
LostCallback = Callable[[str], Awaitable[None] | None]
HandoffCallback = Callable[[str], Awaitable[None] | None]


class LeaseCoordinator:
    def __init__(
        self,
        table: LeaseTable,
        settings: LeaseSettings,
        worker_id: str,
        *,
        on_acquired: AcquiredCallback,
        on_lost: LostCallback,
        on_handoff: HandoffCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        balance_interval_s: float | None = None,
    ) -> None:
        """``on_handoff(shard_id)``: another worker asked for this held lease; the callee finishes
        the shard's work and then calls ``release(shard_id)``. None: release at once."""
        if settings.renew_interval_s >= settings.lease_duration_s:
            raise ValueError("renew_interval_s must be shorter than lease_duration_s")
        self.table = table
        self.worker_id = worker_id
        self.lease_duration_s = settings.lease_duration_s
        self.renew_interval_s = settings.renew_interval_s
        self.balance_interval_s = (
            balance_interval_s if balance_interval_s is not None else settings.lease_duration_s / 2
        )
        self._on_acquired = on_acquired
        self._taking = True
        self._on_lost = on_lost
        self._on_handoff = on_handoff
        self._handing_off: set[str] = set()  # held leases being handed over (on_handoff called)
        self._asked: dict[str, float] = {}  # shard -> clock() when this worker asked its owner for it
        self._clock = clock
        self._held: dict[str, Lease] = {}
        self._renewed_at: dict[str, float] = {}  # clock() when the last successful renewal was *sent*
        self._seen: dict[str, tuple[int, float]] = {}  # shard -> (counter, clock() when first seen)
        self._locks: dict[str, asyncio.Lock] = {}  # serialise renew/checkpoint/release per shard
        self._releasing: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._stopping = asyncio.Event()

    # -- public -------------------------------------------------------------------------------

    @property
    def held(self) -> dict[str, Lease]:
        """shard id -> Lease currently owned by this worker (a copy)."""
        return dict(self._held)

    @property
    def running(self) -> bool:
        return self._running

    def stop_taking(self) -> None:
        """Take and steal no more leases, but keep renewing the held ones: a draining replica
        still needs them for its final checkpoints."""
        self._taking = False

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._stopping = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name=f"lease-renew-{self.worker_id}"),
            asyncio.create_task(self._balance_loop(), name=f"lease-balance-{self.worker_id}"),
        ]

    async def stop(self, release: bool = True) -> None:
        """Stop both loops. ``release=True`` hands every held lease over (free at once);
        ``release=False`` keeps them, as a crash would, so they expire. No callbacks are called.

        A pass in progress is allowed to finish (up to one lease duration) rather than being
        cancelled, so no write whose outcome is unknown is left behind; a lease taken while
        stopping is handed straight back."""
        self._running = False
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.lease_duration_s)
            for task in pending:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if release:
            await asyncio.gather(*(self.release(shard_id) for shard_id in list(self._held)))
        self._held.clear()
        self._renewed_at.clear()

    async def checkpoint(self, shard_id: str, sequence: str) -> bool:
        """Record ``sequence`` for a held shard. False if the shard is not held (or no longer
        is: then it is dropped and ``on_lost`` is called). Errors other than a lost lease raise."""
        async with self._lock(shard_id):
            lease = self._held.get(shard_id)
            if lease is None:
                return False
            ok = await self.table.checkpoint(shard_id, self.worker_id, sequence)
            if ok:
                self._held[shard_id] = replace(lease, checkpoint=sequence, owner_switches=0)
                return True
            self._drop(shard_id)
        log.warning("lease lost at checkpoint", extra={"shard": shard_id, "worker": self.worker_id, "owner": None})
        await self._notify_lost(shard_id)
        return False

    async def mark_shard_end(self, shard_id: str) -> bool:
        """The shard was read to its end and everything is processed: checkpoint SHARD_END and
        release the lease (nobody takes it again; its children become eligible)."""
        if not await self.checkpoint(shard_id, SHARD_END):
            return False
        await self.release(shard_id)
        return True

    async def release(self, shard_id: str) -> bool:
        """Give one held lease up (free at once). The shard is no longer held afterwards, even if
        the write fails. No ``on_lost`` call: the caller asked for it. Note that the balancer
        may take it again later if this worker is below its target."""
        self._releasing.add(shard_id)
        try:
            async with self._lock(shard_id):
                lease = self._held.get(shard_id)
                if lease is None:
                    return False
                handing_over = shard_id in self._handing_off
                self._drop(shard_id)
                try:
                    # A hand-over keeps the asker's name on the free lease: it is reserved for it.
                    released = await self.table.release(lease, keep_handoff=handing_over)
                except Exception:
                    log.exception("lease release failed; it will expire",
                                  extra={"shard": shard_id, "worker": self.worker_id, "owner": self.worker_id})
                    return False
            log.info("lease released" if released else "lease already lost at release",
                     extra={"shard": shard_id, "worker": self.worker_id, "owner": self.worker_id})
            return released
        finally:
            self._releasing.discard(shard_id)
            self._handing_off.discard(shard_id)

    async def sync_shards(self, shards: Iterable[Mapping[str, Any]]) -> list[str]:
        """Create the missing leases for ListShards output (dicts with ShardId, ParentShardId,
        AdjacentParentShardId), parents before children. Returns the shard ids created."""
        by_id = {str(shard["ShardId"]): shard for shard in shards}
        created: list[str] = []
        for shard_id in _parents_first(by_id):
            shard = by_id[shard_id]
            parents = [str(p) for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p]
            if await self.table.create_if_missing(shard_id, parents):
                created.append(shard_id)
        if created:
            log.info("leases created", extra={"worker": self.worker_id, "shards": created})
        return created

    async def balance_once(self) -> None:
        """One balancing pass (the balancing loop calls this; exposed for tests and tools)."""
        leases = await self.table.list_leases()
        now = self._clock()
        by_id = {lease.shard_id: lease for lease in leases}
        for shard_id in list(self._seen):
            if shard_id not in by_id:
                del self._seen[shard_id]
        for lease in leases:
            seen = self._seen.get(lease.shard_id)
            if seen is None or seen[0] != lease.counter:
                self._seen[lease.shard_id] = (lease.counter, now)

        # Held leases that somebody else owns now (stolen, or deleted) are lost.
        for shard_id in list(self._held):
            current = by_id.get(shard_id)
            if (current is None or current.owner != self.worker_id) and shard_id not in self._releasing:
                await self._lose(shard_id, current.owner if current else None, "lease taken by another worker")
            elif current is not None:
                await self._answer_handoff(current)
        for shard_id in [shard for shard in self._asked if by_id.get(shard) is None
                         or by_id[shard].handoff_to != self.worker_id]:
            del self._asked[shard_id]  # taken, or handed to someone else

        def expired(lease: Lease) -> bool:
            if lease.owner is None or lease.owner == self.worker_id:
                return False
            return now - self._seen[lease.shard_id][1] >= self.lease_duration_s

        def reserved(lease: Lease) -> bool:
            """Free, but handed over to another worker that has not taken it yet (for a lease duration)."""
            return (lease.owner is None and lease.handoff_to not in (None, self.worker_id)
                    and now - self._seen[lease.shard_id][1] < self.lease_duration_s)

        eligible = [lease for lease in leases if _eligible(lease, by_id)]
        live = {lease.owner for lease in leases if lease.owner is not None and not expired(lease)}
        # A worker that asked for a lease is live, though it may own none yet.
        live |= {str(lease.handoff_to) for lease in leases if lease.handoff_to is not None
                 and (lease.owner is None or not expired(lease))}
        live.add(self.worker_id)
        target = math.ceil(len(eligible) / len(live)) if eligible else 0
        needed = target - sum(1 for lease in eligible if lease.shard_id in self._held)
        if needed <= 0 or not self._taking:
            return

        available = [
            lease for lease in eligible
            if lease.shard_id not in self._held and lease.shard_id not in self._releasing and not reserved(lease)
            and (lease.owner is None or lease.owner == self.worker_id or expired(lease))
        ]
        if available:
            random.shuffle(available)

            def rank(lease: Lease) -> int:
                if lease.owner is not None and lease.owner != self.worker_id and lease.owner not in live:
                    return 0  # a dead worker's shard: nobody reads it
                return 1 if lease.owner is None or lease.owner == self.worker_id else 2

            available.sort(key=rank)
            for lease in available:
                if needed <= 0 or self._stopping.is_set():
                    break
                if await self._take(lease, "take"):
                    needed -= 1
            return

        live_owned = [lease for lease in eligible
                      if lease.owner is not None and lease.owner != self.worker_id and not expired(lease)]
        if not self._stopping.is_set():
            await self._ask_or_steal(live_owned, needed, target, now)

    async def _ask_or_steal(self, owned: list[Lease], needed: int, target: int, now: float) -> None:
        """Step 5: steal what was asked for a lease duration ago and is still not released, and
        ask the most loaded owners for the rest (at most ``needed`` leases asked at a time)."""
        asked = [lease for lease in owned if lease.handoff_to == self.worker_id]
        for lease in asked:
            if now - self._asked.setdefault(lease.shard_id, now) >= self.lease_duration_s:
                log.warning("hand-over not answered within a lease duration; stealing the lease",
                            extra={"shard": lease.shard_id, "worker": self.worker_id, "owner": lease.owner})
                await self._take(lease, "steal")
        wanted = needed - len(asked)
        loads = Counter(str(lease.owner) for lease in owned)
        while wanted > 0 and loads:
            top = max(loads.values())
            if not (top > target or (top == target and wanted > 1)):  # KCL's rule, as in step 5
                break
            victim = random.choice(sorted(owner for owner, count in loads.items() if count == top))
            candidates = [lease for lease in owned if lease.owner == victim and lease.handoff_to is None]
            if not candidates:  # each is being handed to someone already
                del loads[victim]
                continue
            lease = random.choice(candidates)
            owned.remove(lease)
            loads[victim] -= 1
            if await self.table.request_handoff(lease, self.worker_id):
                self._asked[lease.shard_id] = now
                wanted -= 1
                log.info("lease hand-over requested", extra={"shard": lease.shard_id, "worker": self.worker_id,
                                                             "owner": lease.owner})

    async def _answer_handoff(self, lease: Lease) -> None:
        """A held lease another worker asked for: hand it over (once)."""
        shard_id = lease.shard_id
        if lease.handoff_to in (None, self.worker_id) or shard_id in self._handing_off or shard_id not in self._held:
            return
        self._handing_off.add(shard_id)
        log.info("lease hand-over asked for: finishing the shard, then releasing it",
                 extra={"shard": shard_id, "worker": self.worker_id, "owner": self.worker_id, "to": lease.handoff_to})
        if self._on_handoff is None:
            await self.release(shard_id)
            return
        try:
            result = self._on_handoff(shard_id)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_handoff failed; releasing the lease now",
                          extra={"shard": shard_id, "worker": self.worker_id, "owner": self.worker_id})
            await self.release(shard_id)

    async def renew_once(self) -> None:
        """Renew every held lease once (the renewal loop calls this); answer hand-over requests."""
        results = await asyncio.gather(*(self._renew(shard_id) for shard_id in list(self._held)))
        for shard_id in (result for result in results if result is not None):
            await self._notify_lost(shard_id)
        for lease in list(self._held.values()):
            await self._answer_handoff(lease)

    # -- loops --------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while self._running:
            started = self._clock()
            try:
                await self.renew_once()
            except Exception:
                log.exception("lease renewal pass failed", extra={"worker": self.worker_id})
            await self._pause(self.renew_interval_s - (self._clock() - started))

    async def _balance_loop(self) -> None:
        while self._running:
            started = self._clock()
            try:
                await self.balance_once()
            except Exception:
                log.exception("lease balancing pass failed", extra={"worker": self.worker_id})
            await self._pause(self.balance_interval_s - (self._clock() - started))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    # -- internals ----------------------------------------------------------------------------

    def _lock(self, shard_id: str) -> asyncio.Lock:
        lock = self._locks.get(shard_id)
        if lock is None:
            lock = self._locks[shard_id] = asyncio.Lock()
        return lock

    def _drop(self, shard_id: str) -> None:
        self._held.pop(shard_id, None)
        self._renewed_at.pop(shard_id, None)
        self._handing_off.discard(shard_id)

    async def _renew(self, shard_id: str) -> str | None:
        """Renew one lease; returns the shard id when it is lost (already dropped), else None."""
        async with self._lock(shard_id):
            lease = self._held.get(shard_id)
            if lease is None:
                return None
            sent = self._clock()
            try:
                renewed = await self.table.renew(lease)
            except Exception:
                if sent - self._renewed_at.get(shard_id, sent) < self.lease_duration_s:
                    log.warning("lease renewal failed; retrying", exc_info=True,
                                extra={"shard": shard_id, "worker": self.worker_id, "owner": self.worker_id})
                    return None
                log.error("lease not renewed for a lease duration; giving it up", exc_info=True,
                          extra={"shard": shard_id, "worker": self.worker_id, "owner": self.worker_id})
                self._drop(shard_id)
                return shard_id
            if renewed is None:
                log.warning("lease lost (renewal refused: taken by another worker)",
                            extra={"shard": shard_id, "worker": self.worker_id, "owner": None})
                self._drop(shard_id)
                return shard_id
            self._held[shard_id] = renewed
            self._renewed_at[shard_id] = sent
            return None

    async def _take(self, lease: Lease, how: str) -> bool:
        previous = lease.owner
        try:
            taken = await self.table.take(lease, self.worker_id)
        except Exception:
            log.exception("lease %s failed", how, extra={"shard": lease.shard_id, "worker": self.worker_id, "owner": previous})
            return False
        if taken is None:
            log.debug("lease %s lost the race", how, extra={"shard": lease.shard_id, "worker": self.worker_id, "owner": previous})
            return False
        if self._stopping.is_set():  # stop() was called while the write was in flight: hand it back
            with contextlib.suppress(Exception):
                await self.table.release(taken)
            return False
        self._held[lease.shard_id] = taken
        self._asked.pop(lease.shard_id, None)
        self._renewed_at[lease.shard_id] = self._clock()
        self._seen[lease.shard_id] = (taken.counter, self._clock())
        log.info("lease stolen" if how == "steal" else "lease taken",
                 extra={"shard": lease.shard_id, "worker": self.worker_id, "owner": previous})
        try:
            result = self._on_acquired(taken)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_acquired failed; releasing the lease",
                          extra={"shard": lease.shard_id, "worker": self.worker_id, "owner": self.worker_id})
            await self.release(lease.shard_id)
            return False
        return True

    async def _lose(self, shard_id: str, owner: str | None, message: str) -> None:
        async with self._lock(shard_id):
            if shard_id not in self._held:
                return
            self._drop(shard_id)
        log.warning(message, extra={"shard": shard_id, "worker": self.worker_id, "owner": owner})
        await self._notify_lost(shard_id)

    async def _notify_lost(self, shard_id: str) -> None:
        try:
            result = self._on_lost(shard_id)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_lost failed", extra={"shard": shard_id, "worker": self.worker_id, "owner": None})


def _eligible(lease: Lease, by_id: Mapping[str, Lease]) -> bool:
    """May this shard be read now? Not finished, and every parent finished (or unknown)."""
    if lease.checkpoint == SHARD_END:
        return False
    for parent_id in lease.parent_shard_ids:
        parent = by_id.get(parent_id)
        if parent is not None and parent.checkpoint != SHARD_END:
            return False
    return True


def _parents_first(shards: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Shard ids ordered so every parent in ``shards`` comes before its children."""
    order: list[str] = []
    done: set[str] = set()

    def visit(shard_id: str, path: frozenset[str]) -> None:
        if shard_id in done or shard_id in path:
            return
        shard = shards[shard_id]
        for parent in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")):
            if parent and str(parent) in shards:
                visit(str(parent), path | {shard_id})
        done.add(shard_id)
        order.append(shard_id)

    for shard_id in shards:
        visit(shard_id, frozenset())
    return order
