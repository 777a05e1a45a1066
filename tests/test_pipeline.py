"""The in-process pipeline over a JSONL file: order, dead letters, checkpoints, restart, bounds."""

from __future__ import annotations

import asyncio
import io
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from segment_relay import SegmentChange
from segment_relay.consumer.deadletter import JsonlDeadLetter, MemoryDeadLetter
from segment_relay.consumer.export import parse_export
from segment_relay.consumer.membership import StoredMembership, supersedes
from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
from segment_relay.consumer.sources.file import FileSource
from segment_relay.consumer.state import MembershipStore, MemoryStore, SqliteStore
from segment_relay.handlers.api import FunctionHandler, change_id_for
from segment_relay.handlers.builtin import JsonlHandler
from segment_relay.handlers.router import RetryPolicy, Router

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.0001, max_backoff_s=0.0002, handler_timeout_s=5.0)
BASE = datetime(2024, 3, 1, tzinfo=UTC)
RUN_TIMEOUT_S = 20


def record(profile: str, *segments: tuple[str, str, int], z_form: bool = True) -> bytes:
    """One export line: segments are (segment_id, status, minutes after BASE)."""
    audiences = {}
    for segment_id, status, minutes in segments:
        moment = BASE + timedelta(minutes=minutes)
        text = moment.strftime("%Y-%m-%dT%H:%M:%SZ" if z_form else "%Y-%m-%dT%H:%M:%S+0000")
        audiences[segment_id] = {"status": status, "lastQualificationTime": text}
    return orjson.dumps({
        "identityMap": {"ecid": [{"id": profile}]},
        "segmentMembership": {"ups": audiences},
        "person": {"name": profile},
    })


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def expected_changes(lines: list[bytes]) -> list[tuple[str, int, str, str, str]]:
    """A reference model of DESIGN.md's rules: (change_id, line, profile_key, segment, change) in file order."""
    state: dict[tuple[str, str, str], StoredMembership] = {}
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            export = parse_export(line)
        except ValueError:
            continue
        key = f"ecid:{export.identity_map['ecid'][0].id}"
        for entry in export.segments:
            new = StoredMembership(entry.status, entry.qualified_at_us)
            old = state.get((key, entry.namespace, entry.segment_id))
            if not supersedes(new, old):
                continue
            state[(key, entry.namespace, entry.segment_id)] = new
            if new.is_member and (old is None or not old.is_member):
                kind = "enter"
            elif not new.is_member and (old is None or old.is_member):
                kind = "exit"
            else:
                continue
            cid = change_id_for(key, entry.namespace, entry.segment_id, entry.status.value, entry.qualified_at_us)
            out.append((cid, number, key, entry.segment_id, kind))
    return out


def make_pipeline(
    path: Path,
    handler: Callable[[SegmentChange], Awaitable[None]],
    *,
    store: MembershipStore | None = None,
    checkpoint: Path | None = None,
    batch_size: int = 500,
    concurrency: int = 64,
    retry: RetryPolicy = FAST,
    **settings: Any,
) -> tuple[Pipeline, MemoryDeadLetter]:
    dead = MemoryDeadLetter()
    source = FileSource(str(path), checkpoint_path=str(checkpoint) if checkpoint else None, batch_size=batch_size)
    settings.setdefault("checkpoint_interval_s", 3600.0)
    router = Router([FunctionHandler(handler, name="recorder")], dead, retry=retry, concurrency=concurrency)
    pipeline = Pipeline(source, store if store is not None else MemoryStore(), router, dead, settings=PipelineSettings(**settings))
    return pipeline, dead


def checkpoint_line(path: Path) -> int | None:
    if not path.exists():
        return None
    return int(orjson.loads(path.read_bytes())["line"])


