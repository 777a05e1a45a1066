"""RedisStore against a real redis-server: the layout, awkward keys, exact time comparison in Lua,
replicas racing, NOSCRIPT recovery, credentials kept out of repr and errors, config and open_store.

The cases every store shares run against redis-server in tests/test_state.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from state_cases import AWKWARD_KEYS, check_save_many_keeps_the_conditional_rules

from segment_relay.config import ConfigError, load_config, secrets_in
from segment_relay.consumer.export import SegmentStatus
from segment_relay.consumer.membership import StoredMembership
from segment_relay.consumer.state import RedisStore, open_store
from segment_relay.consumer.state.redis import decode_value, redact_url
from segment_relay.errors import StartupError
from segment_relay.testing.aws import free_port
from segment_relay.testing.redis import RedisServer

REALIZED, EXISTING, EXITED = SegmentStatus.REALIZED, SegmentStatus.EXISTING, SegmentStatus.EXITED
STATUSES = (REALIZED, EXISTING, EXITED)
K = ("ups", "seg-1")


def m(status: SegmentStatus, at: int) -> StoredMembership:
    return StoredMembership(status, at)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"  # one server for the session: a prefix per test


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    opened = RedisStore(redis_server.url, key_prefix=prefix)
    await opened.open()
    yield opened
    await opened.close()


# --- layout and encoding -----------------------------------------------------------------------



async def test_layout(store: RedisStore, raw: Any, prefix: str) -> None:
    await store.save("ups:abc", {("a/b", "seg-1"): m(EXISTING, 1_700_000_000_123_456), K: m(EXITED, 5)})
    assert await raw.hgetall(f"{prefix}profile:ups:abc") == {
        "a%2Fb/seg-1": "existing|1700000000123456",
        "ups/seg-1": "exited|5",
    }
    assert await raw.keys(f"{prefix}*") == [f"{prefix}profile:ups:abc"]


async def test_awkward_keys_round_trip(store: RedisStore) -> None:
    mine = {key: m(STATUSES[i % 3], 100 + i) for i, key in enumerate(AWKWARD_KEYS)}
    await store.save("p", mine)
    await store.save("p|x", {("a|b", "c|d"): m(EXITED, 1)})  # separator characters in the profile key too
    await store.save("", {("", ""): m(REALIZED, 2)})
    assert await store.load("p") == mine
    assert await store.load("p|x") == {("a|b", "c|d"): m(EXITED, 1)}
    assert await store.load("") == {("", ""): m(REALIZED, 2)}
    # and each key still obeys supersedes on its own
    await store.save("p", {key: m(EXITED, 99) for key in AWKWARD_KEYS})
    assert await store.load("p") == mine


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (2**53, 2**53 + 1),  # equal as doubles: the script compares decimal strings
        (9, 10),  # longer is larger, although "10" < "9" as strings
        (-10, -9),
        (-1, 0),
        (-(2**70), 2**70),
        (1_700_000_000_123_456, 1_700_000_000_123_457),
    ],
)
async def test_times_compare_exactly(store: RedisStore, old: int, new: int) -> None:
    await store.save("p", {K: m(REALIZED, old)})
    await store.save("p", {K: m(EXITED, new)})
    assert await store.load("p") == {K: m(EXITED, new)}
    await store.save("p", {K: m(EXISTING, old)})  # older: refused
    assert await store.load("p") == {K: m(EXITED, new)}


def test_decode_value_refuses_foreign_values() -> None:
    assert decode_value("realized|-3") == m(REALIZED, -3)
    for bad in ("realized", "member|1", "realized|", "realized|1.5", "realized|01"):
        with pytest.raises(ValueError, match="not a membership value"):
            decode_value(bad)


# --- NOSCRIPT ----------------------------------------------------------------------------------


async def test_save_recovers_from_a_flushed_script_cache(store: RedisStore, raw: Any) -> None:
    await store.save("p", {K: m(REALIZED, 1)})
    await raw.script_flush()  # as after a restart or a failover
    await store.save("p", {K: m(EXITED, 2)})  # EVALSHA -> NOSCRIPT -> SCRIPT LOAD -> EVALSHA
    assert await store.load("p") == {K: m(EXITED, 2)}
    await raw.script_flush()
    await store.save("p", {K: m(REALIZED, 1)})  # still conditional after the reload
    assert await store.load("p") == {K: m(EXITED, 2)}
    await store.save("p", {K: m(EXISTING, 3)})  # the script is cached again: EVALSHA works at once
    assert await store.load("p") == {K: m(EXISTING, 3)}


async def test_empty_save_is_a_no_op(store: RedisStore, raw: Any, prefix: str) -> None:
    await store.save("p", {})
    assert await raw.keys(f"{prefix}*") == []


# --- credentials, open, open_store -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@127.0.0.1:6379/0", "redis://user:***@127.0.0.1:6379/0"),
        ("rediss://:s3cret@cache.example:6380/2", "rediss://:***@cache.example:6380/2"),
        ("redis://127.0.0.1:6379/0?password=s3cret&socket_timeout=5", "redis://127.0.0.1:6379/0?password=***&socket_timeout=5"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_repr_hides_the_password(url: str, shown: str) -> None:
    store = RedisStore(url, key_prefix="x:")
    assert repr(store) == f"RedisStore({shown!r}, key_prefix='x:')"
    assert "s3cret" not in repr(store)
    assert redact_url(url) == shown


async def test_a_password_protected_user_works_and_errors_hide_the_password(
    redis_server: RedisServer, raw: Any, prefix: str
) -> None:
    user = f"relay-{uuid.uuid4().hex[:8]}"
    await raw.acl_setuser(user, enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    try:
        store = RedisStore(f"redis://{user}:s3cret@127.0.0.1:{redis_server.port}/0", key_prefix=prefix)
        await store.open()
        try:
            await store.save("p", {K: m(REALIZED, 1)})
            assert await store.load("p") == {K: m(REALIZED, 1)}
        finally:
            await store.close()
        wrong = RedisStore(f"redis://{user}:wr0ng-pass@127.0.0.1:{redis_server.port}/0", key_prefix=prefix)
        with pytest.raises(StartupError, match="cannot be opened") as caught:
            await wrong.open()
        assert "wr0ng-pass" not in str(caught.value)
    finally:
        await raw.acl_deluser(user)


async def test_open_fails_clearly_when_nothing_listens() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StartupError, match=r"RedisStore\('redis://127.0.0.1:\d+/0'.*cannot be opened"):
        await store.open()
    await store.close()  # harmless after a failed open


async def test_open_store_redis(redis_server: RedisServer) -> None:
    store = open_store(f"redis://127.0.0.1:{redis_server.port}/0")
    assert isinstance(store, RedisStore)
    assert store.key_prefix == "segment-relay:"
    await store.open()
    profile = f"open-store-{uuid.uuid4().hex}"
    try:
        await store.save(profile, {K: m(REALIZED, 1)})
        await store.flush()
        assert await store.load(profile) == {K: m(REALIZED, 1)}
    finally:
        await store.close()


def test_open_store_rediss_and_bad_urls() -> None:
    assert isinstance(open_store("rediss://:pw@cache.example:6380/1"), RedisStore)
    with pytest.raises(ValueError, match="invalid redis URL") as caught:
        open_store("redis://:s3cret@host:notaport/0")
    assert "s3cret" not in str(caught.value)


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["redis://127.0.0.1:6379/0", "rediss://user:pw@cache.example:6380/2", "redis://cache"])
def test_config_accepts_redis_urls(spec: str) -> None:
    assert load_config(state=spec).state == spec


def test_config_refuses_a_bad_redis_url_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="invalid redis URL") as caught:
        load_config(state="redis://:s3cret@host:notaport/0")
    assert "s3cret" not in str(caught.value)


def test_config_error_lists_redis() -> None:
    with pytest.raises(ConfigError, match=r"redis://HOST:PORT/DB"):
        load_config(state="postgres:x")


@pytest.mark.parametrize(
    ("spec", "secret"),
    [
        ("redis://user:s3cret@cache:6379/0", "s3cret"),
        ("rediss://:s3cret@cache:6380/0", "s3cret"),
        ("redis://cache:6379/0?password=s3cret", "s3cret"),
    ],
)
def test_secrets_in_lists_the_redis_password(spec: str, secret: str) -> None:
    assert secret in secrets_in(load_config(state=spec))


def test_secrets_in_lists_the_percent_decoded_password_too() -> None:
    found = secrets_in(load_config(state="redis://:p%40ss@cache:6379/0"))
    assert "p%40ss" in found and "p@ss" in found


def test_no_redis_secret_without_a_password() -> None:
    assert secrets_in(load_config(state="redis://cache:6379/0", handlers=["log"])) == []


# --- batch calls: load_many and save_many --------------------------------------------------------


class RecordingPipeline:
    """A redis-py pipeline that records the commands queued on it and hands them to its recorder."""

    def __init__(self, real: Any, recorder: RecordingClient) -> None:
        self._real, self._recorder = real, recorder
        self.commands: list[str] = []

    async def __aenter__(self) -> RecordingPipeline:
        await self._real.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._real.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name == "execute":
            async def execute(*args: Any, **kwargs: Any) -> Any:
                self._recorder.round_trips.append(list(self.commands))
                return await attr(*args, **kwargs)
            return execute
        self.commands.append(name)
        return attr


class RecordingClient:
    """The store's redis client, recording its round trips: each pipeline's commands, or one direct call."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.round_trips: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name == "pipeline":
            return lambda *args, **kwargs: RecordingPipeline(attr(*args, **kwargs), self)
        if name != "aclose" and callable(attr):
            self.round_trips.append([name])
        return attr


