"""aiobotocore clients for the Kinesis source, error classification, and backoff.

botocore's own retries are off (one attempt per call): the shard readers and the lease
code retry themselves, with full jitter and a ceiling, so that throttling shows up in
logs and counters instead of hiding inside the SDK, and so that a stop is never stuck
behind an SDK retry loop. Code calling these clients must therefore retry throttling
and network errors itself (``is_retryable`` + ``Backoff``).

Messages built here never contain credentials: ``explain`` uses the error code, the
operation, the stream or table name, the region and the endpoint (without any userinfo),
and AWS's own error message only for codes it does not know (AWS never echoes secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator
from typing import Any, NotRequired, TypedDict

import aiohttp
import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ....errors import StartupError
from .settings import KinesisSettings

__all__ = [
    "AwsError",
    "Backoff",
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_POOL_CONNECTIONS",
    "READ_TIMEOUT_S",
    "check_stream",
    "client_config",
    "create_session",
    "dynamodb_client",
    "error_code",
    "explain",
    "is_expired_iterator",
    "is_retryable",
    "is_retryable_network",
    "is_throttle",
    "kinesis_client",
]

log = logging.getLogger(__name__)

KinesisClient = Any  # aiobotocore clients are generated at run time: no static type to name
DynamoDBClient = Any

CONNECT_TIMEOUT_S = 5.0
# botocore's read timeout is per socket read, not per call: a 10 MiB GetRecords streams in
# far sooner than this, and a silent peer is noticed (ReadTimeoutError, retried) after it.
READ_TIMEOUT_S = 30.0
# One pooled connection per shard read concurrently, plus lease and ListShards calls.
# A replica reading more shards than this should pass max_pool_connections.
DEFAULT_MAX_POOL_CONNECTIONS = 128
# total_max_attempts=1 is one attempt and no SDK retry. (botocore's older key
# "max_attempts" counts *retries*: {"max_attempts": 1} would still retry once, silently.)
RETRIES: dict[str, Any] = {"total_max_attempts": 1, "mode": "standard"}

THROTTLE_CODES = frozenset({
    "ProvisionedThroughputExceededException",  # Kinesis GetRecords/PutRecords, DynamoDB
    "LimitExceededException",  # Kinesis control plane (ListShards, DescribeStreamSummary, GetShardIterator)
    "ThrottlingException",  # DynamoDB control plane, STS
    "RequestLimitExceeded",  # DynamoDB account-level
    "KMSThrottlingException",  # GetRecords on a KMS-encrypted stream
})
EXPIRED_ITERATOR_CODES = frozenset({"ExpiredIteratorException"})
SERVER_ERROR_CODES = frozenset({"InternalFailure", "InternalServerError", "ServiceUnavailable",
                                "ServiceUnavailableException", "KMSInternalException"})
CREDENTIAL_REJECTED_CODES = frozenset({"UnrecognizedClientException", "InvalidSignatureException",
                                       "ExpiredTokenException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                                       "IncompleteSignatureException", "MissingAuthenticationTokenException"})

_KINESIS_OPERATIONS = frozenset({
    "GetRecords", "GetShardIterator", "ListShards", "DescribeStream", "DescribeStreamSummary", "ListStreams",
    "PutRecord", "PutRecords", "CreateStream", "DeleteStream", "SplitShard", "MergeShards", "UpdateShardCount",
    "SubscribeToShard", "RegisterStreamConsumer", "DescribeStreamConsumer", "DeregisterStreamConsumer",
    "ListStreamConsumers", "AddTagsToStream", "ListTagsForStream",
})


class AwsError(StartupError):
    """A call failed for a reason the operator has to fix; ``str()`` is ``explain()``'s sentence.
    The original exception is chained (``__cause__``) and its code kept in ``code``."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# --- clients ---------------------------------------------------------------------------
def create_session() -> AioSession:
    """A fresh aiobotocore session (credentials and region from the standard AWS chain)."""
    return get_session()


def client_config(*, max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS) -> AioConfig:
    return AioConfig(
        retries=dict(RETRIES),
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=max_pool_connections,
        tcp_keepalive=True,
        user_agent_extra="segment-relay",
    )


