"""SQLite membership state: WAL, batched commits, conditional upserts.

Reads run on the event loop (a primary-key lookup in WAL mode is microseconds
and never waits on a writer). Saves collect in memory and are written in one
transaction by ``flush`` on a worker thread, so the loop never waits on a lock
held by another process. Reads see saved-but-unflushed values through that
in-memory overlay.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ...model import SegmentStatus
from ..membership import supersedes
from ..stored import SegmentKey, StoredMembership
from .base import ProfileState, ScanQueries, SingleProfileAccess, Updates, Wanted

_SCHEMA = """
CREATE TABLE IF NOT EXISTS membership (
    profile_key     TEXT NOT NULL,
    namespace       TEXT NOT NULL,
    segment_id      TEXT NOT NULL,
    status          TEXT NOT NULL,
    qualified_at_us INTEGER NOT NULL,
    PRIMARY KEY (profile_key, namespace, segment_id)
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

_SELECT = "SELECT profile_key, namespace, segment_id, status, qualified_at_us FROM membership WHERE profile_key IN "
_SELECT_CHUNK = 500  # profile keys per query (well under SQLite's limit on bound parameters)

_STATUS = {status.value: status for status in SegmentStatus}

Pending = dict[str, dict[SegmentKey, StoredMembership]]


async def _while_locked(connection: sqlite3.Connection, statement: str, timeout_s: float) -> None:
    """Execute ``statement``, again every 50 ms while another opener holds the database locked,
    up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


class SqliteStore(SingleProfileAccess, ScanQueries):
    scan_note = "reads the whole table (there is no index by segment)"

    def __init__(self, path: str | Path, *, max_pending: int = 20_000, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self.max_pending = max_pending
        self._busy_timeout_s = busy_timeout_s
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._pending: Pending = {}
        self._pending_rows = 0
        self._flushing: Pending = {}
        self._flush_lock = asyncio.Lock()

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
        for statement in ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", _SCHEMA):
            await _while_locked(self._writer, statement, self._busy_timeout_s)
        self._reader = sqlite3.connect(target, timeout=5.0, isolation_level=None, uri=uri)

    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]:
        reader = self._reader
        assert reader is not None, "store not opened"
        keys = list(profiles)
        states: dict[str, ProfileState] = {}
        status_of = _STATUS
        for start in range(0, len(keys), _SELECT_CHUNK):
            chunk = keys[start:start + _SELECT_CHUNK]
            query = _SELECT + "(" + ",".join("?" * len(chunk)) + ")"
            for profile_key, namespace, segment_id, status, qualified_at_us in reader.execute(query, chunk):
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
        if self._pending_rows >= self.max_pending and not self._flush_lock.locked():
            await self.flush()  # bound memory: a long stretch without checkpoints still commits

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._pending:
                return
            self._flushing, self._pending = self._pending, {}
            self._pending_rows = 0
            rows = [
                (profile_key, namespace, segment_id, value.status.value, value.qualified_at_us)
                for profile_key, updates in self._flushing.items()
                for (namespace, segment_id), value in updates.items()
            ]
            try:
                await asyncio.to_thread(self._write, rows)
            except BaseException:
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

    def _write(self, rows: list[tuple[str, str, str, str, int]]) -> None:
        assert self._writer is not None
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._writer.executemany(_UPSERT, rows)
            self._writer.execute("COMMIT")
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise

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
            for connection in (self._reader, self._writer):
                if connection is not None:
                    connection.close()
            self._reader = self._writer = None
