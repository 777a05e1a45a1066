"""`segment-relay run --dry-run`: the relay's reading, validation and diff, with no effect anywhere.

What is replaced, and why:

- the handlers: the changes that would fire are printed as JSON lines on stdout instead (the
  ``jsonl`` handler's format), and no configured handler is built or called;
- the membership store: read, never written (``DryRunStore``): what the run would save stays in
  memory, so that a profile's later records are diffed against its earlier ones as in a real run;
- the source: read from where a real run would start (the file's or the leases' checkpoints),
  never committed;
- the dead letter: kept in memory; the invalid records are counted in the totals.

On Kinesis the shards are read without leases (``KinesisReadOnlySource``), so the replicas
running on the stream are not disturbed. On Event Hubs every partition is read through a
consumer group of the dry run's own (``eventhubs.dry_run_consumer_group``) with no checkpoint
store, so no ownership is claimed and no epoch receiver opened, starting after the running
replicas' checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from .config import ConfigError, RelayConfig
from .consumer.membership import supersedes
from .consumer.sources.base import PartitionListener, Source, SourceSnapshot
from .consumer.state import open_existing_store
from .consumer.state.base import AliasIndex, MembershipStore, ProfileState, SingleProfileAccess, Updates, Wanted
from .consumer.state.memory import MemoryStore
from .consumer.stored import SegmentKey, StoredMembership
from .errors import StoreMissing

log = logging.getLogger(__name__)

__all__ = ["DryRunSource", "DryRunStore", "dry_run_config", "dry_run_source"]

#: Where a dry run prints the changes that would fire.
CHANGES_OUT = "jsonl:/dev/stdout"


def dry_run_config(config: RelayConfig) -> RelayConfig:
    """The config a dry run builds its relay from: the changes go to stdout, nowhere else."""
    if config.source.startswith("eventhubs:"):
        group = config.eventhubs.dry_run_consumer_group
        if group is None or group == config.eventhubs.consumer_group:
            raise ConfigError(
                "--dry-run on Event Hubs: config field 'eventhubs.dry_run_consumer_group' must name a consumer "
                f"group other than consumer_group ({config.eventhubs.consumer_group!r}): readers in the running "
                "replicas' group would take their partitions. Create one for dry runs (az eventhubs eventhub "
                "consumer-group create --name dry-run ...) and set SEGMENT_RELAY_EVENTHUBS__DRY_RUN_CONSUMER_GROUP")
    return config.model_copy(update={"handlers": [CHANGES_OUT]})


def dry_run_source(config: RelayConfig) -> Source[Any]:
    """The configured source, read as a real run would start, committing nothing."""
    from .app import build_source, kinesis_settings

    kind, _, arg = config.source.partition(":")
    if kind == "kinesis":
        from .consumer.sources.kinesis.read_only import KinesisReadOnlySource

        return KinesisReadOnlySource(kinesis_settings(config, arg))  # no leases: see there
    if kind == "eventhubs":
        from dataclasses import replace

        from .app import eventhubs_settings
        from .consumer.sources.eventhubs import EventHubsSource

        settings = replace(eventhubs_settings(config, arg), read_only_consumer_group=config.eventhubs.dry_run_consumer_group)
        return EventHubsSource(settings)  # no ownership, no checkpoints written: see connection.py
    return DryRunSource(build_source(config))


class DryRunStore(SingleProfileAccess):
    """The configured store, read and never written: saves, identity claims and merges stay in
    memory, on top of it.

    A store that does not exist yet (no sqlite file, no DynamoDB table) is read as empty, and
    not created."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._inner: MembershipStore | None = None
        self._saved: dict[str, ProfileState] = {}
        self._links = MemoryStore()  # the aliases and redirects this run would add

    def __repr__(self) -> str:
        return f"DryRunStore({self._inner!r})" if self._inner is not None else f"DryRunStore({self.spec!r})"

    async def open(self) -> None:
        if self.spec == "memory":
            return
        try:
            self._inner = await open_existing_store(self.spec)
        except StoreMissing as missing:
            log.warning("dry run: the state store does not exist; starting from empty state", extra={
                "reason": str(missing)})

    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]:
        states = await self._inner.load_many(profiles) if self._inner is not None else {}
        saved = self._saved
        for profile_key in profiles:
            mine = saved.get(profile_key)
            if mine:
                state = states[profile_key] = dict(states.get(profile_key, {}))
                for key, value in mine.items():
                    if supersedes(value, state.get(key)):
                        state[key] = value
        return states

    async def save_many(self, updates: Updates) -> None:
        for profile_key, changes in updates.items():
            state: dict[SegmentKey, StoredMembership] = self._saved.setdefault(profile_key, {})
            for key, value in changes.items():
                if supersedes(value, state.get(key)):
                    state[key] = value

    # --- the alias index: the inner store's, then this run's own ---------------------------------
    def _inner_index(self) -> AliasIndex | None:
        return self._inner if isinstance(self._inner, AliasIndex) else None

    async def find_profiles(self, aliases: Collection[str]) -> dict[str, str]:
        inner = self._inner_index()
        found = await inner.find_profiles(aliases) if inner is not None else {}
        mine = await self._links.find_profiles([alias for alias in aliases if alias not in found])
        return await self._redirected({**found, **mine})

    async def claim_aliases(self, claims: Mapping[str, str]) -> dict[str, str]:
        inner = self._inner_index()
        held = await inner.find_profiles(list(claims)) if inner is not None else {}
        mine = await self._links.claim_aliases({alias: key for alias, key in claims.items() if alias not in held})
        return await self._redirected({**held, **mine})

    async def survivors_of(self, keys: Collection[str]) -> dict[str, str]:
        inner = self._inner_index()
        moved = await inner.survivors_of(keys) if inner is not None else {}
        followed = await self._redirected({key: moved.get(key, key) for key in keys})
        return {key: survivor for key, survivor in followed.items() if survivor != key}

    async def _redirected(self, owners: dict[str, str]) -> dict[str, str]:
        return await self._links._follow(owners)  # this run's merges, on top of the inner store's

    async def redirect_profiles(self, redirects: Mapping[str, str]) -> None:
        await self._links.redirect_profiles(redirects)
        for absorbed in redirects:
            self._saved.pop(absorbed, None)

    async def aliases_of(self, profile_key: str) -> list[str]:
        inner = self._inner_index()
        stored = await inner.aliases_of(profile_key) if inner is not None else []
        return sorted({*stored, *await self._links.aliases_of(profile_key)})

    # --- profile claims: granted at once, written nowhere (a dry run changes nothing others see) --
    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]:
        return set(keys)

    async def release_profiles(self, keys: Collection[str], owner: str) -> None:
        pass

    async def flush(self) -> None:
        pass  # nothing is written

    async def close(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.close()


class DryRunSource:
    """A source read as usual and never committed to."""

    def __init__(self, source: Source[Any]) -> None:
        self._source = source
        self.name = source.name

    async def start(self, listener: PartitionListener) -> None:
        await self._source.start(listener)

    def batches(self) -> Any:
        return self._source.batches()

    async def commit(self, partition: str, position: Any) -> None:
        pass  # a dry run moves no checkpoint

    def stop(self) -> None:
        self._source.stop()

    async def close(self) -> None:
        await self._source.close()

    def snapshot(self) -> SourceSnapshot:
        return self._source.snapshot()
