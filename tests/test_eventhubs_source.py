"""The Event Hubs source end to end, in process: the real azure-eventhub SDK against the project's
emulator, with the real Blob checkpoint store on Azurite."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from azure.eventhub.amqp import AmqpMessageBodyType
from azure.storage.blob.aio import BlobServiceClient
from prometheus_client import generate_latest
from support import Collector, Takeover, poll

from segment_relay.app import Relay
from segment_relay.config import ConfigError, RelayConfig, load_config
from segment_relay.errors import StartupError
from segment_relay.ops.metrics import metrics_registry
from segment_relay.testing.azure import Azurite
from segment_relay.testing.eventhubs.produce import send_exports
from segment_relay.testing.eventhubs.server import EventHubsEmulator
from segment_relay.testing.exports import StreamSpec, expected_changes, generate

HUB = "exports"


@pytest.fixture
async def emulator() -> AsyncIterator[EventHubsEmulator]:
    emu = EventHubsEmulator({HUB: 4})
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


def relay_config(emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path,
                 **eventhubs: Any) -> RelayConfig:
    settings = {
        "connection_string": emulator.connection_string(HUB),
        "checkpoint_connection_string": azurite.connection_string,
        "checkpoint_container": container,
        "load_balancing_interval_s": 0.3,
        "lag_interval_s": 0.2,
        **eventhubs,
    }
    return load_config(
        None, source=f"eventhubs:{HUB}", state="memory", dead_letter=str(tmp_path / "dead-letter.jsonl"),
        handlers=[f"jsonl:{tmp_path / 'changes.jsonl'}"], eventhubs=settings, pipeline={"checkpoint_interval_s": 0.2}, log_level="WARNING",
    )


async def checkpoints(azurite: Azurite, container: str) -> dict[str, dict[str, str]]:
    """Checkpoint blobs by partition id, with their metadata: what KEDA's blobMetadata strategy reads."""
    found = {}
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        client = service.get_container_client(container)
        async for blob in client.list_blobs(include=["metadata"]):
            if "/checkpoint/" in blob.name:
                found[blob.name.rsplit("/", 1)[-1]] = {"name": blob.name, **(blob.metadata or {})}
    return found


class Running:
    """A relay running in this event loop until stop()."""

    def __init__(self, config: RelayConfig) -> None:
        self.collector = Collector()
        self.relay = Relay(config, extra_handlers=[self.collector.handler()])
        self.task = asyncio.create_task(self.relay.run())

    async def until_finished(self, records: int, timeout_s: float = 30.0) -> None:
        pipeline = self.relay.pipeline
        await poll(lambda: pipeline.records_finished >= records or self.task.done(), f"{records} records", timeout_s)
        assert not self.task.done(), self.task

    async def stop(self) -> None:
        self.relay.stop()
        await asyncio.wait_for(self.task, 30)


async def test_every_change_reaches_the_handlers_once_and_checkpoints_are_keda_readable(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=51, profiles=120, records=1500, invalid_rate=0.01)))
    truth = expected_changes(records)
    await send_exports(emulator.connection_string(HUB), HUB, records)

    running = Running(relay_config(emulator, azurite, container, tmp_path))
    try:
        await running.until_finished(len(records))
        relay = running.relay
        assert relay.snapshot().source.owned == ("0", "1", "2", "3")
        await poll(lambda: len(relay.snapshot().source.lag_events) == 4, "a lag figure for every partition")
        assert set(relay.snapshot().source.lag_events.values()) == {0}  # read to the end
        metrics = generate_latest(metrics_registry(relay.snapshot)).decode()
        assert "segment_relay_partitions_owned 4.0" in metrics
        assert metrics.count("segment_relay_partition_lag_events{") == 4
    finally:
        await running.stop()

    assert Counter(running.collector.changes) == Counter(truth.changes)
    assert running.relay.snapshot().summary()["invalid"] == truth.invalid > 0  # poison: dead-lettered, moved on
    dead = (tmp_path / "dead-letter.jsonl").read_text().splitlines()
    assert len(dead) == truth.dead_letters  # records, and audience entries dropped alone
    # The graceful stop checkpointed each partition at its last event, in the SDK's blob layout.
    found = await checkpoints(azurite, container)
    assert sorted(found) == ["0", "1", "2", "3"]
    port = emulator.port
    for pid, blob in found.items():
        assert blob["name"] == f"127.0.0.1:{port}/{HUB}/$default/checkpoint/{pid}"
        assert int(blob["sequencenumber"]) == len(emulator.events(HUB, pid)) - 1
        assert blob["offset"].isdigit()


