"""DynamoDBStore against dynalite: the conditional semantics of every store, the item layout,
table creation, replicas racing, open_store from the AWS environment, and throttling retries."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st
from state_cases import AWKWARD_KEYS, check_save_many_keeps_the_conditional_rules

from segment_relay.consumer.export import SegmentStatus
from segment_relay.consumer.membership import StoredMembership
from segment_relay.consumer.state import DynamoDBStore, open_store
from segment_relay.consumer.state.dynamodb import decode_segment, encode_segment
from segment_relay.testing.aws import Emulator

REALIZED, EXISTING, EXITED = SegmentStatus.REALIZED, SegmentStatus.EXISTING, SegmentStatus.EXITED
STATUSES = (REALIZED, EXISTING, EXITED)
K = ("ups", "seg-1")


def m(status: SegmentStatus, at: int) -> StoredMembership:
    return StoredMembership(status, at)


@pytest.fixture
def table() -> str:
    return f"membership-{uuid.uuid4().hex[:12]}"  # one table per test: dynalite lives for the session


@pytest.fixture
async def client(dynalite: Emulator) -> AsyncIterator[Any]:
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as raw:
        yield raw


@pytest.fixture
async def store(dynalite: Emulator, table: str) -> AsyncIterator[DynamoDBStore]:
    opened = DynamoDBStore(table, endpoint_url=dynalite.endpoint)
    await opened.open()
    yield opened
    await opened.close()


# The cases every store shares (conditional saves, independence, visibility) run against
# dynalite in tests/test_state.py; these are DynamoDB's own.


# --- key encoding and item layout -------------------------------------------------------------



@pytest.mark.parametrize(("namespace", "segment_id"), AWKWARD_KEYS)
def test_encode_segment_round_trips(namespace: str, segment_id: str) -> None:
    assert decode_segment(encode_segment(namespace, segment_id)) == (namespace, segment_id)


def test_encode_segment_is_readable_and_unambiguous() -> None:
    assert encode_segment("ups", "5f9c-1") == "ups/5f9c-1"
    assert encode_segment("a/b", "c") == "a%2Fb/c"
    assert encode_segment("a", "b/c") == "a/b/c"
    assert encode_segment("%2F", "x") == "%252F/x"
    assert len({encode_segment(*key) for key in AWKWARD_KEYS}) == len(AWKWARD_KEYS)


@given(st.tuples(st.text(), st.text()), st.tuples(st.text(), st.text()))
def test_encode_segment_is_injective(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert decode_segment(encode_segment(*a)) == a
    assert (encode_segment(*a) == encode_segment(*b)) == (a == b)


def test_decode_segment_rejects_a_foreign_key() -> None:
    with pytest.raises(ValueError, match="no '/'"):
        decode_segment("no-separator")


async def test_load_returns_one_profiles_segments_across_namespaces(store: DynamoDBStore) -> None:
    mine = {key: m(STATUSES[i % 3], 100 + i) for i, key in enumerate(AWKWARD_KEYS) if key != ("", "")}
    await store.save("p", mine)
    await store.save("p/", {("a", "b/c"): m(EXITED, 1)})  # a profile key that prefixes another one
    await store.save("q", {("a/b", "c"): m(REALIZED, 2)})
    assert await store.load("p") == mine
    assert await store.load("p/") == {("a", "b/c"): m(EXITED, 1)}
    assert await store.load("q") == {("a/b", "c"): m(REALIZED, 2)}


async def test_load_paginates(client: Any, table: str) -> None:
    # ~1.2 MB of keys: more than one Query page (1 MB), so LastEvaluatedKey must be followed.
    counting = ThrottlingClient(client, operation="query", fail=0)
    store = DynamoDBStore(table, client=counting)
    await store.open()
    many = {("ups", f"{i:05d}-" + "x" * 1000): m(REALIZED, i) for i in range(1200)}
    await store.save("big", many)
    assert await store.load("big") == many
    assert counting.calls == 2


async def test_item_layout(store: DynamoDBStore, client: Any, table: str) -> None:
    await store.save("ups:abc", {("a/b", "seg-1"): m(EXISTING, 1_700_000_000_123_456)})
    item = (await client.get_item(TableName=table, Key={"profileKey": {"S": "ups:abc"}, "segment": {"S": "a%2Fb/seg-1"}},
                                  ConsistentRead=True))["Item"]
    assert item == {
        "profileKey": {"S": "ups:abc"},
        "segment": {"S": "a%2Fb/seg-1"},
        "status": {"S": "existing"},
        "qualifiedAtUs": {"N": "1700000000123456"},
    }
    described = (await client.describe_table(TableName=table))["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert sorted((k["AttributeName"], k["KeyType"]) for k in described["KeySchema"]) == [
        ("profileKey", "HASH"), ("segment", "RANGE")
    ]


# --- open, close, repr -----------------------------------------------------------------------


async def test_open_uses_an_existing_table_and_keeps_its_items(dynalite: Emulator, store: DynamoDBStore, table: str) -> None:
    await store.save("p", {K: m(REALIZED, 1)})
    again = DynamoDBStore(table, endpoint_url=dynalite.endpoint)
    await again.open()
    try:
        assert await again.load("p") == {K: m(REALIZED, 1)}
    finally:
        await again.close()


async def test_concurrent_opens_create_the_table_once(dynalite: Emulator, table: str) -> None:
    stores = [DynamoDBStore(table, endpoint_url=dynalite.endpoint) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))  # all but one see ResourceInUseException
        await stores[0].save("p", {K: m(REALIZED, 1)})
        assert [await s.load("p") for s in stores] == [{K: m(REALIZED, 1)}] * 4
    finally:
        for s in stores:
            await s.close()


async def test_open_refuses_a_table_with_another_key(dynalite: Emulator, client: Any, table: str) -> None:
    await client.create_table(
        TableName=table, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
    )
    store = DynamoDBStore(table, endpoint_url=dynalite.endpoint)
    with pytest.raises(ValueError, match="not a membership table"):
        await store.open()
    assert store._client is None  # the client it created is closed again


async def test_injected_client_is_used_and_left_open(client: Any, table: str) -> None:
    store = DynamoDBStore(table, client=client)
    await store.open()
    await store.save("p", {K: m(REALIZED, 1)})
    await store.close()
    assert (await client.describe_table(TableName=table))["Table"]["TableStatus"] == "ACTIVE"  # still usable


def test_repr_names_the_table_and_no_secrets() -> None:
    store = DynamoDBStore("membership", region="eu-west-1", endpoint_url="http://user:s3cret@127.0.0.1:8000")
    assert repr(store) == "DynamoDBStore(table='membership', region='eu-west-1', endpoint_url='http://127.0.0.1:8000')"


@pytest.mark.parametrize("name", ["ab", "has space", "a/b", "x" * 256])
def test_invalid_table_names_are_refused_early(name: str) -> None:
    with pytest.raises(ValueError, match="invalid DynamoDB table name"):
        DynamoDBStore(name)


# --- open_store -------------------------------------------------------------------------------


async def test_open_store_dynamodb_from_the_environment(dynalite: Emulator, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynalite.endpoint)  # botocore reads it itself
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # botocore alone ignores AWS_REGION; the store does not
    store = open_store(f"dynamodb:{table}")
    assert isinstance(store, DynamoDBStore)
    assert store.table == table
    await store.open()
    try:
        assert repr(store) == f"DynamoDBStore(table={table!r}, region='eu-west-1', endpoint_url={dynalite.endpoint!r})"
        await store.save("p", {K: m(REALIZED, 1)})
        assert await store.load("p") == {K: m(REALIZED, 1)}
    finally:
        await store.close()


@pytest.mark.parametrize("spec", ["dynamodb", "dynamodb:", "dynamo:table"])
def test_open_store_dynamodb_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown state store") as caught:
        open_store(spec)
    assert "'memory' or 'sqlite:PATH' or 'dynamodb:TABLE'" in str(caught.value)


# --- throttling --------------------------------------------------------------------------------
# dynalite enforces no capacity (neither does moto), so it never throttles: the fault is injected
# at the client layer by a proxy around the real aiobotocore client.


def _throttled(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "Rate of requests exceeds the allowed throughput."},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, operation)


class ThrottlingClient:
    """The real client, except that the first ``fail`` calls of ``operation`` raise ``code``."""

    def __init__(self, real: Any, *, operation: str = "update_item", fail: int,
                 code: str = "ProvisionedThroughputExceededException") -> None:
        self._real, self._operation, self._code = real, operation, code
        self.remaining = fail
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != self._operation:
            return attr

        async def call(**kwargs: Any) -> Any:
            self.calls += 1
            if self.remaining > 0:
                self.remaining -= 1
                raise _throttled(self._code, self._operation)
            return await attr(**kwargs)

        return call


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "ThrottlingException"])
async def test_throttled_writes_are_retried(client: Any, table: str, code: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy = ThrottlingClient(client, fail=3, code=code)
    store = DynamoDBStore(table, client=proxy, max_attempts=5, backoff_s=0.02, max_backoff_s=0.05)
    await store.open()
    with caplog.at_level(logging.DEBUG, logger="segment_relay.consumer.state.dynamodb"):
        await store.save("p", {K: m(REALIZED, 1)})
    assert proxy.calls == 4 and store.retries == 3
    assert await store.load("p") == {K: m(REALIZED, 1)}
    # Full jitter under a doubling ceiling: [0, 0.02], [0, 0.04], then capped at [0, 0.05].
    delays = [record.__dict__["delay_s"] for record in caplog.records if record.getMessage() == "DynamoDB call retried"]
    assert len(delays) == 3
    assert all(0 <= delay <= cap for delay, cap in zip(delays, [0.02, 0.04, 0.05], strict=True))


async def test_throttling_gives_up_after_max_attempts(client: Any, table: str) -> None:
    proxy = ThrottlingClient(client, fail=10)
    store = DynamoDBStore(table, client=proxy, max_attempts=3, backoff_s=0.01)
    await store.open()
    with pytest.raises(ClientError) as caught:
        await store.save("p", {K: m(REALIZED, 1)})
    assert caught.value.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
    assert proxy.calls == 3  # not forever: the pipeline retries the record
    proxy.remaining = 0
    await store.save("p", {K: m(REALIZED, 1)})  # the record's retry goes through
    assert await store.load("p") == {K: m(REALIZED, 1)}


async def test_throttled_reads_are_retried(client: Any, table: str) -> None:
    store = DynamoDBStore(table, client=ThrottlingClient(client, operation="query", fail=2), backoff_s=0.01)
    await store.open()
    assert await store.load("p") == {}
    assert store.retries == 2


async def test_a_failing_write_does_not_stop_the_others_of_its_save(client: Any, table: str) -> None:
    proxy = ThrottlingClient(client, fail=1, code="ValidationException")  # not retryable
    store = DynamoDBStore(table, client=proxy)
    await store.open()
    updates = {("ups", f"s{i}"): m(REALIZED, i) for i in range(20)}
    with pytest.raises(ClientError, match="ValidationException"):
        await store.save("p", updates)
    assert store.retries == 0
    assert len(await store.load("p")) == 19  # every other write finished before the error was raised


# --- batch calls: load_many and save_many --------------------------------------------------------


class RecordingClient:
    """The real client, recording every call's operation and arguments and how many ran at once.

    ``pause_s`` holds each call open a moment before it goes out, so that calls issued together
    overlap measurably even against a fast local emulator.
    """

    def __init__(self, real: Any, *, pause_s: float = 0.0) -> None:
        self._real, self._pause_s = real, pause_s
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.most_in_flight: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name == "meta" or not callable(attr):
            return attr

        async def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            self.in_flight += 1
            self.most_in_flight[name] = max(self.most_in_flight.get(name, 0), self.in_flight)
            try:
                if self._pause_s:
                    await asyncio.sleep(self._pause_s)
                return await attr(**kwargs)
            finally:
                self.in_flight -= 1

        return call

    def operations(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
async def recorded(client: Any, table: str) -> AsyncIterator[tuple[DynamoDBStore, RecordingClient]]:
    recording = RecordingClient(client)
    opened = DynamoDBStore(table, client=recording)
    await opened.open()
    recording.calls.clear()  # DescribeTable / CreateTable of open
    yield opened, recording
    await opened.close()


async def test_load_many_mixes_named_segments_and_whole_profiles(recorded: tuple[DynamoDBStore, RecordingClient]) -> None:
    store, recording = recorded
    other, gone = ("aep", "seg-2"), ("ups", "never-saved")
    await store.save_many({
        "a": {K: m(REALIZED, 1), other: m(EXITED, 2), ("a/b", "c"): m(EXISTING, 3)},
        "b": {K: m(EXISTING, 4), other: m(REALIZED, 5)},
        "c": {K: m(EXITED, 6)},
        "p/": {K: m(EXITED, 7)},  # its key prefixes none of the others', but it is never asked for
    })
    recording.calls.clear()
    loaded = await store.load_many({
        "a": [K, gone, ("a/b", "c")],  # a missing segment is simply absent
        "b": None,  # all of it
        "c": [gone],  # nothing of what is named exists: the profile is absent
        "d": [],  # nothing named at all: absent, and nothing to ask for
        "nobody": None,  # never saved: absent
    })
    assert loaded == {
        "a": {K: m(REALIZED, 1), ("a/b", "c"): m(EXISTING, 3)},
        "b": {K: m(EXISTING, 4), other: m(REALIZED, 5)},
    }
    # The named segments of every profile in one BatchGetItem, a Query per whole profile.
    assert sorted(recording.operations()) == ["batch_get_item", "query", "query"]
    (request,) = [kwargs["RequestItems"] for name, kwargs in recording.calls if name == "batch_get_item"]
    assert request[store.table]["ConsistentRead"] is True
    assert request[store.table]["ProjectionExpression"] == "#pk, #sk, #status, #at"
    assert len(request[store.table]["Keys"]) == 4  # a: 3, c: 1


async def test_load_many_of_nothing_sends_no_request(recorded: tuple[DynamoDBStore, RecordingClient]) -> None:
    store, recording = recorded
    assert await store.load_many({}) == {}
    assert await store.load_many({"p": [], "q": ()}) == {}
    await store.save_many({})
    await store.save_many({"p": {}})
    assert recording.calls == []


async def test_load_many_asks_for_a_repeated_segment_once(recorded: tuple[DynamoDBStore, RecordingClient]) -> None:
    store, recording = recorded
    await store.save("p", {K: m(REALIZED, 1)})
    # BatchGetItem refuses a request naming one key twice (ValidationException): the store dedupes.
    assert await store.load_many({"p": [K, K, ("ups", "seg-1")]}) == {"p": {K: m(REALIZED, 1)}}
    (request,) = [kwargs["RequestItems"] for name, kwargs in recording.calls if name == "batch_get_item"]
    assert len(request[store.table]["Keys"]) == 1


async def test_load_many_splits_batch_get_item_at_100_keys_and_bounds_concurrency(client: Any, table: str) -> None:
    recording = RecordingClient(client, pause_s=0.02)
    store = DynamoDBStore(table, client=recording, concurrency=2)
    await store.open()
    try:
        saved = {f"p{p}": {("ups", f"s{i:03d}"): m(STATUSES[i % 3], i) for i in range(90)} for p in range(3)}
        await store.save_many(saved)
        recording.calls.clear()
        recording.most_in_flight.clear()
        wanted: dict[str, list[tuple[str, str]] | None] = {
            profile: [*state, ("ups", "missing")] for profile, state in saved.items()  # 273 keys
        }
        wanted["whole-1"] = wanted["whole-2"] = None
        assert await store.load_many(wanted) == saved
        sizes = sorted(len(kwargs["RequestItems"][table]["Keys"]) for name, kwargs in recording.calls
                       if name == "batch_get_item")
        assert sizes == [73, 100, 100]
        assert recording.operations().count("query") == 2
        assert recording.most_in_flight == {"batch_get_item": 2, "query": 2}  # concurrent, never more than 2
    finally:
        await store.close()


async def test_save_many_writes_concurrently_within_the_bound(client: Any, table: str) -> None:
    recording = RecordingClient(client, pause_s=0.01)
    store = DynamoDBStore(table, client=recording, concurrency=3)
    await store.open()
    try:
        updates = {f"p{p}": {("ups", f"s{i}"): m(REALIZED, i) for i in range(5)} for p in range(4)}
        await store.save_many(updates)
        assert recording.operations().count("update_item") == 20  # one conditional UpdateItem each
        assert recording.most_in_flight["update_item"] == 3
        assert await store.load_many(dict.fromkeys(updates)) == updates
    finally:
        await store.close()


class UnprocessedKeysClient:
    """Fault injection: the emulator cannot produce UnprocessedKeys (dynalite never throttles and only
    leaves keys unprocessed past 1 MB per answer, which 100 of these small items never reach), so the
    first ``rounds`` BatchGetItem calls serve only half of their keys and hand the rest back as
    UnprocessedKeys, as DynamoDB does under throttling. Only ``Keys`` is handed back (dynalite's own
    UnprocessedKeys drops the projection too): the store must rebuild the rest of the request."""

    def __init__(self, real: Any, *, rounds: int) -> None:
        self._real = real
        self.remaining = rounds
        self.requests: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name != "batch_get_item":
            return attr

        async def batch_get_item(*, RequestItems: dict[str, Any], **kwargs: Any) -> Any:  # noqa: N803 - boto's name
            self.requests.append(RequestItems)
            if self.remaining <= 0:
                return await attr(RequestItems=RequestItems, **kwargs)
            self.remaining -= 1
            ((table, wanted),) = RequestItems.items()
            keys = wanted["Keys"]
            served, left = keys[: (len(keys) + 1) // 2], keys[(len(keys) + 1) // 2:]
            answer = await attr(RequestItems={table: {**wanted, "Keys": served}}, **kwargs)
            answer["UnprocessedKeys"] = {table: {"Keys": left}} if left else {}
            return answer

        return batch_get_item


async def test_load_many_asks_again_for_unprocessed_keys(client: Any, table: str) -> None:
    injecting = UnprocessedKeysClient(client, rounds=3)
    store = DynamoDBStore(table, client=injecting, backoff_s=0.001, max_backoff_s=0.005)
    await store.open()
    try:
        saved = {("ups", f"s{i}"): m(REALIZED, i) for i in range(20)}
        await store.save("p", saved)
        assert await store.load_many({"p": list(saved)}) == {"p": saved}  # nothing lost, however many rounds
        assert [len(request[table]["Keys"]) for request in injecting.requests] == [20, 10, 5, 2]
        assert store.retries == 3
        for request in injecting.requests:  # every round is a whole, strongly consistent, projected request
            assert request[table]["ConsistentRead"] is True
            assert request[table]["ProjectionExpression"] == "#pk, #sk, #status, #at"
    finally:
        await store.close()


async def test_throttled_batch_get_item_is_retried(client: Any, table: str) -> None:
    proxy = ThrottlingClient(client, operation="batch_get_item", fail=2)
    store = DynamoDBStore(table, client=proxy, backoff_s=0.01)
    await store.open()
    await store.save("p", {K: m(REALIZED, 1)})
    assert await store.load_many({"p": [K]}) == {"p": {K: m(REALIZED, 1)}}
    assert proxy.calls == 3 and store.retries == 2


async def test_save_many_keeps_the_conditional_rules(store: DynamoDBStore, dynalite: Emulator) -> None:
    async def replica() -> DynamoDBStore:  # another client of the table: another replica
        other = DynamoDBStore(store.table, endpoint_url=dynalite.endpoint)
        await other.open()
        return other

    await check_save_many_keeps_the_conditional_rules(store, replica)


async def test_a_failing_write_does_not_stop_the_others_of_its_save_many(client: Any, table: str) -> None:
    proxy = ThrottlingClient(client, fail=1, code="ValidationException")  # not retryable
    store = DynamoDBStore(table, client=proxy, concurrency=4)
    await store.open()
    updates = {f"p{p}": {("ups", f"s{i}"): m(REALIZED, i) for i in range(10)} for p in range(3)}
    with pytest.raises(ClientError, match="ValidationException"):
        await store.save_many(updates)
    loaded = await store.load_many(dict.fromkeys(updates))
    assert sum(len(state) for state in loaded.values()) == 29  # every other write finished first


def test_access_denied_names_every_permission_the_store_needs() -> None:
    from segment_relay.consumer.state.dynamodb import _describe_aws_error

    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "not authorized\nsigned headers"}},
                         "BatchGetItem")
    assert _describe_aws_error(denied) == (
        "BatchGetItem gave AccessDeniedException: not authorized"
        " (grant dynamodb:DescribeTable, Query, BatchGetItem, UpdateItem, PutItem, GetItem, DeleteItem and CreateTable)"
    )
