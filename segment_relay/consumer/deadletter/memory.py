"""A dead letter in memory: for tests and embedding."""

from __future__ import annotations

from typing import Any

import orjson

from .base import LineDeadLetter


class MemoryDeadLetter(LineDeadLetter):
    """Keeps entries in a list, as a file would hold them (without ``at``)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def _put(self, line: bytes, *, partition: str, position: str) -> None:
        kept = orjson.loads(line)
        kept.pop("at", None)
        self.entries.append(kept)