def _raw_timestamp(value: Any) -> Any:
    return value


class _GetRecordsRecord(TypedDict):
    SequenceNumber: str
    Data: bytes  # msgspec decodes the base64 straight into bytes
    ApproximateArrivalTimestamp: NotRequired[Any]
    PartitionKey: NotRequired[str]
    EncryptionType: NotRequired[str]


class _GetRecordsOutput(TypedDict):
    Records: list[_GetRecordsRecord]
    NextShardIterator: NotRequired[str]
    MillisBehindLatest: NotRequired[int]
    ChildShards: NotRequired[list[Any]]


_decode_get_records = msgspec.json.Decoder(_GetRecordsOutput).decode


class _FastGetRecordsParser(AioJSONParser):
    """botocore's JSON parser, except for a successful GetRecords: decoded by msgspec in one pass.

    botocore walks the output shape field by field for every record, which cost about as much
    CPU per record as the whole relay pipeline; orjson then base64 per record still cost 12 us
    per 1.5 KB record, msgspec (JSON and base64 in C, into plain dicts) 3.6 us. The result has
    the same keys and types (``Data`` as bytes, timestamps raw); errors, every other operation,
    and a body msgspec does not expect take botocore's path.
    """

    async def _do_parse(self, response: dict[str, Any], shape: Any) -> Any:
        if shape is None or shape.name != "GetRecordsOutput" or not response["body"]:
            return await super()._do_parse(response, shape)
        try:
            parsed: dict[str, Any] = _decode_get_records(response["body"])  # type: ignore[assignment]
        except msgspec.DecodeError:
            return await super()._do_parse(response, shape)
        self._inject_response_metadata(parsed, response["headers"])
        return parsed


class _KinesisParserFactory(AioResponseParserFactory):
    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            return _FastGetRecordsParser(**self._defaults)
        return super().create_parser(protocol_name)


@contextlib.asynccontextmanager
async def kinesis_client(
    settings: KinesisSettings, *, session: AioSession | None = None,
    max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
) -> AsyncIterator[KinesisClient]:
    """A Kinesis client for ``settings.region`` and ``settings.endpoint_url`` (None: the standard
    chain, including AWS_ENDPOINT_URL_KINESIS). Closed, with its connection pool, on exit."""
    if session is None:
        session = create_session()
        # GetRecords is the hot path: parse it with msgspec (see _FastGetRecordsParser), and keep
        # timestamps as received (epoch floats) everywhere: converting every record's arrival time
        # to a local datetime was half of botocore's parsing cost, and nothing here reads it.
        # Both settings belong to the session: this one is ours alone.
        factory = _KinesisParserFactory()
        factory.set_parser_defaults(timestamp_parser=_raw_timestamp)
        session.register_component("response_parser_factory", factory)
    async with session.create_client(
        "kinesis", region_name=settings.region, endpoint_url=settings.endpoint_url,
        config=client_config(max_pool_connections=max_pool_connections),
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def dynamodb_client(
    settings: KinesisSettings, *, session: AioSession | None = None,
    max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
) -> AsyncIterator[DynamoDBClient]:
    """A DynamoDB client (the lease table) for ``settings.region`` and ``settings.dynamodb_endpoint_url``."""
    session = session or create_session()
    async with session.create_client(
        "dynamodb", region_name=settings.region, endpoint_url=settings.dynamodb_endpoint_url,
        config=client_config(max_pool_connections=max_pool_connections),
    ) as client:
        yield client


# --- classification --------------------------------------------------------------------
def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a ClientError, else None."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def _http_status(exc: ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else 0


def is_throttle(exc: BaseException) -> bool:
    """AWS refused the call for rate: retry after a backoff."""
    return error_code(exc) in THROTTLE_CODES


def is_expired_iterator(exc: BaseException) -> bool:
    """The shard iterator is older than 5 minutes: get a new one from the last position read."""
    return error_code(exc) in EXPIRED_ITERATOR_CODES


def is_retryable_network(exc: BaseException) -> bool:
    """The request may not have reached AWS or its answer was lost: retry it.

    TLS errors (botocore SSLError: certificate or proxy set-up) are not retried; they do not
    heal by themselves and should surface with ``explain``.
    """
    if isinstance(exc, SSLError):
        return False
    return isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, BotoConnectionError,
                            HTTPClientError, aiohttp.ClientError, TimeoutError, OSError))


