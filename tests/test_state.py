"""Membership stores: conditional saves, durability, open_store, two processes on one file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from segment_relay.consumer.export import SegmentStatus
from segment_relay.consumer.membership import StoredMembership
from segment_relay.consumer.state import (
    DynamoDBStore,
    MembershipStore,
    MemoryStore,
    RedisStore,
    SqliteStore,
    open_store,
)

REALIZED, EXISTING, EXITED = SegmentStatus.REALIZED, SegmentStatus.EXISTING, SegmentStatus.EXITED
K = ("ups", "seg-1")


def m(status: SegmentStatus, at: int) -> StoredMembership:
    return StoredMembership(status, at)


@pytest.fixture(params=["memory", "sqlite", "sqlite-links-with-state", "dynamodb", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MembershipStore]:
    """Every backend must pass the same cases (dynamodb against dynalite, redis against redis-server;
    sqlite both as replicas claiming profiles open it and as a lone replica does)."""
    opened: MembershipStore
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param.startswith("sqlite"):
        opened = SqliteStore(tmp_path / "state.db", links_with_state=request.param == "sqlite-links-with-state")
    elif request.param == "dynamodb":
        dynalite = request.getfixturevalue("dynalite")
        opened = DynamoDBStore(f"state-{uuid.uuid4().hex[:12]}", endpoint_url=dynalite.endpoint)
    else:  # one server for the session: a key prefix per test keeps the tests apart
        redis_server = request.getfixturevalue("redis_server")
        opened = RedisStore(redis_server.url, key_prefix=f"test-{uuid.uuid4().hex[:12]}:")
    await opened.open()
    yield opened
    await opened.close()


async def test_same_value_again_is_not_an_error(store: MembershipStore) -> None:
    await store.save("p", {K: m(REALIZED, 20)})
    await store.save("p", {K: m(REALIZED, 20)})  # dynamodb: ConditionalCheckFailed underneath, swallowed
    await store.flush()
    assert await store.load("p") == {K: m(REALIZED, 20)}


async def test_protocol(store: MembershipStore) -> None:
    assert isinstance(store, MembershipStore)


async def test_unknown_profile_loads_empty(store: MembershipStore) -> None:
    assert await store.load("nobody") == {}


@pytest.mark.parametrize("flush_between", [False, True])
async def test_older_never_overwrites_newer(store: MembershipStore, flush_between: bool) -> None:
    await store.save("p", {K: m(REALIZED, 20)})
    if flush_between:
        await store.flush()
    await store.save("p", {K: m(EXITED, 10)})
    await store.flush()
    assert await store.load("p") == {K: m(REALIZED, 20)}
    await store.save("p", {K: m(EXITED, 30)})
    if flush_between:
        await store.flush()
    assert await store.load("p") == {K: m(EXITED, 30)}


@pytest.mark.parametrize("flush_between", [False, True])
async def test_same_time_different_status_replaces(store: MembershipStore, flush_between: bool) -> None:
    await store.save("p", {K: m(REALIZED, 20)})
    if flush_between:
        await store.flush()
    await store.save("p", {K: m(EXITED, 20)})
    if flush_between:
        await store.flush()
    assert await store.load("p") == {K: m(EXITED, 20)}
    await store.save("p", {K: m(EXISTING, 20)})
    await store.flush()
    assert await store.load("p") == {K: m(EXISTING, 20)}


async def test_keys_and_profiles_are_independent(store: MembershipStore) -> None:
    other = ("aep", "seg-1")
    await store.save("p", {K: m(REALIZED, 5), other: m(EXITED, 7)})
    await store.save("q", {K: m(EXITED, 1)})
    await store.save("p", {K: m(EXITED, 4), other: m(REALIZED, 8)})
    await store.flush()
    assert await store.load("p") == {K: m(REALIZED, 5), other: m(REALIZED, 8)}
    assert await store.load("q") == {K: m(EXITED, 1)}


async def test_unflushed_saves_visible_to_load(store: MembershipStore) -> None:
    await store.save("p", {K: m(REALIZED, 1)})
    assert await store.load("p") == {K: m(REALIZED, 1)}
    await store.save("p", {K: m(EXITED, 2)})
    assert await store.load("p") == {K: m(EXITED, 2)}


async def test_sqlite_unflushed_saves_overlay_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    writer, reader = SqliteStore(path), SqliteStore(path)
    await writer.open()
    await reader.open()
    try:
        await writer.save("p", {K: m(REALIZED, 1)})
        await writer.flush()
        await writer.save("p", {K: m(EXITED, 2)})
        assert await writer.load("p") == {K: m(EXITED, 2)}  # overlay over the file
        assert await reader.load("p") == {K: m(REALIZED, 1)}  # not yet in the file
        await writer.flush()
        assert await reader.load("p") == {K: m(EXITED, 2)}
        await writer.save("p", {K: m(REALIZED, 0)})  # older than the file: the overlay must not win
        assert await writer.load("p") == {K: m(EXITED, 2)}
    finally:
        await writer.close()
        await reader.close()


async def test_sqlite_persists_across_reopen_after_flush(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "state.db"
    first = SqliteStore(path)
    await first.open()
    await first.save("p", {K: m(REALIZED, 10), ("ups", "b"): m(EXITED, 11)})
    await first.flush()
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.load("p") == {K: m(REALIZED, 10), ("ups", "b"): m(EXITED, 11)}
        await second.save("p", {K: m(EXITED, 9)})
        await second.flush()
    finally:
        await second.close()
    third = SqliteStore(path)
    await third.open()
    try:
        assert (await third.load("p"))[K] == m(REALIZED, 10)
    finally:
        await third.close()


async def test_sqlite_close_flushes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    await first.open()
    await first.save("p", {K: m(EXISTING, 3)})
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.load("p") == {K: m(EXISTING, 3)}
    finally:
        await second.close()


async def test_sqlite_max_pending_flushes_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store, reader = SqliteStore(path, max_pending=3), SqliteStore(path)
    await store.open()
    await reader.open()
    try:
        for i in range(3):
            await store.save(f"p{i}", {K: m(REALIZED, i)})
        assert await reader.load("p2") == {K: m(REALIZED, 2)}
    finally:
        await store.close()
        await reader.close()


# Regression (found by this suite, fixed in c0ffd30): when a flush failed, SqliteStore put the
# failed batch back with `supersedes(failed, pending)`. A save made *during* that flush with the same
# time and another status is newer (the later record wins), but the older failed value overwrote it.
async def test_sqlite_failed_flush_keeps_the_later_save_at_equal_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    entered, release = threading.Event(), threading.Event()

    def failing_write(rows: list[tuple[str, str, str, str, int]], *rest: object) -> None:
        entered.set()
        release.wait(10)
        raise OSError("disk full")

    try:
        await store.save("p", {K: m(REALIZED, 20)})
        monkeypatch.setattr(store, "_write", failing_write)
        flushing = asyncio.create_task(store.flush())
        await asyncio.to_thread(entered.wait, 10)
        await store.save("p", {K: m(EXITED, 20)})  # the later record, same time
        assert await store.load("p") == {K: m(EXITED, 20)}
        release.set()
        with pytest.raises(OSError):
            await flushing
        monkeypatch.undo()
        assert await store.load("p") == {K: m(EXITED, 20)}  # REALIZED@20 came back before the fix
    finally:
        release.set()
        await store.close()


async def test_sqlite_failed_flush_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    await store.open()
    calls = 0
    real_write = store._write

    def flaky_write(rows: list[tuple[str, str, str, str, int]], *rest: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("transient")
        real_write(rows, *rest)

    monkeypatch.setattr(store, "_write", flaky_write)
    await store.save("p", {K: m(REALIZED, 1)})
    with pytest.raises(OSError):
        await store.flush()
    assert await store.load("p") == {K: m(REALIZED, 1)}
    await store.save("q", {K: m(EXITED, 2)})
    await store.flush()
    await store.close()
    again = SqliteStore(path)
    await again.open()
    try:
        assert await again.load("p") == {K: m(REALIZED, 1)}
        assert await again.load("q") == {K: m(EXITED, 2)}
    finally:
        await again.close()


# --- open_store ------------------------------------------------------------------------


def test_open_store_memory() -> None:
    assert isinstance(open_store("memory"), MemoryStore)


def test_open_store_sqlite(tmp_path: Path) -> None:
    store = open_store(f"sqlite:{tmp_path / 'x.db'}")
    assert isinstance(store, SqliteStore)
    assert store.path == str(tmp_path / "x.db")


@pytest.mark.parametrize("spec", ["", "sqlite", "sqlite:", "memory:x", "redis:localhost", "redis:/x", "dynamodb:", "file:x"])
def test_open_store_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown state store") as caught:
        open_store(spec)
    assert repr(spec) in str(caught.value)
    assert "'memory' or 'sqlite:PATH'" in str(caught.value)


# Regression (found by this suite, fixed in c0ffd30): open_store("sqlite::memory:") is accepted, but
# the reader and writer connections each opened their own private in-memory database, so load()
# failed with "sqlite3.OperationalError: no such table: membership".
async def test_open_store_sqlite_in_memory_works() -> None:
    store = open_store("sqlite::memory:")
    await store.open()
    try:
        await store.save("p", {K: m(REALIZED, 1)})
        assert await store.load("p") == {K: m(REALIZED, 1)}
        await store.flush()
        assert await store.load("p") == {K: m(REALIZED, 1)}
    finally:
        await store.close()


# --- two processes, one sqlite file ----------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import asyncio, json, random, sys
    from segment_relay.consumer.export import SegmentStatus
    from segment_relay.consumer.membership import StoredMembership
    from segment_relay.consumer.state import SqliteStore

    async def main(path, seed):
        rng = random.Random(seed)
        store = SqliteStore(path)
        await store.open()
        writes = []
        for profile in range(20):
            for segment in range(10):
                for _ in range(3):
                    writes.append((f"p{profile}", f"s{segment}", rng.randrange(12), rng.choice(["realized", "existing", "exited"])))
        rng.shuffle(writes)
        print("ready", flush=True)
        sys.stdin.readline()  # wait for "go" so both processes write at the same time
        for i, (profile, segment, at, status) in enumerate(writes):
            await store.save(profile, {("ups", segment): StoredMembership(SegmentStatus(status), at)})
            if rng.random() < 0.15:
                await store.flush()
            if i % 7 == 0:
                await asyncio.sleep(0)
        await store.close()
        print(json.dumps(writes), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_two_processes_share_one_sqlite_store(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    init = SqliteStore(path)  # create the schema once up front
    await init.open()
    await init.close()

    def run_both() -> list[list[list]]:
        procs = [
            subprocess.Popen([sys.executable, str(script), str(path), str(seed)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            results = []
            for proc in procs:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                results.append(json.loads(out.strip().splitlines()[-1]))
            return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()

    results = await asyncio.to_thread(run_both)
    best: dict[tuple[str, str], tuple[int, set[str]]] = {}
    for writes in results:
        for profile, segment, at, status in writes:
            key = (profile, segment)
            top, statuses = best.get(key, (-1, set()))
            if at > top:
                best[key] = (at, {status})
            elif at == top:
                statuses.add(status)
    assert len(best) == 200

    reader = SqliteStore(path)
    await reader.open()
    try:
        for (profile, segment), (top, statuses) in best.items():
            value = (await reader.load(profile))[("ups", segment)]
            assert value.qualified_at_us == top, (profile, segment, value, top)
            assert value.status.value in statuses, (profile, segment, value, statuses)
    finally:
        await reader.close()


# --- replicas racing on a shared store --------------------------------------------------------


def _two_clients(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> list[Any]:
    """Two clients of one shared store, as two replicas on two hosts have (sqlite: two connections to one file)."""
    if kind == "dynamodb":
        dynalite = request.getfixturevalue("dynalite")
        table = f"race-{uuid.uuid4().hex[:12]}"
        return [DynamoDBStore(table, endpoint_url=dynalite.endpoint) for _ in range(2)]
    if kind == "redis":
        redis_server = request.getfixturevalue("redis_server")
        prefix = f"race-{uuid.uuid4().hex[:12]}:"
        return [RedisStore(redis_server.url, key_prefix=prefix) for _ in range(2)]
    return [SqliteStore(tmp_path / "state.db") for _ in range(2)]


@contextlib.asynccontextmanager
async def two_clients(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> AsyncIterator[list[Any]]:
    """``_two_clients``, opened for the block and closed after it."""
    stores = _two_clients(request, kind, tmp_path)
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


@pytest.fixture(params=["dynamodb", "redis"])
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[MembershipStore]]:
    """Two clients of a store that writes through at once (sqlite's saves wait for a flush)."""
    async with two_clients(request, request.param, tmp_path) as stores:
        yield stores


async def test_a_second_store_sees_saves_at_once(two_stores: list[MembershipStore]) -> None:
    store, other = two_stores
    await store.save("p", {K: m(REALIZED, 1)})
    assert await other.load("p") == {K: m(REALIZED, 1)}  # synchronous writes, consistent reads
    await other.save("p", {K: m(EXITED, 0)})  # older: refused by the shared store, not by a cache
    assert await store.load("p") == {K: m(REALIZED, 1)}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_two_stores_racing_end_with_the_max_per_key(two_stores: list[MembershipStore], seed: int) -> None:
    rng = random.Random(seed)
    statuses_all = (REALIZED, EXISTING, EXITED)
    profiles, segments = [f"p{i}" for i in range(6)], [("ups", f"s{i}") for i in range(5)] + [("a/b", "s/0")]
    plans = [
        [(rng.choice(profiles), {key: m(rng.choice(statuses_all), rng.randrange(8))
                                 for key in rng.sample(segments, rng.randint(1, 4))})
         for _ in range(150)]
        for _ in two_stores
    ]

    async def writer(store: MembershipStore, saves: list[tuple[str, dict[tuple[str, str], StoredMembership]]]) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        for profile, updates in saves:  # several saves of one store at once, too: the store decides
            in_flight.add(asyncio.create_task(store.save(profile, updates)))
            if len(in_flight) >= 8:
                _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*in_flight)

    await asyncio.gather(*(writer(s, saves) for s, saves in zip(two_stores, plans, strict=True)))
    best: dict[tuple[str, tuple[str, str]], tuple[int, set[SegmentStatus]]] = {}
    for saves in plans:
        for profile, updates in saves:
            for key, value in updates.items():
                top, statuses = best.get((profile, key), (-1, set()))
                if value.qualified_at_us > top:
                    best[(profile, key)] = (value.qualified_at_us, {value.status})
                elif value.qualified_at_us == top:
                    statuses.add(value.status)
    for profile in profiles:
        loaded = await two_stores[seed % 2].load(profile)
        assert set(loaded) == {key for p, key in best if p == profile}
        for key, value in loaded.items():
            top, statuses = best[(profile, key)]
            assert value.qualified_at_us == top, (profile, key, value, top)
            assert value.status in statuses, (profile, key, value, statuses)