async def poll(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def finished(run: asyncio.Task[Any], pipeline: Pipeline) -> None:
    """Wait for ``run`` to end; if it does not in time, say where it is and what the pipeline and
    its handlers hold (this test once timed out in a full suite, and never alone)."""
    try:
        await asyncio.wait_for(asyncio.shield(run), RUN_TIMEOUT_S)
    except TimeoutError:
        stack = io.StringIO()
        run.print_stack(file=stack)
        raise AssertionError(f"the run did not end in {RUN_TIMEOUT_S} s\n{stack.getvalue()}\n"
                             f"pipeline: {pipeline.snapshot()}\nhandlers: {pipeline.sink.snapshot()}") from None


async def random_yields(rng: random.Random, most: int = 10) -> None:
    for _ in range(rng.randrange(most)):
        await asyncio.sleep(0)


def interleaved_history(rng: random.Random, profiles: int, per_profile: int) -> list[bytes]:
    """Each profile flips two segments at every record; records of all profiles are interleaved."""
    queues = {
        f"p{n}": [
            record(f"p{n}", ("a", "realized" if i % 2 == 0 else "exited", i * 10),
                   ("b", "exited" if i % 2 == 0 else "existing", i * 10), z_form=i % 3 != 0)
            for i in range(per_profile)
        ]
        for n in range(profiles)
    }
    lines = []
    while queues:
        name = rng.choice(sorted(queues))
        lines.append(queues[name].pop(0))
        if not queues[name]:
            del queues[name]
    return lines


# --- tests ------------------------------------------------------------------------------------


async def test_order_within_a_profile_under_concurrency(tmp_path: Path) -> None:
    rng = random.Random(5)
    lines = interleaved_history(rng, profiles=30, per_profile=8)
    path = write_lines(tmp_path / "in.jsonl", lines)
    got: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    running: set[str] = set()
    peak = 0

    async def handler(change: SegmentChange) -> None:
        nonlocal peak
        assert change.profile_key not in running, "two changes of one profile at once"
        running.add(change.profile_key)
        peak = max(peak, len(running))
        await random_yields(rng)
        got[change.profile_key].append((int(change.position), change.segment_id, change.change.value))
        running.discard(change.profile_key)

    pipeline, dead = make_pipeline(path, handler, concurrency=16)
    stats = await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)  # a PipelineSnapshot
    expected: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for _, line, key, segment, kind in expected_changes(lines):
        expected[key].append((line, segment, kind))
    assert len(expected) == 30 and sum(map(len, expected.values())) == 30 * 8 * 2
    assert dict(got) == dict(expected)
    assert peak > 1, "different profiles should run concurrently"
    assert dead.entries == []
    assert stats.records_finished == len(lines)


async def test_a_handler_down_for_longer_than_max_age_dead_letters_and_the_checkpoint_reaches_the_end(
        tmp_path: Path) -> None:
    # A downstream that never comes back: every change is held (its circuit opens) until it is
    # older than retry.max_age_s, then dead-lettered, so the partition moves on.
    lines = interleaved_history(random.Random(2), profiles=5, per_profile=4)
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"

    async def broken(change: SegmentChange) -> None:
        raise RuntimeError("downstream is down")

    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.0001, max_backoff_s=0.0002, handler_timeout_s=5.0,
                        max_age_s=0.3)
    pipeline, dead = make_pipeline(path, broken, checkpoint=checkpoint, concurrency=4, retry=retry)
    await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    expected = expected_changes(lines)
    assert sorted(e["change"]["change_id"] for e in dead.entries) == sorted(cid for cid, *_ in expected)
    assert {(e["kind"], e["handler"], e["reason"]) for e in dead.entries} == {("failed_change", "recorder", "max_age")}
    assert all(e["partition"] == str(path) for e in dead.entries)
    assert checkpoint_line(checkpoint) == len(lines)