def is_server_error(exc: BaseException) -> bool:
    """AWS answered 5xx (InternalFailure, ServiceUnavailable, ...): transient, retry."""
    if not isinstance(exc, ClientError):
        return False
    return error_code(exc) in SERVER_ERROR_CODES or _http_status(exc) >= 500


def is_retryable(exc: BaseException) -> bool:
    """Throttling, network and 5xx errors: the same call may succeed after a backoff."""
    return is_throttle(exc) or is_retryable_network(exc) or is_server_error(exc)


# --- explanations ----------------------------------------------------------------------
def _region(settings: KinesisSettings) -> str:
    region = settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return region or "the default region"


def _safe_url(url: str | None) -> str | None:
    """The URL without userinfo, query or fragment (never print credentials someone put in it)."""
    if not url:
        return None
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    # Cut at the LAST "@": a secret with an unencoded "/" or ":" must not survive as path or port.
    rest = rest.rsplit("@", 1)[-1]
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{rest}" if scheme else rest


def _service(operation: str) -> str:
    return "kinesis" if operation in _KINESIS_OPERATIONS else "dynamodb"


def _resource(service: str, settings: KinesisSettings) -> str:
    if service == "kinesis":
        return f"Kinesis stream {settings.stream_name!r}"
    return f"DynamoDB table {settings.lease_table!r}"


def _aws_message(exc: ClientError) -> str:
    """AWS's own message, first line only: a signature error goes on with the canonical
    request, which can hold a session token header."""
    message = str(exc.response.get("Error", {}).get("Message") or "")
    return message.strip().splitlines()[0][:300] if message.strip() else ""


def explain(exc: BaseException, settings: KinesisSettings) -> str:
    """One sentence an operator can act on, without credentials."""
    region = _region(settings)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ("No usable AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or run with an IAM role (instance profile, EKS IRSA / pod identity, ECS task role).")
    if isinstance(exc, NoRegionError):
        return ("No AWS region is configured: set region in the [kinesis] config section, "
                "or AWS_REGION / AWS_DEFAULT_REGION in the environment.")
    if isinstance(exc, ClientError):
        code = error_code(exc) or "UnknownError"
        operation = exc.operation_name or "the call"
        service = _service(operation)
        resource = _resource(service, settings)
        permission = f"{service}:{operation}"
        endpoint = settings.endpoint_url if service == "kinesis" else settings.dynamodb_endpoint_url
        where = f"region {region}" + (f" (endpoint {_safe_url(endpoint)})" if endpoint else "")
        if code == "ResourceNotFoundException":
            if operation in ("GetShardIterator", "GetRecords"):  # the stream, or only this shard (trimmed, deleted)
                message = _aws_message(exc)
                return (f"{resource} or one of its shards was not found in {where} ({operation} gave {code}"
                        + (f": {message}" if message else "") + "): check the stream name and the region.")
            if service == "kinesis":
                return (f"{resource} was not found in {where} ({operation} gave {code}): "
                        f"check the stream name and the region.")
            return (f"{resource} was not found in {where} ({operation} gave {code}): check the application "
                    f"setting (the lease table is named <application>-leases), the region, and that it was created.")
        if code == "AccessDeniedException":
            return (f"Access denied: the AWS identity in use lacks the IAM permission {permission} "
                    f"on {resource} in {where}; grant it to the consumer's role or user.")
        if code == "KMSAccessDeniedException":
            return (f"Access denied by KMS: {resource} is encrypted and the AWS identity in use lacks "
                    f"kms:Decrypt on its key (needed for {permission}); grant it in the key policy or IAM.")
        if code in CREDENTIAL_REJECTED_CODES:
            return (f"AWS rejected the credentials ({code}) when calling {permission} on {resource} in {where}: "
                    f"check that the access key, secret and session token are current and belong to this "
                    f"account and partition.")
        if is_throttle(exc):
            return (f"AWS throttled {permission} on {resource} ({code}): too many readers or calls per second "
                    f"for the shard or account; it is retried with backoff.")
        if is_expired_iterator(exc):
            return (f"A shard iterator of {resource} expired ({code}, iterators live 5 minutes): "
                    f"the reader takes a new one after the last record it read.")
        message = _aws_message(exc)
        return f"{permission} on {resource} in {where} failed with {code}" + (f": {message}" if message else ".")
    if isinstance(exc, SSLError):
        url = _safe_url(getattr(exc, "kwargs", {}).get("endpoint_url"))
        return (f"TLS to the AWS endpoint {url or '(unknown)'} failed: check the CA bundle "
                f"(AWS_CA_BUNDLE), any TLS-inspecting proxy, and the endpoint URL.")
    if is_retryable_network(exc):
        url = _safe_url(getattr(exc, "kwargs", {}).get("endpoint_url")) or _safe_url(settings.endpoint_url)
        target = f"the AWS endpoint {url}" if url else f"the AWS endpoint for region {region}"
        return (f"Could not reach {target} ({type(exc).__name__}): check the network, DNS, proxy "
                f"(HTTPS_PROXY) or VPC endpoint, and the endpoint_url and region settings.")
    return f"{type(exc).__name__}: {exc}"


