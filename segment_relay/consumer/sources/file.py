"""A JSONL file (or stdin) as a source: one record per line, position = line number.

The file is one partition, assigned once at start and never revoked. With a checkpoint
file, a rerun skips the lines already finished. The checkpoint is written atomically
(temp file + rename), so a crash leaves the old or the new one, never half of one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, NewType

import orjson

from .base import Batch, PartitionListener, SourceRecord, SourceSnapshot, get_unless_stopped

log = logging.getLogger(__name__)

_WHITESPACE = frozenset(b" \t\r\n\f\v")
_STDIN_CHUNK = 1 << 16
_STDIN_QUEUED_CHUNKS = 8  # bounds what the reader thread holds ahead of the pipeline

#: A position in a file: its 1-based line number (blank lines count).
LineNumber = NewType("LineNumber", int)


class FileSource:
    def __init__(self, path: str, *, checkpoint_path: str | None = None, batch_size: int = 500) -> None:
        self.path = path
        self.name = "stdin" if path == "-" else f"file:{path}"
        self.partition = "stdin" if path == "-" else path
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.batch_size = batch_size
        self.resume_after = 0  # last finished line of an earlier run
        self._line = 0  # last line number read
        self._stream: IO[bytes] | None = None
        self._stopping: asyncio.Event | None = None
        # A cancelled commit leaves its thread running: writes are serialised and never go back.
        self._checkpoint_lock = threading.Lock()
        self._checkpointed = -1

    def __repr__(self) -> str:
        checkpoint = str(self.checkpoint_path) if self.checkpoint_path else None
        return f"FileSource({self.path!r}, checkpoint={checkpoint!r})"

    async def start(self, listener: PartitionListener) -> None:
        self._stopping = asyncio.Event()
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
        if self.path != "-":
            self._stream = open(self.path, "rb", buffering=0)  # read in big blocks: no buffer to copy through
        listener.assigned(self.partition, 0)

    def _records(self, lines: list[bytes]) -> list[SourceRecord[LineNumber]]:
        """Number the lines; drop blank ones and those an earlier run finished."""
        batch: list[SourceRecord[LineNumber]] = []
        append = batch.append
        first = self._line + 1
        self._line += len(lines)
        skip = self.resume_after
        for number, line in enumerate(lines, first):
            if number <= skip:
                continue
            data = line.rstrip(b"\r\n")
            # JSON lines start with "{"; only a line starting with white space needs the copy strip() makes.
            if data and (data[0] not in _WHITESPACE or data.strip()):
                append(SourceRecord(number, data))  # type: ignore[arg-type] # a LineNumber: NewType costs a call
        return batch

    async def batches(self) -> AsyncIterator[Batch[LineNumber]]:
        chunks = self._stdin_chunks() if self.path == "-" else self._file_chunks()
        async for lines in chunks:
            records = self._records(lines)
            if records:
                yield Batch(self.partition, 0, records)

    async def _file_chunks(self) -> AsyncIterator[list[bytes]]:
        # Blocks of bytes split on newlines, not readlines(): split() makes each line once,
        # without its newline, where readlines() keeps it and stripping it copies the line again.
        assert self._stream is not None and self._stopping is not None
        stream = self._stream
        pending = b""
        while not self._stopping.is_set():
            block = await asyncio.to_thread(stream.read, self.batch_size * 2048)
            if not block:
                break
            lines = block.split(b"\n")
            if pending:
                lines[0] = pending + lines[0]  # the line the last block ended in the middle of
            pending = lines.pop()
            if lines:
                yield lines
        if pending and not self._stopping.is_set():
            yield [pending]  # the last line, without a newline at its end

    async def _stdin_chunks(self) -> AsyncIterator[list[bytes]]:
        """stdin may be a pipe that stays open: hand over whatever lines have arrived, at once,
        and let a stop request end the wait (the reader thread is a daemon, it never blocks exit)."""
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue(_STDIN_QUEUED_CHUNKS)
        threading.Thread(target=self._read_stdin, args=(loop, queue), name="stdin-reader", daemon=True).start()
        # None from the queue is the reader's end of input; None from the helper is a stop.
        while (lines := await get_unless_stopped(queue, self._stopping)) is not None:
            yield lines

    @staticmethod
    def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[bytes] | None]) -> None:
        fd = sys.stdin.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, _STDIN_CHUNK)  # returns what is there, blocks only when nothing is
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines and not _hand_over(loop, queue, lines):
                return
        if pending and not _hand_over(loop, queue, [pending]):
            return
        _hand_over(loop, queue, None)

    async def commit(self, partition: str, position: LineNumber) -> None:
        if self.checkpoint_path is None:
            return
        await asyncio.to_thread(self._write_checkpoint, int(position))

    def _write_checkpoint(self, line: int) -> None:
        assert self.checkpoint_path is not None
        with self._checkpoint_lock:
            if line <= self._checkpointed:
                return
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
            with open(temporary, "wb") as handle:
                handle.write(orjson.dumps({"source": self.partition, "line": line}))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.checkpoint_path)
            self._checkpointed = line

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None

    def snapshot(self) -> SourceSnapshot:
        return SourceSnapshot()


def _hand_over(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[bytes] | None],
               item: list[bytes] | None) -> bool:
    """Put ``item`` on the loop's queue from the reader thread; False once the loop has closed
    (the relay is exiting), without leaving a never-awaited coroutine behind."""
    putting = queue.put(item)
    try:
        asyncio.run_coroutine_threadsafe(putting, loop).result()
    except RuntimeError:
        putting.close()
        return False
    return True