async def test_invalid_lines_are_dead_lettered_and_the_partition_moves_on(tmp_path: Path) -> None:
    lines = [
        record("p1", ("a", "realized", 1)),
        b"this is not json",
        record("p2", ("a", "exited", 1)),
        b"[1, 2, 3]",
        b'{"identityMap": {}, "segmentMembership": {}}',
        b'{"identityMap": {"ecid": [{"id": "p3"}]}, "segmentMembership": {"ups": {"a": {"status": "maybe", "lastQualificationTime": "2024-01-01T00:00:00Z"}}}}',
        record("p3", ("a", "realized", 2)),
    ]
    path = tmp_path / "in.jsonl"
    # A blank line is not a record but still counts as a line.
    path.write_bytes(b"\n".join(lines[:3]) + b"\n\n" + b"\n".join(lines[3:]) + b"\n")
    checkpoint = tmp_path / "cp.json"
    seen: list[tuple[str, str, str]] = []

    async def handler(change: SegmentChange) -> None:
        seen.append((change.profile_key, change.change.value, change.position))

    pipeline, dead = make_pipeline(path, handler, checkpoint=checkpoint)
    stats = await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    assert sorted(seen) == [("ecid:p1", "enter", "1"), ("ecid:p2", "exit", "3"), ("ecid:p3", "enter", "8")]
    invalid = [(e["kind"], e["reason"], e["position"], e["partition"]) for e in dead.entries]
    assert invalid == [
        ("invalid_record", "not_json", "2", str(path)),
        ("invalid_record", "not_object", "5", str(path)),
        ("invalid_record", "no_identity", "6", str(path)),
        ("invalid_entry", "unknown_status", "7", str(path)),  # its only audience: the record has no other
    ]
    assert dead.entries[0]["raw"] == "this is not json"
    assert dead.entries[0]["detail"].startswith("not valid JSON")
    assert dead.entries[1]["detail"] == "expected a JSON object, got list"
    assert "segmentMembership.ups.a.status" in dead.entries[3]["detail"]
    assert checkpoint_line(checkpoint) == 8
    assert stats.invalid == {"not_json": 1, "not_object": 1, "no_identity": 1}
    assert stats.invalid_entries == {"unknown_status": 1}


@pytest.mark.parametrize("strict", [False, True])
async def test_a_malformed_audience_entry_is_dead_lettered_alone_unless_entries_are_strict(
    tmp_path: Path, strict: bool
) -> None:
    # Adobe's export carries every audience of a profile: one bad entry, even of an audience this
    # relay does not map, must not cost the others their changes.
    mixed = orjson.loads(record("p1", ("a", "realized", 1), ("b", "realized", 1)))
    mixed["segmentMembership"]["ups"]["gone"] = {"status": "maybe", "lastQualificationTime": "2024-01-01T00:00:00Z"}
    mixed["segmentMembership"]["ups"]["late"] = {"status": "realized", "lastQualificationTime": "yesterday"}
    mixed["segmentMembership"]["other"] = 5
    lines = [orjson.dumps(mixed), record("p2", ("a", "realized", 1))]
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    seen: list[tuple[str, str, str]] = []

    async def handler(change: SegmentChange) -> None:
        seen.append((change.profile_key, change.segment_id, change.position))

    pipeline, dead = make_pipeline(path, handler, checkpoint=checkpoint, strict_entries=strict)
    await finished(asyncio.create_task(pipeline.run()), pipeline)
    snapshot = pipeline.snapshot()
    assert checkpoint_line(checkpoint) == 2
    if strict:  # today's rule: the whole record goes
        assert sorted(seen) == [("ecid:p2", "a", "2")]
        assert [(e["kind"], e["reason"], e["position"]) for e in dead.entries] == [
            ("invalid_record", "unknown_status", "1")]
        return
    assert sorted(seen) == [("ecid:p1", "a", "1"), ("ecid:p1", "b", "1"), ("ecid:p2", "a", "2")]
    found = {e["path"]: e for e in dead.entries}
    assert {(e["kind"], e["position"], e["partition"]) for e in dead.entries} == {("invalid_entry", "1", str(path))}
    assert {path: e["reason"] for path, e in found.items()} == {
        "segmentMembership.ups.gone": "unknown_status",
        "segmentMembership.ups.late": "bad_qualification_time",
        "segmentMembership.other": "bad_shape",
    }
    assert found["segmentMembership.ups.gone"]["entry"] == mixed["segmentMembership"]["ups"]["gone"]
    assert found["segmentMembership.other"]["entry"] == 5
    assert "'maybe' is not one of realized, existing, exited" in found["segmentMembership.ups.gone"]["detail"]
    assert snapshot.invalid_entries == {"unknown_status": 1, "bad_qualification_time": 1, "bad_shape": 1}
    assert snapshot.invalid == {}