def test_replicas_opening_a_new_sqlite_file_together_all_start(tmp_path: Path) -> None:
    # Switching a fresh file to WAL takes an exclusive lock SQLite does not always wait for: two
    # replicas starting together on one host once got "database is locked" and one died.
    opener = ("import asyncio, sys\nfrom segment_relay.consumer.state import SqliteStore\n"
              "async def main():\n    store = SqliteStore(sys.argv[1])\n    await store.open()\n    await store.close()\n"
              "asyncio.run(main())\n")
    for attempt in range(8):
        path = tmp_path / f"state-{attempt}.sqlite"
        processes = [subprocess.Popen([sys.executable, "-c", opener, str(path)], stderr=subprocess.PIPE)
                     for _ in range(4)]
        for process in processes:
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr.decode()


# --- asking the state (segment-relay state) ---------------------------------------------------------


async def test_profiles_members_and_stats_read_back_what_was_saved(store: MembershipStore) -> None:
    from state_cases import AWKWARD_KEYS

    from segment_relay.consumer.state.base import StateQueries

    assert isinstance(store, StateQueries)
    saved = {
        f"p{n}": {key: m(EXITED if (n + i) % 3 == 0 else REALIZED, 10 + n) for i, key in enumerate(AWKWARD_KEYS)}
        for n in range(7)
    }
    await store.save_many(saved)
    await store.flush()
    assert {key: state async for key, state in store.profiles()} == saved
    stats = await store.stats()
    assert (stats.profiles, stats.memberships) == (7, 7 * len(AWKWARD_KEYS))
    for key in AWKWARD_KEYS:
        members = sorted([profile async for profile in store.members(key)])
        assert members == sorted(p for p, state in saved.items() if state[key].is_member), key
        assert stats.members.get(key, 0) == len(members)


