"""SQLite membership state: WAL, batched commits, conditional upserts.

Reads run on the event loop (a primary-key lookup in WAL mode is microseconds
and never waits on a writer). Saves collect in memory and are written in one
transaction by ``flush`` on a worker thread, so the loop never waits on a lock
held by another process. Reads see saved-but-unflushed values through that
in-memory overlay.

Claims (identity aliases, profile claims) that other processes must see before the pipeline
goes on are small: they are written on the event loop, through a connection of their own that
never blocks on the write lock (it polls while another process holds it), never
checkpoints the WAL and does not fsync each commit. Through the worker thread, as they once
went, they competed with the busy loop for the GIL and took several times their work.

With ``links_with_state`` (no profile claims: no other process works on this one's profiles at
the same time) new identity links are not committed one claim at a time: they are kept in
memory like saves, visible to this process's lookups, and written by the flush, in the
transaction that commits the state they belong to. A commit per claim cost more than the rest
of linking (each one rewrote a page of the alias table and of its index per new alias).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ...model import SegmentStatus
from ..membership import supersedes
from ..stored import SegmentKey, StoredMembership
from .base import ProfileState, RedirectFollowing, ScanQueries, SingleProfileAccess, Updates, Wanted

_SCHEMA = """
CREATE TABLE IF NOT EXISTS membership (
    profile_key     TEXT NOT NULL,
    namespace       TEXT NOT NULL,
    segment_id      TEXT NOT NULL,
    status          TEXT NOT NULL,
    qualified_at_us INTEGER NOT NULL,
    PRIMARY KEY (profile_key, namespace, segment_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alias (
    alias           TEXT PRIMARY KEY,
    profile_key     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alias_by_profile ON alias (profile_key);
CREATE TABLE IF NOT EXISTS redirect (
    profile_key     TEXT PRIMARY KEY,
    survivor        TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS claim (
    profile_key     TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    expires_at_ms   INTEGER NOT NULL
) WITHOUT ROWID
"""

# The WHERE clause is `supersedes` in SQL: the database itself refuses to go back in time,
# which is what makes two processes sharing one file safe.
_UPSERT = """
INSERT INTO membership (profile_key, namespace, segment_id, status, qualified_at_us)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (profile_key, namespace, segment_id) DO UPDATE
SET status = excluded.status, qualified_at_us = excluded.qualified_at_us
WHERE excluded.qualified_at_us > membership.qualified_at_us
   OR (excluded.qualified_at_us = membership.qualified_at_us AND excluded.status <> membership.status)
"""

# A merge, applied in the transaction that commits the survivor's merged state (flush).
_REDIRECT = (
    "INSERT OR REPLACE INTO redirect (profile_key, survivor) VALUES (?, ?)",
    "UPDATE alias SET profile_key = ? WHERE profile_key = ?",
    "DELETE FROM membership WHERE profile_key = ?",
)

# A profile claim (ProfileClaims): taken when free, expired or already the owner's.
_CLAIM = """
INSERT INTO claim (profile_key, owner, expires_at_ms) VALUES (?, ?, ?)
ON CONFLICT (profile_key) DO UPDATE SET owner = excluded.owner, expires_at_ms = excluded.expires_at_ms
WHERE claim.owner = excluded.owner OR claim.expires_at_ms < ?
"""
_UNCLAIM = "DELETE FROM claim WHERE profile_key = ? AND owner = ?"

# The alias index: a new link is a conditional create (an alias keeps its first owner).
_LINK = "INSERT OR IGNORE INTO alias (alias, profile_key) VALUES (?, ?)"
_OWNERS = "SELECT alias, profile_key FROM alias WHERE alias IN "

log = logging.getLogger(__name__)

_SELECT = "SELECT profile_key, namespace, segment_id, status, qualified_at_us FROM membership WHERE profile_key IN "
WRITER_CACHE_KIB = 32 * 1024  # the flush connection's page cache
_SELECT_CHUNK = 500  # profile keys per query (well under SQLite's limit on bound parameters)

_STATUS = {status.value: status for status in SegmentStatus}

Pending = dict[str, dict[SegmentKey, StoredMembership]]
_T = TypeVar("_T")


def _rows_in(connection: sqlite3.Connection, query: str, keys: list[str]) -> Iterator[Any]:
    """The rows of ``query`` (ending in ``... IN ``) for ``keys``, a chunk of keys per statement."""
    for start in range(0, len(keys), _SELECT_CHUNK):
        chunk = keys[start:start + _SELECT_CHUNK]
        yield from connection.execute(query + "(" + ",".join("?" * len(chunk)) + ")", chunk)


def _pairs_in(connection: sqlite3.Connection, query: str, keys: list[str]) -> dict[str, str]:
    return dict(_rows_in(connection, query, keys))


async def _while_locked(connection: sqlite3.Connection, statement: str, timeout_s: float) -> None:
    """Execute ``statement``, again while another connection holds the database locked (polling
    from 1 ms, doubling to 50 ms, never blocking the loop), up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            connection.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(0.05, delay * 2)


class SqliteStore(SingleProfileAccess, ScanQueries, RedirectFollowing):
    scan_note = "reads the whole table (there is no index by segment)"

    def __init__(self, path: str | Path, *, max_pending: int = 20_000, busy_timeout_s: float = 30.0,
                 links_with_state: bool = False) -> None:
        self.path = str(path)
        self.max_pending = max_pending
        self.links_with_state = links_with_state
        self._busy_timeout_s = busy_timeout_s
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._pending: Pending = {}
        self._pending_rows = 0
        self._flushing: Pending = {}
        self._redirects: dict[str, str] = {}  # merges saved, not yet committed (absorbed -> survivor)
        self._links: dict[str, str] = {}  # links_with_state: aliases claimed, not yet committed (alias -> key)
        self._linking: dict[str, str] = {}  # ...being committed by the flush under way
        self._absent: set[str] = set()  # links_with_state: the aliases the last lookup found nowhere
        self._releases: set[tuple[str, str]] = set()  # (profile key, owner): claims freed by the next flush
        self._releasing: set[tuple[str, str]] = set()  # ...by the flush under way
        self._flush_lock = asyncio.Lock()  # one flush at a time (the writer connection is its own)
        self._write_lock = asyncio.Lock()  # one write transaction of this process at a time: fair, FIFO
        self._claimer: sqlite3.Connection | None = None  # claims, on the loop: never blocks on the lock

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    async def open(self) -> None:
        if self.path == ":memory:":
            # Two connections to ":memory:" would be two databases: share one named in-memory db.
            target, uri = f"file:segment-relay-{id(self)}?mode=memory&cache=shared", True
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            target, uri = self.path, False
        self._writer = sqlite3.connect(
            target, timeout=self._busy_timeout_s, check_same_thread=False, isolation_level=None, uri=uri
        )
        # Replicas on one host open the file together: switching it to WAL takes an exclusive
        # lock for which SQLite does not always wait (it answers "database is locked" at once).
        for statement in ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", *_SCHEMA.split(";")):
            await _while_locked(self._writer, statement, self._busy_timeout_s)
        # A state file outgrows SQLite's default 2 MiB cache in the first hour; the flush's
        # upserts and new links land on random pages, and each miss is a read.
        self._writer.execute(f"PRAGMA cache_size={-WRITER_CACHE_KIB}")
        self._reader = sqlite3.connect(target, timeout=5.0, isolation_level=None, uri=uri)
        self._claimer = sqlite3.connect(target, timeout=0, isolation_level=None, uri=uri)
        # Its commits never checkpoint the WAL (copying pages into the file, with an fsync): on the
        # loop that took milliseconds per claim. The writer's commits, on the worker thread, do.
        self._claimer.execute("PRAGMA wal_autocheckpoint=0")
        self._claimer.execute("PRAGMA synchronous=NORMAL")  # per connection; FULL fsyncs every commit

    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]:
        reader = self._reader
        assert reader is not None, "store not opened"
        keys = list(profiles)
        states: dict[str, ProfileState] = {}
        status_of = _STATUS
        for profile_key, namespace, segment_id, status, qualified_at_us in _rows_in(reader, _SELECT, keys):
            state = states.get(profile_key)
            if state is None:
                state = states[profile_key] = {}
            state[(namespace, segment_id)] = StoredMembership(status_of[status], qualified_at_us)
        for overlay in (self._flushing, self._pending):  # saved, not yet committed
            if not overlay:
                continue
            for profile_key in keys:
                unflushed = overlay.get(profile_key)
                if unflushed:
                    state = states.setdefault(profile_key, {})
                    for key, value in unflushed.items():
                        if supersedes(value, state.get(key)):
                            state[key] = value
        return states

    async def save_many(self, updates: Updates) -> None:
        pending_of = self._pending
        for profile_key, changes in updates.items():
            pending = pending_of.get(profile_key)
            if pending is None:
                pending_of[profile_key] = dict(changes)
                self._pending_rows += len(changes)
                continue
            for key, value in changes.items():
                if supersedes(value, pending.get(key)):
                    if key not in pending:
                        self._pending_rows += 1
                    pending[key] = value
        if self._pending_rows + len(self._links) >= self.max_pending and not self._flush_lock.locked():
            await self.flush()  # bound memory: a long stretch without checkpoints still commits

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._pending and not self._redirects and not self._releases and not self._links:
                return
            redirects, self._redirects = self._redirects, {}
            links = self._linking = self._links
            self._links = {}
            releases, self._releases = self._releases, set()
            self._releasing = releases
            self._flushing, self._pending = self._pending, {}
            self._pending_rows = 0
            rows = [
                (profile_key, namespace, segment_id, value.status.value, value.qualified_at_us)
                for profile_key, updates in self._flushing.items()
                for (namespace, segment_id), value in updates.items()
            ]
            try:
                async with self._write_lock:
                    taken = await asyncio.to_thread(self._write, rows, redirects, releases, links)
            except BaseException:
                self._links = {**links, **self._links}
                self._redirects = {**redirects, **self._redirects}
                self._releases |= releases
                # Put the batch back in front of anything saved meanwhile so nothing is lost.
                for profile_key, updates in self._flushing.items():
                    pending = self._pending.setdefault(profile_key, {})
                    for key, value in updates.items():
                        later = pending.get(key)  # saved after this batch: it wins ties
                        if later is None or not supersedes(later, value):
                            pending[key] = value
                self._pending_rows = sum(len(updates) for updates in self._pending.values())
                raise
            finally:
                self._flushing = {}
                self._releasing = set()
                self._linking = {}
            if taken:
                self._links_taken(taken)

    def _links_taken(self, taken: dict[str, str]) -> None:
        """Aliases this process linked with the state that another process had linked first: the
        other's links stand, and are what lookups answer from now on (the next export carrying
        one merges the two profiles)."""
        self._remember(taken)
        log.warning("another process links identities in this sqlite file at the same time; "
                    "set claims.mode = \"on\" on every replica that shares it",
                    extra={"state": self.path, "aliases": len(taken)})

    def _write(self, rows: list[tuple[str, str, str, str, int]], redirects: Mapping[str, str],
               releases: Iterable[tuple[str, str]] = (), links: Mapping[str, str] | None = None) -> dict[str, str]:
        """One transaction: ``links`` (new aliases), the state, the merges, the releases. Answers
        the links that another process had made first (alias -> its owner)."""
        assert self._writer is not None
        taken: dict[str, str] = {}
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            if links:  # first: a merge below repoints them with the absorbed profile's others
                inserted = self._writer.executemany(_LINK, links.items()).rowcount
                if inserted != len(links):
                    stored = _pairs_in(self._writer, _OWNERS, list(links))
                    taken = {alias: key for alias, key in stored.items() if links[alias] != key}
            self._writer.executemany(_UPSERT, rows)
            for absorbed, survivor in redirects.items():  # after the upserts: the survivor's merged state
                insert, move, drop = _REDIRECT
                self._writer.execute(insert, (absorbed, survivor))
                self._writer.execute(move, (survivor, absorbed))
                self._writer.execute(drop, (absorbed,))
            self._writer.executemany(_UNCLAIM, releases)  # last: the state they guarded is in this commit
            self._writer.execute("COMMIT")
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        return taken

    # --- the alias index ---------------------------------------------------------------------
    async def _alias_owners(self, aliases: list[str]) -> dict[str, str]:
        assert self._reader is not None, "store not opened"
        owners = _pairs_in(self._reader, _OWNERS, aliases)
        if self._links or self._linking:
            for alias in aliases:
                if alias not in owners and (key := self._unflushed_owner(alias)) is not None:
                    owners[alias] = key
        if self.links_with_state:
            # The claims that follow a lookup are of what it did not find: they need not ask again.
            self._absent = {alias for alias in aliases if alias not in owners}
        return owners

    async def _claim_owners(self, claims: Mapping[str, str]) -> dict[str, str]:
        if not self.links_with_state:
            # Committed at once, in one transaction: another process claiming the same alias
            # waits for it and then finds it held.
            return await self._commit_now(self._claim, dict(claims))
        # Written by the next flush. An alias held already keeps its owner: one linked here and
        # not committed yet, or one in the file that the last lookup did not ask about.
        absent, self._absent = self._absent, set()  # good for the claims right after its lookup only
        unflushed = {alias: owner for alias in claims if (owner := self._unflushed_owner(alias)) is not None}
        unasked = [alias for alias in claims if alias not in absent and alias not in unflushed]
        assert self._reader is not None, "store not opened"
        stored = _pairs_in(self._reader, _OWNERS, unasked) if unasked else {}
        owners: dict[str, str] = {}
        for alias, key in claims.items():
            owner = stored.get(alias) or unflushed.get(alias)
            if owner is None:
                owner = self._links[alias] = key
            owners[alias] = owner
        return owners

    def _unflushed_owner(self, alias: str) -> str | None:
        """links_with_state: the owner of an alias linked here and not committed yet."""
        return self._links.get(alias) or self._linking.get(alias)

    async def _commit_now(self, write: Callable[..., _T], *args: Any) -> _T:
        """``write(connection, *args)`` in a transaction begun for it, which it commits before
        this returns: on the event loop, after this process's write under way (a flush) and,
        polling, after another process's."""
        claimer = self._claimer
        assert claimer is not None, "store not opened"
        async with self._write_lock:
            await _while_locked(claimer, "BEGIN IMMEDIATE", self._busy_timeout_s)
            return write(claimer, *args)

    @staticmethod
    def _claim(writer: sqlite3.Connection, claims: dict[str, str]) -> dict[str, str]:
        try:
            inserted = writer.executemany(_LINK, claims.items()).rowcount
            # Every one new (the usual case): they are the claimants'; else ask who holds them.
            owners = dict(claims) if inserted == len(claims) else _pairs_in(writer, _OWNERS, list(claims))
            writer.execute("COMMIT")
        except BaseException:
            writer.execute("ROLLBACK")
            raise
        return owners

    async def _redirect_targets(self, keys: list[str]) -> dict[str, str]:
        assert self._reader is not None, "store not opened"
        targets = _pairs_in(self._reader, "SELECT profile_key, survivor FROM redirect WHERE profile_key IN ",
                                     keys)
        pending = self._redirects
        if pending:
            targets.update((key, pending[key]) for key in keys if key in pending)
        return targets

    async def redirect_profiles(self, redirects: Mapping[str, str]) -> None:
        self._redirects.update(redirects)  # with the next flush, after the survivor's state

    async def aliases_of(self, profile_key: str) -> list[str]:
        assert self._reader is not None, "store not opened"
        aliases = {alias for (alias,) in self._reader.execute(
            "SELECT alias FROM alias WHERE profile_key = ?", (profile_key,))}
        for overlay in (self._linking, self._links):  # linked, not yet committed
            aliases.update(alias for alias, key in overlay.items() if key == profile_key)
        return sorted(aliases)

    # --- profile claims (replicas sharing the file) --------------------------------------------
    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]:
        if not keys:
            return set()
        if any((key, owner) in self._releasing for key in keys):
            async with self._flush_lock:  # a flush under way frees it: claim it again after that
                pass
        held = await self._commit_now(self._claim_profiles, list(keys), owner, ttl_s)
        self._releases.difference_update((key, owner) for key in held)  # held again: keep it
        return held

    @staticmethod
    def _claim_profiles(writer: sqlite3.Connection, keys: list[str], owner: str, ttl_s: float) -> set[str]:
        now_ms = int(time.time() * 1000)
        expires = now_ms + int(ttl_s * 1000)
        try:
            taken = writer.executemany(_CLAIM, ((key, owner, expires, now_ms) for key in keys)).rowcount
            # Every row written (the usual case): all are the owner's; else ask which are.
            held = set(keys) if taken == len(keys) else {
                key for key, holder in _rows_in(writer, "SELECT profile_key, owner FROM claim WHERE profile_key IN ",
                                                keys) if holder == owner}
            writer.execute("COMMIT")
        except BaseException:
            writer.execute("ROLLBACK")
            raise
        return held

    async def release_profiles(self, keys: Collection[str], owner: str) -> None:
        # Other processes read committed rows only: a claim is freed in the commit that makes the
        # state it guarded visible (the next flush), never before.
        self._releases.update((key, owner) for key in keys)

    # --- asking the state (operators' tool; committed rows only) ----------------------------
    async def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]:
        reader = self._reader
        assert reader is not None, "store not opened"
        current: str | None = None
        state: ProfileState = {}
        # The primary key's order: a profile's rows come together.
        for profile_key, namespace, segment_id, status, qualified_at_us in reader.execute(
                "SELECT profile_key, namespace, segment_id, status, qualified_at_us FROM membership "
                "ORDER BY profile_key, namespace, segment_id"):
            if profile_key != current:
                if current is not None:
                    yield current, state
                current, state = profile_key, {}
            state[(namespace, segment_id)] = StoredMembership(_STATUS[status], qualified_at_us)
        if current is not None:
            yield current, state

    async def members(self, segment: SegmentKey) -> AsyncIterator[str]:
        reader = self._reader
        assert reader is not None, "store not opened"
        for (profile_key,) in reader.execute(
                "SELECT profile_key FROM membership WHERE namespace = ? AND segment_id = ? AND status <> ? "
                "ORDER BY profile_key", (*segment, SegmentStatus.EXITED.value)):
            yield profile_key

    async def close(self) -> None:
        try:
            if self._writer is not None:
                await self.flush()
        finally:
            for connection in (self._reader, self._writer, self._claimer):
                if connection is not None:
                    connection.close()
            self._reader = self._writer = self._claimer = None
