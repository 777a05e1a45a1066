"""Dead letters on this host: a JSONL file rotated by size (``file:PATH``), and stdout for a log
pipeline (``stdout``). Neither survives the loss of its pod's disk: see objects.py for that."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from .base import LineDeadLetter

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


class JsonlDeadLetter(LineDeadLetter):
    """Appends entries to a JSONL file; ``flush`` fsyncs before the pipeline checkpoints.

    Past ``max_bytes`` the file is closed (fsynced) and renamed ``PATH.YYYYMMDDTHHMMSS.ffffffZ``,
    and a new one begins: rotated files are never deleted here (they are dead letters)."""

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        if max_bytes < 1024:
            raise ValueError(f"a dead-letter file needs max_bytes of at least 1024, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"JsonlDeadLetter({str(self.path)!r})"

    async def _put(self, line: bytes, *, partition: str, position: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open until close() or rotation
        elif self._file.tell() + len(line) > self.max_bytes and self._file.tell() > 0:
            self._rotate()
            await self._put(line, partition=partition, position=position)
            return
        self._file.write(line)
        self._file.flush()  # rare and precious: hand it to the OS at once

    def _rotate(self) -> None:
        assert self._file is not None
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self.path.rename(self.path.with_name(f"{self.path.name}.{stamp}"))

    def rotated(self) -> list[Path]:
        """The rotated files, oldest first."""
        return sorted(self.path.parent.glob(f"{self.path.name}.*"))

    async def flush(self) -> None:
        if self._file is not None:
            await asyncio.to_thread(os.fsync, self._file.fileno())

    async def close(self) -> None:
        if self._file is not None:
            await self.flush()
            self._file.close()
            self._file = None


class StdoutDeadLetter(LineDeadLetter):
    """Writes entries to stdout, one JSON line each, for a log pipeline that keeps them (the
    ``log`` handler cannot share stdout with it). Durable once the pipe has them."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream

    def __repr__(self) -> str:
        return "StdoutDeadLetter()"

    def _target(self) -> IO[bytes]:
        return self._stream if self._stream is not None else sys.stdout.buffer

    async def _put(self, line: bytes, *, partition: str, position: str) -> None:
        self._target().write(line)

    async def flush(self) -> None:
        self._target().flush()
