"""The built-in handlers: log, jsonl and webhook (against a real local HTTP server)."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from segment_relay import SegmentChange
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.handlers.api import BatchResult, HandlerRetry, PermanentHandlerError
from segment_relay.handlers.builtin import (
    JsonlHandler,
    LogHandler,
    WebhookBatchHandler,
    WebhookHandler,
    parse_retry_after,
    redact_url,
)
from segment_relay.handlers.router import BatchSettings, RetryPolicy, Router

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
from handler_targets import make_change  # noqa: E402

SUMMARY_KEYS = {"change", "segment_id", "profile_key", "qualified_at", "change_id"}


# --- log -------------------------------------------------------------------------------------------


async def test_log_writes_one_parseable_json_line_per_change() -> None:
    stream = io.BytesIO()
    handler = LogHandler(stream)
    changes = [make_change(profile_key="ecid:1"), make_change(change="exit", profile_key="ecid:2")]
    await handler.start()
    for change in changes:
        await handler.handle(change)
    await handler.flush()
    await handler.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    for line, change in zip(lines, changes, strict=True):
        decoded = orjson.loads(line)
        assert SUMMARY_KEYS <= decoded.keys()
        assert decoded == change.to_dict()
    assert orjson.loads(lines[1])["change"] == "exit"
    assert handler.name == "log"


async def test_log_defaults_to_stdout(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    handler = LogHandler()
    change = make_change()
    await handler.handle(change)
    await handler.flush()
    out = capsysbinary.readouterr().out
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    assert orjson.loads(out)["change_id"] == change.change_id


# --- jsonl -----------------------------------------------------------------------------------------


async def test_jsonl_appends_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "changes.jsonl"  # parent dirs are created
    first = JsonlHandler(path)
    await first.start()
    await first.handle(make_change(profile_key="ecid:1"))
    await first.handle(make_change(profile_key="ecid:2"))
    await first.flush()
    # flush() made it durable without closing the file
    assert [orjson.loads(line)["profile_key"] for line in path.read_bytes().splitlines()] == ["ecid:1", "ecid:2"]
    await first.close()
    await first.close()  # idempotent

    second = JsonlHandler(str(path))
    await second.start()
    await second.handle(make_change(change="exit", profile_key="ecid:1"))
    await second.close()

    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [(r["profile_key"], r["change"]) for r in records] == [
        ("ecid:1", "enter"), ("ecid:2", "enter"), ("ecid:1", "exit"),
    ]
    assert all(SUMMARY_KEYS <= r.keys() for r in records)


async def test_jsonl_starts_on_a_fresh_line_after_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "changes.jsonl"
    path.write_bytes(b'{"change":"enter"}\n{"change":"ent')  # a crash mid-line
    handler = JsonlHandler(path)
    await handler.start()
    await handler.handle(make_change())
    await handler.close()
    lines = path.read_bytes().splitlines()
    assert lines[1] == b'{"change":"ent'
    assert orjson.loads(lines[2])["change"] == "enter"


async def test_jsonl_handle_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="start"):
        await JsonlHandler(tmp_path / "x.jsonl").handle(make_change())


# --- webhook: a real local server --------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    query: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


class Hook:
    """Records every request and answers from a script of (status, headers); 200 once it is used up."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[tuple[int, dict[str, str]] | tuple[int, dict[str, str], bytes]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server: TestServer | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(
            request.method, request.path, request.query_string, request.raw_path, dict(request.headers), await request.read(),
        ))
        status, headers, *body = self.script.pop(0) if self.script else (200, {})
        return web.Response(status=status, headers=headers, body=body[0] if body else b"ok")

    def url(self, path: str = "/hook", *, userinfo: str = "", query: str = "") -> str:
        assert self.server is not None
        auth = f"{userinfo}@" if userinfo else ""
        return f"http://{auth}127.0.0.1:{self.server.port}{path}{'?' + query if query else ''}"


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    hook = Hook()
    hook.server = TestServer(hook.app, host="127.0.0.1", port=0)
    await hook.server.start_server()
    try:
        yield hook
    finally:
        await hook.server.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port that is bound but not listening: connecting to it is refused, and nobody else can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
