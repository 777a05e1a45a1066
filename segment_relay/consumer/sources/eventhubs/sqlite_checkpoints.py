"""A CheckpointStore for the Event Hubs SDK in one sqlite file: checkpoints and partition
ownership for replicas on one host (the demo, tests, a single machine), where Blob storage is
not at hand. Same semantics as the Blob store the relay uses: an ownership claim succeeds only
with the etag the claimer last saw (or, for a new row, when nobody created it meanwhile), and a
checkpoint only moves forward.
KEDA cannot read it; use Blob storage with KEDA."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterable
from typing import Any

from azure.eventhub.aio import CheckpointStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ownership (
    namespace TEXT NOT NULL, hub TEXT NOT NULL, consumer_group TEXT NOT NULL, partition_id TEXT NOT NULL,
    owner_id TEXT NOT NULL, etag TEXT NOT NULL, modified REAL NOT NULL,
    PRIMARY KEY (namespace, hub, consumer_group, partition_id));
CREATE TABLE IF NOT EXISTS checkpoint (
    namespace TEXT NOT NULL, hub TEXT NOT NULL, consumer_group TEXT NOT NULL, partition_id TEXT NOT NULL,
    offset TEXT, sequence_number INTEGER NOT NULL,
    PRIMARY KEY (namespace, hub, consumer_group, partition_id));
"""


class SqliteCheckpointStore(CheckpointStore):  # type: ignore[misc]  # the SDK's base class is untyped
    def __init__(self, path: str) -> None:
        self.path = path
        # Each statement is its own short transaction; several processes share the file (WAL).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"SqliteCheckpointStore({self.path!r})"

    @staticmethod
    def _key(item: dict[str, Any]) -> tuple[str, str, str, str]:
        # Lower-cased like the Blob store's names, so the two stores see the same identities.
        return (str(item["fully_qualified_namespace"]).lower(), str(item["eventhub_name"]).lower(),
                str(item["consumer_group"]).lower(), str(item["partition_id"]))

    async def list_ownership(self, fully_qualified_namespace: str, eventhub_name: str, consumer_group: str,
                             **kwargs: Any) -> Iterable[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT partition_id, owner_id, etag, modified FROM ownership "
            "WHERE namespace = ? AND hub = ? AND consumer_group = ?",
            (fully_qualified_namespace.lower(), eventhub_name.lower(), consumer_group.lower()),
        ).fetchall()
        return [{"fully_qualified_namespace": fully_qualified_namespace, "eventhub_name": eventhub_name,
                 "consumer_group": consumer_group, "partition_id": pid, "owner_id": owner,
                 "etag": etag, "last_modified_time": modified} for pid, owner, etag, modified in rows]

    async def claim_ownership(self, ownership_list: Iterable[dict[str, Any]], **kwargs: Any) -> Iterable[dict[str, Any]]:
        claimed = []
        for ownership in ownership_list:
            etag, now = uuid.uuid4().hex, time.time()
            key = self._key(ownership)
            owner = ownership.get("owner_id") or ""
            if ownership.get("etag"):
                cursor = self._db.execute(
                    "UPDATE ownership SET owner_id = ?, etag = ?, modified = ? WHERE namespace = ? AND hub = ? "
                    "AND consumer_group = ? AND partition_id = ? AND etag = ?", (owner, etag, now, *key, ownership["etag"]),
                )
            else:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO ownership VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, owner, etag, now)
                )
            if cursor.rowcount == 1:  # otherwise another replica changed it since it was read: lost
                claimed.append({**ownership, "etag": etag, "last_modified_time": now})
        return claimed

    async def update_checkpoint(self, checkpoint: dict[str, Any], **kwargs: Any) -> None:
        offset = checkpoint.get("offset")
        self._db.execute(
            "INSERT INTO checkpoint VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "offset = excluded.offset, sequence_number = excluded.sequence_number "
            "WHERE excluded.sequence_number > checkpoint.sequence_number",  # never back: see blob_checkpoints.py
            (*self._key(checkpoint), None if offset is None else str(offset), int(checkpoint["sequence_number"])),
        )

    async def list_checkpoints(self, fully_qualified_namespace: str, eventhub_name: str, consumer_group: str,
                               **kwargs: Any) -> Iterable[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT partition_id, offset, sequence_number FROM checkpoint "
            "WHERE namespace = ? AND hub = ? AND consumer_group = ?",
            (fully_qualified_namespace.lower(), eventhub_name.lower(), consumer_group.lower()),
        ).fetchall()
        return [{"fully_qualified_namespace": fully_qualified_namespace, "eventhub_name": eventhub_name,
                 "consumer_group": consumer_group, "partition_id": pid, "offset": offset, "sequence_number": seq}
                for pid, offset, seq in rows]

    async def close(self) -> None:
        self._db.close()
