"""Identity linking (identity.mode = "link") through the public CLI, on every store: memory, sqlite,
DynamoDB (dynalite) and redis (redis-server), the servers started by the session fixtures."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from redis import Redis

from segment_relay import Handler, SegmentChange, on_enter, on_exit, on_merge
from segment_relay.consumer.identity import IdentityResolver, aliases_of
from segment_relay.consumer.state import MemoryStore
from segment_relay.model import IdentityItem
from segment_relay.testing.exports import Change, Merge, StreamSpec, expected_changes, generate, iso_utc
from segment_relay.testing.pipeline import run_exports

CLI = [sys.executable, "-m", "segment_relay.cli"]
REDIS_DB = 12  # this module's own database on the session's redis-server: emptied per test


def export(identities: dict[str, list[dict[str, object]]], at: str, **segments: str) -> bytes:
    audiences = {segment: {"status": status, "lastQualificationTime": at} for segment, status in segments.items()}
    return orjson.dumps({"identityMap": identities, "segmentMembership": {"ups": audiences}})


def run(tmp_path: Path, lines: list[bytes], state: str, mode: str = "link") -> list[dict[str, object]]:
    """A relay run over ``lines`` (file source, jsonl handler): the changes it handed over."""
    exports = tmp_path / f"exports-{len(list(tmp_path.iterdir()))}.jsonl"
    exports.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "changes.jsonl"
    out.unlink(missing_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    environment["SEGMENT_RELAY_IDENTITY__MODE"] = mode
    result = subprocess.run(
        [*CLI, "run", "--source", f"file:{exports}", "--state", state, "--handler", f"jsonl:{out}",
         "--dead-letter", str(tmp_path / "dead.jsonl")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


@pytest.fixture(params=["memory", "sqlite", "dynamodb", "redis"])
def state(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "memory":
        yield "memory"
    elif request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'state.db'}"
    elif request.param == "dynamodb":
        dynalite = request.getfixturevalue("dynalite")
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynalite.endpoint)  # the relay's subprocesses inherit it
        yield f"dynamodb:identity-{uuid.uuid4().hex[:12]}"
    else:
        redis_server = request.getfixturevalue("redis_server")
        spec = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
        with Redis.from_url(spec) as client:
            client.flushdb()
        yield spec


ECID = {"ECID": [{"id": "visitor-1"}]}
LOGGED_IN = {"ECID": [{"id": "visitor-1"}], "Email": [{"id": "ann@example.com", "primary": True}]}


def login_stream() -> list[bytes]:
    return [
        export(ECID, "2026-01-01T00:00:00Z", gold="realized", silver="realized"),
        # the visitor logs in: the email now ranks first (primary)
        export(LOGGED_IN, "2026-01-02T00:00:00Z", gold="realized", silver="realized"),
        export(LOGGED_IN, "2026-01-03T00:00:00Z", gold="realized", silver="exited"),
    ]


def summary(changes: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(c["change"], c.get("segment_id"), c["profile_key"]) for c in changes]


def test_a_visitor_who_logs_in_keeps_their_history(tmp_path: Path, state: str) -> None:
    changes = run(tmp_path, login_stream(), state)
    assert summary(changes) == [
        ("enter", "gold", "ecid:visitor-1"), ("enter", "silver", "ecid:visitor-1"),
        ("exit", "silver", "ecid:visitor-1"),
    ]
    if state != "memory":  # the state tool finds the profile through the identity it gained
        shown = subprocess.run([*CLI, "state", "show", "email:ann@example.com", "--state", state],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        profile = json.loads(shown.stdout)
        assert profile["profile_key"] == "ecid:visitor-1"
        assert profile["aliases"] == ["ecid:visitor-1", "email:ann@example.com"]
        assert profile["member_of"] == ["gold"]


def test_key_mode_keeps_todays_behaviour(tmp_path: Path) -> None:
    # The key follows the top-ranked identity: the login starts a new history (a second enter).
    changes = run(tmp_path, login_stream(), "memory", mode="key")
    assert summary(changes) == [
        ("enter", "gold", "ecid:visitor-1"), ("enter", "silver", "ecid:visitor-1"),
        ("enter", "gold", "email:ann@example.com"), ("enter", "silver", "email:ann@example.com"),
        ("exit", "silver", "email:ann@example.com"),
    ]


def merge_stream(order: str) -> list[bytes]:
    phone = export({"Phone": [{"id": "555"}]}, "2026-01-01T00:00:00Z", gold="realized", bronze="realized")
    cookie = export({"ECID": [{"id": "cookie-9"}]}, "2026-01-02T00:00:00Z", silver="realized", bronze="exited")
    both = export({"ECID": [{"id": "cookie-9"}], "Phone": [{"id": "555"}]}, "2026-01-03T00:00:00Z",
                  gold="realized", silver="realized")
    return [phone, cookie, both] if order == "phone-first" else [cookie, phone, both]


@pytest.mark.parametrize("order", ["phone-first", "cookie-first"])
def test_two_profiles_adobe_merges_become_one(tmp_path: Path, state: str, order: str) -> None:
    later = export({"Phone": [{"id": "555"}]}, "2026-01-04T00:00:00Z",
                   gold="realized", silver="realized", bronze="realized")
    *separate, both = merge_stream(order)
    before = run(tmp_path, separate, state)
    assert {c["profile_key"] for c in before} == {"phone:555", "ecid:cookie-9"}
    if state == "memory":  # one run: the two profiles and the export that joins them in one batch
        changes = run(tmp_path, [*separate, both, later], state)
        # The same as two runs: the records before the merge are diffed under their own profiles.
        assert sorted(summary(changes[:len(before)])) == sorted(summary(before))
        changes = changes[len(before):]
    else:  # the two profiles are stored, then an export joins them
        changes = run(tmp_path, [both, later], state)
    merges = [c for c in changes if c["change"] == "merge"]
    assert len(merges) == 1
    assert (merges[0]["profile_key"], merges[0]["merged_keys"]) == ("ecid:cookie-9", ["phone:555"])
    # The joining export fires nothing (gold and silver were known members); bronze is the
    # newer of the two (exited on 01-02), so the later export through the phone alone enters
    # it, under the surviving key.
    assert summary(changes) == [("merge", None, "ecid:cookie-9"), ("enter", "bronze", "ecid:cookie-9")]


def test_the_merged_result_is_the_same_in_both_arrival_orders(tmp_path: Path) -> None:
    seen = []
    for order in ("phone-first", "cookie-first"):
        path = tmp_path / order
        path.mkdir()
        run(path, merge_stream(order), f"sqlite:{path / 'state.db'}")
        shown = subprocess.run([*CLI, "state", "show", "phone:555", "--state", f"sqlite:{path / 'state.db'}",
                                ], capture_output=True, text=True, timeout=60, cwd=path)
        assert shown.returncode == 0, shown.stderr
        seen.append(json.loads(shown.stdout))
    assert seen[0] == seen[1]
    assert seen[0]["profile_key"] == "ecid:cookie-9"


def batching_stream() -> list[bytes]:
    """Profiles that Adobe merges, with records of each side before and after the merge, a merge
    of a merged profile into a third (a chain), and a bystander, interleaved."""
    a, b, c = {"Phone": [{"id": "1"}]}, {"ECID": [{"id": "2"}]}, {"Email": [{"id": "0"}]}
    bystander = {"ECID": [{"id": "9"}]}
    return [
        export(a, "2026-01-01T00:00:00Z", gold="realized"),
        export(b, "2026-01-01T01:00:00Z", silver="realized", gold="exited"),
        export(bystander, "2026-01-01T02:00:00Z", gold="realized"),
        export(b, "2026-01-02T00:00:00Z", silver="realized", bronze="realized"),
        export({**a, **b}, "2026-01-03T00:00:00Z", gold="realized", silver="realized"),  # a and b: one person
        export(b, "2026-01-04T00:00:00Z", silver="exited", bronze="realized"),
        export(c, "2026-01-04T01:00:00Z", platinum="realized"),
        export(a, "2026-01-05T00:00:00Z", gold="realized", bronze="realized"),
        export({**c, **a}, "2026-01-06T00:00:00Z", gold="realized", platinum="realized"),  # ... and c
        export(b, "2026-01-07T00:00:00Z", gold="exited", bronze="realized"),
        export(bystander, "2026-01-07T01:00:00Z", gold="exited"),
    ]


class Recorder(Handler):
    """Every change, merges included, in the order handled."""

    def __init__(self) -> None:
        self.changes: list[SegmentChange] = []

    @property
    def seen(self) -> list[tuple[object, ...]]:
        return [(c.change.value, c.segment_id or None, c.profile_key, c.merged_keys) for c in self.changes]

    def _record(self, change: SegmentChange) -> None:
        self.changes.append(change)

    @on_enter()
    async def entered(self, change: SegmentChange) -> None:
        self._record(change)

    @on_exit()
    async def exited(self, change: SegmentChange) -> None:
        self._record(change)

    @on_merge()
    async def merged(self, change: SegmentChange) -> None:
        self._record(change)


async def changes_of(records: list[bytes], batch_size: int) -> dict[object, list[tuple[object, ...]]]:
    """Each profile's changes in order (profiles interleave as their steps finish)."""
    recorder = Recorder()
    await run_exports(records, [recorder], store=MemoryStore(), link_namespaces=["*"], batch_size=batch_size)
    by_profile: dict[object, list[tuple[object, ...]]] = {}
    for kind, segment, key, merged in recorder.seen:
        by_profile.setdefault(key, []).append((kind, segment, *merged))
    return by_profile