@pytest.fixture
def recording(store: RedisStore) -> RecordingClient:
    recorder = RecordingClient(store._client)
    store._client = recorder
    return recorder


async def test_load_many_is_one_round_trip(store: RedisStore, recording: RecordingClient) -> None:
    other, gone = ("aep", "seg-2"), ("ups", "never-saved")
    await store.save_many({
        "a": {K: m(REALIZED, 1), other: m(EXITED, 2), ("a/b", "c"): m(EXISTING, 3)},
        "b": {K: m(EXISTING, 4), other: m(REALIZED, 5)},
        "c": {K: m(EXITED, 6)},
    })
    assert recording.round_trips == [["evalsha"] * 3]  # one pipeline, one script per profile
    recording.round_trips.clear()
    loaded = await store.load_many({
        "a": [K, gone, ("a/b", "c"), K],  # a missing segment is absent; a repeated one harmless
        "b": None,  # all of it
        "c": [gone],  # nothing of what is named exists: the profile is absent
        "d": [],  # nothing named at all: absent, and no (invalid) HMGET without fields
        "nobody": None,  # never saved: absent
    })
    assert loaded == {
        "a": {K: m(REALIZED, 1), ("a/b", "c"): m(EXISTING, 3)},
        "b": {K: m(EXISTING, 4), other: m(REALIZED, 5)},
    }
    assert recording.round_trips == [["hmget", "hgetall", "hmget", "hgetall"]]