async def webhooks() -> AsyncIterator[list[WebhookHandler]]:
    """Closes every handler a test creates, even when the test fails."""
    created: list[WebhookHandler] = []
    yield created
    for handler in created:
        await handler.close()


async def started(webhooks: list[WebhookHandler], url: str, *, kind: type[WebhookHandler] = WebhookHandler,
                  **kwargs: object) -> WebhookHandler:
    handler = kind(url, **kwargs)  # type: ignore[arg-type]
    webhooks.append(handler)
    await handler.start()
    return handler


async def test_webhook_posts_json_with_idempotency_key(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    handler = await started(webhooks, hook.url(), headers={"X-Relay": "yes"})
    change = make_change()
    await handler.handle(change)

    [request] = hook.requests
    assert request.method == "POST" and request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == change.change_id
    assert request.headers["X-Relay"] == "yes"
    assert orjson.loads(request.body) == change.to_dict()
    assert handler.name == "webhook"


async def test_webhook_sends_the_url_exactly_as_configured(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    # Signed URLs (SAS, HMAC over the query) break if percent-escapes are re-encoded or decoded.
    query = "sig=a%2Bb%2F%3D&se=2024-01-01T00%3A00%3A00Z&sp=r"
    handler = await started(webhooks, hook.url("/api/x%2Fy", query=query))
    await handler.handle(make_change())
    [request] = hook.requests
    assert request.raw_path == f"/api/x%2Fy?{query}"


async def test_webhook_429_with_retry_after_seconds(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    hook.script.append((429, {"Retry-After": "2"}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(HandlerRetry) as info:
        await handler.handle(make_change())
    assert info.value.after == 2
    assert "429" in str(info.value)


async def test_webhook_503_with_retry_after_http_date(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    hook.script.append((503, {"Retry-After": format_datetime(when, usegmt=True)}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(HandlerRetry) as info:
        await handler.handle(make_change())
    assert info.value.after is not None
    assert 20 < info.value.after <= 30  # the date has whole seconds; a slow run eats a little more


async def test_webhook_500_without_retry_after(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    hook.script.append((500, {}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(HandlerRetry) as info:
        await handler.handle(make_change())
    assert info.value.after is None


async def test_webhook_unparseable_retry_after_means_none(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    hook.script.append((502, {"Retry-After": "soon-ish"}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(HandlerRetry) as info:
        await handler.handle(make_change())
    assert info.value.after is None


async def test_webhook_400_is_permanent(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    hook.script.append((400, {}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(PermanentHandlerError, match="400"):
        await handler.handle(make_change())


async def test_webhook_408_is_retried(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    hook.script.append((408, {}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(HandlerRetry, match="408"):
        await handler.handle(make_change())


async def test_webhook_redirect_is_not_followed(hook: Hook, webhooks: list[WebhookHandler]) -> None:
    hook.script.append((302, {"Location": "/elsewhere"}))
    handler = await started(webhooks, hook.url())
    with pytest.raises(PermanentHandlerError, match="302"):
        await handler.handle(make_change())
    assert [r.path for r in hook.requests] == ["/hook"]


async def test_webhook_connection_refused_is_retried(refused_port: int, webhooks: list[WebhookHandler]) -> None:
    handler = await started(webhooks, f"http://127.0.0.1:{refused_port}/hook", timeout_s=5)
    with pytest.raises(HandlerRetry) as info:
        await handler.handle(make_change())
    assert info.value.after is None
    assert f"127.0.0.1:{refused_port}/…" in str(info.value)


async def test_webhook_through_router_retries_429_then_succeeds(
    hook: Hook, webhooks: list[WebhookHandler]
) -> None:
    hook.script.append((429, {"Retry-After": "2"}))  # the policy caps it at 0.05 s
    handler = WebhookHandler(hook.url())
    webhooks.append(handler)
    dead = MemoryDeadLetter()
    router = Router([handler], dead, retry=RetryPolicy(initial_backoff_s=0.01, max_retry_after_s=0.05))
    change = make_change()
    await router.start()
    try:
        await router.dispatch(change)
    finally:
        await router.close()

    assert dead.entries == []
    assert len(hook.requests) == 2
    assert {r.headers["Idempotency-Key"] for r in hook.requests} == {change.change_id}
    assert orjson.loads(hook.requests[1].body) == change.to_dict()


async def test_webhook_secrets_never_shown(
    hook: Hook, refused_port: int, webhooks: list[WebhookHandler]
) -> None:
    secrets = ("hunter2pw", "SECRET")
    query = "sig=SECRET&code=SECRET2"

    def assert_clean(text: str) -> None:
        for secret in secrets:
            assert secret not in text, text

    handler = WebhookHandler(hook.url(userinfo="relay:hunter2pw", query=query))
    webhooks.append(handler)
    assert_clean(repr(handler))
    assert_clean(handler.description)
    assert_clean(handler.url)
    assert repr(handler) == f"WebhookHandler('http://127.0.0.1:{hook.server.port}/…?…')"  # type: ignore[union-attr]

    # The real URL is still what goes over the wire.
    hook.script.append((400, {}))
    dead = MemoryDeadLetter()
    router = Router([handler], dead, retry=RetryPolicy(initial_backoff_s=0.01, max_retry_after_s=0.05))
    await router.start()
    try:
        await router.dispatch(make_change())
    finally:
        await router.close()
    [request] = hook.requests
    assert request.query == query
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"relay:hunter2pw").decode()
    [entry] = dead.entries
    assert entry["reason"] == "handler_rejected"
    assert "400" in entry["detail"]
    assert_clean(entry["detail"])
    assert_clean(orjson.dumps(entry).decode())

    # Retryable answers and transport failures too.
    hook.script.append((503, {}))
    await handler.start()
    with pytest.raises(HandlerRetry) as retry:
        await handler.handle(make_change())
    assert_clean(str(retry.value))

    unreachable = await started(
        webhooks, f"http://relay:hunter2pw@127.0.0.1:{refused_port}/hook?{query}", timeout_s=5
    )
    with pytest.raises(HandlerRetry) as refused:
        await unreachable.handle(make_change())
    assert_clean(str(refused.value))
    assert_clean(repr(refused.value))

    # And validation errors.
    for bad in (f"ftp://relay:hunter2pw@example.com/x?{query}", f"https://relay:hunter2pw@/x?{query}",
                f"https://relay:hunter2pw@example.com:notaport/x?{query}", "relay:hunter2pw@example.com/x"):
        with pytest.raises(ValueError) as invalid:
            WebhookHandler(bad)
        assert_clean(str(invalid.value))


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/x", "https:///x", "http://"])
def test_webhook_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="webhook URL"):
        WebhookHandler(url)


def test_webhook_rejects_credentials_in_url_and_authorization_header() -> None:
    with pytest.raises(ValueError, match="Authorization"):
        WebhookHandler("https://u:p@example.com/x", headers={"authorization": "Bearer t"})


async def test_webhook_handle_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        await WebhookHandler("https://example.com/x").handle(make_change())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/x?sig=abc&code=def", "https://hooks.example.com/…?…"),
        ("https://user:pw@hooks.example.com:8443/a/b", "https://hooks.example.com:8443/…"),
        ("https://user:p@ss@hooks.example.com/x#frag", "https://hooks.example.com/…"),
        ("http://[::1]:8080/x?t=1", "http://[::1]:8080/…?…"),
        ("https://hooks.slack.com/services/T000/B000/SECRETTOKEN", "https://hooks.slack.com/…"),
        ("https://hooks.example.com/", "https://hooks.example.com/"),
        ("https://user:12/ss@hooks.example.com/x", "https://…"),  # unescaped "/" in the password
        ("https://user:pa/ss@hooks.example.com/x", "<unparseable URL>"),
        ("https://user:pw@host:notaport/x", "<unparseable URL>"),
        ("user:pw@hooks.example.com/x", "<not an absolute http(s) URL>"),
        ("https://hooks.example.com", "https://hooks.example.com"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_parse_retry_after() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("2") == 2
    assert parse_retry_after(" 120 ") == 120
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Wed, 01 May 2024 11:59:00 GMT", now=now) == 0  # in the past: now
    for value in (None, "", "-1", "soon", "1e3", "²"):
        assert parse_retry_after(value, now=now) is None


# --- webhook arrays (webhook:URL#batch=N) ------------------------------------------------------------
async def test_webhook_batch_posts_an_array_with_a_stable_idempotency_key(
    hook: Hook, webhooks: list[WebhookHandler]
) -> None:
    handler = await started(webhooks, hook.url(), kind=WebhookBatchHandler, batch=10)
    changes = [make_change(profile_key=f"ecid:{i}") for i in range(3)]
    assert await handler.handle_batch(changes) is None  # "ok" is not a failure report: all done
    assert await handler.handle_batch(changes) is None
    first, second = hook.requests
    assert orjson.loads(first.body) == [change.to_dict() for change in changes]
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]  # same changes, same key
    assert handler.batch_max_changes == 10 and "arrays of up to 10" in handler.description


async def test_webhook_batch_reads_the_changes_the_receiver_names_as_failed_or_rejected(
    hook: Hook, webhooks: list[WebhookHandler]
) -> None:
    handler = await started(webhooks, hook.url(), kind=WebhookBatchHandler, batch=10)
    changes = [make_change(profile_key=f"ecid:{i}") for i in range(4)]
    report = {"failed": [changes[1].change_id, "not-in-this-batch"], "rejected": [changes[3].change_id]}
    hook.script.append((207, {}, orjson.dumps(report)))
    result = await handler.handle_batch(changes)
    assert isinstance(result, BatchResult)
    assert set(result.failures) == {changes[1].change_id, changes[3].change_id}
    assert isinstance(result.failures[changes[1].change_id], HandlerRetry)
    assert isinstance(result.failures[changes[3].change_id], PermanentHandlerError)
    hook.script.append((503, {"Retry-After": "1"}))  # the whole array: retried as a whole, after the wait
    with pytest.raises(HandlerRetry) as retry:
        await handler.handle_batch(changes)
    assert retry.value.after == 1.0
    hook.script.append((400, {}))
    with pytest.raises(PermanentHandlerError):  # the relay splits the array to find the refused change
        await handler.handle_batch(changes)


async def test_webhook_batch_through_the_router_retries_the_failed_and_dead_letters_the_rejected(
    hook: Hook, webhooks: list[WebhookHandler]
) -> None:
    handler = WebhookBatchHandler(hook.url(), batch=10)
    webhooks.append(handler)
    changes = [make_change(profile_key=f"ecid:{i}") for i in range(4)]
    hook.script.append((200, {}, orjson.dumps({"failed": [changes[1].change_id],
                                                "rejected": [changes[3].change_id]})))
    dead = MemoryDeadLetter()
    router = Router([handler], dead, retry=RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02),
                    batch=BatchSettings(max_changes=10, max_wait_s=0.05))
    await router.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(router.dispatch(change) for change in changes)), 10)
    finally:
        await router.close()
    posted = [[c["change_id"] for c in orjson.loads(request.body)] for request in hook.requests]
    assert posted == [[c.change_id for c in changes], [changes[1].change_id]]  # only the failed one again
    assert [(entry["reason"], entry["change"]["change_id"]) for entry in dead.entries] == [
        ("handler_rejected", changes[3].change_id)]


def test_webhook_spec_options() -> None:
    from segment_relay.handlers.loader import HandlerSpecError, load_handler

    plain = load_handler("webhook:https://example.com/hook?sig=abc")
    arrays = load_handler("webhook:https://example.com/hook?sig=abc#batch=25")
    assert type(plain) is WebhookHandler
    assert isinstance(arrays, WebhookBatchHandler) and arrays.batch_max_changes == 25
    for bad in ("webhook:https://example.com/hook#batch=0", "webhook:https://example.com/hook#batch=x",
                "webhook:https://example.com/hook#token=SECRET"):
        with pytest.raises(HandlerSpecError) as caught:
            load_handler(bad)
        assert "SECRET" not in str(caught.value)


async def test_jsonl_writes_a_batch_in_one_write_and_skips_fsync_for_a_device(tmp_path: Path) -> None:
    path = tmp_path / "changes.jsonl"
    handler = JsonlHandler(path)
    await handler.start()
    changes = [make_change(profile_key=f"ecid:{i}") for i in range(5)]
    await handler.handle_batch(changes)
    await handler.flush()
    await handler.close()
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == [c.to_dict() for c in changes]
    device = JsonlHandler("/dev/null")  # jsonl:/dev/stdout and pipes cannot be fsynced: they are not files
    await device.start()
    await device.handle_batch(changes)
    await device.flush()
    await device.close()


# --- changes JSON cannot carry -----------------------------------------------------------------------
def unencodable(change: SegmentChange, how: str) -> SegmentChange:
    """``change`` with attributes orjson refuses to encode (though orjson.loads accepts their JSON)."""
    nested: object = 1
    for _ in range(300):  # orjson decodes up to 1024 levels, encodes up to 254
        nested = {"n": nested}
    attributes = {"deep": nested} if how == "deep" else {"big": 2**70}
    return msgspec.structs.replace(change, attributes=attributes)


async def test_builtin_handlers_refuse_only_the_changes_json_cannot_carry(
    tmp_path: Path, hook: Hook, webhooks: list[WebhookHandler]
) -> None:
    good = [make_change(profile_key=f"ecid:{i}") for i in range(4)]
    deep, big = unencodable(good[1], "deep"), unencodable(good[3], "big")
    changes = [good[0], deep, good[2], big]

    jsonl = JsonlHandler(tmp_path / "out.jsonl")
    await jsonl.start()
    result = await jsonl.handle_batch(changes)
    assert result is not None and set(result.failures) == {deep.change_id, big.change_id}
    assert all(isinstance(error, PermanentHandlerError) for error in result.failures.values())
    assert "cannot be encoded as JSON" in str(result.failures[deep.change_id])
    with pytest.raises(PermanentHandlerError):
        await jsonl.handle(big)
    await jsonl.close()
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["change_id"] for line in lines] == [good[0].change_id, good[2].change_id]
    assert jsonl.count == 2

    stream = io.BytesIO()
    result = await LogHandler(stream).handle_batch(changes)
    assert result is not None and set(result.failures) == {deep.change_id, big.change_id}
    assert len(stream.getvalue().splitlines()) == 2

    batch = await started(webhooks, hook.url(), kind=WebhookBatchHandler, batch=10)
    result = await batch.handle_batch(changes)
    assert result is not None and set(result.failures) == {deep.change_id, big.change_id}
    [request] = hook.requests
    assert [item["change_id"] for item in orjson.loads(request.body)] == [good[0].change_id, good[2].change_id]
    assert await batch.handle_batch([deep]) is not None and len(hook.requests) == 1  # nothing left to post

    single = await started(webhooks, hook.url())
    with pytest.raises(PermanentHandlerError):
        await single.handle(deep)
    assert len(hook.requests) == 1