async def test_redis_queries_read_only_their_own_prefix_even_with_glob_characters(redis_server: Any) -> None:
    odd, plain = (RedisStore(redis_server.url, key_prefix=f"{prefix}{uuid.uuid4().hex[:8]}:") for prefix in
                  ("a*[b]?\\", "a"))
    for opened in (odd, plain):
        await opened.open()
    try:
        await odd.save_many({"p": {K: m(REALIZED, 1)}})
        await plain.save_many({"q": {K: m(REALIZED, 1)}})
        assert [key async for key in odd.members(K)] == ["p"]
        assert [key async for key, _ in odd.profiles()] == ["p"]
    finally:
        for opened in (odd, plain):
            await opened.close()


# --- the alias index (identity linking) -----------------------------------------------------------


async def test_alias_index_claims_follows_redirects_and_keeps_state_apart(store: MembershipStore) -> None:
    from segment_relay.consumer.state.base import AliasIndex, StateQueries

    assert isinstance(store, AliasIndex) and isinstance(store, StateQueries)
    assert await store.find_profiles(["ecid:a"]) == {}
    assert await store.claim_aliases({"ecid:a": "ecid:a", "email:x": "ecid:a"}) == {"ecid:a": "ecid:a",
                                                                                     "email:x": "ecid:a"}
    # A later claim of a held alias answers its owner and changes nothing.
    assert await store.claim_aliases({"email:x": "phone:1", "phone:1": "phone:1"}) == {"email:x": "ecid:a",
                                                                                       "phone:1": "phone:1"}
    await store.save_many({"phone:1": {K: m(REALIZED, 5)}, "ecid:a": {("ups", "seg-2"): m(REALIZED, 6)}})
    await store.flush()
    assert await store.aliases_of("ecid:a") == ["ecid:a", "email:x"]
    # A merge: phone:1 is absorbed by ecid:a (its state was combined into the survivor's by the
    # pipeline, which saved it first).
    await store.save_many({"ecid:a": {K: m(REALIZED, 5)}})
    await store.redirect_profiles({"phone:1": "ecid:a"})
    await store.flush()
    assert await store.find_profiles(["phone:1", "email:x", "nobody:0"]) == {"phone:1": "ecid:a", "email:x": "ecid:a"}
    assert await store.claim_aliases({"phone:1": "phone:1"}) == {"phone:1": "ecid:a"}
    assert await store.survivors_of(["phone:1", "ecid:a", "nobody:0"]) == {"phone:1": "ecid:a"}
    assert await store.aliases_of("ecid:a") == ["ecid:a", "email:x", "phone:1"]
    assert await store.aliases_of("phone:1") == []
    assert await store.load_many({"phone:1": None}) == {}
    assert await store.load("ecid:a") == {K: m(REALIZED, 5), ("ups", "seg-2"): m(REALIZED, 6)}
    # The index is not state: the operators' queries see one profile and its two memberships.
    assert [key async for key, _ in store.profiles()] == ["ecid:a"]
    stats = await store.stats()
    assert (stats.profiles, stats.memberships) == (1, 2)


