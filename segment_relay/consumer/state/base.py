"""The membership store protocol: per-profile state, loaded and saved a batch at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..stored import SegmentKey, StoredMembership

__all__ = ["AliasIndex", "MembershipStore", "ProfileClaims", "ProfileState", "RedirectFollowing", "ScanQueries", "SingleProfileAccess",
           "StateQueries", "StoreStats", "Updates", "Wanted"]

ProfileState = dict[SegmentKey, StoredMembership]
#: profile key -> the segments its records mention (None: every segment of the profile)
Wanted = Mapping[str, Collection[SegmentKey] | None]
#: profile key -> the new values of some of its segments
Updates = Mapping[str, Mapping[SegmentKey, StoredMembership]]


@runtime_checkable
class MembershipStore(Protocol):
    """Per-profile membership state.

    ``load_many`` returns, for each profile asked for, its stored state: at least the segments
    named (a store may return all of the profile's), nothing for a profile never saved (it may
    be missing from the result). One call per pipeline step: a local store answers from memory
    or one query, a remote one with one round trip's worth of batched requests.

    ``save_many`` is conditional per segment: a value replaces the stored one only if it
    ``supersedes`` it (newer qualification time, or the same time with another status), so an
    older status never overwrites a newer one, whoever writes. ``flush`` makes everything saved
    so far durable; the pipeline calls it before it checkpoints.
    """

    async def open(self) -> None: ...

    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]: ...

    async def save_many(self, updates: Updates) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class SingleProfileAccess:
    """``load`` and ``save`` of one profile, on top of a store's batch calls (tools and tests)."""

    async def load(self: MembershipStore, profile_key: str) -> ProfileState:  # type: ignore[misc]
        return (await self.load_many({profile_key: None})).get(profile_key, {})

    async def save(self: MembershipStore, profile_key: str,  # type: ignore[misc]
                   updates: Mapping[SegmentKey, StoredMembership]) -> None:
        if updates:
            await self.save_many({profile_key: updates})


# --- asking the state (segment-relay state) ------------------------------------------------------
@dataclass
class StoreStats:
    """What ``segment-relay state stats`` prints."""

    profiles: int = 0  # profiles with at least one stored segment
    memberships: int = 0  # (profile, segment) values stored, members or not
    members: dict[SegmentKey, int] = field(default_factory=dict)  # current members per segment
    how: str = "a full scan"  # how the figures were worked out


@runtime_checkable
class StateQueries(Protocol):
    """Read-only questions about the stored state, for operators (never on the hot path).

    Every store keys its state by profile, which is what the pipeline needs (one lookup per
    profile); a question by segment therefore reads every profile. ``scan_note`` says so in
    the store's own terms."""

    scan_note: str

    def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]: ...

    def members(self, segment: SegmentKey) -> AsyncIterator[str]: ...

    async def stats(self) -> StoreStats: ...


class ScanQueries:
    """``members`` and ``stats`` from a store's ``profiles()``: stores that can ask their backend
    something narrower override ``members``."""

    scan_note = "reads every profile (a full scan)"

    def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]:
        raise NotImplementedError

    async def members(self, segment: SegmentKey) -> AsyncIterator[str]:
        async for profile_key, state in self.profiles():
            value = state.get(segment)
            if value is not None and value.is_member:
                yield profile_key

    async def stats(self) -> StoreStats:
        stats = StoreStats(how=self.scan_note)
        members = stats.members
        async for _, state in self.profiles():
            stats.profiles += 1
            stats.memberships += len(state)
            for segment, value in state.items():
                if value.is_member:
                    members[segment] = members.get(segment, 0) + 1
        return stats


# --- the alias index (identity linking) ----------------------------------------------------------
#: How many redirects a lookup follows: a merge redirects the absorbed key to a smaller one, so
#: chains only go down and end; the bound guards a store edited by hand.
MAX_REDIRECTS = 16


@runtime_checkable
class AliasIndex(Protocol):
    """Which profile each identity belongs to: ``alias`` (``namespace:id``, the namespace in lower
    case) -> the profile's canonical key. Every store implements it beside its membership state.

    ``find_profiles`` answers the aliases it knows, through redirects (a merged profile's key
    points to the one that absorbed it). ``claim_aliases`` is a conditional create per alias:
    an alias nobody holds becomes the given profile's; one already held stays where it is, and
    either way the answer is its owner now, so two replicas claiming one identity for two
    profiles agree on one. Claims take effect at once (they record no membership: a replay
    finds the same profile and repeats its changes). ``redirect_profiles`` ends a merge: each
    absorbed key points to its survivor, its aliases move there and its state is dropped; it
    is durable with the next ``flush``, as saved state is, and never ahead of it.
    ``aliases_of`` lists a profile's aliases (``segment-relay state show``). ``survivors_of``
    answers which of some profile keys a merge has absorbed, each with its survivor now."""

    async def find_profiles(self, aliases: Collection[str]) -> dict[str, str]: ...

    async def survivors_of(self, keys: Collection[str]) -> dict[str, str]: ...

    async def claim_aliases(self, claims: Mapping[str, str]) -> dict[str, str]: ...

    async def redirect_profiles(self, redirects: Mapping[str, str]) -> None: ...

    async def aliases_of(self, profile_key: str) -> list[str]: ...


