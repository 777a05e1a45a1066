"""Helpers several test files share: waiting with a deadline, collecting handled changes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


async def run_until_finished(relay: Any, records: int, stop_timeout_s: float = 60.0) -> None:
    """Run ``relay`` (an ``app.Relay``) until it has finished ``records`` records, then stop it
    gracefully (its state saved, its position checkpointed); fails if the run ended before."""
    run = asyncio.create_task(relay.run())
    try:
        await poll(lambda: relay.pipeline.records_finished == records or run.done(), f"{records} records finished")
        assert not run.done(), run
    finally:
        relay.stop()
        await asyncio.wait_for(run, stop_timeout_s)


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = 60.0, seen: Callable[[], object] | None = None
) -> float:
    """Block until ``condition()`` holds; returns how long it took. On a timeout the error shows
    ``seen()``, what was there instead, so that an intermittent failure can be diagnosed."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out waiting for {what}" + ("" if seen is None else f"; saw {seen()!r}"))
        time.sleep(0.05)
    return time.monotonic() - started


def changes_in(paths: list[Path]) -> Counter[Change]:
    """The changes jsonl handlers wrote to these files (missing files count as empty). A last
    line without its newline is being written now, and a torn line (a replica SIGKILLed in the
    middle of a write; its restart begins a fresh line) was never reported as handled: neither
    is a delivered change."""
    found: Counter[Change] = Counter()
    for path in paths:
        if path.exists():
            data = path.read_bytes()
            for line in data[: data.rfind(b"\n") + 1].splitlines():
                if line.strip():
                    try:
                        c = json.loads(line)
                    except ValueError:
                        continue
                    if c["change"] != "merge":  # identity linking: a merge names no segment
                        found[(c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])] += 1
    return found


def shape(change: SegmentChange) -> Change:
    """A change in the reference model's shape."""
    return change.profile_key, change.segment_id, change.change.value, iso_utc(change.qualified_at)