@pytest.fixture(params=["sqlite", "dynamodb", "redis"])
async def claimants(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[Any]]:
    """Two clients of one shared alias index: claims take effect at once on every store."""
    async with two_clients(request, request.param, tmp_path) as stores:
        yield stores


async def test_two_stores_claiming_one_identity_agree_on_its_owner(claimants: list[Any]) -> None:
    # Two replicas each meet a new person through a different export, and claim its identities
    # for two different profile keys at the same moment: every alias ends with one owner, and
    # both replicas are told the same one.
    first, second = claimants
    for round_ in range(20):
        shared = f"ecid:v{round_}"
        answers = await asyncio.gather(
            first.claim_aliases({shared: shared}),
            second.claim_aliases({shared: f"email:e{round_}", f"email:e{round_}": f"email:e{round_}"}),
        )
        assert answers[0][shared] == answers[1][shared]
        owner = answers[0][shared]
        assert await first.find_profiles([shared]) == {shared: owner}
        assert shared in await second.aliases_of(owner)


# --- profile claims (state.exclusive profiles between replicas) ---------------------------------


async def test_profile_claims_go_to_one_owner_and_only_the_owner_renews_or_frees_them(claimants: list[Any]) -> None:
    first, second = claimants
    assert await first.claim_profiles(["p", "q"], "one", 60) == {"p", "q"}
    assert await second.claim_profiles(["p", "r"], "two", 60) == {"r"}  # p is one's
    assert await first.claim_profiles(["p"], "one", 60) == {"p"}  # its own again: renewed
    await second.release_profiles(["p"], "two")  # not two's to free
    assert await second.claim_profiles(["p"], "two", 60) == set()
    await first.release_profiles(["p", "q"], "one")
    await first.flush()  # sqlite frees them with the commit that makes the state visible
    assert await second.claim_profiles(["p", "q"], "two", 60) == {"p", "q"}


