"""The diff rules of DESIGN.md, one test each."""

from __future__ import annotations

from typing import Any

import orjson

from segment_relay.consumer.export import ProfileExport, SegmentStatus, parse_export
from segment_relay.consumer.membership import ChangeType, StoredMembership, diff_membership, supersedes

REALIZED, EXISTING, EXITED = SegmentStatus.REALIZED, SegmentStatus.EXISTING, SegmentStatus.EXITED
ENTER, EXIT = ChangeType.ENTER, ChangeType.EXIT

T1 = "2024-01-01T00:00:00Z"
T2 = "2024-01-02T00:00:00Z"
T3 = "2024-01-03T00:00:00+0000"


def us(moment: str) -> int:
    return parse_export(snapshot(("s", "realized", moment))).segments[0].qualified_at_us


def snapshot(*segments: tuple[str, str, str], namespace: str = "ups") -> bytes:
    audiences: dict[str, Any] = {}
    for segment_id, status, moment in segments:
        audiences[segment_id] = {"status": status, "lastQualificationTime": moment}
    return orjson.dumps({"identityMap": {"ecid": [{"id": "e1"}]}, "segmentMembership": {namespace: audiences}})


def export(*segments: tuple[str, str, str]) -> ProfileExport:
    return parse_export(snapshot(*segments))


def stored(segment_id: str, status: SegmentStatus, moment: str) -> dict[tuple[str, str], StoredMembership]:
    return {("ups", segment_id): StoredMembership(status, us(moment))}


def changes(diff: Any) -> list[tuple[str, ChangeType]]:
    return [(entry.segment_id, change) for entry, change in diff.transitions]


def test_first_sighting_member_enters() -> None:
    for status in ("realized", "existing"):
        diff = diff_membership({}, export(("s", status, T1)))
        assert changes(diff) == [("s", ENTER)]
        assert diff.updates == {("ups", "s"): StoredMembership(SegmentStatus(status), us(T1))}


def test_first_sighting_exited_exits() -> None:
    diff = diff_membership({}, export(("s", "exited", T1)))
    assert changes(diff) == [("s", EXIT)]
    assert diff.updates == {("ups", "s"): StoredMembership(EXITED, us(T1))}


def test_member_to_exited_exits() -> None:
    for old in (REALIZED, EXISTING):
        diff = diff_membership(stored("s", old, T1), export(("s", "exited", T2)))
        assert changes(diff) == [("s", EXIT)]
        assert diff.updates == {("ups", "s"): StoredMembership(EXITED, us(T2))}


def test_exited_to_realized_later_enters() -> None:
    diff = diff_membership(stored("s", EXITED, T1), export(("s", "realized", T2)))
    assert changes(diff) == [("s", ENTER)]
    assert diff.updates[("ups", "s")] == StoredMembership(REALIZED, us(T2))


def test_exited_to_exited_later_is_no_change_but_updates() -> None:
    diff = diff_membership(stored("s", EXITED, T1), export(("s", "exited", T2)))
    assert changes(diff) == []
    assert diff.updates[("ups", "s")] == StoredMembership(EXITED, us(T2))


def test_member_to_member_later_is_nothing() -> None:
    diff = diff_membership(stored("s", REALIZED, T1), export(("s", "realized", T2)))
    assert changes(diff) == []
    assert diff.stale == diff.duplicate == 0
    assert diff.updates[("ups", "s")] == StoredMembership(REALIZED, us(T2))  # time moves on


def test_existing_is_member_existing_to_realized_later_is_no_change() -> None:
    diff = diff_membership(stored("s", EXISTING, T1), export(("s", "realized", T2)))
    assert changes(diff) == []
    diff = diff_membership(stored("s", REALIZED, T1), export(("s", "existing", T2)))
    assert changes(diff) == []
    assert EXISTING.is_member and StoredMembership(EXISTING, 0).is_member


def test_stale_is_counted_and_ignored() -> None:
    diff = diff_membership(stored("s", REALIZED, T2), export(("s", "exited", T1)))
    assert changes(diff) == [] and diff.updates == {}
    assert diff.stale == 1 and diff.duplicate == 0