class RedirectFollowing:
    """``find_profiles`` and ``claim_aliases`` from a store's raw lookups: ``_alias_owners``
    (alias -> the key stored for it), ``_claim_owners`` (the conditional create, answering the
    stored keys) and ``_redirect_targets`` (absorbed key -> survivor).

    The raw owners found or claimed are remembered in this process (up to
    ``ALIAS_CACHE_MAX`` aliases, then forgotten all at once): an alias, once created, only
    ever changes owner by a merge, and a merge leaves a permanent redirect from the absorbed key,
    which every lookup still follows in the store. So a remembered owner is never wrong, only
    possibly one redirect behind, and most of a busy stream's identities need no lookup.
    (An alias item deleted by hand stays known here until a restart.)"""

    ALIAS_CACHE_MAX = 200_000
    remember_aliases = True  # False for a store whose lookups are a dict already (memory: it answers find_profiles itself)
    _known_owners: dict[str, str] | None = None

    async def _alias_owners(self, aliases: list[str]) -> dict[str, str]:
        raise NotImplementedError

    async def _claim_owners(self, claims: Mapping[str, str]) -> dict[str, str]:
        raise NotImplementedError

    async def _redirect_targets(self, keys: list[str]) -> dict[str, str]:
        raise NotImplementedError

    async def find_profiles(self, aliases: Collection[str]) -> dict[str, str]:
        if not aliases:
            return {}
        known = self._known()
        owners: dict[str, str] = {}
        missing: list[str] = []
        for alias in aliases:
            owner = known.get(alias)
            if owner is None:
                missing.append(alias)
            else:
                owners[alias] = owner
        if missing:
            found = await self._alias_owners(missing)
            self._remember(found)
            owners.update(found)
        return await self._follow(owners)

    async def claim_aliases(self, claims: Mapping[str, str]) -> dict[str, str]:
        if not claims:
            return {}
        owners = await self._claim_owners(claims)
        if self.remember_aliases:
            self._remember(owners)
        return await self._follow(owners)

    async def survivors_of(self, keys: Collection[str]) -> dict[str, str]:
        followed = await self._follow({key: key for key in keys})
        return {key: survivor for key, survivor in followed.items() if survivor != key}

    def _known(self) -> dict[str, str]:
        known = self._known_owners
        if known is None:
            known = self._known_owners = {}
        return known

    def forget_aliases(self) -> None:
        """Drops the remembered owners (the next lookups read the store)."""
        self._known_owners = None

    def _remember(self, owners: Mapping[str, str]) -> None:
        known = self._known()
        if len(known) + len(owners) > self.ALIAS_CACHE_MAX:
            known.clear()  # cheaper than an LRU per lookup; refilled by the next batches' lookups
        known.update(owners)

    async def _follow(self, owners: dict[str, str]) -> dict[str, str]:
        for _ in range(MAX_REDIRECTS):
            if not owners:
                return owners
            targets = await self._redirect_targets(sorted(set(owners.values())))
            if not targets:
                return owners
            owners = {alias: targets.get(key, key) for alias, key in owners.items()}
        return owners


# --- profile claims (replicas sharing a store) ---------------------------------------------------
@runtime_checkable
class ProfileClaims(Protocol):
    """Short leases on profiles, so that two replicas never diff one profile at the same time.

    Adobe's partition key is not documented, so exports of one person can land on two shards
    read by two replicas. Both would load the same state, and both would fire the same
    ``enter``. A replica therefore claims a profile before it loads it and gives the claim up
    only after the profile's new state is saved (visible to the others); a replica that finds
    it claimed waits and loads the saved state afterwards.

    ``claim_profiles`` is a conditional write per key: a key that is free, expired, or already
    ``owner``'s becomes ``owner``'s for ``ttl_s`` (claiming one's own again renews it); the
    answer is the keys ``owner`` now holds. ``release_profiles`` frees the keys ``owner`` still
    holds (never another's); a store whose saves become visible only at ``flush`` frees them
    with the next flush. A replica that dies without releasing is waited for until ``ttl_s``."""

    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]: ...

    async def release_profiles(self, keys: Collection[str], owner: str) -> None: ...
