"""DynamoDB membership state: one item per (profile, segment), conditional writes, shared by replicas.

Item layout (table created on first ``open`` if missing, PAY_PER_REQUEST)::

    profileKey     S  hash key   the profile key, verbatim
    segment        S  range key  ESCAPE(namespace) + "/" + segment_id
    status         S             "realized" | "existing" | "exited"
    qualifiedAtUs  N             qualification time, microseconds since the epoch

Namespaces and segment ids are arbitrary strings, so the range key escapes the namespace only:
``%`` becomes ``%25`` and ``/`` becomes ``%2F`` (in that order). The escaped namespace then holds
no ``/``, so the first ``/`` of the range key ends it and everything after it is the segment id,
verbatim (it may contain ``/`` and ``%``). Usual keys stay readable: ``ups/5f9c...``.

``save_many`` writes one UpdateItem per (profile, segment) whose ConditionExpression is ``supersedes``
in DynamoDB terms, so the table itself refuses to go back in time, whichever replica writes::

    attribute_not_exists(qualifiedAtUs) OR qualifiedAtUs < :t OR (qualifiedAtUs = :t AND status <> :s)

A failed condition means a newer (or the same) value is already stored: not an error. BatchWriteItem
cannot carry conditions (its PutRequest has no ConditionExpression), which is why writes stay one
UpdateItem each; the writes of one call go out concurrently (at most ``concurrency`` at once).

``load_many`` reads the segments it is told about with strongly consistent BatchGetItem requests
(100 keys each; UnprocessedKeys are asked again, with the backoff below, until none are left) and
whole profiles with a strongly consistent, paginated Query, all the requests of one call concurrently
(at most ``concurrency`` at once). Writes are synchronous, so ``flush`` has nothing to do and
``load_many`` sees every completed ``save_many``.

Throttling (and 5xx or connection errors) is retried here, a few times with full-jitter
exponential backoff, then raised: the pipeline retries the record anyway. A client this store
creates has botocore's own retries turned off so that backoff lives in one place; an injected
client keeps whatever retry configuration it was built with (retried here on top of it).

The alias index (identity linking) shares the table, under sort keys that hold no ``/`` (every
segment's does, so a profile's Query and the Scans tell them apart)::

    profileKey = ALIAS        segment = "@alias"     profile S   the canonical key of an identity
    profileKey = PROFILE KEY  segment = "@aliases"   aliases SS  a profile's aliases (``state show``)
    profileKey = PROFILE KEY  segment = "@redirect"  profile S   the profile that absorbed this one

A claim is a PutItem conditioned on ``attribute_not_exists(profileKey)``: the first replica to claim
an identity owns it, a later one reads the owner back (strongly consistent GetItem).

Profile claims (``ProfileClaims``: replicas never diff one profile at once) are one more item in the
profile's partition, written by a conditional PutItem and freed by a conditional DeleteItem, each
request of a call concurrently::

    profileKey = PROFILE KEY  segment = "@claim"  owner S, expiresAtMs N (wall clock; replicas'
                                                  clocks must agree to well within the TTL)

IAM: dynamodb:DescribeTable, Query, BatchGetItem, UpdateItem, PutItem, GetItem and DeleteItem on
the table (the last three for identity linking and profile claims), and CreateTable if it may be missing;
``segment-relay state`` needs DescribeTable, Query and Scan (``members`` and ``stats`` Scan the whole
table: the table is keyed by profile, so nothing narrower can answer a question by segment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ...errors import StartupError, StoreMissing
from ...model import SegmentStatus
from ..stored import SegmentKey, StoredMembership
from .base import ProfileState, RedirectFollowing, ScanQueries, SingleProfileAccess, Updates, Wanted

log = logging.getLogger(__name__)

HASH_KEY = "profileKey"
RANGE_KEY = "segment"

# `status` is a DynamoDB reserved word (and `segment` one too): every name goes through a placeholder.
_NAMES = {"#pk": HASH_KEY, "#sk": RANGE_KEY, "#status": "status", "#at": "qualifiedAtUs"}
_UPDATE = "SET #status = :s, #at = :t"
_SUPERSEDES = "attribute_not_exists(#at) OR #at < :t OR (#at = :t AND #status <> :s)"
# BatchGetItem answers items of many profiles in one list: the hash key tells them apart.
_BATCH_PROJECTION = "#pk, #sk, #status, #at"
BATCH_GET_MAX_KEYS = 100  # DynamoDB's limit per BatchGetItem request

# The alias index's sort keys: no "/", so never a segment's (see the module docstring).
ALIAS_SK = "@alias"
ALIASES_SK = "@aliases"
REDIRECT_SK = "@redirect"
_CLAIM_FREE = "attribute_not_exists(#pk)"
CLAIM_SK = "@claim"
_PROFILE_CLAIMABLE = "attribute_not_exists(#pk) OR #owner = :owner OR #expires < :now"
_CLAIM_NAMES = {"#pk": HASH_KEY, "#owner": "owner", "#expires": "expiresAtMs"}
_POINTER_NAMES = {"#pk": HASH_KEY, "#profile": "profile"}

THROTTLING_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"})
_TRANSIENT_CODES = THROTTLING_CODES | {"InternalServerError", "ServiceUnavailable"}

_STATUS = {status.value: status for status in SegmentStatus}
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")
_UNESCAPE = re.compile(r"%(25|2F)")
_UNESCAPED = {"25": "%", "2F": "/"}


def encode_segment(namespace: str, segment_id: str) -> str:
    """The range key of (namespace, segment_id): the namespace escaped, a ``/``, the id verbatim."""
    return namespace.replace("%", "%25").replace("/", "%2F") + "/" + segment_id


def decode_segment(value: str) -> SegmentKey:
    """Inverse of ``encode_segment``."""
    escaped, sep, segment_id = value.partition("/")
    if not sep:
        raise ValueError(f"not a segment range key (no '/'): {value!r}")
    # One pass, so "%252F" (a namespace holding "%2F" literally) comes back as "%2F", not "/".
    return _UNESCAPE.sub(lambda match: _UNESCAPED[match[1]], escaped), segment_id


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
    return isinstance(exc, BotoConnectionError | HTTPClientError)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _without_userinfo(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def _item_key(hash_key: str, sort_key: str) -> dict[str, Any]:
    return {HASH_KEY: {"S": hash_key}, RANGE_KEY: {"S": sort_key}}


def _is_segment_item(item: Mapping[str, Any]) -> bool:
    """A membership item, not one of the alias index's (their sort keys hold no ``/``)."""
    return "/" in item[RANGE_KEY]["S"]


