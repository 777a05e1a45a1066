"""One replica's claims on the profiles it is working on, in a store shared with other replicas.

A step claims its profiles before it loads their state and gives them back once their new
state is saved (``claims.mode``; see ``ProfileClaims`` for why). This module
keeps the bookkeeping out of the pipeline:

- a profile several steps need at once (a merge's absorbed key) is claimed once and counted;
- a profile given back is freed by a background sweep, a batch at a time, and one taken back
  before the sweep needs no request at all (the next record of a busy profile);
- held claims are renewed every third of their TTL, so a step that waits on a downstream
  outage keeps its profiles; a claim found lost on renewal is logged (another replica may
  then repeat a change: the only way to lose one is to stall longer than the TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .state.base import ProfileClaims

log = logging.getLogger(__name__)


def replica_owner() -> str:
    """A claim owner unique to this process: host, pid and a random part (pids repeat across pods)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class ClaimsSnapshot:
    held: int  # profiles this replica holds claims on now
    waits: int  # steps that found one of their profiles claimed by another replica, so far


class ProfileClaimer:
    def __init__(self, store: ProfileClaims, ttl_s: float, owner: str | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.owner = owner or replica_owner()
        self._held: dict[str, int] = {}  # profile key -> steps using it (0: held, waiting to be freed)
        self._idle: set[str] = set()  # held by no step: freed by the next sweep
        self._freeing: set[str] = set()  # a release request for these is under way
        self._freed = asyncio.Event()
        self._wake = asyncio.Event()
        self.waits = 0  # steps that found a profile claimed by another replica (a metric)
        self._stopping = False

    def stop(self) -> None:
        """End ``run`` (the pipeline stops it, then frees what is left with ``close``)."""
        self._stopping = True
        self._wake.set()

    def snapshot(self) -> ClaimsSnapshot:
        return ClaimsSnapshot(held=len(self._held), waits=self.waits)

    async def take(self, keys: Collection[str]) -> set[str]:
        """Claim ``keys`` for one step: the ones it now holds (counted once more each); the others
        are another replica's."""
        while any(key in self._freeing for key in keys):  # a release would undo a claim sent now
            self._freed.clear()
            await self._freed.wait()
        held, idle = self._held, self._idle  # (after the wait: the sweep swaps the idle set)
        taken: set[str] = set()
        new: list[str] = []
        for key in keys:  # counted before any await, so the sweep cannot free them meanwhile
            if key in held:
                held[key] += 1
                idle.discard(key)
                taken.add(key)
            else:
                new.append(key)
        if new:
            for key in await self.store.claim_profiles(new, self.owner, self.ttl_s):
                held[key] = held.get(key, 0) + 1
                self._idle.discard(key)  # (the sweep may have swapped the set meanwhile)
                taken.add(key)
        if len(taken) < len(keys):
            self.waits += 1
        return taken

    def give_back(self, keys: Iterable[str]) -> None:
        """One step is done with ``keys`` (their state is saved): free them unless another step uses them."""
        held = self._held
        for key in keys:
            count = held.get(key)
            if count is None:
                continue
            if count <= 1:
                held[key] = 0
                self._idle.add(key)
            else:
                held[key] = count - 1
        if self._idle:
            self._wake.set()

    async def run(self) -> None:
        """The sweep: frees idle claims as they come, renews held ones every third of the TTL."""
        loop = asyncio.get_running_loop()
        renew_every = self.ttl_s / 3
        renew_at = loop.time() + renew_every
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, renew_at - loop.time()))
            if self._stopping:
                # Python 3.11's wait_for can swallow a cancel that comes as the event is set:
                # the flag ends the loop all the same.
                return
            self._wake.clear()
            try:
                await self._free_idle()
                if loop.time() >= renew_at:
                    renew_at = loop.time() + renew_every
                    await self._renew()
            except Exception:  # noqa: BLE001 - the store is down: the next round tries again (TTL covers it)
                log.exception("profile claims: store call failed; will retry")
                await asyncio.sleep(1.0)

    async def _free_idle(self) -> None:
        if not self._idle:
            return
        keys, self._idle = self._idle, set()
        for key in keys:
            del self._held[key]
        self._freeing = keys
        try:
            await self.store.release_profiles(list(keys), self.owner)
        finally:
            self._freeing = set()
            self._freed.set()

    async def _renew(self) -> None:
        keys = [key for key, count in self._held.items() if count > 0]
        if not keys:
            return
        kept = await self.store.claim_profiles(keys, self.owner, self.ttl_s)
        lost = [key for key in keys if key not in kept]
        if lost:
            log.warning("profile claims expired while in use; another replica may repeat their changes",
                        extra={"profiles": len(lost), "ttl_s": self.ttl_s})

    async def close(self) -> None:
        """Free every claim still held (a graceful stop: the others need not wait for the TTL)."""
        keys, self._held, self._idle = list(self._held), {}, set()
        if keys:
            try:
                await self.store.release_profiles(keys, self.owner)
            except Exception:  # noqa: BLE001 - they expire by themselves
                log.warning("profile claims: could not free them at close; they expire in %s s", self.ttl_s,
                            exc_info=True)