@pytest.mark.parametrize("batch_size", [2, 3, 500])
async def test_the_changes_do_not_depend_on_how_the_records_are_batched(batch_size: int) -> None:
    one_at_a_time = await changes_of(batching_stream(), 1)
    assert await changes_of(batching_stream(), batch_size) == one_at_a_time
    # Before a merge each side fires under its own key. At the first merge gold is b's "exited"
    # (newer than a's "realized"), so the joining export's gold enters it; each merge is announced once.
    assert one_at_a_time == {
        "phone:1": [("enter", "gold")],
        "email:0": [("enter", "platinum")],
        "ecid:9": [("enter", "gold"), ("exit", "gold")],
        "ecid:2": [("enter", "silver"), ("exit", "gold"), ("enter", "bronze"),
                   ("merge", None, "phone:1"), ("enter", "gold"), ("exit", "silver"),
                   ("merge", None, "email:0"), ("exit", "gold")],
    }


async def test_two_resolvers_racing_on_one_store_agree_on_one_profile() -> None:
    # Two replicas' resolvers, one store: each sees a different export of one new person, and
    # both look the aliases up before either claims (the race); the claims settle it.
    store = MemoryStore()
    first, second = IdentityResolver(store), IdentityResolver(store)
    a = {"ECID": [IdentityItem("v")]}
    b = {"ECID": [IdentityItem("v")], "Email": [IdentityItem("e", primary=True)]}
    original = store.find_profiles
    looked: list[int] = []

    async def slow_find(aliases):  # type: ignore[no-untyped-def]
        found = await original(aliases)
        looked.append(1)
        while len(looked) < 2:  # both lookups happen before any claim
            await asyncio.sleep(0)
        return found

    store.find_profiles = slow_find  # type: ignore[method-assign]
    one, two = await asyncio.gather(first.resolve([(a, "ecid:v")]), second.resolve([(b, "email:e")]))
    assert one.keys == two.keys
    assert await store.find_profiles(["ecid:v", "email:e"]) == {"ecid:v": one.keys[0], "email:e": one.keys[0]}


