"""A fuzz run of hostile records mixed with valid ones (issue 12's chaos list): random bytes,
truncated and deeply nested JSON, huge strings, invalid UTF-8, wrong types, odd times and
offsets. Every line is accounted for (finished, or dead-lettered with its reason and position),
the valid changes are exactly the reference model's, and the checkpoint reaches the end."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import orjson

from segment_relay import SegmentChange
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
from segment_relay.consumer.sources.file import FileSource
from segment_relay.consumer.state import SqliteStore
from segment_relay.handlers.api import FunctionHandler
from segment_relay.handlers.router import Router
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, iso_utc

# Times both the relay and the reference model read (or both refuse): see README "Invalid records".
ODD_TIMES_READ = ("2026-01-01T10:00:00+05:30", "2026-01-01T10:00:00-0800", "2026-01-01T10:00:00.5Z",
                  "2026-01-01T10:00:00.123456+00:00")
ODD_TIMES_REFUSED = ("2026-02-30T10:00:00Z", "2026-13-01T00:00:00Z", "2026-01-01T25:00:00Z", "yesterday", "", 1767225600,
                     None, ["2026-01-01T00:00:00Z"])


def hostile(rng: random.Random, valid: list[bytes]) -> bytes:
    """One hostile line (never containing a newline byte, which would split it)."""
    base = orjson.loads(rng.choice(valid))
    kind = rng.randrange(10)
    if kind == 0:  # random bytes
        return bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randrange(1, 300)))
    if kind == 1:  # truncated
        whole = rng.choice(valid)
        return whole[: rng.randrange(1, len(whole) - 1)]
    if kind == 2:  # nested deeper than any JSON parser here takes, or just deep
        depth = rng.choice((300, 2000, 100_000))
        return orjson.dumps(base)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 3:  # a huge string attribute
        base["notes"] = "x" * rng.choice((100_000, 1_500_000))
        return orjson.dumps(base)
    if kind == 4:  # invalid UTF-8 inside a string
        return orjson.dumps(base)[:-1] + b',"name":"caf\xc3\x28 \xff\xfe"}'
    if kind == 5:  # wrong types at the top
        field = rng.choice(("identityMap", "segmentMembership"))
        base[field] = rng.choice(([], "x", 5, None, [{"ecid": []}]))
        return orjson.dumps(base)
    if kind == 6:  # wrong types inside an identity or an audience
        audiences = base.get("segmentMembership", {}).get("ups") or {}
        if audiences and rng.random() < 0.7:
            segment = rng.choice(sorted(audiences))
            audiences[segment] = rng.choice(({"status": 5, "lastQualificationTime": "2026-01-01T00:00:00Z"},
                                              {"status": "realized"}, "realized", [], {"status": None}))
        else:
            base["identityMap"] = {"ecid": [{"id": rng.choice((5, "", None, ["x"]))}]}
        return orjson.dumps(base)
    if kind in (7, 8):  # odd times and offsets
        audiences = base.get("segmentMembership", {}).get("ups") or {}
        for segment in audiences:
            audiences[segment]["lastQualificationTime"] = rng.choice(ODD_TIMES_READ + ODD_TIMES_REFUSED)
        return orjson.dumps(base)
    return b"\x00" * rng.randrange(1, 50) + b'{"identityMap":'  # NULs, then a start of JSON


async def test_hostile_records_mixed_with_valid_ones_are_all_accounted_for(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    valid = list(generate(StreamSpec(seed=77, profiles=300, records=3000)))
    lines: list[bytes] = []
    for record in valid:
        lines.append(record)
        if rng.random() < 0.2:
            lines.append(hostile(rng, valid))
    lines = [line for line in lines if line.strip() and b"\n" not in line]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    truth = expected_changes(lines)

    got: list[tuple[str, str, str, str]] = []

    async def collect(change: SegmentChange) -> None:
        got.append((change.profile_key, change.segment_id, change.change.value, iso_utc(change.qualified_at)))

    dead = MemoryDeadLetter()
    source = FileSource(str(path), checkpoint_path=str(tmp_path / "cp.json"))
    pipeline = Pipeline(source, SqliteStore(tmp_path / "state.sqlite"),
                        Router([FunctionHandler(collect, name="collect")], dead, concurrency=16), dead,
                        settings=PipelineSettings(checkpoint_interval_s=3600.0))
    snapshot = await asyncio.wait_for(pipeline.run(), 120)

    assert Counter(got) == Counter(truth.changes)  # valid changes exact, nothing invented
    kinds: Counter[str] = Counter(entry["kind"] for entry in dead.entries)
    assert kinds == Counter({"invalid_record": truth.invalid, "invalid_entry": truth.invalid_entries}) - Counter()
    assert truth.invalid > 50 and truth.invalid_entries > 10
    # Every line accounted for: finished, and the invalid ones dead-lettered with a reason and position.
    assert snapshot.records_read == snapshot.records_finished == len(lines)
    assert all(entry["reason"] and entry["position"].isdigit() for entry in dead.entries)
    invalid_lines = {int(entry["position"]) for entry in dead.entries if entry["kind"] == "invalid_record"}
    assert all(1 <= line <= len(lines) for line in invalid_lines)
    assert orjson.loads((tmp_path / "cp.json").read_bytes())["line"] == len(lines)
    assert dead.entries and all(len(orjson.dumps(entry)) < 3_000_000 for entry in dead.entries)