async def test_a_change_json_cannot_carry_is_dead_lettered_with_its_record_and_the_partition_moves_on(
    tmp_path: Path,
) -> None:
    # orjson decodes attributes nested up to 1024 levels but encodes only 254, and no JSON
    # encoder here takes integers past 64 bits: such a record is valid, its change is not
    # writable. Real files on both ends: the jsonl handler and the JSONL dead letter.
    deep = b'{"n":' * 300 + b"1" + b"}" * 300
    lines = [
        record("p1", ("a", "realized", 1)),
        record("p2", ("a", "realized", 1))[:-1] + b',"deep":' + deep + b"}",
        record("p3", ("a", "realized", 1))[:-1] + b',"big":123456789012345678901234567890}',
        record("p4", ("a", "realized", 1)),
    ]
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    out, dead_path = tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    dead = JsonlDeadLetter(dead_path)
    router = Router([JsonlHandler(out)], dead, retry=FAST)
    source = FileSource(str(path), checkpoint_path=str(checkpoint))
    pipeline = Pipeline(source, MemoryStore(), router, dead, settings=PipelineSettings(checkpoint_interval_s=3600.0))
    await finished(asyncio.create_task(pipeline.run()), pipeline)

    assert [orjson.loads(line)["profile_key"] for line in out.read_bytes().splitlines()] == ["ecid:p1", "ecid:p4"]
    entries = [orjson.loads(line) for line in dead_path.read_bytes().splitlines()]
    assert [(e["kind"], e["reason"], e["attempts"], e["position"]) for e in entries] == [
        ("failed_change", "handler_rejected", 1, "2"), ("failed_change", "handler_rejected", 1, "3")]
    for entry, line in zip(entries, lines[1:3], strict=True):
        assert entry["raw"] == line.decode()  # the record, for a replay once the handler is fixed
        assert entry["change"]["profile_key"] == f"ecid:p{entry['position']}"
        assert entry["change"]["attributes"]["not_encodable"].startswith("TypeError")
        assert len(entry["change"]["attributes"]["preview"]) <= 2_000
        assert "cannot be encoded as JSON" in entry["detail"]
    assert checkpoint_line(checkpoint) == 4


async def test_the_dead_letter_writes_an_audience_entry_json_cannot_carry_as_a_bounded_preview(tmp_path: Path) -> None:
    nested: object = 1
    for _ in range(300):
        nested = {"n": nested}
    dead = JsonlDeadLetter(tmp_path / "dead.jsonl")
    await dead.invalid_entry({"status": "realized", "deep": nested}, path="segmentMembership.ups.s", reason="bad_shape",
                             detail="...", partition="0", position="7")
    await dead.close()
    (entry,) = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert (entry["kind"], entry["path"], entry["position"]) == ("invalid_entry", "segmentMembership.ups.s", "7")
    assert entry["entry"]["not_encodable"].startswith("TypeError")
    assert "'status': 'realized'" in entry["entry"]["preview"] and len(entry["entry"]["preview"]) <= 2_000


async def test_checkpoint_never_passes_an_unfinished_record(tmp_path: Path) -> None:
    lines = [record(f"p{i}", ("a", "realized", i)) for i in range(1, 21)]
    blocked_line = 6
    lines[blocked_line - 1] = record("blocked", ("a", "realized", 1))
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    gate = asyncio.Event()
    handled: list[int] = []

    async def handler(change: SegmentChange) -> None:
        if change.profile_key == "ecid:blocked":
            await gate.wait()
        handled.append(int(change.position))

    pipeline, _ = make_pipeline(path, handler, checkpoint=checkpoint, concurrency=4)
    run = asyncio.create_task(pipeline.run())
    try:
        await poll(lambda: pipeline.records_finished == len(lines) - 1, "every other record to finish")
        assert blocked_line not in handled and max(handled) == len(lines)
        await pipeline.checkpoint()
        assert checkpoint_line(checkpoint) == blocked_line - 1
        assert pipeline.in_flight == 1  # only the blocked record is unfinished
        gate.set()
        await asyncio.wait_for(run, RUN_TIMEOUT_S)
    finally:
        gate.set()
        if not run.done():
            run.cancel()
    assert checkpoint_line(checkpoint) == len(lines)
    assert sorted(handled) == list(range(1, len(lines) + 1))


