"""Helpers several test files share: waiting with a deadline, collecting handled changes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from segment_relay import SegmentChange
from segment_relay.handlers.api import FunctionHandler
from segment_relay.testing.exports import iso_utc

Change = tuple[str, str, str, str]  # profile key, segment id, enter|exit, qualified at (the reference model's shape)


async def poll(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Await until ``condition()`` holds; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> float:
    """Block until ``condition()`` holds; returns how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def changes_in(paths: list[Path]) -> Counter[Change]:
    """The changes jsonl handlers wrote to these files (missing files count as empty)."""
    found: Counter[Change] = Counter()
    for path in paths:
        if path.exists():
            for line in path.read_bytes().splitlines():
                if line.strip():
                    c = json.loads(line)
                    found[(c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])] += 1
    return found


class Collector:
    """A handler that keeps every change it is given, in the reference model's shape."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def handler(self) -> FunctionHandler:
        async def collect(change: SegmentChange) -> None:
            self.changes.append((change.profile_key, change.segment_id, change.change.value,
                                 iso_utc(change.qualified_at)))

        return FunctionHandler(collect, name="collector")


class ReplicaProcesses:
    """`segment-relay run` processes of one test, by name: each writes its changes to
    ``changes-NAME.jsonl`` and its log to ``NAME.log`` in ``tmp_path``. ``stop_all()`` kills
    whatever is still running (the fixtures call it however the test ends)."""

    CLI = [sys.executable, "-m", "segment_relay.cli"]

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def output(self, name: str) -> Path:
        return self.tmp_path / f"changes-{name}.jsonl"

    @property
    def outputs(self) -> list[Path]:
        return [self.output(name) for name in self.processes]

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.tmp_path / f"{name}.log", "wb") as log:  # the child keeps its own copy of the handle
            self.processes[name] = subprocess.Popen(
                [*self.CLI, "run", *args], cwd=self.tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )

    def signal(self, name: str, signum: int) -> None:
        self.processes[name].send_signal(signum)

    def wait(self, name: str, timeout_s: float = 60.0) -> int:
        return self.processes[name].wait(timeout=timeout_s)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