async def test_a_restart_resumes_after_the_checkpoints(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=52, profiles=80, records=1200)))
    first, second = records[:700], records[700:]
    await send_exports(emulator.connection_string(HUB), HUB, first)
    config = relay_config(emulator, azurite, container, tmp_path, starting_position="earliest")
    running = Running(config)
    await running.until_finished(len(first))
    await running.stop()

    await send_exports(emulator.connection_string(HUB), HUB, second)
    again = Running(config.model_copy(update={"state": "memory"}))
    await again.until_finished(len(second))
    await asyncio.sleep(0)  # one more turn of the loop for anything read beyond
    await again.stop()
    assert again.relay.snapshot().records_read == len(second)  # nothing before the checkpoints came again


async def test_starting_position_latest_and_a_time_apply_only_without_a_checkpoint(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=53, profiles=40, records=300)))
    await send_exports(emulator.connection_string(HUB), HUB, records[:100])
    await asyncio.sleep(0.01)  # enqueued times are in ms: the two loads must not share one
    cut = datetime.now(UTC)
    await send_exports(emulator.connection_string(HUB), HUB, records[100:200])

    timed = Running(relay_config(emulator, azurite, container, tmp_path, starting_position=cut.isoformat()))
    await timed.until_finished(100)
    await timed.stop()
    assert timed.relay.snapshot().records_read == 100

    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        await service.create_container(other := f"{container}-latest")
    latest = Running(relay_config(emulator, azurite, other, tmp_path, starting_position="latest"))
    await poll(lambda: len(latest.relay.source.owned_partitions) == 4, "all partitions claimed")  # type: ignore[attr-defined]
    await poll(lambda: emulator.active_consumers(HUB) >= 4, "four receivers attached")
    await send_exports(emulator.connection_string(HUB), HUB, records[200:])
    await latest.until_finished(100)
    await latest.stop()
    assert latest.relay.snapshot().records_read == 100


async def test_a_partition_started_at_latest_is_checkpointed_there_at_once_for_keda(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    # Without a checkpoint, KEDA's blobMetadata strategy counts a partition's whole retention as
    # lag and holds the deployment at maxReplicaCount until the first event arrives.
    records = list(generate(StreamSpec(seed=57, profiles=40, records=120)))
    await send_exports(emulator.connection_string(HUB), HUB, records[:60])
    newest = {pid: len(emulator.events(HUB, pid)) - 1 for pid in ("0", "1", "2", "3")}  # sequence numbers from 0
    latest = Running(relay_config(emulator, azurite, container, tmp_path, starting_position="latest"))
    expected = {pid: seq for pid, seq in newest.items() if seq >= 0}  # an empty partition has no lag to misread
    found: dict[str, dict[str, str]] = {}
    deadline = asyncio.get_running_loop().time() + 30
    while len(found) < len(expected):  # written as each partition is claimed, before it is read
        assert asyncio.get_running_loop().time() < deadline, f"first checkpoints: {found}"
        await asyncio.sleep(0.05)
        found = await checkpoints(azurite, container)
    assert {pid: int(found[pid]["sequencenumber"]) for pid in found} == expected
    await poll(lambda: emulator.active_consumers(HUB) >= 4, "four receivers attached")
    await send_exports(emulator.connection_string(HUB), HUB, records[60:])
    await latest.until_finished(60)  # only what came after: the first checkpoint moved nothing earlier in
    await latest.stop()
    assert latest.relay.snapshot().records_read == 60


async def test_emulator_faults_are_recovered_without_loss(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=54, profiles=100, records=1600)))
    truth = expected_changes(records)
    await send_exports(emulator.connection_string(HUB), HUB, records[:400])
    running = Running(relay_config(emulator, azurite, container, tmp_path))
    try:
        await running.until_finished(400)
        emulator.detach_links()  # every receiver link closed by the service
        await send_exports(emulator.connection_string(HUB), HUB, records[400:800])
        await running.until_finished(800)
        emulator.drop_connections()  # every TCP connection gone
        await send_exports(emulator.connection_string(HUB), HUB, records[800:1200])
        await running.until_finished(1200)
        emulator.receivers_busy(3)  # the service refuses the next re-attaches as "server busy"
        emulator.detach_links()
        await send_exports(emulator.connection_string(HUB), HUB, records[1200:])
        await running.until_finished(len(records))
        assert emulator.pending_receivers_busy == 0
    finally:
        await running.stop()
    # Redelivered events (read again after a reconnect) are suppressed as duplicates.
    assert Counter(running.collector.changes) == Counter(truth.changes)


