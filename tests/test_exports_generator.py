"""The export stream generator, its reference model, and the relay checked against both."""

from __future__ import annotations

import logging
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.consumer.export import InvalidReason, InvalidRecord, parse_export
from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
from segment_relay.consumer.profile_key import ProfileKeyRule
from segment_relay.consumer.sources.base import SourceSnapshot
from segment_relay.consumer.sources.file import FileSource
from segment_relay.consumer.state import MemoryStore, SqliteStore
from segment_relay.handlers.api import FunctionHandler, SegmentChange
from segment_relay.handlers.router import Router
from segment_relay.ops.metrics import RelaySnapshot
from segment_relay.testing.exports import (
    DEFAULT_SEGMENTS,
    StreamSpec,
    expected_changes,
    generate,
    iso_utc,
    reference_profile_key,
    write_jsonl,
)

SMALL = dict(profiles=300, records=3000)


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = list(generate(StreamSpec(seed=11, **SMALL)))
    again = list(generate(StreamSpec(seed=11, **SMALL)))
    other = list(generate(StreamSpec(seed=12, **SMALL)))
    assert first == again
    assert first != other


def test_yields_exactly_the_requested_number_of_single_line_records() -> None:
    for records in (0, 1, 2, 3, 57, 1000):
        stream = list(generate(StreamSpec(seed=5, profiles=20, records=records, out_of_order_rate=0.3)))
        assert len(stream) == records
        assert all(isinstance(r, bytes) and b"\n" not in r for r in stream)


def test_record_sizes_are_near_the_target() -> None:
    for target in (1500, 3000):
        sizes = [len(r) for r in generate(StreamSpec(seed=3, target_record_bytes=target, **SMALL))]
        median = statistics.median(sizes)
        assert 0.95 * target <= median <= 1.1 * target, median
        assert min(sizes) >= 0.95 * target  # padding fills small records up
        assert sum(size <= 1.5 * target for size in sizes) >= 0.95 * len(sizes)


def test_every_record_parses_when_there_is_no_garbage() -> None:
    for record in generate(StreamSpec(seed=4, **SMALL)):
        export = parse_export(record)
        assert export.segments
        assert export.identity_map["ecid"]


def test_records_look_like_adobe_exports() -> None:
    stream = [orjson.loads(r) for r in generate(StreamSpec(seed=8, **SMALL))]
    known = dict(DEFAULT_SEGMENTS)
    for document in stream:
        assert set(document) >= {"person", "personalEmail", "segmentMembership", "identityMap"}
        assert set(document["segmentMembership"]) == {"ups"}
        for segment_id, entry in document["segmentMembership"]["ups"].items():
            assert entry["name"] == known[segment_id]
            assert {"createdAt", "updatedAt", "mappingCreatedAt", "mappingUpdatedAt"} <= set(entry)
            assert entry["lastQualificationTime"] >= "2026-01-01T00:00:00"
        assert 1 <= len(document["identityMap"]["ecid"]) <= 2
    with_email = [d for d in stream if "email_lc_sha256" in d["identityMap"]]
    assert len(with_email) > len(stream) / 2
    assert any(d["identityMap"]["email_lc_sha256"][0].get("primary") for d in with_email)
    seen = {segment_id for d in stream for segment_id in d["segmentMembership"]["ups"]}
    assert "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae" in seen  # the non-UUID id of Adobe's documentation

    bare = orjson.loads(next(generate(StreamSpec(seed=8, include_names=False, include_timestamps=False, **SMALL))))
    for entry in bare["segmentMembership"]["ups"].values():
        assert set(entry) == {"lastQualificationTime", "status"}


