from __future__ import annotations

from collections.abc import AsyncIterator

from .base import ProfileState, ScanQueries, SingleProfileAccess, Updates, Wanted


class MemoryStore(SingleProfileAccess, ScanQueries):
    """State in a dict: for tests, the demo and runs that may start from nothing."""

    def __init__(self) -> None:
        self._profiles: dict[str, ProfileState] = {}

    async def open(self) -> None:
        pass

    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]:
        stored = self._profiles
        # The stored dicts themselves, not copies: the pipeline only reads them.
        return {key: state for key in profiles if (state := stored.get(key)) is not None}

    async def save_many(self, updates: Updates) -> None:
        profiles = self._profiles
        for profile_key, changes in updates.items():
            state = profiles.get(profile_key)
            if state is None:
                profiles[profile_key] = dict(changes)
                continue
            for key, new in changes.items():
                old = state.get(key)  # supersedes(), inlined: this runs per saved segment
                if old is None or new.qualified_at_us > old.qualified_at_us or (
                        new.qualified_at_us == old.qualified_at_us and new.status is not old.status):
                    state[key] = new

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]:
        for profile_key, state in list(self._profiles.items()):
            yield profile_key, dict(state)

    def __len__(self) -> int:
        return len(self._profiles)
