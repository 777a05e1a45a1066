from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Mapping

from .base import ProfileState, RedirectFollowing, ScanQueries, SingleProfileAccess, Updates, Wanted


class MemoryStore(SingleProfileAccess, ScanQueries, RedirectFollowing):
    """State in a dict: for tests, the demo and runs that may start from nothing."""

    remember_aliases = False  # its alias lookups are a dict already

    def __init__(self) -> None:
        self._profiles: dict[str, ProfileState] = {}
        self._aliases: dict[str, str] = {}  # alias -> canonical profile key
        self._redirects: dict[str, str] = {}  # absorbed profile key -> survivor
        self._claims: dict[str, tuple[str, float]] = {}  # profile key -> (owner, monotonic expiry)

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

    # --- the alias index ---------------------------------------------------------------------
    async def find_profiles(self, aliases: Collection[str]) -> dict[str, str]:
        known = self._aliases
        owners = {alias: key for alias in aliases if (key := known.get(alias)) is not None}
        # A merge repoints its aliases here: a redirect is followed only for a claim that raced one.
        return await self._follow(owners) if self._redirects else owners

    async def _claim_owners(self, claims: Mapping[str, str]) -> dict[str, str]:
        known = self._aliases
        return {alias: known.setdefault(alias, key) for alias, key in claims.items()}

    async def _redirect_targets(self, keys: list[str]) -> dict[str, str]:
        redirects = self._redirects
        return {key: target for key in keys if (target := redirects.get(key)) is not None}

    async def redirect_profiles(self, redirects: Mapping[str, str]) -> None:
        for absorbed, survivor in redirects.items():
            self._redirects[absorbed] = survivor
            self._profiles.pop(absorbed, None)
        moved = {alias for alias, key in self._aliases.items() if key in redirects}
        for alias in moved:
            self._aliases[alias] = redirects[self._aliases[alias]]

    async def aliases_of(self, profile_key: str) -> list[str]:
        return sorted(alias for alias, key in self._aliases.items() if key == profile_key)

    # --- profile claims (pipelines sharing this store in one process, as tests do) -------------
    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]:
        now = time.monotonic()
        claims = self._claims
        held: set[str] = set()
        for key in keys:
            current = claims.get(key)
            if current is None or current[0] == owner or current[1] < now:
                claims[key] = (owner, now + ttl_s)
                held.add(key)
        return held

    async def release_profiles(self, keys: Collection[str], owner: str) -> None:
        claims = self._claims
        for key in keys:
            current = claims.get(key)
            if current is not None and current[0] == owner:
                del claims[key]

    async def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]:
        for profile_key, state in list(self._profiles.items()):
            yield profile_key, dict(state)

    def __len__(self) -> int:
        return len(self._profiles)
