"""An email suppression list kept from audience membership.

A profile that *enters* a segment (say "Unsubscribed" or "Do not contact") is suppressed for
it; one that *exits* is released. The list lives in a SQLite file that a mailing job (or an
export to your email service provider) reads, and every applied change is also kept in an
audit table, so "why was this address suppressed, and since when" has an answer.

What it shows about writing a handler:

* ``on_enter`` / ``on_exit`` methods on a ``Handler`` subclass;
* an argument from the handler spec (``suppression-list:PATH``) reaching the constructor;
* ``start`` / ``flush`` / ``close`` for a resource held across changes;
* idempotency: at-least-once delivery may repeat a change, so the audit is keyed by
  ``change_id`` and the list only ever moves forward in qualification time;
* effects leave the process before ``handle`` returns (each change is committed), and the
  blocking SQLite calls run in a thread, never on the relay's event loop;
* ``HandlerRetry`` for a transient failure (a locked database).
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

from segment_relay import Handler, HandlerRetry, SegmentChange, on_enter, on_exit

__all__ = ["SuppressionList", "read_audit", "read_suppressed"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EMAIL_NAMESPACE = "email_lc_sha256"  # Adobe's hashed e-mail namespace: what ESP suppression lists accept

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    profile_key     TEXT    NOT NULL,
    segment_id      TEXT    NOT NULL,
    suppressed      INTEGER NOT NULL,   -- 1 after an enter, 0 after an exit
    qualified_at_us INTEGER NOT NULL,   -- the change's lastQualificationTime, microseconds since the epoch
    email_sha256    TEXT,
    change_id       TEXT    NOT NULL,
    PRIMARY KEY (profile_key, segment_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    change_id    TEXT PRIMARY KEY,
    profile_key  TEXT NOT NULL,
    segment_id   TEXT NOT NULL,
    change       TEXT NOT NULL,         -- enter | exit
    qualified_at TEXT NOT NULL,         -- ISO 8601, UTC, "Z"
    recorded_at  TEXT NOT NULL
) WITHOUT ROWID;
"""

# A repeated or late change never moves the list back in time; an equal time with another
# status wins, as in the relay's own membership store.
_UPSERT = """
INSERT INTO suppression (profile_key, segment_id, suppressed, qualified_at_us, email_sha256, change_id)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (profile_key, segment_id) DO UPDATE SET
    suppressed = excluded.suppressed,
    qualified_at_us = excluded.qualified_at_us,
    email_sha256 = coalesce(excluded.email_sha256, suppression.email_sha256),
    change_id = excluded.change_id
WHERE excluded.qualified_at_us >= suppression.qualified_at_us
"""
_AUDIT = "INSERT OR IGNORE INTO audit VALUES (?, ?, ?, ?, ?, ?)"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _email_sha256(change: SegmentChange) -> str | None:
    """The first hashed e-mail of the profile; Adobe writes the namespace in varying case."""
    for namespace, items in change.identities.items():
        if namespace.lower() == _EMAIL_NAMESPACE and items:
            return items[0].id
    return None


class SuppressionList(Handler):
    """``--handler suppression-list:/path/to/suppression.sqlite``: suppress on enter, release on exit."""

    name = "suppression-list"

    def __init__(self, path: str | None = None) -> None:
        if not path:
            raise ValueError("suppression-list needs a database file, e.g. suppression-list:/data/suppression.sqlite")
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        # One connection, used from worker threads one call at a time: handler calls for
        # different profiles overlap, a sqlite3 connection must not.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SuppressionList({str(self.path)!r})"

    async def start(self) -> None:
        self._db = await asyncio.to_thread(self._open)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")  # readers (the mailing job) never block the relay
        db.execute("PRAGMA synchronous=NORMAL")  # a commit reaches the OS; flush() makes it durable
        db.executescript(_SCHEMA)
        return db

    @on_enter()
    async def suppress(self, change: SegmentChange) -> None:
        await self._apply(change, suppressed=True)

    @on_exit()
    async def release(self, change: SegmentChange) -> None:
        await self._apply(change, suppressed=False)

    async def _apply(self, change: SegmentChange, *, suppressed: bool) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, change, suppressed)
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):  # another writer holds it: try again shortly
                    raise HandlerRetry(f"suppression list is busy: {exc}", after=1.0) from exc
                raise

    def _write(self, change: SegmentChange, suppressed: bool) -> None:
        db = self._db
        if db is None:
            raise RuntimeError(f"{self!r} is not started")
        qualified_at_us = (change.qualified_at - _EPOCH) // timedelta(microseconds=1)
        with db:  # one transaction, committed before handle() returns
            db.execute("BEGIN IMMEDIATE")
            db.execute(_UPSERT, (change.profile_key, change.segment_id, int(suppressed), qualified_at_us,
                                 _email_sha256(change), change.change_id))
            db.execute(_AUDIT, (change.change_id, change.profile_key, change.segment_id, change.change.value,
                                _iso(change.qualified_at), _iso(datetime.now(UTC))))

    async def flush(self) -> None:
        """The relay checkpoints right after this: move the WAL into the database and fsync it."""
        if self._db is not None:
            async with self._lock:
                await asyncio.to_thread(self._db.execute, "PRAGMA wal_checkpoint(FULL)")

    async def close(self) -> None:
        if self._db is None:
            return
        await self.flush()
        db, self._db = self._db, None
        await asyncio.to_thread(db.close)


def read_suppressed(path: str | Path) -> dict[str, set[str]]:
    """Segment id -> the profile keys suppressed for it now (what a mailing job would read)."""
    found: dict[str, set[str]] = {}
    with closing(sqlite3.connect(path)) as db:
        for segment_id, profile_key in db.execute(
            "SELECT segment_id, profile_key FROM suppression WHERE suppressed = 1"
        ):
            found.setdefault(segment_id, set()).add(profile_key)
    return found


def read_audit(path: str | Path) -> list[tuple[str, str, str, str]]:
    """Every change applied, once each, as (profile_key, segment_id, change, qualified_at), oldest first."""
    with closing(sqlite3.connect(path)) as db:
        return list(db.execute(
            "SELECT profile_key, segment_id, change, qualified_at FROM audit ORDER BY recorded_at, change_id"
        ))