def _decode_item(item: Mapping[str, Any]) -> tuple[SegmentKey, StoredMembership]:
    return decode_segment(item[RANGE_KEY]["S"]), StoredMembership(_STATUS[item["status"]["S"]], int(item["qualifiedAtUs"]["N"]))


class DynamoDBStore(SingleProfileAccess, ScanQueries, RedirectFollowing):
    """Membership state in a DynamoDB table (see the module docstring for the item layout).

    ``region`` and ``endpoint_url`` default to the standard AWS environment: ``AWS_REGION``, then
    botocore's chain (``AWS_DEFAULT_REGION``, the profile); ``AWS_ENDPOINT_URL_DYNAMODB`` or
    ``AWS_ENDPOINT_URL``. With ``client`` (an aiobotocore DynamoDB client) the store uses it as
    is and never closes it.
    """

    def __init__(
        self,
        table: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any = None,
        max_attempts: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        concurrency: int = 16,
        open_timeout_s: float = 300.0,
        create_table: bool = True,
    ) -> None:
        if not (_TABLE_NAME.fullmatch(table) or table.startswith("arn:")):
            raise ValueError(f"invalid DynamoDB table name {table!r}: 3-255 characters of A-Z a-z 0-9 _ . -")
        if max_attempts < 1 or concurrency < 1:
            raise ValueError("max_attempts and concurrency must be at least 1")
        self.table = table
        self.region = region
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = concurrency
        self.open_timeout_s = open_timeout_s
        self.create_table = create_table  # False: a missing table is an error (the state tool)
        # Calls repeated after throttling or a transient error, or for UnprocessedKeys (for metrics and tests).
        self.retries = 0
        self._client: Any = client
        self._owns_client = client is None
        self._exit_stack: contextlib.AsyncExitStack | None = None

    def __repr__(self) -> str:
        region = self.region
        endpoint = self.endpoint_url
        if self._client is not None:  # what the client resolved (from the environment, say)
            region = getattr(self._client.meta, "region_name", region)
            endpoint = getattr(self._client.meta, "endpoint_url", endpoint)
        return f"DynamoDBStore(table={self.table!r}, region={region!r}, endpoint_url={_without_userinfo(endpoint)!r})"

    # --- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        if self._client is None:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            stack = contextlib.AsyncExitStack()
            config = AioConfig(
                retries={"mode": "standard", "total_max_attempts": 1},  # retried here, see the docstring
                max_pool_connections=64,  # the pipeline's default concurrency: one lane, one connection
            )
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "dynamodb",
                    region_name=self.region or os.environ.get("AWS_REGION") or None,  # botocore skips AWS_REGION
                    endpoint_url=self.endpoint_url,
                    config=config,
                )
            )
            self._exit_stack = stack
        try:
            await self._ensure_table()
        except (ClientError, BotoCoreError) as exc:
            await self.close()
            raise StartupError(f"membership store {self!r} cannot be opened: {_describe_aws_error(exc)}") from exc
        except BaseException:
            await self.close()
            raise

    async def _ensure_table(self) -> None:
        """Wait until the table serves requests, creating it first if it is missing."""
        deadline = time.monotonic() + self.open_timeout_s
        delay = 0.05
        while True:
            try:
                table = (await self._call(self._client.describe_table, TableName=self.table))["Table"]
            except ClientError as exc:
                if _error_code(exc) != "ResourceNotFoundException":
                    raise
                if not self.create_table:
                    raise StoreMissing(f"DynamoDB table {self.table!r} does not exist") from None
                await self._create_table()  # tolerates a concurrent creator
                status = "missing"
            else:
                status = table.get("TableStatus")
                if status in ("ACTIVE", "UPDATING"):  # UPDATING (a new GSI, a billing change) still serves
                    self._check_schema(table)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"DynamoDB table {self.table!r} is {status}, not ACTIVE, after {self.open_timeout_s:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _create_table(self) -> None:
        log.info("creating DynamoDB table", extra={"table": self.table})
        try:
            await self._call(
                self._client.create_table,
                TableName=self.table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": HASH_KEY, "AttributeType": "S"},
                    {"AttributeName": RANGE_KEY, "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": HASH_KEY, "KeyType": "HASH"},
                    {"AttributeName": RANGE_KEY, "KeyType": "RANGE"},
                ],
            )
        except ClientError as exc:
            if _error_code(exc) != "ResourceInUseException":  # another replica is creating it: wait for it
                raise

    def _check_schema(self, table: Mapping[str, Any]) -> None:
        keys = {key["KeyType"]: key["AttributeName"] for key in table.get("KeySchema", [])}
        types = {attr["AttributeName"]: attr["AttributeType"] for attr in table.get("AttributeDefinitions", [])}
        if keys != {"HASH": HASH_KEY, "RANGE": RANGE_KEY} or types.get(HASH_KEY) != "S" or types.get(RANGE_KEY) != "S":
            raise ValueError(
                f"DynamoDB table {self.table!r} is not a membership table: its key is {keys} {types}, "
                f"expected {HASH_KEY} (HASH, S) and {RANGE_KEY} (RANGE, S)"
            )

    async def flush(self) -> None:
        pass  # every save is written before it returns

    async def close(self) -> None:
        stack, self._exit_stack = self._exit_stack, None
        if self._owns_client:
            self._client = None
        if stack is not None:
            await stack.aclose()

    # --- reads and writes ----------------------------------------------------------------
    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]:
        assert self._client is not None, "store not opened"
        states: dict[str, ProfileState] = {}
        jobs: list[Callable[[], Awaitable[None]]] = []
        keys: list[dict[str, Any]] = []
        for profile_key, segments in profiles.items():
            if segments is None:
                jobs.append(partial(self._query, profile_key, states))
                continue
            # A set: BatchGetItem refuses a request that names one key twice.
            for encoded in {encode_segment(*key) for key in segments}:
                keys.append({HASH_KEY: {"S": profile_key}, RANGE_KEY: {"S": encoded}})
        for start in range(0, len(keys), BATCH_GET_MAX_KEYS):
            jobs.append(partial(self._batch_get, keys[start:start + BATCH_GET_MAX_KEYS], states))
        await self._run_bounded(jobs)
        return states

    async def _query(self, profile_key: str, states: dict[str, ProfileState]) -> None:
        """Every segment of one profile into ``states`` (nothing when it has none)."""
        state: ProfileState = {}
        async for item in self._profile_items(profile_key, "#sk, #status, #at", _NAMES):
            if _is_segment_item(item):
                key, value = _decode_item(item)
                state[key] = value
        if state:
            states[profile_key] = state

    async def _profile_items(self, profile_key: str, projection: str,
                             names: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Every item under one hash key: a paginated, strongly consistent Query (``names`` maps ``#pk``)."""
        request: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "#pk = :pk",
            "ProjectionExpression": projection,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": {":pk": {"S": profile_key}},
            "ConsistentRead": True,
        }
        while True:
            page = await self._call(self._client.query, **request)
            for item in page.get("Items", ()):
                yield item
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    async def _batch_get(self, keys: list[dict[str, Any]], states: dict[str, ProfileState]) -> None:
        """The items of ``keys`` (at most 100) that exist into ``states``, following UnprocessedKeys."""
        def collect(item: Mapping[str, Any]) -> None:
            key, value = _decode_item(item)
            states.setdefault(item[HASH_KEY]["S"], {})[key] = value

        await self._batch_get_items(keys, _BATCH_PROJECTION, _NAMES, collect)

    async def _batch_get_items(self, keys: list[dict[str, Any]], projection: str, names: Mapping[str, str],
                               sink: Callable[[Mapping[str, Any]], None]) -> None:
        """Each existing item of ``keys`` (at most 100) to ``sink``, following UnprocessedKeys."""
        get = self._client.batch_get_item
        rounds = 0
        while True:
            page = await self._call(
                get,
                RequestItems={
                    self.table: {
                        "Keys": keys,
                        "ConsistentRead": True,
                        "ProjectionExpression": projection,
                        "ExpressionAttributeNames": names,
                    }
                },
            )
            for items in page.get("Responses", {}).values():  # one table asked: whatever name it is keyed by
                for item in items:
                    sink(item)
            # Only the keys are taken from UnprocessedKeys; the request around them is rebuilt, so the
            # projection and consistency never depend on what the answer echoes back.
            keys = [key for pending in page.get("UnprocessedKeys", {}).values() for key in pending.get("Keys", ())]
            if not keys:
                return
            # Not bounded by max_attempts: DynamoDB answers UnprocessedKeys only when it served some keys
            # of the request (it raises ProvisionedThroughputExceeded, retried by _call, when it served
            # none), so every round makes progress and the loop ends.
            rounds += 1
            delay = self._backoff(rounds)
            self.retries += 1
            log.debug(
                "DynamoDB BatchGetItem left keys unprocessed",
                extra={"table": self.table, "unprocessed": len(keys), "round": rounds, "delay_s": round(delay, 3)},
            )
            await asyncio.sleep(delay)

    # --- the alias index (identity linking) ----------------------------------------------------
    async def _alias_owners(self, aliases: list[str]) -> dict[str, str]:
        return await self._pointers(aliases, ALIAS_SK)

    async def _redirect_targets(self, keys: list[str]) -> dict[str, str]:
        return await self._pointers(keys, REDIRECT_SK)

    async def _pointers(self, keys: list[str], sort_key: str) -> dict[str, str]:
        """hash key -> its ``profile`` attribute, for the items (key, ``sort_key``) that exist."""
        found: dict[str, str] = {}

        def collect(item: Mapping[str, Any]) -> None:
            found[item[HASH_KEY]["S"]] = item["profile"]["S"]

        unique = list(dict.fromkeys(keys))  # BatchGetItem refuses a request that names one key twice
        await self._run_bounded(
            partial(self._batch_get_items, [_item_key(key, sort_key) for key in unique[start:start + BATCH_GET_MAX_KEYS]],
                    "#pk, #profile", _POINTER_NAMES, collect)
            for start in range(0, len(unique), BATCH_GET_MAX_KEYS))
        return found

    async def _claim_owners(self, claims: Mapping[str, str]) -> dict[str, str]:
        owners: dict[str, str] = {}
        await self._run_bounded(partial(self._claim, alias, key, owners) for alias, key in claims.items())
        won: dict[str, list[str]] = {}
        for alias, key in claims.items():
            if owners[alias] == key:
                won.setdefault(key, []).append(alias)
        await self._run_bounded(partial(self._add_aliases, key, aliases) for key, aliases in won.items())
        return owners

    async def _claim(self, alias: str, key: str, owners: dict[str, str]) -> None:
        """The conditional create of one alias item; ``owners[alias]`` is then whoever holds it."""
        while True:
            try:
                await self._put_pointer(alias, ALIAS_SK, key, condition=_CLAIM_FREE)
            except ClientError as exc:
                if _error_code(exc) != "ConditionalCheckFailedException":
                    raise
            else:
                owners[alias] = key
                return
            # Held already: by whom? Alias items are overwritten by merges, never deleted, so it is
            # there; if someone deleted it by hand meanwhile, the claim is simply made again.
            item = await self._get_item(alias, ALIAS_SK, "#profile", {"#profile": "profile"})
            if item is not None:
                owners[alias] = item["profile"]["S"]
                return

    async def _add_aliases(self, profile_key: str, aliases: list[str]) -> None:
        await self._call(
            self._client.update_item,
            TableName=self.table,
            Key=_item_key(profile_key, ALIASES_SK),
            UpdateExpression="ADD #aliases :a",
            ExpressionAttributeNames={"#aliases": "aliases"},
            ExpressionAttributeValues={":a": {"SS": sorted(set(aliases))}},
        )

    async def redirect_profiles(self, redirects: Mapping[str, str]) -> None:
        assert self._client is not None, "store not opened"
        await self._run_bounded(partial(self._redirect, absorbed, survivor) for absorbed, survivor in redirects.items())

    async def _redirect(self, absorbed: str, survivor: str) -> None:
        # The redirect first: from then on every lookup that reaches the absorbed key goes on to
        # the survivor, whichever later step an outage interrupts.
        await self._put_pointer(absorbed, REDIRECT_SK, survivor)
        aliases = await self.aliases_of(absorbed)
        if aliases:
            await self._add_aliases(survivor, aliases)
            await self._run_bounded(partial(self._put_pointer, alias, ALIAS_SK, survivor) for alias in aliases)
        # Then the absorbed profile's own items: its membership (the survivor's now) and its alias set.
        doomed = [sort_key async for item in self._profile_items(absorbed, "#sk", {"#pk": HASH_KEY, "#sk": RANGE_KEY})
                  if "/" in (sort_key := item[RANGE_KEY]["S"]) or sort_key == ALIASES_SK]
        await self._run_bounded(
            partial(self._call, self._client.delete_item, TableName=self.table, Key=_item_key(absorbed, sort_key))
            for sort_key in doomed)

    # --- profile claims ------------------------------------------------------------------------
    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]:
        assert self._client is not None, "store not opened"
        held: set[str] = set()
        now_ms = int(time.time() * 1000)
        await self._run_bounded(partial(self._claim_profile, key, owner, now_ms, now_ms + int(ttl_s * 1000), held)
                                for key in keys)
        return held

    async def _claim_profile(self, key: str, owner: str, now_ms: int, expires_ms: int, held: set[str]) -> None:
        try:
            await self._call(
                self._client.put_item, TableName=self.table,
                Item={**_item_key(key, CLAIM_SK), "owner": {"S": owner}, "expiresAtMs": {"N": str(expires_ms)}},
                ConditionExpression=_PROFILE_CLAIMABLE, ExpressionAttributeNames=_CLAIM_NAMES,
                ExpressionAttributeValues={":owner": {"S": owner}, ":now": {"N": str(now_ms)}})
        except ClientError as exc:
            if _error_code(exc) != "ConditionalCheckFailedException":
                raise
            return  # another replica holds it
        held.add(key)

    async def release_profiles(self, keys: Collection[str], owner: str) -> None:
        assert self._client is not None, "store not opened"
        await self._run_bounded(partial(self._release_profile, key, owner) for key in keys)

    async def _release_profile(self, key: str, owner: str) -> None:
        try:
            await self._call(self._client.delete_item, TableName=self.table, Key=_item_key(key, CLAIM_SK),
                             ConditionExpression="#owner = :owner", ExpressionAttributeNames={"#owner": "owner"},
                             ExpressionAttributeValues={":owner": {"S": owner}})
        except ClientError as exc:
            if _error_code(exc) != "ConditionalCheckFailedException":
                raise  # else: expired and taken by another replica, or gone: not ours to free

    async def aliases_of(self, profile_key: str) -> list[str]:
        item = await self._get_item(profile_key, ALIASES_SK, "#aliases", {"#aliases": "aliases"})
        return sorted(item["aliases"]["SS"]) if item else []

    async def _put_pointer(self, hash_key: str, sort_key: str, profile_key: str, condition: str | None = None) -> None:
        request: dict[str, Any] = {"TableName": self.table,
                                   "Item": {**_item_key(hash_key, sort_key), "profile": {"S": profile_key}}}
        if condition is not None:
            request.update(ConditionExpression=condition, ExpressionAttributeNames={"#pk": HASH_KEY})
        await self._call(self._client.put_item, **request)

    async def _get_item(self, hash_key: str, sort_key: str, projection: str,
                        names: Mapping[str, str]) -> Mapping[str, Any] | None:
        assert self._client is not None, "store not opened"
        page = await self._call(self._client.get_item, TableName=self.table, Key=_item_key(hash_key, sort_key),
                                ConsistentRead=True, ProjectionExpression=projection, ExpressionAttributeNames=names)
        item: Mapping[str, Any] | None = page.get("Item")
        return item

    # --- asking the state (operators' tool) -------------------------------------------------
    scan_note = "a Scan of the whole table: it reads, and is billed for, every item (there is no index by segment)"

    async def _scan(self, **request: Any) -> AsyncIterator[dict[str, Any]]:
        """Every item a paginated, eventually consistent Scan returns."""
        assert self._client is not None, "store not opened"
        request = {"TableName": self.table, **request}
        while True:
            page = await self._call(self._client.scan, **request)
            for item in page.get("Items", ()):
                yield item
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    async def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]:
        # A Scan returns the items of one partition key together (an item collection is stored
        # together, in range key order), so a profile is complete when the next one starts.
        current: str | None = None
        state: ProfileState = {}
        async for item in self._scan(ProjectionExpression=_BATCH_PROJECTION, ExpressionAttributeNames=_NAMES):
            if not _is_segment_item(item):
                continue
            profile_key = item[HASH_KEY]["S"]
            if profile_key != current:
                if current is not None:
                    yield current, state
                current, state = profile_key, {}
            key, value = _decode_item(item)
            state[key] = value
        if current is not None:
            yield current, state

    async def members(self, segment: SegmentKey) -> AsyncIterator[str]:
        async for item in self._scan(
                ProjectionExpression="#pk",
                ExpressionAttributeNames={"#pk": HASH_KEY, "#sk": RANGE_KEY, "#status": "status"},
                FilterExpression="#sk = :sk AND #status <> :exited",
                ExpressionAttributeValues={":sk": {"S": encode_segment(*segment)},
                                           ":exited": {"S": SegmentStatus.EXITED.value}}):
            yield item[HASH_KEY]["S"]

    async def save_many(self, updates: Updates) -> None:
        assert self._client is not None, "store not opened"
        # Each (profile, segment) appears once in a call, so its writes are independent and may go out
        # together; the condition orders each one against every other writer.
        await self._run_bounded(
            partial(self._write, profile_key, key, value)
            for profile_key, changes in updates.items()
            for key, value in changes.items()
        )

    async def _run_bounded(self, jobs: Iterable[Callable[[], Awaitable[None]]]) -> None:
        """Run ``jobs``, at most ``concurrency`` at once; let every one finish, then raise the first failure."""
        queue = list(jobs)
        if len(queue) <= 1:  # the common single request: no workers to start
            for job in queue:
                await job()
            return
        shared = iter(queue)
        failures: list[Exception] = []

        async def worker() -> None:
            for job in shared:  # one iterator shared by the workers: each job runs once
                try:
                    await job()
                except Exception as exc:  # noqa: BLE001 - raised once the other jobs are done
                    failures.append(exc)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(queue)))))
        # Finishing the others first leaves less to redo: a retried call repeats jobs harmlessly.
        if failures:
            raise failures[0]

    async def _write(self, profile_key: str, key: SegmentKey, value: StoredMembership) -> None:
        try:
            await self._call(
                self._client.update_item,
                TableName=self.table,
                Key={HASH_KEY: {"S": profile_key}, RANGE_KEY: {"S": encode_segment(*key)}},
                UpdateExpression=_UPDATE,
                ConditionExpression=_SUPERSEDES,
                ExpressionAttributeNames={"#status": "status", "#at": "qualifiedAtUs"},
                ExpressionAttributeValues={":s": {"S": value.status.value}, ":t": {"N": str(value.qualified_at_us)}},
            )
        except ClientError as exc:
            if _error_code(exc) != "ConditionalCheckFailedException":
                raise
            # A newer value (or this very one) is already stored: the condition did its job.

    def _backoff(self, attempt: int) -> float:
        """Full jitter under a ceiling that doubles per attempt (1-based), capped at ``max_backoff_s``."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

    async def _call(self, method: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
        """``method(**kwargs)``, retried on throttling and transient errors with full-jitter backoff."""
        attempt = 1
        while True:
            try:
                return await method(**kwargs)
            except (ClientError, BotoConnectionError, HTTPClientError) as exc:
                if attempt >= self.max_attempts or not _is_retryable(exc):
                    raise
                delay = self._backoff(attempt)
                self.retries += 1
                log.debug(
                    "DynamoDB call retried",
                    extra={"table": self.table, "attempt": attempt, "delay_s": round(delay, 3), "error": repr(exc)},
                )
                attempt += 1
                await asyncio.sleep(delay)


def _describe_aws_error(exc: BaseException) -> str:
    """The code and AWS's first message line (later lines can echo signed headers)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        message = str(error.get("Message", "")).splitlines()[0] if error.get("Message") else ""
        hint = (" (grant dynamodb:DescribeTable, Query, BatchGetItem, UpdateItem, PutItem, GetItem, DeleteItem"
                " and CreateTable)") if "AccessDenied" in str(error.get("Code")) else ""
        return f"{exc.operation_name} gave {error.get('Code')}: {message}{hint}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