async def test_batch_calls_of_nothing_send_nothing(store: RedisStore, recording: RecordingClient, raw: Any,
                                                    prefix: str) -> None:
    assert await store.load_many({}) == {}
    assert await store.load_many({"p": [], "q": ()}) == {}
    await store.save_many({})
    await store.save_many({"p": {}})
    assert recording.round_trips == []
    assert await raw.keys(f"{prefix}*") == []


async def test_save_many_keeps_the_conditional_rules(store: RedisStore, redis_server: RedisServer, prefix: str) -> None:
    async def replica() -> RedisStore:  # another client of the server: another replica
        other = RedisStore(redis_server.url, key_prefix=prefix)
        await other.open()
        return other

    await check_save_many_keeps_the_conditional_rules(store, replica)


async def test_save_many_recovers_from_a_flushed_script_cache(store: RedisStore, recording: RecordingClient,
                                                               raw: Any) -> None:
    other = ("aep", "seg-2")
    await store.save_many({"p": {K: m(REALIZED, 20)}, "q": {K: m(EXITED, 5)}})
    await raw.script_flush()  # as after a restart or a failover
    recording.round_trips.clear()
    await store.save_many({
        "p": {K: m(EXITED, 10), other: m(EXITED, 30)},  # K older: still refused after the reload
        "q": {K: m(EXISTING, 6)},
        "r": {K: m(REALIZED, 1)},
    })
    # NOSCRIPT for the batch, the script loaded again, the whole batch again: never one EVAL per profile.
    assert recording.round_trips == [["evalsha"] * 3, ["script_load"], ["evalsha"] * 3]
    expected = {"p": {K: m(REALIZED, 20), other: m(EXITED, 30)}, "q": {K: m(EXISTING, 6)}, "r": {K: m(REALIZED, 1)}}
    assert await store.load_many(dict.fromkeys(expected)) == expected
    recording.round_trips.clear()
    await store.save_many({"p": {K: m(EXISTING, 40)}, "s": {K: m(EXITED, 2)}})  # cached again: one round trip
    assert recording.round_trips == [["evalsha"] * 2]
    assert await store.load_many({"p": [K], "s": [K]}) == {"p": {K: m(EXISTING, 40)}, "s": {K: m(EXITED, 2)}}


async def test_save_many_raises_a_failing_profile_after_writing_the_others(store: RedisStore, raw: Any,
                                                                           prefix: str) -> None:
    from redis.exceptions import ResponseError

    await raw.set(f"{prefix}profile:bad", "not a hash")  # WRONGTYPE for the script's HGET
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.save_many({"a": {K: m(REALIZED, 1)}, "bad": {K: m(REALIZED, 1)}, "z": {K: m(EXITED, 2)}})
    assert await store.load_many({"a": None, "z": None}) == {"a": {K: m(REALIZED, 1)}, "z": {K: m(EXITED, 2)}}