async def test_restart_from_checkpoint_loses_no_change(tmp_path: Path) -> None:
    rng = random.Random(9)
    lines = interleaved_history(rng, profiles=25, per_profile=6)
    # Some re-exports that must not change anything: a stale copy and a duplicate.
    lines.insert(100, record("p3", ("a", "exited", -5)))
    lines.insert(40, lines[10])
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    db = tmp_path / "state.db"
    expected = expected_changes(lines)
    expected_ids = {cid for cid, *_ in expected}
    assert len(expected_ids) == len(expected)
    stop_after = 60

    first: list[tuple[str, int]] = []
    first_pipeline: Pipeline | None = None

    async def first_handler(change: SegmentChange) -> None:
        await random_yields(rng, 4)
        first.append((change.change_id, int(change.position)))
        if len(first) == stop_after:
            assert first_pipeline is not None
            first_pipeline.stop()

    # A small in-flight bound keeps the reader from running far ahead of the handlers, so stop()
    # lands part way through the file.
    first_pipeline, dead1 = make_pipeline(path, first_handler, store=SqliteStore(db), checkpoint=checkpoint,
                                          batch_size=7, concurrency=8, max_in_flight_records=8)
    await asyncio.wait_for(first_pipeline.run(), RUN_TIMEOUT_S)
    resumed_after = checkpoint_line(checkpoint)
    assert resumed_after is not None and resumed_after < len(lines), "the first run should stop part way"
    assert len(first) >= stop_after

    second: list[tuple[str, int]] = []

    async def second_handler(change: SegmentChange) -> None:
        await random_yields(rng, 4)
        second.append((change.change_id, int(change.position)))

    second_pipeline, dead2 = make_pipeline(path, second_handler, store=SqliteStore(db), checkpoint=checkpoint,
                                           batch_size=7, concurrency=8)
    await asyncio.wait_for(second_pipeline.run(), RUN_TIMEOUT_S)

    assert dead1.entries == [] and dead2.entries == []
    assert checkpoint_line(checkpoint) == len(lines)
    union = {cid for cid, _ in first} | {cid for cid, _ in second}
    assert union == expected_ids  # nothing lost, nothing invented
    assert all(line > resumed_after for _, line in second), "the second run re-read a checkpointed record"
    repeated = {cid for cid, _ in first} & {cid for cid, _ in second}
    by_id = {cid: line for cid, line, *_ in expected}
    assert all(by_id[cid] > resumed_after for cid in repeated)
    assert len({cid for cid, _ in first}) == len(first)


