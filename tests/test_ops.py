from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import orjson
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from segment_relay.consumer.pipeline import PipelineSnapshot
from segment_relay.consumer.sources.base import SourceSnapshot
from segment_relay.handlers.dispatch import HandlerSnapshot
from segment_relay.histogram import Histogram
from segment_relay.ops.health import Health, OpsServer
from segment_relay.ops.logging import (
    MAX_MESSAGE_CHARS,
    MAX_TRACE_CHARS,
    MAX_VALUE_CHARS,
    SecretRedactingFilter,
    configure_logging,
    redact,
    redact_shapes,
)
from segment_relay.ops.metrics import RelaySnapshot, metrics_registry

SECRET = "s3cr3t-Token-ABC123"


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` until it is true or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def pipeline_snapshot(**values: object) -> PipelineSnapshot:
    fields: dict[str, object] = dict(
        records_read=0, records_finished=0, records_dropped=0, invalid={}, changes={}, stale=0, duplicate=0,
        filtered=0, dead_letters=0, in_flight_records=0, in_flight_bytes=0, profiles_waiting=0)
    fields.update(values)
    return PipelineSnapshot(**fields)  # type: ignore[arg-type]


def handler_snapshot(name: str = "webhook", **values: object) -> HandlerSnapshot:
    fields: dict[str, object] = dict(
        name=name, batch=False, calls=0, failed_calls=0, failures=0, dead_letters=0, dropped=0, pending=0,
        circuit="closed", circuit_opened=0)
    fields.update(values)
    return HandlerSnapshot(**fields)  # type: ignore[arg-type]


class Snapshots:
    """A relay's snapshot that a test changes between scrapes."""

    def __init__(self, **pipeline: object) -> None:
        self.pipeline = pipeline_snapshot(**pipeline)
        self.handlers: tuple[HandlerSnapshot, ...] = ()
        self.source = SourceSnapshot()

    def __call__(self) -> RelaySnapshot:
        return RelaySnapshot(self.pipeline, self.handlers, self.source)


@contextlib.asynccontextmanager
async def running(snapshots: Snapshots, health: Health) -> AsyncIterator[tuple[OpsServer, aiohttp.ClientSession]]:
    server = OpsServer(metrics_registry(snapshots), health, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            yield server, session
    finally:
        await server.stop()


async def get(session: aiohttp.ClientSession, server: OpsServer, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
    async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
        return resp.status, await resp.text(), resp


# --- /metrics ---------------------------------------------------------------------
async def test_metrics_exposes_the_relay_snapshot() -> None:
    stats = Snapshots(records_read=7, invalid={"bad_json": 2}, changes={("seg-1", "enter"): 3})
    latency = Histogram()
    latency.observe(0.01)
    stats.handlers = (handler_snapshot("webhook", latency={"ok": latency}, circuit="open", pending=4),)
    async with running(stats, Health()) as (server, session):
        assert server.port != 0
        status, text, resp = await get(session, server, "/metrics")
        assert status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert "segment_relay_records_read_total 7.0" in text
        assert 'segment_relay_records_invalid_total{reason="bad_json"} 2.0' in text
        assert 'segment_relay_changes_total{change="enter",segment_id="seg-1"} 3.0' in text
        assert 'segment_relay_handler_latency_seconds_count{handler="webhook",outcome="ok"} 1.0' in text
        assert 'segment_relay_handler_circuit_open{handler="webhook"} 1.0' in text
        assert 'segment_relay_handler_pending_changes{handler="webhook"} 4.0' in text

        stats.pipeline = pipeline_snapshot(records_read=8)  # read at scrape time, not cached
        _, text, _ = await get(session, server, "/metrics")
        assert "segment_relay_records_read_total 8.0" in text


def test_metrics_carry_base_units_checkpoint_counts_build_info_and_the_runtime() -> None:
    stats = Snapshots(checkpoints={"shard-0": "49590338271490256608559692538361571095921575989136588898"},
                      checkpoints_written={"shard-0": 3}, checkpointed_at={"shard-0": 1_764_885_600.5})
    stats.source = SourceSnapshot(lag_ms={"shard-0": 1500.0})
    text = generate_latest(metrics_registry(lambda: RelaySnapshot(stats.pipeline, (), stats.source,
                                                                  event_loop_stalls=2))).decode()
    assert 'segment_relay_partition_lag_seconds{partition="shard-0"} 1.5' in text  # seconds, not ms
    assert "lag_milliseconds" not in text
    # Counted, not a float of a 56-digit sequence number (two of those compare equal).
    assert '# TYPE segment_relay_checkpoints_total counter' in text
    assert 'segment_relay_checkpoints_total{partition="shard-0"} 3.0' in text
    assert 'segment_relay_last_checkpoint_timestamp_seconds{partition="shard-0"} 1.7648856005e+09' in text
    assert "checkpoint_position" not in text
    assert re.search(r'segment_relay_build_info\{python="3\.\d+\.\d+",version="[^"]+"\} 1\.0', text)
    assert "segment_relay_event_loop_stalls_total 2.0" in text
    for histogram in ("segment_relay_record_latency_seconds", "segment_relay_change_age_seconds"):
        assert f"# TYPE {histogram} histogram" in text and f"{histogram}_count 0.0" in text
    for runtime in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
                    "python_gc_collections_total"):
        assert f"\n{runtime}" in text, runtime


async def test_start_picks_free_port_and_stop_is_idempotent() -> None:
    registry, health = metrics_registry(Snapshots()), Health()
    async with OpsServer(registry, health) as a, OpsServer(registry, health) as b:
        assert a.port and b.port and a.port != b.port
    await a.stop()


# --- /readyz ----------------------------------------------------------------------
async def test_readyz_transitions() -> None:
    owns_work = True
    health = Health(extra_ready=lambda: owns_work)
    async with running(Snapshots(), health) as (server, session):
        status, text, _ = await get(session, server, "/readyz")
        assert status == 503 and orjson.loads(text)["status"] == "not ready"
        assert health.ready is False

        health.mark_started()
        status, text, _ = await get(session, server, "/readyz")
        assert status == 200 and orjson.loads(text) == {"status": "ok"}
        assert health.ready is True

        owns_work = False
        status, text, _ = await get(session, server, "/readyz")
        assert status == 503 and orjson.loads(text)["status"] == "not ready"
        assert health.ready is False

        owns_work = True
        assert health.ready is True
        health.mark_stopping()
        status, text, _ = await get(session, server, "/readyz")
        assert status == 503 and orjson.loads(text)["status"] == "not ready"
        assert health.ready is False


def test_readiness_reason_from_the_check() -> None:
    reason: bool | str = "handler circuit open: crm"
    health = Health(extra_ready=lambda: reason)
    health.mark_started()
    assert health.readiness() == (False, "handler circuit open: crm")
    reason = True
    assert health.readiness() == (True, "ok")


def test_handler_metrics_of_a_handler_are_exported_with_its_name() -> None:
    from segment_relay.handlers.api import HandlerMetrics

    metrics = HandlerMetrics("crm")
    metrics.count("responses", status="429")
    metrics.count("responses", 2, status="200")
    metrics.set("quota_left", 17)
    with pytest.raises(ValueError, match="first used with labels"):
        metrics.count("responses", code="x")
    with pytest.raises(ValueError, match="set by the relay"):
        metrics.count("other", handler="x")
    stats = Snapshots()
    stats.handlers = (handler_snapshot("crm", counters=metrics.counters, gauges=metrics.gauges),)
    text = generate_latest(metrics_registry(stats)).decode()
    assert 'segment_relay_handler_responses_total{handler="crm",status="429"} 1.0' in text
    assert 'segment_relay_handler_responses_total{handler="crm",status="200"} 2.0' in text
    assert 'segment_relay_handler_quota_left{handler="crm"} 17.0' in text


def test_a_handler_metric_cannot_take_a_name_the_relay_uses_and_every_built_in_is_reserved() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from segment_relay.handlers.api import RELAY_HANDLER_METRICS, HandlerMetrics

    metrics = HandlerMetrics("crm")
    for taken in ("calls", "calls_total", "latency_seconds_count", "circuit_open", "dropped_changes"):
        with pytest.raises(ValueError, match="relay's own"):
            metrics.count(taken)
    metrics.count("calls_by_status", status="200")  # a name of its own is fine
    stats = Snapshots()
    stats.handlers = (handler_snapshot("crm", counters=metrics.counters),)
    text = generate_latest(metrics_registry(stats)).decode()
    built_in = {family.name.removeprefix("segment_relay_handler_") for family in text_string_to_metric_families(text)
                if family.name.startswith("segment_relay_handler_") and family.name != "segment_relay_handler_calls_by_status"}
    assert built_in and built_in <= RELAY_HANDLER_METRICS  # a new built-in must be added to the reserved names


def test_handlers_using_one_metric_name_with_different_labels_keep_every_label() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from segment_relay.handlers.api import HandlerMetrics

    crm, mail = HandlerMetrics("crm"), HandlerMetrics("mail")
    crm.count("responses", status="429")
    mail.count("responses", provider="ses")
    stats = Snapshots()
    stats.handlers = (handler_snapshot("crm", counters=crm.counters), handler_snapshot("mail", counters=mail.counters))
    text = generate_latest(metrics_registry(stats)).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "segment_relay_handler_responses"]
    samples = {(s.labels["handler"], s.labels["status"], s.labels["provider"]) for s in family.samples
               if s.name.endswith("_total")}
    assert samples == {("crm", "429", ""), ("mail", "", "ses")}


async def test_ready_false_when_extra_ready_raises() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    health = Health(extra_ready=broken)
    health.mark_started()
    assert health.ready is False
    async with running(Snapshots(), health) as (server, session):
        status, _, _ = await get(session, server, "/readyz")
        assert status == 503


# --- /healthz and the watchdog ------------------------------------------------------
async def test_healthz_ok_then_503_when_heartbeat_is_stale() -> None:
    health = Health(stall_after_s=0.1)
    async with running(Snapshots(), health) as (server, session):
        # Before the first beat there is nothing to judge: live.
        status, text, _ = await get(session, server, "/healthz")
        assert status == 200 and orjson.loads(text) == {"status": "ok"}

        health.beat()
        status, _, _ = await get(session, server, "/healthz")
        assert status == 200

        time.sleep(0.2)  # deliberately block the event loop: no watchdog, no beats
        status, text, _ = await get(session, server, "/healthz")
        body = orjson.loads(text)
        assert status == 503 and body["status"] == "stalled" and "heartbeat" in body["reason"]

        health.beat()
        status, _, _ = await get(session, server, "/healthz")
        assert status == 200


async def test_watchdog_liveness_fails_only_when_loop_is_blocked(caplog: pytest.LogCaptureFixture) -> None:
    health = Health(stall_after_s=0.1)
    task = asyncio.create_task(health.watchdog(interval_s=0.01))
    try:
        await eventually(lambda: health.last_beat is not None)
        assert health.live

        caplog.set_level(logging.WARNING, logger="segment_relay.ops.health")
        time.sleep(0.2)  # deliberately block the event loop (the behaviour under test)
        assert health.live is False  # evaluated before the loop gets to run the watchdog

        await eventually(lambda: health.live)  # the loop is free again: beats resume
        await eventually(lambda: health.stalls >= 1)
        assert any(r.getMessage() == "event loop was blocked" for r in caplog.records)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_awaiting_slow_io_does_not_stop_heartbeats() -> None:
    health = Health(stall_after_s=0.2)
    task = asyncio.create_task(health.watchdog(interval_s=0.01))
    try:
        await eventually(lambda: health.last_beat is not None)
        # A "slow handler" awaiting I/O for well over stall_after_s; the loop stays free.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            assert health.live
        assert health.stalls == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watchdog_rejects_interval_not_below_stall() -> None:
    with pytest.raises(ValueError):
        await Health(stall_after_s=1.0).watchdog(interval_s=1.0)


# --- logging ----------------------------------------------------------------------
@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


class Unserialisable:
    def __str__(self) -> str:
        return "<unserialisable>"


def test_json_logging_lines_with_extras_and_exception(log_stream: io.StringIO) -> None:
    configure_logging("DEBUG", stream=log_stream)
    log = logging.getLogger("segment_relay.test")
    log.info("hello %s", "world", extra={"partition": "shard-1", "count": 3, "obj": Unserialisable(), "level": "x"})
    try:
        raise ValueError("kaput")
    except ValueError:
        log.exception("handler failed", extra={"handler": "webhook"})

    first, second = lines(log_stream)
    assert first["msg"] == "hello world"
    assert first["level"] == "INFO"
    assert first["logger"] == "segment_relay.test"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert first["partition"] == "shard-1" and first["count"] == 3
    assert first["obj"] == "<unserialisable>"
    assert first["extra_level"] == "x"  # core fields are not overwritten by extras
    assert "exc" not in first
    for key in ("args", "lineno", "pathname", "thread", "process"):
        assert key not in first

    assert second["level"] == "ERROR" and second["handler"] == "webhook"
    assert "Traceback" in second["exc"] and "ValueError: kaput" in second["exc"]


def test_configure_logging_twice_does_not_duplicate(log_stream: io.StringIO) -> None:
    configure_logging(stream=io.StringIO())
    configure_logging(stream=log_stream)
    logging.getLogger("segment_relay.test").warning("once")
    assert [line["msg"] for line in lines(log_stream)] == ["once"]
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_segment_relay_handler", False)]
    assert len(ours) == 1


def test_level_filters_records(log_stream: io.StringIO) -> None:
    configure_logging("warning", stream=log_stream)
    log = logging.getLogger("segment_relay.test")
    log.info("hidden")
    log.warning("shown")
    assert [line["msg"] for line in lines(log_stream)] == ["shown"]


@pytest.mark.parametrize("json", [True, False])
def test_secret_never_appears_in_output(log_stream: io.StringIO, json: bool) -> None:
    configure_logging(stream=log_stream, json=json, secrets=[SECRET, "abc"])
    log = logging.getLogger("segment_relay.test.child")
    log.info("token is %s", SECRET)
    log.info(f"inline {SECRET} in message")
    log.info(
        "extras",
        extra={
            "token": SECRET,
            "header": f"Bearer {SECRET}",
            "nested": {"auth": [f"x{SECRET}y"], SECRET: 1},
            "obj": type("O", (), {"__str__": lambda self: f"obj({SECRET})"})(),
        },
    )
    try:
        raise RuntimeError(f"auth failed with {SECRET}")
    except RuntimeError:
        log.exception("call failed")
    log.info("stack", stack_info=True, extra={"note": SECRET})

    output = log_stream.getvalue()
    assert SECRET not in output
    assert "***" in output
    if json:
        records = lines(log_stream)
        assert records[0]["msg"] == "token is ***"
        assert records[2]["header"] == "Bearer ***"
        assert records[2]["nested"] == {"auth": ["x***y"], "***": 1}
        assert records[2]["obj"] == "obj(***)"
        assert "auth failed with ***" in records[3]["exc"]


def test_short_secrets_are_ignored(log_stream: io.StringIO) -> None:
    configure_logging(stream=log_stream, secrets=["abc", ""])
    logging.getLogger("segment_relay.test").info("abc stays")
    assert lines(log_stream)[0]["msg"] == "abc stays"


def test_redact_helper_and_filter() -> None:
    assert redact(f"a {SECRET} b {SECRET}", [SECRET]) == "a *** b ***"
    assert redact("nothing here", [SECRET]) == "nothing here"
    assert redact("key abcd", ["abc", "abcd"]) == "key ***"  # short one ignored
    assert redact("xx longsecret yy", ["long", "longsecret"]) == "xx *** yy"  # longest wins
    assert redact("a.b*c", ["a.b*c"]) == "***"  # not treated as a regex

    record = logging.LogRecord("n", logging.INFO, __file__, 1, "v=%s", (SECRET,), None)
    record.token = SECRET
    assert SecretRedactingFilter([SECRET]).filter(record) is True
    assert record.getMessage() == "v=***" and record.token == "***"


@pytest.mark.parametrize(("logged", "secret"), [
    ("headers={'X-Amz-Security-Token': b'IQoJb3JpZ2luX2Vj/abc+=', 'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIA/x, "
     "SignedHeaders=host, Signature=0123456789abcdef'}", ("IQoJb3JpZ2luX2Vj", "0123456789abcdef")),
    ("CanonicalRequest:\nx-amz-security-token:IQoJb3JpZ2luX2Vj\nSignature:\n0123456789abcdef", ("IQoJb3JpZ2luX2Vj", "0123456789abcdef")),
    ("GET https://acct.blob.core.windows.net/c/b?sv=2021&sr=b&sig=abcDEF%2Bxyz%3D&se=2030", ("abcDEF",)),
    ("SharedAccessSignature sr=amqp%3A%2F%2Fns%2Fhub&sig=QWxhZGRpbjpvcGVu%3D&se=1700000000&skn=k", ("QWxhZGRpbjpvcGVu",)),
    ("Endpoint=sb://ns/;SharedAccessKeyName=root;SharedAccessKey=c2VjcmV0a2V5+/=;EntityPath=hub", ("c2VjcmV0a2V5",)),
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9vYmFyYmF6==;EndpointSuffix=core.windows.net", ("Zm9vYmFyYmF6",)),
    ("connecting to redis://:hunter2hunter@redis:6379/0", ("hunter2hunter",)),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.signature", ("eyJhbGciOiJIUzI1NiJ9",)),
    ('response {"access_token": "eyJ0eXAiOiJKV1Qi", "token_type": "bearer"}', ("eyJ0eXAiOiJKV1Qi",)),
    ("grant_type=client_credentials&client_id=abc&client_secret=p8e-XYZsecret", ("p8e-XYZsecret",)),
])
def test_secret_shapes_are_redacted_whoever_logs_them(log_stream: io.StringIO, logged: str, secret: tuple[str, ...]) -> None:
    # No secret is configured: these are credentials the relay never saw (IRSA session tokens,
    # SDK-made SAS and CBS tokens, OAuth answers), in what the SDKs log at DEBUG.
    configure_logging("DEBUG", stream=log_stream)
    logging.getLogger("botocore.endpoint").debug("%s", logged, extra={"request": logged})
    output = log_stream.getvalue()
    assert "***" in output
    for part in secret:
        assert part not in output


def test_ordinary_text_is_not_taken_for_a_secret() -> None:
    for text in ("status code: 500, partition: 3", "signature check ok", "token refreshed", "password reset requested",
                 "the sig of a partition", "https://example.com/a:b@c"):
        assert redact_shapes(text) == text


def test_every_value_is_bounded_keeping_its_start_and_end(log_stream: io.StringIO) -> None:
    configure_logging(stream=log_stream)
    huge = "A" * 5_000_000 + "the end"
    logging.getLogger("segment_relay.test").warning("field %s", huge, extra={"value": huge, "nested": {"v": [huge]}})
    try:
        raise ValueError(huge)
    except ValueError:
        logging.getLogger("segment_relay.test").exception("failed")
    first, second = lines(log_stream)
    assert len(first["msg"]) < MAX_MESSAGE_CHARS + 100 and first["msg"].startswith("field AAA")
    assert first["msg"].endswith("the end") and "chars cut" in first["msg"]
    assert len(first["value"]) < MAX_VALUE_CHARS + 100 and first["value"].endswith("the end")
    assert len(first["nested"]["v"][0]) < MAX_VALUE_CHARS + 100
    assert len(second["exc"]) < MAX_TRACE_CHARS + 100 and second["exc"].startswith("Traceback")
    assert second["exc"].endswith("the end")  # the error line is kept
    assert len(log_stream.getvalue()) < 50_000


def test_handler_latency_histogram_is_cumulative_with_le_semantics() -> None:
    from prometheus_client import generate_latest

    ok, error = Histogram(), Histogram()
    for seconds in (0.0005, 0.0007, 0.02, 100.0):
        ok.observe(seconds)
    error.observe(0.001)
    stats = Snapshots()
    stats.handlers = (handler_snapshot("noop", latency={"ok": ok, "error": error}, failures=1),)
    text = generate_latest(metrics_registry(stats)).decode()
    assert 'segment_relay_handler_latency_seconds_bucket{handler="noop",le="0.0005",outcome="ok"} 1.0' in text
    assert 'segment_relay_handler_latency_seconds_bucket{handler="noop",le="0.025",outcome="ok"} 3.0' in text
    assert 'segment_relay_handler_latency_seconds_bucket{handler="noop",le="+Inf",outcome="ok"} 4.0' in text
    assert 'segment_relay_handler_latency_seconds_count{handler="noop",outcome="ok"} 4.0' in text
    assert 'segment_relay_handler_latency_seconds_count{handler="noop",outcome="error"} 1.0' in text
    assert 'segment_relay_handler_failures_total{handler="noop"} 1.0' in text


def test_cloud_sdks_say_only_warnings_unless_debugging(log_stream: io.StringIO) -> None:
    configure_logging("INFO", stream=log_stream)
    logging.getLogger("azure.eventhub._pyamqp.aio._link_async").info("Link state changed")
    logging.getLogger("azure.eventhub").warning("kept")
    logging.getLogger("segment_relay.test").info("ours")
    assert [line["msg"] for line in lines(log_stream)] == ["kept", "ours"]
    configure_logging("DEBUG", stream=log_stream)
    logging.getLogger("azure.eventhub._pyamqp.aio._link_async").debug("frame")
    assert [line["msg"] for line in lines(log_stream)][-1] == "frame"
    configure_logging("INFO", stream=io.StringIO())


def test_the_sdk_credential_variables_are_secrets_to_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    from segment_relay.config import environment_secrets

    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "azure-client-secret-value")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    found = environment_secrets()
    assert "FwoGZXIvYXdzEXAMPLETOKEN" in found and "azure-client-secret-value" in found
