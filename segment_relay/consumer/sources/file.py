"""A JSONL file (or stdin) as a source: one record per line, position = line number.

With a checkpoint file, a rerun skips the lines already finished. The checkpoint
is written atomically (temp file + rename), so a crash leaves the old or the new
one, never half of one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from .base import SourceRecord

log = logging.getLogger(__name__)


class FileSource:
    def __init__(self, path: str, *, checkpoint_path: str | None = None, batch_size: int = 500) -> None:
        self.path = path
        self.name = "stdin" if path == "-" else f"file:{path}"
        self.partition = "stdin" if path == "-" else path
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.batch_size = batch_size
        self.resume_after = 0  # last finished line of an earlier run
        self._stopping = False
        self._stream: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"FileSource({self.path!r}, checkpoint={str(self.checkpoint_path) if self.checkpoint_path else None!r})"

    async def start(self) -> None:
        if self.path != "-" and not Path(self.path).is_file():
            raise FileNotFoundError(f"source file {self.path!r} does not exist")
        if self.checkpoint_path and self.checkpoint_path.exists():
            saved = orjson.loads(self.checkpoint_path.read_bytes())
            if saved.get("source") != self.partition:
                raise ValueError(
                    f"checkpoint {str(self.checkpoint_path)!r} belongs to {saved.get('source')!r}, "
                    f"not {self.partition!r}: delete it or pick another checkpoint file"
                )
            self.resume_after = int(saved["line"])
            log.info("resuming after checkpoint", extra={"source": self.partition, "line": self.resume_after})
        self._stream = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")

    def _read_batch(self, first_line: int) -> list[SourceRecord]:
        assert self._stream is not None
        batch: list[SourceRecord] = []
        line_number = first_line
        readline = self._stream.readline
        while len(batch) < self.batch_size:
            line = readline()
            if not line:
                break
            line_number += 1
            if line_number <= self.resume_after:
                continue
            data = line.rstrip(b"\r\n")
            if data.strip():  # blank lines are not records; the loop ends only when full or at EOF
                batch.append(SourceRecord(self.partition, line_number, data))
        self._lines_read = line_number
        return batch

    async def batches(self) -> AsyncIterator[Sequence[SourceRecord]]:
        self._lines_read = 0
        while not self._stopping:
            batch = await asyncio.to_thread(self._read_batch, self._lines_read)
            if not batch:
                return
            yield batch

    async def commit(self, partition: str, position: Any) -> None:
        if self.checkpoint_path is None:
            return
        payload = orjson.dumps({"source": self.partition, "line": int(position)})
        await asyncio.to_thread(self._write_checkpoint, payload)

    def _write_checkpoint(self, payload: bytes) -> None:
        assert self.checkpoint_path is not None
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.checkpoint_path)

    def stop(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdin.buffer:
            self._stream.close()
        self._stream = None