async def test_unknown_hub_and_missing_container_fail_at_start_with_a_reason(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    config = relay_config(emulator, azurite, container, tmp_path)
    wrong_hub = config.model_copy(update={"source": "eventhubs:nosuchhub"})
    conn = emulator.connection_string(HUB).replace(f"EntityPath={HUB}", "EntityPath=nosuchhub")
    wrong_hub.eventhubs.connection_string = type(config.eventhubs.connection_string)(conn)  # type: ignore[misc]
    with pytest.raises(StartupError, match="event hub 'nosuchhub' was not found"):
        await Relay(wrong_hub).run()

    no_container = relay_config(emulator, azurite, "no-such-container", tmp_path)
    with pytest.raises(StartupError, match="checkpoint container 'no-such-container' does not exist: create it"):
        await Relay(no_container).run()


def test_config_names_what_is_missing_and_keeps_keys_out_of_reprs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of eventhubs.connection_string"):
        load_config(None, source="eventhubs:hub")
    with pytest.raises(ConfigError, match="exactly one of eventhubs.checkpoint_connection_string"):
        load_config(None, source="eventhubs:hub", eventhubs={"connection_string": "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v"})
    with pytest.raises(ConfigError, match="eventhubs.starting_position"):
        load_config(None, source="eventhubs:hub", eventhubs={"starting_position": "yesterday"})
    with pytest.raises(ConfigError, match="eventhubs.checkpoint_container"):
        load_config(None, source="eventhubs:hub", eventhubs={"checkpoint_container": "Bad_Name"})

    secret_key = "c2VjcmV0LWtleS1uZXZlci10by1iZS1sb2dnZWQ="
    config = load_config(None, source="eventhubs:hub", eventhubs={
        "connection_string": f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey={secret_key};EntityPath=other",
        "checkpoint_connection_string": f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={secret_key};",
    })
    assert secret_key not in repr(config) and secret_key not in str(config.model_dump())
    from segment_relay.config import secrets_in

    assert secret_key in secrets_in(config)  # redacted from every log line
    with pytest.raises(ConfigError, match="differs from EntityPath='other'"):
        Relay(config)
    relay_ok = config.model_copy(update={"source": "eventhubs:other"})
    relay = Relay(relay_ok)
    assert secret_key not in repr(relay.source) and secret_key not in repr(relay.source.settings)  # type: ignore[attr-defined]


class StaticToken:
    """An azure-core AsyncTokenCredential: the emulator checks no token, so this stands in for
    azure-identity's DefaultAzureCredential, which needs Azure AD (not reachable here)."""

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken("test-token", int(datetime.now(UTC).timestamp()) + 3600)

    async def close(self) -> None:
        pass


async def test_a_namespace_with_an_azure_credential_instead_of_a_connection_string(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    from segment_relay.consumer.deadletter import JsonlDeadLetter
    from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
    from segment_relay.consumer.sources.eventhubs import EventHubsSettings, EventHubsSource
    from segment_relay.consumer.state.memory import MemoryStore
    from segment_relay.handlers.router import Router

    records = list(generate(StreamSpec(seed=55, profiles=30, records=200)))
    await send_exports(emulator.connection_string(HUB), HUB, records)
    settings = EventHubsSettings(
        hub=HUB, fully_qualified_namespace=f"127.0.0.1:{emulator.port}", credential=StaticToken(),
        checkpoint_connection_string=azurite.connection_string, checkpoint_container=container,
        load_balancing_interval_s=0.3, client_options={"use_tls": False},  # the emulator speaks plain AMQP
    )
    source = EventHubsSource(settings)
    collector = Collector()
    dead_letter = JsonlDeadLetter(tmp_path / "dead.jsonl")
    pipeline = Pipeline(source, MemoryStore(), Router([collector.handler()], dead_letter), dead_letter,
                        settings=PipelineSettings(checkpoint_interval_s=0.2))
    run = asyncio.create_task(pipeline.run())
    await poll(lambda: pipeline.records_finished == len(records) or run.done(), "every record")
    pipeline.stop()
    await asyncio.wait_for(run, 30)
    assert Counter(collector.changes) == Counter(expected_changes(records).changes)


class _Context:
    """Stands in for the SDK's PartitionContext: the SDK only creates one inside its event
    processor, and ownership loss there cannot be timed precisely enough to test this ordering."""

    def __init__(self, pid: str) -> None:
        self.partition_id = pid
        self.fully_qualified_namespace = "ns"
        self.eventhub_name = HUB
        self.consumer_group = "$default"


class _Event:
    def __init__(self, seq: int) -> None:
        self.sequence_number = seq
        self.offset = str(seq * 100)
        self.enqueued_time = None
        self.body = iter([b'{"a":', b"1}"])  # data sections, as the SDK gives them
        self.body_type = AmqpMessageBodyType.DATA


class _Store:
    def __init__(self) -> None:
        self.checkpoints: list[dict[str, Any]] = []

    async def update_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoints.append(checkpoint)


class _Listener:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def assigned(self, partition: str, epoch: int) -> None:
        self.events.append(("assigned", partition, epoch))

    def revoked(self, partition: str) -> None:
        self.events.append(("revoked", partition))


async def test_a_claimed_and_closed_partition_is_an_assignment_and_a_revoke_and_batches_carry_the_epoch() -> None:
    from segment_relay.consumer.sources.eventhubs import EventHubsSettings, EventHubsSource

    source = EventHubsSource(EventHubsSettings(hub=HUB, connection_string="x", checkpoint_connection_string="y"))
    store = _Store()
    source._clients = type("Clients", (), {"checkpoint_store": store})()  # type: ignore[assignment]
    listener = _Listener()
    source._listener = listener
    context = _Context("0")
    await source._on_initialize(context)
    await source._on_batch(context, [_Event(1), _Event(2)])
    old = source._queue.get_nowait()
    assert (old.partition, old.epoch) == ("0", 1)
    assert [r.data for r in old.records] == [b'{"a":1}', b'{"a":1}'] and str(old.records[-1].position) == "2"
    await source._on_close(context, "OWNERSHIP_LOST")
    assert listener.events == [("assigned", "0", 1), ("revoked", "0")]  # the pipeline drops what it holds of it
    await source.commit("0", old.records[-1].position)  # not ours: another replica checkpoints now
    assert store.checkpoints == [] and source.owned_partitions == []

    await source._on_initialize(context)  # taken back: a new assignment, resuming from the other's checkpoint
    await source._on_batch(context, [_Event(7)])
    fresh = await anext(source.batches())
    assert (fresh.epoch, [str(r.position) for r in fresh.records]) == (2, ["7"])
    assert listener.events[-1] == ("assigned", "0", 2)
    await source.commit("0", fresh.records[-1].position)
    assert store.checkpoints == [{"fully_qualified_namespace": "ns", "eventhub_name": HUB, "consumer_group": "$default",
                                  "partition_id": "0", "offset": "700", "sequence_number": 7}]


class _Probe:
    """Stands in for the management client: the newest event of each partition, as set by the test."""

    def __init__(self) -> None:
        self.newest: dict[str, dict[str, Any]] = {}
        self.asked = 0

    async def get_partition_properties(self, pid: str) -> dict[str, Any]:
        self.asked += 1
        return self.newest[pid]


def _at(second: int) -> datetime:
    return datetime(2026, 12, 1, 12, 0, second, tzinfo=UTC)


async def test_lag_figures_come_from_a_periodic_poll_and_fall_as_events_are_read() -> None:
    from segment_relay.consumer.sources.eventhubs import EventHubsSettings, EventHubsSource

    source = EventHubsSource(EventHubsSettings(hub=HUB, connection_string="x", checkpoint_path="y", lag_interval_s=0.01))
    source._listener = _Listener()
    probe = _Probe()
    probe.newest = {"0": {"last_enqueued_sequence_number": 9, "last_enqueued_time_utc": _at(30), "is_empty": False},
                    "1": {"last_enqueued_sequence_number": -1, "last_enqueued_time_utc": None, "is_empty": True},
                    "2": {"last_enqueued_sequence_number": 4, "last_enqueued_time_utc": _at(5), "is_empty": False}}
    for pid in "012":
        await source._on_initialize(_Context(pid))
    event = _Event(6)
    event.enqueued_time = _at(10)
    await source._on_batch(_Context("0"), [_Event(5), event])
    polling = asyncio.create_task(source._poll_lag(type("Clients", (), {"probe": probe})()))  # type: ignore[arg-type]
    try:
        await poll(lambda: len(source.snapshot().lag_events) == 2, "figures for the partitions it can judge")
        snapshot = source.snapshot()
        # 0: three events behind, 20 s apart; 1: empty; 2: nothing read since the claim, so no figure.
        assert (snapshot.lag_events, snapshot.lag_ms) == ({"0": 3, "1": 0}, {"0": 20_000.0, "1": 0.0})
        last = _Event(9)
        last.enqueued_time = _at(30)
        await source._on_batch(_Context("0"), [last])
        assert source.snapshot().lag_events["0"] == 0  # read to the newest: no wait for the next poll
        await source._on_close(_Context("0"), "OWNERSHIP_LOST")
        assert "0" not in source.snapshot().lag_events  # not ours: no figure
        asked = probe.asked
        await poll(lambda: probe.asked >= asked + 4, "two more polls")
        assert "0" not in source.snapshot().lag_events
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)


async def test_batches_queued_behind_each_other_are_joined_per_partition_and_epoch_in_order() -> None:
    from segment_relay.consumer.sources.eventhubs import EventHubsSettings, EventHubsSource

    source = EventHubsSource(EventHubsSettings(hub=HUB, connection_string="x", checkpoint_path="y"))
    source._listener = _Listener()
    for pid in "01":
        await source._on_initialize(_Context(pid))
    await source._on_batch(_Context("0"), [_Event(1), _Event(2)])
    await source._on_batch(_Context("1"), [_Event(1)])
    await source._on_batch(_Context("0"), [_Event(3)])
    await source._on_close(_Context("1"), "OWNERSHIP_LOST")
    await source._on_initialize(_Context("1"))  # a new epoch: its batches stay apart from the old one's
    await source._on_batch(_Context("1"), [_Event(2)])
    batches = source.batches()
    joined = [await anext(batches) for _ in range(3)]
    assert [(b.partition, b.epoch, [str(r.position) for r in b.records]) for b in joined] == [
        ("0", 1, ["1", "2", "3"]), ("1", 2, ["1"]), ("1", 3, ["2"])]
    assert source._read_ahead.held == 0  # every joined event was handed over


async def test_the_credential_path_names_the_extra_when_azure_identity_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from segment_relay.consumer.sources.eventhubs.connection import default_credential

    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    with pytest.raises(StartupError, match=r"pip install 'segment-relay\[azure-identity\]'"):
        default_credential()


async def test_a_sqlite_checkpoint_store_shares_partitions_between_replicas_on_one_host(
    emulator: EventHubsEmulator, tmp_path: Path
) -> None:
    records = list(generate(StreamSpec(seed=56, profiles=100, records=1200)))
    truth = expected_changes(records)
    await send_exports(emulator.connection_string(HUB), HUB, records[:600])
    config = load_config(
        None, source=f"eventhubs:{HUB}", state=f"sqlite:{tmp_path / 'state.sqlite'}",
        dead_letter=str(tmp_path / "dead-letter.jsonl"), handlers=[f"jsonl:{tmp_path / 'changes.jsonl'}"],
        pipeline={"checkpoint_interval_s": 0.2}, log_level="WARNING",
        eventhubs={"connection_string": emulator.connection_string(HUB), "checkpoint_path": str(tmp_path / "cp.sqlite"),
                   "load_balancing_interval_s": 0.3},
    )
    first, second = Running(config), Running(config)
    owned = [lambda r=r: r.relay.source.owned_partitions for r in (first, second)]  # type: ignore[attr-defined]
    await poll(lambda: sorted(len(o()) for o in owned) == [2, 2], "two replicas to own 2 partitions each")
    await first.stop()
    await poll(lambda: len(owned[1]()) == 4, "the other replica to take all four")
    await send_exports(emulator.connection_string(HUB), HUB, records[600:])
    await poll(lambda: Counter(first.collector.changes + second.collector.changes) >= Counter(truth.changes),
               "every change")
    await second.stop()
    assert set(first.collector.changes + second.collector.changes) == set(truth.changes)


async def test_a_receive_loop_the_sdk_gave_up_on_fails_the_relay() -> None:
    from segment_relay.consumer.sources.eventhubs import EventHubsSettings, EventHubsSource

    source = EventHubsSource(EventHubsSettings(hub=HUB, connection_string="x", checkpoint_path="y"))
    source._failure = RuntimeError("the SDK gave up")  # what _receive() records before stopping
    source.stop()
    with pytest.raises(RuntimeError, match="gave up"):
        async for _ in source.batches():
            pass


async def test_a_partition_taken_over_while_its_events_are_queued_reaches_no_handler_after_the_loss(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    """Replica A owns all four partitions and is stuck on a few profiles of each, so events wait in
    its pipeline; replica B starts and claims its share. Once A's partition closes, nothing of it
    may reach A's handler or be checkpointed by A, and B delivers what A did not finish."""
    records = list(generate(StreamSpec(seed=58, profiles=160, records=2000)))
    truth = expected_changes(records)
    await send_exports(emulator.connection_string(HUB), HUB, records)
    takeover = Takeover()
    config = relay_config(emulator, azurite, container, tmp_path, max_batch_size=50)
    config = config.model_copy(update={"state": f"sqlite:{tmp_path / 'state.sqlite'}", "handlers": []})
    relays = {worker: Relay(config, extra_handlers=[takeover.handler(worker)]) for worker in ("a", "b")}
    spy = await takeover.run(relays, 4, set(truth.changes))
    late, commits = spy.after_loss(takeover.calls["a"])
    assert late == [], f"{len(late)} changes of a lost partition reached A's handler after A lost it"
    assert commits == []
    pipeline_a = relays["a"].pipeline
    assert pipeline_a.snapshot().records_dropped > 0  # what A still held of the partitions it lost
    assert takeover.handled() == set(truth.changes)  # nothing lost; nothing the rules do not produce



def test_every_connection_of_a_source_shares_one_tls_context_that_keeps_a_given_ca_bundle(tmp_path: Path) -> None:
    # The SDK otherwise builds a context and loads the CA bundle for each connection it opens (every
    # receiver and every management call, e.g. each lag poll), 25 to 80 ms of CPU each.
    import ssl

    from segment_relay.consumer.sources.eventhubs.connection import shared_tls

    default = shared_tls({})["ssl_context"]
    assert isinstance(default, ssl.SSLContext) and default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    one_ca = ssl.DER_cert_to_PEM_cert(ssl.create_default_context().get_ca_certs(binary_form=True)[0])
    bundle = tmp_path / "ca.pem"
    bundle.write_text(one_ca)
    # connection_verify (the SDK's CA bundle option, which it ignores once given a context) is what the context trusts
    assert shared_tls({"connection_verify": str(bundle)})["ssl_context"].cert_store_stats()["x509_ca"] == 1
    assert shared_tls({"ssl_context": default}) == {}  # the caller's own context is used as it is


async def test_an_sdk_task_that_swallows_a_cancel_is_cancelled_until_it_ends() -> None:
    # The SDK's management call can swallow a cancel (its transport reads under asyncio.wait_for,
    # which on Python 3.11 may turn a cancel into the timeout it catches); that race cannot be
    # set off on cue against the emulator, so a task that swallows one stands for it here.
    from segment_relay.consumer.sources.eventhubs.source import _cancel_until_done

    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await _cancel_until_done(task, "stubborn")
    assert task.cancelled() and swallowed == 1


async def test_received_events_read_from_the_amqp_message_agree_with_the_sdks_event_data(
    emulator: EventHubsEmulator,
) -> None:
    """The relay reads received events without the SDK's EventData (received.py): for the same
    events from the emulator, every field it reads must equal what EventData gives, and a body
    that is not data sections must still come through (by EventData)."""
    from azure.eventhub import EventData
    from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient
    from azure.eventhub.amqp import AmqpAnnotatedMessage

    from segment_relay.consumer.sources.eventhubs.received import ReceivedEvent, light_consumer_client
    from segment_relay.consumer.sources.eventhubs.source import event_body

    connection = emulator.connection_string(HUB)
    async with EventHubProducerClient.from_connection_string(connection, eventhub_name=HUB) as producer:
        batch = await producer.create_batch(partition_id="2")
        for index in range(30):
            batch.add(EventData(b'{"n": %d}' % index))
        batch.add(AmqpAnnotatedMessage(value_body={"a value": "body"}))  # type: ignore[arg-type]
        await producer.send_batch(batch)

    async def receive(client_class: Any) -> list[Any]:
        got: list[Any] = []
        client = client_class.from_connection_string(connection, consumer_group="$Default", eventhub_name=HUB)

        async def on_batch(context: Any, events: list[Any]) -> None:
            got.extend(events)

        task = asyncio.create_task(client.receive_batch(on_batch, partition_id="2", starting_position="-1",
                                                        max_batch_size=10, max_wait_time=0.2))
        try:
            await poll(lambda: len(got) >= 31, "every event")
        finally:
            task.cancel()  # the SDK's receive loop can outlive close() for its idle timeout
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
        return got

    light = await receive(light_consumer_client(EventHubConsumerClient))
    sdk = await receive(EventHubConsumerClient)
    assert all(type(event) is ReceivedEvent for event in light)  # an SDK change that stops this fails here

    def fields(event: Any) -> tuple[Any, ...]:
        return event.sequence_number, event.offset, event.enqueued_time, event_body(event)

    assert [fields(event) for event in light] == [fields(event) for event in sdk]
    assert event_body(light[-1]) == b'{"a value":"body"}' and light[0].enqueued_time is not None


async def test_events_with_value_or_sequence_bodies_are_dead_lettered_and_the_partition_moves_on(
    emulator: EventHubsEmulator, azurite: Azurite, container: str, tmp_path: Path
) -> None:
    from azure.eventhub import EventData
    from azure.eventhub.aio import EventHubProducerClient
    from azure.eventhub.amqp import AmqpAnnotatedMessage

    records = list(generate(StreamSpec(seed=59, profiles=2, records=2, duplicate_rate=0, out_of_order_rate=0)))
    async with EventHubProducerClient.from_connection_string(emulator.connection_string(HUB), eventhub_name=HUB) as producer:
        batch = await producer.create_batch(partition_id="1")
        batch.add(EventData(records[0]))
        batch.add(AmqpAnnotatedMessage(value_body={"a map": "with keys the SDK decodes as binary"}))  # type: ignore[arg-type]
        batch.add(AmqpAnnotatedMessage(sequence_body=[[1, "two", b"three"]]))  # type: ignore[arg-type]
        batch.add(EventData(records[1]))
        await producer.send_batch(batch)
    running = Running(relay_config(emulator, azurite, container, tmp_path))
    try:
        await running.until_finished(4)
    finally:
        await running.stop()
    dead = [orjson.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()]
    assert [(entry["position"], entry["raw"]) for entry in dead] == [
        ("1", '{"a map":"with keys the SDK decodes as binary"}'), ("2", '[[1,"two","three"]]')]
    assert Counter(running.collector.changes) == Counter(expected_changes(records).changes)
    assert int((await checkpoints(azurite, container))["1"]["sequencenumber"]) == 3