async def test_in_flight_records_are_bounded(tmp_path: Path) -> None:
    rng = random.Random(4)
    lines = [record(f"p{rng.randrange(50)}", ("a", "realized" if i % 2 else "exited", i)) for i in range(150)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    observed: list[int] = []
    pipeline: Pipeline | None = None

    async def handler(change: SegmentChange) -> None:
        assert pipeline is not None
        observed.append(pipeline.in_flight)
        await random_yields(rng, 12)
        observed.append(pipeline.in_flight)

    pipeline, dead = make_pipeline(path, handler, concurrency=16, max_in_flight_records=5, batch_size=50)
    stats = await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    assert observed and max(observed) <= 5
    assert max(observed) == 5, "the bound should be reached with a backlog this size"
    assert stats.records_finished == len(lines) and pipeline.in_flight == 0
    assert dead.entries == []


async def test_in_flight_bytes_are_bounded(tmp_path: Path) -> None:
    rng = random.Random(8)
    lines = [record(f"p{i}", ("a", "realized", i)) for i in range(60)]
    size = max(len(line) for line in lines)
    path = write_lines(tmp_path / "in.jsonl", lines)
    observed: list[int] = []
    pipeline: Pipeline | None = None

    async def handler(change: SegmentChange) -> None:
        assert pipeline is not None
        observed.append(pipeline._limit.bytes)
        await random_yields(rng, 12)

    pipeline, _ = make_pipeline(path, handler, concurrency=16, max_in_flight_bytes=3 * size)
    await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    assert len(observed) == 60 and max(observed) <= 3 * size


async def test_restart_after_a_drain_timeout_loses_no_change(tmp_path: Path) -> None:
    """A first run whose last record never finishes (shutdown timeout): the rerun handles it again."""
    rng = random.Random(13)
    lines = interleaved_history(rng, profiles=10, per_profile=5)
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    db = tmp_path / "state.db"
    expected_ids = {cid for cid, *_ in expected_changes(lines)}
    stuck_profile = "ecid:p4"
    never = asyncio.Event()
    first: list[tuple[str, int]] = []
    first_pipeline: Pipeline | None = None

    async def first_handler(change: SegmentChange) -> None:
        if change.profile_key == stuck_profile and int(change.position) > 10:
            assert first_pipeline is not None
            first_pipeline.stop()
            await never.wait()  # hangs until the pipeline gives up on draining
        first.append((change.change_id, int(change.position)))

    first_pipeline, _ = make_pipeline(path, first_handler, store=SqliteStore(db), checkpoint=checkpoint,
                                      batch_size=5, concurrency=4, shutdown_timeout_s=0.2)
    await asyncio.wait_for(first_pipeline.run(), RUN_TIMEOUT_S)
    resumed_after = checkpoint_line(checkpoint) or 0
    stuck_lines = [n for n, line in enumerate(lines, 1) if b'"p4"' in line and n > 10]
    assert resumed_after < stuck_lines[0], "the checkpoint passed the record that never finished"

    second: list[tuple[str, int]] = []

    async def second_handler(change: SegmentChange) -> None:
        second.append((change.change_id, int(change.position)))

    second_pipeline, _ = make_pipeline(path, second_handler, store=SqliteStore(db), checkpoint=checkpoint,
                                       batch_size=5, concurrency=4)
    await asyncio.wait_for(second_pipeline.run(), RUN_TIMEOUT_S)
    assert {cid for cid, _ in first} | {cid for cid, _ in second} == expected_ids
    assert all(line > resumed_after for _, line in second)
    assert checkpoint_line(checkpoint) == len(lines)


class FlakyStore(MemoryStore):
    """A store that is down for its first ``failures`` calls (a real store's outage, in small)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def load_many(self, profiles: Any) -> dict[str, dict[Any, StoredMembership]]:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store unavailable")
        return await super().load_many(profiles)


async def test_a_store_outage_delays_records_but_loses_none(tmp_path: Path) -> None:
    lines = [record(f"p{i % 5}", ("a", "realized" if i % 2 else "exited", i)) for i in range(1, 31)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    seen: list[tuple[str, int, str, str, str]] = []

    async def handler(change: SegmentChange) -> None:
        seen.append((change.change_id, int(change.position), change.profile_key, change.segment_id,
                     change.change.value))

    pipeline, dead = make_pipeline(path, handler, store=FlakyStore(failures=3), checkpoint=checkpoint,
                                   concurrency=2, record_retry_backoff_s=0.001)
    await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    assert sorted(seen) == sorted(expected_changes(lines))
    assert not dead.entries  # an outage is not a reason to drop anything
    assert checkpoint_line(checkpoint) == len(lines)


async def test_checkpoint_writes_never_interleave_or_go_back(tmp_path: Path) -> None:
    # Commits abandoned by a cancelled task keep running in their threads; a later commit must
    # neither interleave with them nor be overwritten by an older position.
    path = write_lines(tmp_path / "in.jsonl", [record("p", ("a", "realized", 1))])
    checkpoint = tmp_path / "cp.json"
    source = FileSource(str(path), checkpoint_path=str(checkpoint))
    await source.start(NoListener())
    try:
        commits = [asyncio.create_task(source.commit(str(path), line)) for line in range(1, 200)]
        for task in commits[::3]:
            task.cancel()
        await asyncio.gather(*commits, return_exceptions=True)
        await source.commit(str(path), 200)
        await source.commit(str(path), 150)  # older than what was written: ignored
        await asyncio.to_thread(lambda: None)  # let abandoned writers finish
        await poll(lambda: checkpoint_line(checkpoint) == 200, "the newest position to land")
        assert checkpoint_line(checkpoint) == 200
    finally:
        await source.close()


class NoListener:
    def assigned(self, partition: str, epoch: int) -> None:
        pass

    def revoked(self, partition: str) -> None:
        pass


class FlakyCheckpointSource(FileSource):
    """A file source whose first commits fail, as a lease table under throttling would."""

    def __init__(self, *args: Any, failures: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures

    async def commit(self, partition: str, position: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("checkpoint store unavailable")
        await super().commit(partition, position)


async def test_a_failing_final_checkpoint_is_retried_and_never_crashes_the_shutdown(tmp_path: Path) -> None:
    lines = [record(f"p{i}", ("a", "realized", i)) for i in range(1, 6)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    dead = MemoryDeadLetter()

    async def handler(change: SegmentChange) -> None:
        pass

    source = FlakyCheckpointSource(str(path), checkpoint_path=str(checkpoint), failures=1)
    router = Router([FunctionHandler(handler, name="noop")], dead, retry=FAST)
    pipeline = Pipeline(source, MemoryStore(), router, dead, settings=PipelineSettings(checkpoint_interval_s=3600))
    await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    assert checkpoint_line(checkpoint) == len(lines)  # the second attempt landed

    source = FlakyCheckpointSource(str(path), checkpoint_path=str(tmp_path / "cp2.json"), failures=99)
    router = Router([FunctionHandler(handler, name="noop")], dead, retry=FAST)
    pipeline = Pipeline(source, MemoryStore(), router, dead, settings=PipelineSettings(checkpoint_interval_s=3600))
    await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)  # reported, not raised
    assert checkpoint_line(tmp_path / "cp2.json") is None


async def test_checkpoint_every_records_checkpoints_without_waiting_for_the_interval(tmp_path: Path) -> None:
    lines = [record(f"p{i}", ("a", "realized", i)) for i in range(1, 41)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    checkpoint = tmp_path / "cp.json"
    gate = asyncio.Event()

    async def handler(change: SegmentChange) -> None:
        if int(change.position) > 30:
            await gate.wait()  # the last ten stay unfinished until the count-triggered checkpoint is seen

    pipeline, _ = make_pipeline(path, handler, checkpoint=checkpoint, concurrency=64, checkpoint_every_records=10)
    run = asyncio.create_task(pipeline.run())  # checkpoint_interval_s is an hour here
    try:
        await poll(lambda: checkpoint_line(checkpoint) == 30, "a checkpoint after 30 finished records")
        gate.set()
        await finished(run, pipeline)
    finally:
        gate.set()
        if not run.done():
            run.cancel()
    assert checkpoint_line(checkpoint) == len(lines)


async def test_end_to_end_latency_counts_every_finished_record_and_every_handled_change(tmp_path: Path) -> None:
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    lines = []
    for n in range(5):
        lines.append(orjson.dumps({"identityMap": {"ecid": [{"id": f"p{n}"}]}, "segmentMembership": {"ups": {
            "a": {"status": "realized", "lastQualificationTime": two_hours_ago.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "b": {"status": "exited", "lastQualificationTime": two_hours_ago.strftime("%Y-%m-%dT%H:%M:%SZ")}}}}))
    lines.append(lines[0])  # a duplicate: a record finished, no change
    lines.append(b"not json")  # not a record the pipeline finishes through its handlers
    handled: list[SegmentChange] = []

    async def handler(change: SegmentChange) -> None:
        handled.append(change)

    pipeline, _ = make_pipeline(write_lines(tmp_path / "in.jsonl", lines), handler)
    started = datetime.now(UTC)
    stats = await asyncio.wait_for(pipeline.run(), RUN_TIMEOUT_S)
    took = (datetime.now(UTC) - started).total_seconds()
    assert len(handled) == 10
    assert stats.record_latency.count == 6  # every valid record, duplicates too
    assert 0 <= stats.record_latency.total <= 6 * took
    assert stats.change_age.count == 10  # every enter and exit, from Adobe's qualification time
    assert 10 * 7199 <= stats.change_age.total <= 10 * (7201 + took)
    assert dict(stats.change_age.cumulative())["3600.0"] == 0 and dict(stats.change_age.cumulative())["7200.0"] == 0