# --- stream check ----------------------------------------------------------------------
async def check_stream(client: KinesisClient, settings: KinesisSettings, *, attempts: int = 5) -> list[dict[str, Any]]:
    """DescribeStreamSummary, then every shard from ListShards (following NextToken).

    Throttling, network and 5xx errors are retried ``attempts`` times in all with backoff;
    any other failure, or the last retryable one, raises ``AwsError`` with ``explain()``'s
    sentence. Closed shards are included (resharding logic needs their parents).
    """
    backoff = Backoff(settings.max_backoff_s)
    name = settings.stream_name

    async def call(method: Any, **kwargs: Any) -> dict[str, Any]:
        for attempt in range(1, attempts + 1):
            try:
                response: dict[str, Any] = await method(**kwargs)
                return response
            except Exception as exc:
                if attempt < attempts and is_retryable(exc):
                    delay = backoff.next_delay()
                    log.warning("stream check failed; retrying",
                                extra={"stream": name, "error": error_code(exc) or type(exc).__name__,
                                       "attempt": attempt, "delay_s": round(delay, 3)})
                    await asyncio.sleep(delay)
                    continue
                raise AwsError(explain(exc, settings), code=error_code(exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    summary = (await call(client.describe_stream_summary, StreamName=name))["StreamDescriptionSummary"]
    status = summary.get("StreamStatus")
    if status not in ("ACTIVE", "UPDATING"):
        log.warning("stream is not active", extra={"stream": name, "status": status})
    response = await call(client.list_shards, StreamName=name)
    shards: list[dict[str, Any]] = list(response.get("Shards", []))
    token = response.get("NextToken")
    while token:
        # A page after the first takes NextToken alone: AWS rejects StreamName with it.
        response = await call(client.list_shards, NextToken=token)
        shards.extend(response.get("Shards", []))
        token = response.get("NextToken")
    return shards


# --- backoff ---------------------------------------------------------------------------
class Backoff:
    """Exponential backoff with full jitter: the n-th delay in a row is uniform in
    [0, min(ceiling, initial * 2**n)]. ``reset()`` after a success."""

    def __init__(self, ceiling_s: float, *, initial_s: float = 0.1, rng: random.Random | None = None) -> None:
        if initial_s <= 0 or ceiling_s <= 0:
            raise ValueError("backoff delays must be positive")
        self.initial_s = initial_s
        self.ceiling_s = ceiling_s
        self.attempt = 0  # failures in a row
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.ceiling_s, self.initial_s * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return self._rng.uniform(0, cap)

    def reset(self) -> None:
        self.attempt = 0