def test_stream_has_duplicates_late_records_both_time_forms_and_legacy_status() -> None:
    stream = list(generate(StreamSpec(seed=9, **SMALL)))
    text = b"\n".join(stream)
    assert len(stream) - len(set(stream)) >= 0.03 * len(stream)  # exact re-deliveries
    assert b'+0000"' in text and b'Z"' in text
    assert b'"status":"existing"' in text and b'"status":"realized"' in text and b'"status":"exited"' in text
    truth = expected_changes(stream)
    assert truth.stale > 0  # older snapshots arrive after newer ones
    # a late record: some profile's snapshot is older than one delivered before it
    newest: dict[str, str] = {}
    delivered: set[bytes] = set()
    late = 0
    for record in stream:
        if record in delivered:
            continue  # re-deliveries do not count as late records here
        delivered.add(record)
        export = parse_export(record)
        key = ProfileKeyRule().key_for(export.identity_map)
        moment = max(iso_utc(e.qualified_at) for e in export.segments)
        if key in newest and moment < newest[key]:
            late += 1
        newest[key] = max(moment, newest.get(key, moment))
    assert late >= 0.01 * len(stream)


def test_timelines_enter_exit_and_first_sighting_exits() -> None:
    truth = expected_changes(generate(StreamSpec(seed=10, **SMALL)))
    assert truth.enters > 0 and truth.exits > 0
    by_segment: dict[tuple[str, str], list[str]] = defaultdict(list)
    for profile, segment, change, _ in truth.changes:
        by_segment[(profile, segment)].append(change)
    first_exits = sum(changes[0] == "exit" for changes in by_segment.values())
    assert first_exits > 0  # a profile may exit a segment it was never seen in
    for changes in by_segment.values():  # enter and exit alternate after the first change
        assert all(a != b for a, b in zip(changes, changes[1:], strict=False))
    assert 0 < truth.profiles <= 300


def test_garbage_lines_are_rejected_by_the_parser_and_counted_by_the_model() -> None:
    stream = list(generate(StreamSpec(seed=6, invalid_rate=0.2, **SMALL)))
    reasons: Counter[str] = Counter()
    for record in stream:
        try:
            parse_export(record)
        except InvalidRecord as invalid:
            reasons[invalid.reason.value] += 1
    expected = {InvalidReason.NOT_JSON, InvalidReason.NO_IDENTITY, InvalidReason.UNKNOWN_STATUS,
                InvalidReason.BAD_QUALIFICATION_TIME}
    assert set(reasons) == {reason.value for reason in expected}
    truth = expected_changes(stream, strict_entries=True)
    assert truth.invalid == sum(reasons.values())
    assert 0.15 * len(stream) <= truth.invalid <= 0.25 * len(stream)
    assert truth.records == len(stream)
    # Without strict entries (the default) a bad status or time costs only its entry.
    tolerant = expected_changes(stream)
    rejected = dropped = 0
    for record in stream:
        try:
            dropped += len(parse_export(record, strict_entries=False).invalid_entries)
        except InvalidRecord:
            rejected += 1
    assert (tolerant.invalid, tolerant.invalid_entries) == (rejected, dropped)
    assert tolerant.invalid_entries > 0 and tolerant.dead_letters == truth.invalid
    assert len(tolerant.changes) > len(truth.changes)


def test_reference_key_agrees_with_the_default_profile_key_rule() -> None:
    rule = ProfileKeyRule()
    primaries = 0
    for record in generate(StreamSpec(seed=2, **SMALL)):
        export = parse_export(record)
        identities = orjson.loads(record)["identityMap"]
        key = reference_profile_key(identities)
        assert key == rule.key_for(export.identity_map)
        primaries += key.startswith("email_lc_sha256:")
    assert primaries > 0