def test_aliases_are_lower_case_namespaces_and_only_linking_ones() -> None:
    identities = {"ECID": [IdentityItem("A")], "Household": [IdentityItem("h1")]}
    assert aliases_of(identities, None) == ["ecid:A", "household:h1"]
    assert aliases_of(identities, frozenset({"ecid"})) == ["ecid:A"]





class Crm(Handler):
    """A user's handler: welcomes members of gold, and merges contacts when profiles merge."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []

    @on_enter("gold")
    async def welcome(self, change: SegmentChange) -> None:
        self.calls.append(("welcome", change.profile_key, ()))

    @on_merge()
    async def merged(self, change: SegmentChange) -> None:
        self.calls.append(("merge", change.profile_key, change.merged_keys))


async def test_handlers_that_ask_for_merges_get_them_and_others_do_not() -> None:
    store = MemoryStore()
    crm, plain = Crm(), []

    async def everything(change: SegmentChange) -> None:
        plain.append(change.change.value)

    await run_exports(merge_stream("phone-first")[:2], [crm, everything], store=store, link_namespaces=["*"])
    await run_exports(merge_stream("phone-first")[2:], [crm, everything], store=store, link_namespaces=["*"])
    assert crm.calls == [("welcome", "phone:555", ()), ("merge", "ecid:cookie-9", ("phone:555",))]
    assert "merge" not in plain
    # The merge was saved: the survivor holds both profiles' memberships, the absorbed key is gone.
    assert set(await store.load("ecid:cookie-9")) == {("ups", "gold"), ("ups", "silver"), ("ups", "bronze")}
    assert await store.load("phone:555") == {}
    assert await store.aliases_of("ecid:cookie-9") == ["ecid:cookie-9", "phone:555"]


STITCHED = StreamSpec(seed=29, profiles=300, records=4000, login_rate=0.05, merge_rate=0.25)


def as_truth(changes: list[SegmentChange]) -> tuple[Counter[Change], list[Merge]]:
    memberships: Counter[Change] = Counter()
    merges: list[Merge] = []
    for c in changes:
        if c.change.value == "merge":
            merges.append((c.profile_key, c.merged_keys, iso_utc(c.qualified_at)))
        else:
            memberships[(c.profile_key, c.segment_id, c.change.value, iso_utc(c.qualified_at))] += 1
    return memberships, merges


@pytest.mark.parametrize("batch_size", [1, 500])
async def test_a_stream_with_logins_and_merges_matches_the_reference_model(batch_size: int) -> None:
    records = list(generate(STITCHED))
    truth = expected_changes(records, link_namespaces=["*"])
    assert len(truth.merges) >= 10 and truth.profiles < STITCHED.profiles  # the stream does stitch
    recorder = Recorder()
    await run_exports(records, [recorder], store=MemoryStore(), link_namespaces=["*"], batch_size=batch_size)
    memberships, merges = as_truth(recorder.changes)
    assert memberships == Counter(truth.changes)
    assert sorted(merges) == sorted(truth.merges)


async def test_in_key_mode_the_same_stream_fires_what_the_key_rule_implies() -> None:
    records = list(generate(STITCHED))
    key_truth, link_truth = expected_changes(records), expected_changes(records, link_namespaces=["*"])
    assert key_truth.enters > link_truth.enters  # a login re-enters every segment the person is in
    recorder = Recorder()
    await run_exports(records, [recorder], store=MemoryStore())
    assert as_truth(recorder.changes) == (Counter(key_truth.changes), [])


def test_every_store_matches_the_reference_model_on_a_stitched_stream(tmp_path: Path, state: str) -> None:
    records = list(generate(StreamSpec(seed=31, profiles=200, records=2000, login_rate=0.05, merge_rate=0.25)))
    truth = expected_changes(records, link_namespaces=["*"])
    changes = run(tmp_path, records, state)
    merges = [(c["profile_key"], tuple(c["merged_keys"]), c["qualified_at"]) for c in changes if c["change"] == "merge"]
    memberships = Counter((c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])
                          for c in changes if c["change"] != "merge")
    assert memberships == Counter(truth.changes)
    assert sorted(merges) == sorted(truth.merges) and merges
