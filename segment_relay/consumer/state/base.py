"""The membership store protocol: per-profile state, loaded and saved a batch at a time."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol, runtime_checkable

from ..stored import SegmentKey, StoredMembership

__all__ = ["MembershipStore", "ProfileState", "SingleProfileAccess", "Updates", "Wanted"]

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