class Collector:
    """A handler that keeps every change it is given, in the reference model's shape."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def handler(self) -> FunctionHandler:
        async def collect(change: SegmentChange) -> None:
            self.changes.append(shape(change))

        return FunctionHandler(collect, name="collector")


def every_change_after_kills(outputs: list[Path], truth: Counter[Change], kills: int, chunks: int,
                             timeout_s: float) -> None:
    """The end of a kill run: wait until ``outputs`` hold every true change; nothing may be lost or
    invented, and what the kills repeated is printed and bounded. A kill repeats what its victim
    handled after its last checkpoint (the sqlite store commits with the checkpoint, so those
    changes come again): at most about the chunk loaded since the previous kill. Bounded, never a
    loop that re-dispatches."""
    caught_up = wait_for(lambda: not truth - changes_in(outputs), f"every change after {kills} kills", timeout_s)
    emitted = changes_in(outputs)
    assert set(emitted) == set(truth), "a change was lost or invented"
    repeats = sum(emitted.values()) - sum(truth.values())
    print(f"{kills} kills: {sum(truth.values())} changes, {repeats} repeated; every change {caught_up:.1f} s "
          "after the last records were written")
    assert repeats <= kills * sum(truth.values()) / chunks


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


class PartitionSpy:
    """Records, with monotonic times, what a pipeline is told about its partitions
    (assigned, revoked), what it commits, and each checkpoint round, to check that nothing of a
    lost partition is handled or committed after the loss."""

    def __init__(self, pipeline: Any, source: Any) -> None:
        self.assigned: list[tuple[float, str]] = []
        self.revoked: list[tuple[float, str]] = []
        self.commits: list[tuple[float, str]] = []
        self.checkpoint_rounds = 0
        assigned, revoked, commit, checkpoint = pipeline.assigned, pipeline.revoked, source.commit, pipeline.checkpoint

        def assigned_spy(partition: str, epoch: int) -> None:
            self.assigned.append((time.monotonic(), partition))
            assigned(partition, epoch)

        def revoked_spy(partition: str) -> None:
            self.revoked.append((time.monotonic(), partition))
            revoked(partition)

        async def commit_spy(partition: str, position: Any) -> None:
            self.commits.append((time.monotonic(), partition))
            await commit(partition, position)

        async def checkpoint_spy() -> None:
            await checkpoint()
            self.checkpoint_rounds += 1

        pipeline.assigned, pipeline.revoked, pipeline.checkpoint = assigned_spy, revoked_spy, checkpoint_spy
        source.commit = commit_spy

    async def checkpoint_rounds_pass(self, rounds: int = 2) -> None:
        """Until ``rounds`` more checkpoint rounds ran: each one had its chance to commit wrongly."""
        target = self.checkpoint_rounds + rounds
        await poll(lambda: self.checkpoint_rounds >= target, f"{rounds} more checkpoint rounds")

    def after_loss(self, handled: list[tuple[float, SegmentChange]]) -> tuple[list[SegmentChange], list[float]]:
        """The changes in ``handled`` (start time, change) and the commits of a partition that
        came after it was lost and before it was assigned here again (if the balancer gave it back,
        it is read from its checkpoint anew)."""
        late: list[SegmentChange] = []
        commits: list[float] = []
        for lost_at, lost in self.revoked:
            back_at = min((at for at, partition in self.assigned if partition == lost and at > lost_at),
                          default=float("inf"))
            late += [c for started, c in handled if c.partition == lost and lost_at < started < back_at]
            commits += [at for at, partition in self.commits if partition == lost and lost_at < at < back_at]
        return late, commits


async def stopped_within(runs: dict[str, asyncio.Task[Any]], timeout_s: float) -> None:
    """Await relays' ``run()`` tasks; past ``timeout_s``, fail with where every task of the loop
    is stuck (a relay that does not stop is a bug to find, and the stacks say where)."""
    done, pending = await asyncio.wait(runs.values(), timeout=timeout_s)
    if pending:
        stuck = [name for name, task in runs.items() if task in pending]
        stacks = "\n".join(f"{task.get_name()}: {' <- '.join(f'{frame.f_code.co_name}:{frame.f_lineno}' for frame in task.get_stack(limit=6))}"
                           for task in asyncio.all_tasks() if not task.done())
        for task in pending:
            task.cancel()
        raise AssertionError(f"relays {stuck} did not stop within {timeout_s} s; tasks:\n{stacks}")
    for task in done:
        task.result()


class Takeover:
    """Replica A takes every partition and its handler holds ``stuck`` profiles of each until B
    has taken some from it, so that A's pipeline still holds their later records at the loss.
    Every handler call is recorded per replica with its start time."""

    def __init__(self, stuck: int = 2) -> None:
        self.stuck = stuck
        self.gate = asyncio.Event()
        self.blocked: dict[str, set[str]] = defaultdict(set)  # partition -> its held profiles
        self.calls: dict[str, list[tuple[float, SegmentChange]]] = {"a": [], "b": []}

    def handler(self, worker: str) -> FunctionHandler:
        async def handle(change: SegmentChange) -> None:
            self.calls[worker].append((time.monotonic(), change))
            held = self.blocked[change.partition]
            if worker == "a" and not self.gate.is_set() and (len(held) < self.stuck or change.profile_key in held):
                held.add(change.profile_key)  # its later records wait behind it in A's pipeline
                await self.gate.wait()

        return FunctionHandler(handle, name="recorder")

    def handled(self) -> set[Change]:
        return {shape(c) for worker in self.calls for _, c in self.calls[worker]}

    async def run(self, relays: dict[str, Any], partitions: int, truth: set[Change]) -> PartitionSpy:
        """A alone until it holds records of every partition, then B too until every true change
        was handled by one or the other and two more checkpoint rounds passed; both stopped."""
        a = relays["a"]
        spy = PartitionSpy(a.pipeline, a.source)
        runs = {"a": asyncio.create_task(a.run())}
        try:
            await poll(lambda: len(a.snapshot().source.owned or ()) == partitions, "A to take every partition")
            await poll(lambda: sum(map(len, self.blocked.values())) == self.stuck * partitions
                       and a.pipeline.snapshot().profiles_waiting > 0, "records of the held profiles to queue up in A")
            runs["b"] = asyncio.create_task(relays["b"].run())
            await poll(lambda: bool(spy.revoked), "A to lose a partition to B", timeout_s=30)
            self.gate.set()
            await poll(lambda: self.handled() >= truth, "every change, from one replica or the other", timeout_s=60)
            await spy.checkpoint_rounds_pass()  # A must not commit what it lost in any of them
        finally:
            self.gate.set()
            for relay in relays.values():
                relay.stop()
            await stopped_within(runs, 60)
        return spy
