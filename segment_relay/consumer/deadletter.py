"""Where records and changes that cannot be processed go, so nothing is silently lost.

One JSON object per line. Every entry has ``kind`` (``invalid_record`` or
``failed_change``), ``reason``, ``detail``, ``partition``, ``position`` and ``at``;
an invalid record carries the raw bytes (``raw`` as text, or ``raw_base64`` when
they are not UTF-8); a failed change carries the change, the ``handler`` and the
number of ``attempts``.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import orjson


class DeadLetter(Protocol):
    async def invalid_record(self, raw: bytes, *, reason: str, detail: str, partition: str, position: str) -> None: ...

    async def failed_change(
        self, change: dict[str, Any], *, handler: str, attempts: int, reason: str, detail: str,
        partition: str, position: str,
    ) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def raw_fields(raw: bytes) -> dict[str, str]:
    try:
        return {"raw": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(raw).decode("ascii")}


class JsonlDeadLetter:
    """Appends entries to a JSONL file; ``flush`` fsyncs before the pipeline checkpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self.count = 0

    def __repr__(self) -> str:
        return f"JsonlDeadLetter({str(self.path)!r})"

    def _write(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write(orjson.dumps(entry) + b"\n")
        self._file.flush()  # rare and precious: hand it to the OS at once
        self.count += 1

    async def invalid_record(self, raw: bytes, *, reason: str, detail: str, partition: str, position: str) -> None:
        self._write({
            "kind": "invalid_record", "reason": reason, "detail": detail,
            "partition": partition, "position": position, "at": _now(), **raw_fields(raw),
        })

    async def failed_change(
        self, change: dict[str, Any], *, handler: str, attempts: int, reason: str, detail: str,
        partition: str, position: str,
    ) -> None:
        self._write({
            "kind": "failed_change", "reason": reason, "detail": detail, "handler": handler,
            "attempts": attempts, "partition": partition, "position": position, "at": _now(),
            "change": change,
        })

    async def flush(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())

    async def close(self) -> None:
        if self._file is not None:
            await self.flush()
            self._file.close()
            self._file = None


class MemoryDeadLetter:
    """Keeps entries in a list: for tests and embedding."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def invalid_record(self, raw: bytes, *, reason: str, detail: str, partition: str, position: str) -> None:
        self.entries.append({
            "kind": "invalid_record", "reason": reason, "detail": detail,
            "partition": partition, "position": position, **raw_fields(raw),
        })

    async def failed_change(
        self, change: dict[str, Any], *, handler: str, attempts: int, reason: str, detail: str,
        partition: str, position: str,
    ) -> None:
        self.entries.append({
            "kind": "failed_change", "reason": reason, "detail": detail, "handler": handler,
            "attempts": attempts, "partition": partition, "position": position, "change": change,
        })

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass
