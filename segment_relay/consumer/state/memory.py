from __future__ import annotations

from collections.abc import Mapping

from ..membership import SegmentKey, StoredMembership, supersedes
from .base import ProfileState


class MemoryStore:
    """State in a dict: for tests, the demo and runs that may start from nothing."""

    def __init__(self) -> None:
        self._profiles: dict[str, ProfileState] = {}

    async def open(self) -> None:
        pass

    async def load(self, profile_key: str) -> ProfileState:
        return self._profiles.get(profile_key, {})

    async def save(self, profile_key: str, updates: Mapping[SegmentKey, StoredMembership]) -> None:
        state = self._profiles.setdefault(profile_key, {})
        for key, new in updates.items():
            if supersedes(new, state.get(key)):
                state[key] = new

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._profiles)