async def test_racing_profile_claims_leave_each_profile_with_one_owner(claimants: list[Any]) -> None:
    first, second = claimants
    keys = [f"p{i}" for i in range(40)]
    one, two = await asyncio.gather(first.claim_profiles(keys, "one", 60), second.claim_profiles(keys[::-1], "two", 60))
    assert one | two == set(keys) and not one & two


async def test_a_claim_its_owner_never_freed_expires(claimants: list[Any]) -> None:
    first, second = claimants
    assert await first.claim_profiles(["p"], "dead", 0.05) == {"p"}
    deadline = time.monotonic() + 10
    while not await second.claim_profiles(["p"], "alive", 60):  # poll: the store's clock decides
        assert time.monotonic() < deadline, "the dead owner's claim never expired"
        await asyncio.sleep(0.05)
    assert await first.claim_profiles(["p"], "dead", 60) == set()


async def test_the_memory_store_keeps_claims_for_pipelines_sharing_it() -> None:
    store = MemoryStore()
    assert await store.claim_profiles(["p"], "one", 60) == {"p"}
    assert await store.claim_profiles(["p"], "two", 60) == set()
    await store.release_profiles(["p"], "one")
    assert await store.claim_profiles(["p"], "two", 60) == {"p"}


async def test_sqlite_frees_a_claim_only_with_the_flush_that_commits_the_state(tmp_path: Path) -> None:
    first, second = SqliteStore(tmp_path / "state.db"), SqliteStore(tmp_path / "state.db")
    await first.open()
    await second.open()
    try:
        assert await first.claim_profiles(["p"], "one", 60) == {"p"}
        await first.save("p", {K: m(REALIZED, 1)})
        await first.release_profiles(["p"], "one")
        assert await second.claim_profiles(["p"], "two", 60) == set()  # the state is not visible yet
        await first.flush()
        assert await second.claim_profiles(["p"], "two", 60) == {"p"}
        assert await second.load("p") == {K: m(REALIZED, 1)}
        # Released, then claimed again by its owner before the flush: the flush keeps it.
        await second.release_profiles(["p"], "two")
        assert await second.claim_profiles(["p"], "two", 60) == {"p"}
        await second.flush()
        assert await first.claim_profiles(["p"], "one", 60) == set()
    finally:
        await first.close()
        await second.close()


