"""The export payload model: samples, rejection reasons, and a fuzz property."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segment_relay.consumer.export import (
    InvalidReason,
    InvalidRecord,
    ProfileExport,
    SegmentStatus,
    _fast_export,
    export_from_document,
    parse_export,
    qualification_time,
    to_epoch_us,
)

# The two documented payloads (copied verbatim from /work/shared/samples so the suite runs
# on a clean clone; test_samples_match_shared_copies checks they have not drifted).
SAMPLE_2020 = b"""{
  "person": {
    "email": "yourstruly@adobe.con"
  },
  "segmentMembership": {
    "ups": {
      "72ddd79b-6b0a-4e97-a8d2-112ccd81bd02": {
        "lastQualificationTime": "2020-03-03T21:24:39Z",
        "status": "exited"
      },
      "7841ba61-23c1-4bb3-a495-00d695fe1e93": {
        "lastQualificationTime": "2020-03-04T23:37:33Z",
        "status": "existing"
      }
    }
  },
  "identityMap": {
    "ecid": [
      {"id": "14575006536349286404619648085736425115"},
      {"id": "66478888669296734530114754794777368480"}
    ],
    "email_lc_sha256": [
      {"id": "655332b5fa2aea4498bf7a290cff017cb4"},
      {"id": "66baf76ef9de8b42df8903f00e0e3dc0b7"}
    ]
  }
}
"""

SAMPLE_CURRENT = b"""{
  "person": {"name": {"firstName": "John", "lastName": "Doe"}, "birthDate": "1980-04-12"},
  "personalEmail": {"address": "john.doe@acme.com"},
  "segmentMembership": {
    "ups": {
      "7841ba61-23c1-4bb3-a495-00d3g5fe1e93": {
        "lastQualificationTime": "2022-01-11T21:24:39+0000",
        "status": "realized",
        "createdAt": 1648553325000,
        "updatedAt": 1648553330000,
        "mappingCreatedAt": 1649856570000,
        "mappingUpdatedAt": 1649856570000,
        "name": "First name equals John"
      },
      "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae": {
        "lastQualificationTime": "2022-01-11T21:24:39Z",
        "status": "exited"
      }
    }
  },
  "identityMap": {
    "ecid": [{"id": "14575006536349286404619648085736425115"}],
    "email_lc_sha256": [{"id": "655332b5fa2aea4498bf7a290cff017cb4", "primary": true, "authenticatedState": "authenticated"}]
  }
}
"""

SHARED_SAMPLES = Path("/work/shared/samples")
GOOD_IDENTITY = {"ecid": [{"id": "e1"}]}
T0 = "2024-05-01T10:00:00Z"


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"identityMap": copy.deepcopy(GOOD_IDENTITY)}
    base.update(overrides)
    return base


def membership(**audiences: dict[str, Any]) -> dict[str, Any]:
    return {"ups": audiences}


def reject(raw: bytes | str | Any) -> InvalidRecord:
    if not isinstance(raw, (bytes, str)):
        raw = orjson.dumps(raw)
    with pytest.raises(InvalidRecord) as caught:
        parse_export(raw)
    return caught.value


# --- the documented samples -------------------------------------------------------------


@pytest.mark.skipif(not SHARED_SAMPLES.is_dir(), reason="shared samples not present")
@pytest.mark.parametrize(
    ("name", "embedded"),
    [("export-2020-doc.json", SAMPLE_2020), ("export-current-doc.json", SAMPLE_CURRENT)],
)
def test_samples_match_shared_copies(name: str, embedded: bytes) -> None:
    assert orjson.loads((SHARED_SAMPLES / name).read_bytes()) == orjson.loads(embedded)


def test_sample_2020_parses() -> None:
    export = parse_export(SAMPLE_2020)
    assert [(s.namespace, s.segment_id, s.status) for s in export.segments] == [
        ("ups", "72ddd79b-6b0a-4e97-a8d2-112ccd81bd02", SegmentStatus.EXITED),
        ("ups", "7841ba61-23c1-4bb3-a495-00d695fe1e93", SegmentStatus.EXISTING),
    ]
    assert SegmentStatus.EXISTING.is_member and not SegmentStatus.EXITED.is_member
    assert export.segments[0].qualified_at == datetime(2020, 3, 3, 21, 24, 39, tzinfo=UTC)
    assert export.segments[1].qualified_at == datetime(2020, 3, 4, 23, 37, 33, tzinfo=UTC)
    assert all(s.name is None for s in export.segments)
    assert set(export.identity_map) == {"ecid", "email_lc_sha256"}
    assert [i.id for i in export.identity_map["ecid"]] == [
        "14575006536349286404619648085736425115",
        "66478888669296734530114754794777368480",
    ]
    assert all(not i.primary and i.authenticatedState is None for items in export.identity_map.values() for i in items)
    assert export.attributes == {"person": {"email": "yourstruly@adobe.con"}}


def test_sample_current_parses() -> None:
    export = parse_export(SAMPLE_CURRENT)
    realized, exited = export.segments
    # Segment ids are opaque strings: "00d3g5fe1e93" and "59bd2fkd" are not hex, so not UUIDs.
    assert realized.segment_id == "7841ba61-23c1-4bb3-a495-00d3g5fe1e93"
    assert exited.segment_id == "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae"
    assert type(realized.segment_id) is str and type(exited.segment_id) is str
    assert realized.status is SegmentStatus.REALIZED and exited.status is SegmentStatus.EXITED
    # "+0000" and "Z" name the same instant.
    assert realized.qualified_at == exited.qualified_at == datetime(2022, 1, 11, 21, 24, 39, tzinfo=UTC)
    assert realized.qualified_at_us == exited.qualified_at_us == 1641936279000000
    assert realized.name == "First name equals John"
    assert exited.name is None
    # Unknown top-level attributes are kept untouched for handlers.
    assert export.attributes == {
        "person": {"name": {"firstName": "John", "lastName": "Doe"}, "birthDate": "1980-04-12"},
        "personalEmail": {"address": "john.doe@acme.com"},
    }
    (email,) = export.identity_map["email_lc_sha256"]
    assert email.primary is True and email.authenticatedState == "authenticated"
    (ecid,) = export.identity_map["ecid"]
    assert ecid.primary is False and ecid.authenticatedState is None


def test_created_at_fields_are_accepted() -> None:
    # createdAt/updatedAt/mapping*At are present in the current sample; they must not break parsing.
    parsed = orjson.loads(SAMPLE_CURRENT)
    assert parsed["segmentMembership"]["ups"]["7841ba61-23c1-4bb3-a495-00d3g5fe1e93"]["createdAt"] == 1648553325000
    assert len(parse_export(SAMPLE_CURRENT).segments) == 2


def test_str_input_is_accepted() -> None:
    assert parse_export(SAMPLE_CURRENT.decode()) == parse_export(SAMPLE_CURRENT)


@pytest.mark.parametrize(
    "moment",
    ["2022-01-11T21:24:39Z", "2022-01-11T21:24:39+0000", "2022-01-11T21:24:39+00:00", "2022-01-11T22:24:39+0100",
     "2022-01-11T16:24:39-0500"],
)
def test_time_forms_name_the_same_instant(moment: str) -> None:
    export = parse_export(orjson.dumps(doc(segmentMembership=membership(s={"status": "realized", "lastQualificationTime": moment}))))
    (entry,) = export.segments
    assert entry.qualified_at.tzinfo is not None
    assert entry.qualified_at == datetime(2022, 1, 11, 21, 24, 39, tzinfo=UTC)
    assert entry.qualified_at_us == 1641936279000000 == to_epoch_us(entry.qualified_at)


def test_any_namespace_under_segment_membership() -> None:
    export = parse_export(orjson.dumps(doc(segmentMembership={
        "ups": {"a": {"status": "realized", "lastQualificationTime": T0}},
        "aep": {"b": {"status": "exited", "lastQualificationTime": T0}},
        "customNs": {"c": {"status": "existing", "lastQualificationTime": T0}, "a": {"status": "exited", "lastQualificationTime": T0}},
    })))
    assert [(s.namespace, s.segment_id, s.status.value) for s in export.segments] == [
        ("ups", "a", "realized"),
        ("aep", "b", "exited"),
        ("customNs", "c", "existing"),
        ("customNs", "a", "exited"),
    ]


def test_no_segment_membership_is_an_empty_snapshot() -> None:
    export = parse_export(orjson.dumps(doc(person={"x": 1})))
    assert export.segments == ()
    assert export.attributes == {"person": {"x": 1}}


# --- rejections --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"identityMap": }', b"\xff\xfe{}", b"{}{}"])
def test_not_json(raw: bytes) -> None:
    invalid = reject(raw)
    assert invalid.reason is InvalidReason.NOT_JSON
    assert invalid.detail.startswith("not valid JSON: ")
    assert str(invalid).startswith("not_json: not valid JSON")


@pytest.mark.parametrize(
    ("raw", "type_name"),
    [(b"[]", "list"), (b'[{"identityMap": {}}]', "list"), (b'"a string"', "str"), (b"42", "int"), (b"4.5", "float"),
     (b"null", "NoneType"), (b"true", "bool")],
)
def test_not_an_object(raw: bytes, type_name: str) -> None:
    invalid = reject(raw)
    assert invalid.reason is InvalidReason.NOT_OBJECT
    assert invalid.detail == f"expected a JSON object, got {type_name}"


NO_USABLE = "identityMap has no identity with a non-empty string id"


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"segmentMembership": {}}, id="missing-identityMap"),
        pytest.param({"identityMap": {}}, id="empty-identityMap"),
        pytest.param({"identityMap": {"ecid": []}}, id="empty-namespace"),
        pytest.param({"identityMap": {"ecid": [{"primary": True}]}}, id="item-without-id"),
        pytest.param({"identityMap": {"ecid": [{"id": ""}]}}, id="empty-id"),
        pytest.param({"identityMap": {"ecid": [{"id": 12345}]}}, id="non-string-id"),
        pytest.param({"identityMap": {"ecid": [{"id": None}], "email": "x"}}, id="null-id-and-non-list"),
        pytest.param({"identityMap": {"ecid": ["e1"]}}, id="item-not-an-object"),
    ],
)
def test_no_usable_identity(document: dict[str, Any]) -> None:
    invalid = reject(document)
    assert invalid.reason is InvalidReason.NO_IDENTITY
    assert invalid.detail == NO_USABLE


@pytest.mark.parametrize("identity_map", [[], "ecid", 7, None])
def test_identity_map_of_wrong_type(identity_map: Any) -> None:
    invalid = reject({"identityMap": identity_map})
    assert invalid.reason is InvalidReason.NO_IDENTITY
    assert invalid.detail.startswith("identityMap: ")


def test_unknown_status() -> None:
    invalid = reject(doc(segmentMembership=membership(s1={"status": "qualified", "lastQualificationTime": T0})))
    assert invalid.reason is InvalidReason.UNKNOWN_STATUS
    assert invalid.detail == "segmentMembership.ups.s1.status: 'qualified' is not one of realized, existing, exited"


def test_missing_status() -> None:
    invalid = reject(doc(segmentMembership=membership(s1={"lastQualificationTime": T0})))
    assert invalid.reason is InvalidReason.UNKNOWN_STATUS
    assert invalid.detail == "segmentMembership.ups.s1.status: missing"


def test_missing_last_qualification_time() -> None:
    invalid = reject(doc(segmentMembership={"aep": {"seg-9": {"status": "realized"}}}))
    assert invalid.reason is InvalidReason.BAD_QUALIFICATION_TIME
    assert invalid.detail == "segmentMembership.aep.seg-9.lastQualificationTime: missing"


@pytest.mark.parametrize("moment", ["yesterday", "2022-13-45T99:99:99Z", "", "21:24:39"])
def test_unparseable_last_qualification_time(moment: str) -> None:
    invalid = reject(doc(segmentMembership=membership(s1={"status": "exited", "lastQualificationTime": moment})))
    assert invalid.reason is InvalidReason.BAD_QUALIFICATION_TIME
    assert invalid.detail == f"segmentMembership.ups.s1.lastQualificationTime: cannot parse {moment!r} as an ISO-8601 time"


def test_bad_shape_names_the_path() -> None:
    invalid = reject(doc(segmentMembership={"ups": ["not", "a", "map"]}))
    assert invalid.reason is InvalidReason.BAD_SHAPE
    assert invalid.detail.startswith("segmentMembership.ups: ")


def test_one_bad_segment_rejects_the_record_and_names_it() -> None:
    invalid = reject(doc(segmentMembership=membership(
        good={"status": "realized", "lastQualificationTime": T0},
        bad={"status": "gone", "lastQualificationTime": T0},
    )))
    assert invalid.reason is InvalidReason.UNKNOWN_STATUS
    assert "segmentMembership.ups.bad.status" in invalid.detail


# --- identities ----------------------------------------------------------------------------


def test_identity_item_without_id_beside_a_good_one_is_dropped() -> None:
    export = parse_export(orjson.dumps({"identityMap": {
        "ecid": [{"primary": True}, {"id": "e1"}, {"id": ""}, {"id": 7}, "junk"],
        "email": [{"id": None}],
        "crm": "not a list",
    }}))
    assert {ns: [i.id for i in items] for ns, items in export.identity_map.items()} == {"ecid": ["e1"]}


# Regression (found by this suite, fixed in c0ffd30): an identity item with a usable id but a
# malformed optional field ("primary" not a boolean, "authenticatedState" not a string) used to
# make the whole record invalid (no_identity) although a good identity sat beside it.
@pytest.mark.parametrize(
    "bad_item",
    [{"id": "e2", "primary": "maybe"}, {"id": "e2", "authenticatedState": 5}],
    ids=["primary-not-bool", "authenticatedState-not-str"],
)
def test_malformed_identity_item_beside_a_good_one_is_not_fatal(bad_item: dict[str, Any]) -> None:
    raw = orjson.dumps({"identityMap": {"ecid": [{"id": "e1"}, bad_item]}})
    export = parse_export(raw)  # raised InvalidRecord(no_identity, "identityMap.ecid.1.primary: ...") before the fix
    assert [i.id for i in export.identity_map["ecid"]][0] == "e1"


# --- fuzz: nothing but InvalidRecord escapes -------------------------------------------------

json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

_KEY_NAMES = ["identityMap", "segmentMembership", "ups", "id", "primary", "authenticatedState", "status",
              "lastQualificationTime", "name", "createdAt", "ecid"]
_STATUS_LIKE = st.sampled_from(["realized", "existing", "exited", "REALIZED", "", "gone"])
_TIME_LIKE = st.sampled_from([
    "2022-01-11T21:24:39+0000", "2020-03-03T21:24:39Z", "2020-03-03", "0001-01-01T00:00:00+2359",
    "9999-12-31T23:59:59-2359", "2022-01-11T21:24:39", "x",
    # where msgspec's RFC 3339 parser (the fast path) and datetime.fromisoformat differ
    "2022-01-11t21:24:39z", "2022-01-11T21:24:39.1234567Z", "20220111T212439Z", "2022-01-11 21:24:39Z",
    "2022-01-11T21:24:60Z", "2022-01-11T21:24:39,5Z", "2022-01-11T21:24:39+05",
]) | st.integers() | st.floats(allow_nan=False)


def _paths(node: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every (key|index) path to a value inside node, the root excluded."""
    found: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append(trail + (key,))
            found.extend(_paths(value, trail + (key,)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append(trail + (index,))
            found.extend(_paths(value, trail + (index,)))
    return found


def _swap_type(value: Any) -> Any:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return {"value": value} if not value.isdigit() else int(value)
    return 0


@st.composite
def mutated_samples(draw: st.DrawFn) -> bytes | str:
    document = orjson.loads(draw(st.sampled_from([SAMPLE_2020, SAMPLE_CURRENT])))
    for _ in range(draw(st.integers(0, 4))):
        paths = _paths(document)
        op = draw(st.sampled_from(["delete", "replace", "swap", "rename", "status", "time"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = document
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(json_values)
        elif op == "swap":
            parent[last] = _swap_type(parent[last])
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_KEY_NAMES) | st.text(max_size=6))] = parent.pop(last)
        elif op == "status":
            parent[last] = draw(_STATUS_LIKE)
        elif op == "time":
            parent[last] = draw(_TIME_LIKE)
    raw = json.dumps(document).encode()
    damage = draw(st.sampled_from(["none", "none", "truncate", "splice", "str"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=8)) + raw[at + draw(st.integers(0, 8)):]
    elif damage == "str":
        return raw.decode()
    return raw


@st.composite
def shaped_documents(draw: st.DrawFn) -> bytes:
    """Roughly export-shaped documents whose every level may be wrong."""
    item = st.fixed_dictionaries({}, optional={
        "id": st.text(max_size=4) | json_values, "primary": st.booleans() | json_values,
        "authenticatedState": st.text(max_size=4) | json_values,
    })
    identity_map = st.dictionaries(st.text(max_size=5), st.lists(item, max_size=3) | json_values, max_size=3) | json_values
    audience = st.fixed_dictionaries({}, optional={
        "status": _STATUS_LIKE | json_values, "lastQualificationTime": _TIME_LIKE | json_values,
        "name": st.text(max_size=5) | json_values, "createdAt": st.integers() | json_values,
    })
    segment_membership = st.dictionaries(
        st.text(max_size=5), st.dictionaries(st.text(max_size=5), audience | json_values, max_size=3) | json_values, max_size=3
    ) | json_values
    document = draw(st.fixed_dictionaries({}, optional={
        "identityMap": identity_map, "segmentMembership": segment_membership, "person": json_values,
    }))
    return json.dumps(document).encode()


def _reference(raw: bytes | str) -> ProfileExport | InvalidRecord:
    """What the model path (orjson + pydantic) makes of ``raw``, alone."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return InvalidRecord(InvalidReason.NOT_JSON, "not JSON")
    try:
        return export_from_document(document)
    except InvalidRecord as invalid:
        return invalid


def _as_orjson_decodes(value: Any) -> Any:
    """orjson turns integers beyond 64 bits into floats; msgspec (the fast path) keeps them exact."""
    if isinstance(value, dict):
        return {key: _as_orjson_decodes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_orjson_decodes(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


def _check(raw: bytes | str) -> None:
    # The fast path may only accept what the model accepts, and must build the same export.
    fast = _fast_export(raw)
    reference = _reference(raw)
    if fast is not None:
        assert isinstance(reference, ProfileExport), f"the fast path accepted what the model refuses: {reference}"
        assert (fast.identity_map, fast.segments) == (reference.identity_map, reference.segments)
        assert _as_orjson_decodes(fast.attributes) == reference.attributes
    try:
        export = parse_export(raw)
    except InvalidRecord as invalid:
        assert isinstance(invalid.reason, InvalidReason)
        assert invalid.detail
        assert isinstance(reference, InvalidRecord) and invalid.reason is reference.reason
        return
    assert isinstance(reference, ProfileExport)
    assert (export.identity_map, export.segments) == (reference.identity_map, reference.segments)
    assert export.identity_map and all(items for items in export.identity_map.values())
    assert all(item.id for items in export.identity_map.values() for item in items)
    for entry in export.segments:
        assert isinstance(entry.segment_id, str)
        assert entry.qualified_at.tzinfo is not None and entry.qualified_at.utcoffset() is not None
        assert entry.qualified_at_us == to_epoch_us(entry.qualified_at)
        assert isinstance(entry.status, SegmentStatus)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(json_values)
def test_random_json_values_only_raise_invalid_record(value: Any) -> None:
    _check(json.dumps(value).encode())


@FUZZ
@given(st.dictionaries(st.sampled_from(_KEY_NAMES) | st.text(max_size=6), json_values, max_size=4))
def test_random_objects_only_raise_invalid_record(value: dict[str, Any]) -> None:
    _check(json.dumps(value).encode())


@FUZZ
@given(mutated_samples())
def test_mutated_samples_only_raise_invalid_record(raw: bytes | str) -> None:
    _check(raw)


@FUZZ
@given(shaped_documents())
def test_shaped_documents_only_raise_invalid_record(raw: bytes) -> None:
    _check(raw)


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=32))
def test_random_bytes_only_raise_invalid_record(raw: bytes | str) -> None:
    _check(raw)


@pytest.mark.parametrize("raw", [
    # msgspec checks the UTF-8 only of the strings it builds: bad bytes in a skipped attribute
    b'{"identityMap": {"ecid": [{"id": "e1"}]}, "person": {"name": "\xff"}}',
    b'{"identityMap": {"ecid": [{"id": "e1"}]}, "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",  # too deep to decode
    b'{"identityMap": {"ecid": [{"id": "e1"}]}, "x": "\\ud800"}',  # a lone surrogate
    b'{"identityMap": {"ecid": [{"id": "e1"}]}, "x": NaN}',
    b'{"identityMap": {"ecid": [{"id": "e1"}]}} trailing',
])
def test_what_orjson_refuses_is_not_json_on_the_fast_path_too(raw: bytes) -> None:
    assert _fast_export(raw) is None
    assert reject(raw).reason is InvalidReason.NOT_JSON


def test_attributes_are_decoded_only_when_asked_for_and_as_the_model_decodes_them() -> None:
    export = parse_export(SAMPLE_CURRENT)
    assert export.decoded_attributes is None  # not decoded yet: most records change nothing and never need them
    assert export.attributes == export_from_document(orjson.loads(SAMPLE_CURRENT)).attributes
    big = b'{"identityMap": {"ecid": [{"id": "e1"}]}, "n": 123456789012345678901234567890}'
    assert parse_export(big).attributes == {"n": 123456789012345678901234567890}  # exact, beyond 64 bits


def test_malformed_cosmetic_segment_fields_do_not_cost_the_record() -> None:
    raw = orjson.dumps({
        "identityMap": {"ecid": [{"id": "e1"}]},
        "segmentMembership": {"ups": {"s": {
            "status": "realized", "lastQualificationTime": "2024-01-01T00:00:00Z",
            "name": 42, "createdAt": "yesterday", "mappingUpdatedAt": None,
        }}},
    })
    (entry,) = parse_export(raw).segments
    assert entry.name is None and entry.status.is_member


def test_qualification_times_reach_handlers_in_utc() -> None:
    raw = orjson.dumps({
        "identityMap": {"ecid": [{"id": "e1"}]},
        "segmentMembership": {"ups": {
            "a": {"status": "realized", "lastQualificationTime": "2024-01-01T02:00:00+02:00"},
            "b": {"status": "realized", "lastQualificationTime": "2024-01-01T00:00:00+0000"},
            "c": {"status": "realized", "lastQualificationTime": "2024-01-01T00:00:00"},
        }},
    })
    a, b, c = parse_export(raw).segments
    assert a.qualified_at == b.qualified_at == c.qualified_at
    assert a.qualified_at_us == b.qualified_at_us == c.qualified_at_us
    assert all(entry.qualified_at.tzinfo is UTC for entry in (a, b, c))


@pytest.mark.parametrize(("text", "same_as"), [
    ("2024-01-01t00:00:00z", "2024-01-01T00:00:00Z"),  # RFC 3339 allows lower case
    ("2024-01-01T00:00:00.1234567Z", "2024-01-01T00:00:00.123457Z"),  # past microseconds: rounded
    ("20240101T000000Z", "2024-01-01T00:00:00Z"),  # ISO 8601's basic form: only the reference path reads it
])
def test_both_paths_read_a_time_the_same_way(text: str, same_as: str) -> None:
    def entry(time: str) -> Any:
        raw = orjson.dumps({"identityMap": {"ecid": [{"id": "e1"}]},
                            "segmentMembership": {"ups": {"s": {"status": "realized", "lastQualificationTime": time}}}})
        _check(raw)  # the fast path, if it takes the record, agrees with the model
        (segment,) = parse_export(raw).segments
        return segment

    assert (entry(text).qualified_at, entry(text).qualified_at_us) == (entry(same_as).qualified_at,
                                                                         entry(same_as).qualified_at_us)
    assert qualification_time(text) == qualification_time(same_as)


def test_oversized_keys_are_refused_up_front_not_by_a_store_later() -> None:
    # A store that cannot key on a value refuses it forever, so limits are checked at parse time.
    good = {"status": "realized", "lastQualificationTime": "2024-01-01T00:00:00Z"}
    too_long_segment = orjson.dumps({"identityMap": {"ecid": [{"id": "e1"}]},
                                     "segmentMembership": {"ups": {"s" * 257: good}}})
    with pytest.raises(InvalidRecord) as info:
        parse_export(too_long_segment)
    assert info.value.reason is InvalidReason.BAD_SHAPE
    long_id_beside_a_good_one = orjson.dumps({"identityMap": {"ecid": [{"id": "x" * 1025}, {"id": "e1"}]},
                                              "segmentMembership": {"ups": {"s": good}}})
    assert [item.id for item in parse_export(long_id_beside_a_good_one).identity_map["ecid"]] == ["e1"]


def test_without_strict_entries_only_the_malformed_audience_entries_are_dropped_and_named() -> None:
    good = {"status": "realized", "lastQualificationTime": "2024-01-01T00:00:00Z"}
    document = {
        "identityMap": {"ecid": [{"id": "p"}]},
        "segmentMembership": {
            "ups": {"good": good, "gone": {**good, "status": "gone"}, "untimed": {"status": "exited"},
                    "late": {**good, "lastQualificationTime": "yesterday"}, "x" * 300: good, "seven": 7},
            "other": 5,
            "": {"s": good},
        },
        "person": {"name": "Ada"},
    }
    raw = orjson.dumps(document)
    export = parse_export(raw, strict_entries=False)
    assert [entry.segment_id for entry in export.segments] == ["good"]
    assert export.attributes == {"person": {"name": "Ada"}}
    named = {entry.path: (entry.reason.value, entry.entry) for entry in export.invalid_entries}
    assert named == {
        "segmentMembership.ups.gone": ("unknown_status", {**good, "status": "gone"}),
        "segmentMembership.ups.untimed": ("bad_qualification_time", {"status": "exited"}),
        "segmentMembership.ups.late": ("bad_qualification_time", {**good, "lastQualificationTime": "yesterday"}),
        f"segmentMembership.ups.{'x' * 300}": ("bad_shape", good),
        "segmentMembership.ups.seven": ("bad_shape", 7),
        "segmentMembership.other": ("bad_shape", 5),
        "segmentMembership.": ("bad_shape", {"s": good}),
    }
    with pytest.raises(InvalidRecord) as strict:  # the default: one bad entry rejects the record
        parse_export(raw)
    assert strict.value.reason is InvalidReason.UNKNOWN_STATUS
    # A well-formed record takes the fast path either way, and names nothing.
    clean = orjson.dumps({**document, "segmentMembership": {"ups": {"good": good}}})
    assert parse_export(clean, strict_entries=False) == parse_export(clean)
    assert parse_export(clean, strict_entries=False).invalid_entries == ()
    # Record-level problems stay record-level.
    with pytest.raises(InvalidRecord) as no_identity:
        parse_export(orjson.dumps({**document, "identityMap": {}}), strict_entries=False)
    assert no_identity.value.reason is InvalidReason.NO_IDENTITY
    with pytest.raises(InvalidRecord) as shape:
        parse_export(orjson.dumps({**document, "segmentMembership": 5}), strict_entries=False)
    assert shape.value.reason is InvalidReason.BAD_SHAPE
