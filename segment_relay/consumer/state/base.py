from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from ..membership import SegmentKey, StoredMembership

ProfileState = dict[SegmentKey, StoredMembership]


@runtime_checkable
class MembershipStore(Protocol):
    """Per-profile membership state.

    ``save`` is conditional per segment: a value replaces the stored one only if
    it ``supersedes`` it (newer qualification time, or the same time with another
    status), so an older status never overwrites a newer one, whoever writes.
    ``flush`` makes everything saved so far durable; the pipeline calls it
    before it checkpoints.
    """

    async def open(self) -> None: ...

    async def load(self, profile_key: str) -> ProfileState: ...

    async def save(self, profile_key: str, updates: Mapping[SegmentKey, StoredMembership]) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