async def test_sqlite_claims_wait_for_another_processes_write_without_blocking_the_loop(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)  # another process's writer
    try:
        other.execute("BEGIN IMMEDIATE")
        claim = asyncio.create_task(store.claim_aliases({"ecid:v": "ecid:v"}))
        for _ in range(20):  # the loop goes on while the claim polls for the lock
            await asyncio.sleep(0)
        assert not claim.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(claim, 10) == {"ecid:v": "ecid:v"}
        assert await store.find_profiles(["ecid:v"]) == {"ecid:v": "ecid:v"}
    finally:
        other.close()
        await store.close()


async def test_sqlite_links_with_state_commit_with_the_flush_and_yield_to_another_processes(tmp_path: Path) -> None:
    # A lone replica (claims off) writes its new identity links in the flush that commits the
    # state: visible to itself at once, to other processes with that commit.
    store = SqliteStore(tmp_path / "state.db", links_with_state=True)
    other = SqliteStore(tmp_path / "state.db")
    await store.open()
    await other.open()
    try:
        assert await store.claim_aliases({"ecid:v": "ecid:v", "email:e": "ecid:v"}) == {"ecid:v": "ecid:v",
                                                                                       "email:e": "ecid:v"}
        await store.save("ecid:v", {K: m(REALIZED, 1)})
        store.forget_aliases()  # the cache forgotten: the lookup reads the store and what it holds unflushed
        assert await store.find_profiles(["ecid:v", "email:e"]) == {"ecid:v": "ecid:v", "email:e": "ecid:v"}
        assert await store.aliases_of("ecid:v") == ["ecid:v", "email:e"]
        assert await other.find_profiles(["ecid:v"]) == {}  # nothing committed yet
        await store.flush()
        assert await other.find_profiles(["ecid:v", "email:e"]) == {"ecid:v": "ecid:v", "email:e": "ecid:v"}
        assert await other.load("ecid:v") == {K: m(REALIZED, 1)}
        # Another process (wrongly without claims) linked one of the next aliases first: its link
        # stands, the flush says so, and this process's lookups answer it from then on (the
        # next export carrying both identities merges the two profiles).
        assert await store.claim_aliases({"phone:1": "email:x", "email:x": "email:x"}) == {
            "phone:1": "email:x", "email:x": "email:x"}
        assert await other.claim_aliases({"phone:1": "phone:1"}) == {"phone:1": "phone:1"}
        await store.flush()
        assert await store.find_profiles(["phone:1", "email:x"]) == {"phone:1": "phone:1", "email:x": "email:x"}
        store.forget_aliases()
        assert await store.find_profiles(["phone:1", "email:x"]) == {"phone:1": "phone:1", "email:x": "email:x"}
    finally:
        await store.close()
        await other.close()


async def test_sqlite_links_with_state_survive_a_failed_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(tmp_path / "state.db", links_with_state=True)
    await store.open()
    try:
        await store.claim_aliases({"ecid:v": "ecid:v"})
        original = store._write

        def failing(*args: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "_write", failing)
        with pytest.raises(sqlite3.OperationalError):
            await store.flush()
        store.forget_aliases()
        assert await store.find_profiles(["ecid:v"]) == {"ecid:v": "ecid:v"}  # still held, to be written
        monkeypatch.setattr(store, "_write", original)
        await store.flush()
    finally:
        await store.close()
    reopened = SqliteStore(tmp_path / "state.db")
    await reopened.open()
    try:
        assert await reopened.find_profiles(["ecid:v"]) == {"ecid:v": "ecid:v"}
    finally:
        await reopened.close()