def test_stale_same_status_is_stale_not_duplicate() -> None:
    diff = diff_membership(stored("s", EXITED, T3), export(("s", "exited", T2)))
    assert (diff.stale, diff.duplicate, diff.updates, changes(diff)) == (1, 0, {}, [])


def test_duplicate_is_counted_and_ignored() -> None:
    diff = diff_membership(stored("s", REALIZED, T1), export(("s", "realized", T1)))
    assert changes(diff) == [] and diff.updates == {}
    assert diff.duplicate == 1 and diff.stale == 0


def test_duplicate_across_time_forms() -> None:
    # The same instant written as Z and as +0000 is a duplicate.
    diff = diff_membership(stored("s", REALIZED, "2024-01-03T00:00:00Z"), export(("s", "realized", T3)))
    assert diff.duplicate == 1


def test_same_time_different_status_counts_as_newer() -> None:
    diff = diff_membership(stored("s", REALIZED, T1), export(("s", "exited", T1)))
    assert changes(diff) == [("s", EXIT)]
    assert diff.updates[("ups", "s")] == StoredMembership(EXITED, us(T1))
    diff = diff_membership(stored("s", EXITED, T1), export(("s", "realized", T1)))
    assert changes(diff) == [("s", ENTER)]
    assert diff.stale == diff.duplicate == 0


def test_same_time_existing_vs_realized_updates_without_change() -> None:
    diff = diff_membership(stored("s", EXISTING, T1), export(("s", "realized", T1)))
    assert changes(diff) == []
    assert diff.updates[("ups", "s")] == StoredMembership(REALIZED, us(T1))


def test_transitions_keep_record_segment_order() -> None:
    order = ["z", "a", "m", "b", "y"]
    segs = [(s, "realized" if i % 2 else "exited", T1) for i, s in enumerate(order)]
    diff = diff_membership({}, export(*segs))
    assert [s for s, _ in changes(diff)] == order
    assert [c for _, c in changes(diff)] == [EXIT, ENTER, EXIT, ENTER, EXIT]


def test_transitions_keep_order_across_namespaces_and_skip_non_changes() -> None:
    raw = orjson.dumps({"identityMap": {"ecid": [{"id": "e1"}]}, "segmentMembership": {
        "ups": {"q": {"status": "realized", "lastQualificationTime": T2}, "p": {"status": "realized", "lastQualificationTime": T2}},
        "aep": {"q": {"status": "exited", "lastQualificationTime": T2}},
    }})
    state = {("ups", "p"): StoredMembership(REALIZED, us(T1))}  # p: member -> member, no change
    diff = diff_membership(state, parse_export(raw))
    assert [(entry.namespace, entry.segment_id, change) for entry, change in diff.transitions] == [
        ("ups", "q", ENTER), ("aep", "q", EXIT),
    ]


def test_segment_filter_counts_filtered() -> None:
    diff = diff_membership({}, export(("a", "realized", T1), ("b", "exited", T1), ("c", "realized", T1)), segment_filter={"b"})
    assert changes(diff) == [("b", EXIT)]
    assert diff.filtered == 2
    assert set(diff.updates) == {("ups", "b")}


def test_mixed_record_counts_each_outcome() -> None:
    state = {
        **stored("stale", REALIZED, T3),
        **stored("dup", EXITED, T2),
        **stored("same", REALIZED, T1),
        **stored("leave", EXISTING, T1),
    }
    diff = diff_membership(state, export(
        ("stale", "exited", T2), ("dup", "exited", T2), ("same", "existing", T2), ("leave", "exited", T2), ("new", "realized", T1),
    ))
    assert changes(diff) == [("leave", EXIT), ("new", ENTER)]
    assert (diff.stale, diff.duplicate, diff.filtered) == (1, 1, 0)
    assert set(diff.updates) == {("ups", "same"), ("ups", "leave"), ("ups", "new")}


def test_supersedes() -> None:
    a = StoredMembership(REALIZED, 10)
    assert supersedes(a, None)
    assert supersedes(StoredMembership(REALIZED, 11), a)
    assert not supersedes(StoredMembership(EXITED, 9), a)
    assert not supersedes(StoredMembership(REALIZED, 10), a)
    assert supersedes(StoredMembership(EXITED, 10), a)
    assert supersedes(StoredMembership(EXISTING, 10), a)