def test_reference_model_rules_on_hand_written_records() -> None:
    def record(status: str, time: str, segment: str = "s1", ecid: str = "1") -> bytes:
        return orjson.dumps({
            "identityMap": {"ecid": [{"id": ecid}]},
            "segmentMembership": {"ups": {segment: {"status": status, "lastQualificationTime": time}}},
        })

    stream = [
        record("exited", "2026-01-01T00:00:01Z"),  # first sighting of exited: exit
        record("realized", "2026-01-01T00:00:02+0000"),  # enter
        record("realized", "2026-01-01T00:00:02Z"),  # same status, same time: duplicate
        record("existing", "2026-01-01T00:00:02Z"),  # same time, other status: newer, member -> member
        record("exited", "2026-01-01T00:00:01Z"),  # older: stale
        record("realized", "2026-01-01T00:00:09Z"),  # member -> member later: nothing
        record("exited", "2026-01-01T00:00:10Z"),  # exit
        record("realized", "2026-01-01T00:00:10Z"),  # same time, other status: newer, enter
        b"{not json",
        record("pending", "2026-01-01T00:00:11Z"),
        record("exited", "2026-02-30T00:00:00Z"),
        orjson.dumps({"segmentMembership": {}}),
    ]
    truth = expected_changes(stream)
    assert truth.changes == [
        ("ecid:1", "s1", "exit", "2026-01-01T00:00:01Z"),
        ("ecid:1", "s1", "enter", "2026-01-01T00:00:02Z"),
        ("ecid:1", "s1", "exit", "2026-01-01T00:00:10Z"),
        ("ecid:1", "s1", "enter", "2026-01-01T00:00:10Z"),
    ]
    assert (truth.records, truth.invalid, truth.invalid_entries, truth.profiles) == (12, 2, 2, 1)
    assert (truth.enters, truth.exits, truth.stale, truth.duplicates) == (2, 2, 1, 1)
    strict = expected_changes(stream, strict_entries=True)  # the bad status and the bad time reject their records
    assert (strict.invalid, strict.invalid_entries, strict.changes) == (4, 0, truth.changes)


def test_write_jsonl_writes_the_stream_and_returns_its_truth(tmp_path: Path) -> None:
    spec = StreamSpec(seed=13, **SMALL)
    truth = write_jsonl(spec, tmp_path / "stream.jsonl")
    lines = (tmp_path / "stream.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert lines[:-1] == list(generate(spec))
    assert truth == expected_changes(generate(spec))


async def _run_relay(path: Path, store: object) -> tuple[list[tuple[str, str, str, str]], dict[str, int]]:
    got: list[tuple[str, str, str, str]] = []

    async def collect(change: SegmentChange) -> None:
        got.append((change.profile_key, change.segment_id, change.change.value, iso_utc(change.qualified_at)))

    dead_letter = MemoryDeadLetter()
    router = Router([FunctionHandler(collect, name="collect")], dead_letter, concurrency=16)
    pipeline = Pipeline(FileSource(str(path)), store, router, dead_letter, settings=PipelineSettings())
    summary = RelaySnapshot(await pipeline.run(), router.snapshot(), SourceSnapshot()).summary()
    summary["dead_letter_entries"] = len(dead_letter.entries)
    return got, summary


def _per_profile(changes: list[tuple[str, str, str, str]]) -> dict[str, list[tuple[str, str, str, str]]]:
    grouped: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for change in changes:
        grouped[change[0]].append(change)
    return dict(grouped)


@pytest.mark.parametrize(
    ("seed", "invalid_rate", "store_kind"),
    [(1, 0.0, "memory"), (2, 0.02, "memory"), (3, 0.02, "sqlite")],
)
async def test_the_relay_emits_exactly_the_reference_changes(
    tmp_path: Path, seed: int, invalid_rate: float, store_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="segment_relay")  # one warning per garbage line is noise here
    spec = StreamSpec(seed=seed, profiles=1000, records=8000, invalid_rate=invalid_rate)
    path = tmp_path / "stream.jsonl"
    truth = write_jsonl(spec, path)
    store = MemoryStore() if store_kind == "memory" else SqliteStore(tmp_path / "state.db")

    got, summary = await _run_relay(path, store)

    assert Counter(got) == Counter(truth.changes)
    assert _per_profile(got) == _per_profile(truth.changes)
    assert summary["records"] == truth.records == spec.records
    assert summary["invalid"] == truth.invalid
    assert summary["dead_letter_entries"] == summary["dead_letters"] == truth.dead_letters
    assert (summary["enters"], summary["exits"]) == (truth.enters, truth.exits)
    assert summary["stale_suppressed"] == truth.stale
    assert summary["duplicates_suppressed"] == truth.duplicates
    assert truth.enters > 1000 and truth.exits > 500 and truth.stale > 0
