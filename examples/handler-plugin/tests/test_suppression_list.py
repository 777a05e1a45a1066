"""The suppression list, driven by export records through segment-relay's real pipeline."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from segment_relay.handlers.loader import ENTRY_POINT_GROUP, HandlerSpecError, load_handler
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, iso_utc
from segment_relay.testing.pipeline import run_exports

from segment_relay_suppression import SuppressionList, read_audit, read_suppressed

UNSUBSCRIBED = "7f3b9c2e-1d4a-4e8b-9c61-2a5d0e8f4b17"
BOUNCED = "c4e1a7d2-8b3f-4a69-b05e-9d2c6f1e3a84"


def export(ecid: str, email_hash: str | None, **segments: tuple[str, str]) -> bytes:
    """One Adobe RT-CDP export record: ``segment=(status, lastQualificationTime)``."""
    identity_map: dict[str, list[dict[str, object]]] = {"ECID": [{"id": ecid}]}
    if email_hash:
        identity_map["Email_LC_SHA256"] = [{"id": email_hash, "primary": True}]
    return json.dumps({
        "identityMap": identity_map,
        "segmentMembership": {"ups": {
            segment_id: {"status": status, "lastQualificationTime": at}
            for segment_id, (status, at) in segments.items()
        }},
    }).encode()


def key_of(email_hash: str) -> str:
    return f"email_lc_sha256:{email_hash}"


async def test_enter_suppresses_and_exit_releases(tmp_path: Path) -> None:
    db = tmp_path / "suppression.sqlite"
    records = [
        export("111", "aa11", **{UNSUBSCRIBED: ("realized", "2026-03-01T10:00:00Z")}),
        export("222", "bb22", **{UNSUBSCRIBED: ("realized", "2026-03-01T10:05:00+0000"),
                                 BOUNCED: ("realized", "2026-03-01T10:05:00Z")}),
        export("111", "aa11", **{UNSUBSCRIBED: ("exited", "2026-03-02T09:00:00Z")}),
        export("222", "bb22", **{UNSUBSCRIBED: ("realized", "2026-03-01T10:05:00Z"),  # a re-export: no change
                                 BOUNCED: ("realized", "2026-03-01T10:05:00Z")}),
    ]

    seen = await run_exports(records, [SuppressionList(str(db))])

    assert [(c.profile_key, c.change.value) for c in seen["suppression-list"] if c.profile_key == key_of("aa11")] == [
        (key_of("aa11"), "enter"), (key_of("aa11"), "exit"),
    ]
    assert len(seen["suppression-list"]) == 4
    assert read_suppressed(db) == {UNSUBSCRIBED: {key_of("bb22")}, BOUNCED: {key_of("bb22")}}
    assert sorted(read_audit(db)) == sorted(
        (c.profile_key, c.segment_id, c.change.value, iso_utc(c.qualified_at)) for c in seen["suppression-list"]
    )


async def test_a_realistic_stream_gives_the_list_the_rules_say(tmp_path: Path) -> None:
    db = tmp_path / "suppression.sqlite"
    records = list(generate(StreamSpec(seed=11, profiles=150, records=1500, invalid_rate=0.01)))
    truth = expected_changes(records)

    seen = await run_exports(records, [SuppressionList(str(db))])

    assert len(seen["suppression-list"]) == len(truth.changes)
    assert sorted(read_audit(db)) == sorted(truth.changes)
    members: dict[tuple[str, str], bool] = {}
    for profile_key, segment_id, change, _ in truth.changes:  # in delivery order: the last one wins
        members[(profile_key, segment_id)] = change == "enter"
    expected: dict[str, set[str]] = {}
    for (profile_key, segment_id), member in members.items():
        if member:
            expected.setdefault(segment_id, set()).add(profile_key)
    assert read_suppressed(db) == expected


async def test_repeated_and_late_deliveries_change_nothing(tmp_path: Path) -> None:
    db = tmp_path / "suppression.sqlite"
    records = [
        export("333", "cc33", **{UNSUBSCRIBED: ("realized", "2026-04-01T08:00:00Z")}),
        export("333", "cc33", **{UNSUBSCRIBED: ("exited", "2026-04-03T08:00:00Z")}),
        export("333", "cc33", **{UNSUBSCRIBED: ("realized", "2026-04-05T08:00:00Z")}),
    ]
    changes = (await run_exports(records, [SuppressionList(str(db))], concurrency=1))["suppression-list"]
    assert [c.change.value for c in changes] == ["enter", "exit", "enter"]
    before = (read_suppressed(db), sorted(read_audit(db)))

    # At-least-once delivery: after a crash the relay may hand the same changes over again,
    # in any mix of repeats; an older one must not undo a newer one.
    replay = SuppressionList(str(db))
    await replay.start()
    try:
        for change in [*changes, *reversed(changes), changes[1]]:
            await replay.handle(change)
    finally:
        await replay.close()

    assert (read_suppressed(db), sorted(read_audit(db))) == before
    assert read_suppressed(db) == {UNSUBSCRIBED: {key_of("cc33")}}


def test_installed_as_a_plug_in(tmp_path: Path) -> None:
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names.get("suppression-list") == "segment_relay_suppression:SuppressionList"

    handler = load_handler(f"suppression-list:{tmp_path / 'list.sqlite'}")
    assert isinstance(handler, SuppressionList) and handler.path == tmp_path / "list.sqlite"

    with pytest.raises(HandlerSpecError, match="needs a database file"):
        load_handler("suppression-list")
