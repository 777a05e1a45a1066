"""The export simulator: what Adobe does once a destination dataflow is enabled and maps audiences.

While a flow is ``enabled`` with at least one segment selector, and the fake was given
``ExportSettings``, a seeded population of profiles (``segment_relay.testing.exports.generate``)
enters and leaves exactly the flow's mapped audiences, and each profile snapshot is written to the
flow's target with the real client: the Event Hubs SDK (connection string built from the base
connection's ``namespace`` + ``sasKeyName``/``sasKey`` and the target's ``eventHubName``) or
aiobotocore Kinesis (the target's ``stream``/``region``, the base connection's keys and the fake's
``kinesis_endpoint``). Records carry only the attributes of the flow's profile selectors, names
and timestamps as the target's toggles say, re-exports, duplicates, out-of-order deliveries and
first-sighting exits.

A simulation knows what it caused: ``truth`` is ``expected_changes`` over the records the target
acknowledged, in acknowledgement order (per partition/shard that is the order a consumer reads).
When the mapping or target changes the running phase stops and a new phase starts with a fresh
population (another seed), so the records of all phases together stay one consistent stream.

It only ever connects to loopback addresses: an Event Hubs namespace must be ``127.0.0.1:PORT``
(or ``localhost``), and Kinesis needs an explicit local ``kinesis_endpoint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import orjson

from ..exports import StreamSpec, StreamTruth, expected_changes, generate
from ..kinesis import partition_key_of
from .catalog import EVENT_HUBS_SPEC_ID, KINESIS_SPEC_ID, Audience
from .state import FlowService, WindowStats

__all__ = ["ExportSettings", "ExportTarget", "Simulation", "SimulationFailed", "ExportSimulator", "project"]

log = logging.getLogger(__name__)

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
State = Literal["pending", "running", "completed", "stopped", "failed"]


@dataclass(frozen=True)
class ExportSettings:
    """How a simulation phase exports. ``rate`` is records per second (None: as fast as the target
    takes them). The rates are those of ``StreamSpec``; ``legacy_existing_rate`` defaults to 0 because
    Adobe stopped sending ``existing`` in 2023."""

    records: int = 1000
    rate: float | None = None
    profiles: int = 200
    seed: int = 7
    duplicate_rate: float = 0.05
    out_of_order_rate: float = 0.03
    reexport_rate: float = 0.3
    legacy_existing_rate: float = 0.0
    plus_0000_rate: float = 0.5
    invalid_rate: float = 0.0
    login_rate: float = 0.0
    merge_rate: float = 0.0
    batch_size: int = 100
    start_delay_s: float = 0.1  # mappings usually come in a few PATCHes: start once they settle

    def __post_init__(self) -> None:
        if self.records < 0 or self.profiles < 1 or self.batch_size < 1:
            raise ValueError("records must be >= 0, profiles and batch_size >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive (or None for as fast as possible)")


@dataclass(frozen=True)
class ExportTarget:
    """Where a flow's exports go, resolved from its target and base connections."""

    kind: Literal["eventhubs", "kinesis"]
    name: str  # the event hub or the stream
    address: str  # namespace host:port or the Kinesis endpoint URL
    include_names: bool = True
    include_timestamps: bool = True
    key_name: str = ""  # SAS key name / AWS access key id
    secret: str = ""  # SAS key / AWS secret key: never in describe(), logs or errors
    region: str = "us-east-1"

    def describe(self) -> str:
        return f"{self.kind}:{self.address}/{self.name}"

    def connection_string(self) -> str:
        return (f"Endpoint=sb://{self.address};SharedAccessKeyName={self.key_name};"
                f"SharedAccessKey={self.secret};UseDevelopmentEmulator=true")

    def __repr__(self) -> str:  # dataclass repr would print the secret
        return f"ExportTarget({self.describe()!r})"


class SimulationFailed(RuntimeError):
    pass


def project(document: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """Only the mapped attributes (dotted XDM paths), then segmentMembership and identityMap."""
    out: dict[str, Any] = {}
    for path in paths:
        steps = path.split(".")
        node: Any = document
        for step in steps:
            node = node.get(step) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            continue
        cursor = out
        for step in steps[:-1]:
            cursor = cursor.setdefault(step, {})
        cursor[steps[-1]] = node
    out["segmentMembership"] = document.get("segmentMembership", {})
    out["identityMap"] = document.get("identityMap", {})
    return out


class _Sink(Protocol):
    async def open(self) -> None: ...
    async def send(self, records: list[bytes]) -> list[bytes]: ...
    async def close(self) -> None: ...


class _EventHubsSink:
    """Each profile's records go, in order, to the partition its key hashes to (the service's and the
    SDK's partition-key hash), as a producer that cares about per-profile order does.

    Records are grouped by that partition and each group is sent through the hub's single link with
    the partition key of its first record (every key in the group hashes to the same partition):
    one AMQP link instead of one per partition, whose attach costs the SDK about half a second each.
    Adobe documents no partition key; consumers must not rely on it naming the profile."""

    def __init__(self, target: ExportTarget) -> None:
        self.target = target
        self.producer: Any = None
        self.partitions: list[str] = []

    async def open(self) -> None:
        from azure.eventhub.aio import EventHubProducerClient

        self.producer = EventHubProducerClient.from_connection_string(
            self.target.connection_string(), eventhub_name=self.target.name,
            retry_total=3, retry_backoff_factor=0.1,
        )
        self.partitions = list(await self.producer.get_partition_ids())

    async def send(self, records: list[bytes]) -> list[bytes]:
        from azure.eventhub import EventData

        from ..eventhubs.server import partition_for_key

        groups: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        for record in records:
            key = partition_key_of(record)
            groups[partition_for_key(key, self.partitions)].append((key, record))
        for items in groups.values():
            key = items[0][0]
            batch = await self.producer.create_batch(partition_key=key)
            for _, record in items:
                try:
                    batch.add(EventData(record))
                except ValueError:  # full (1 MB): send it and start the next
                    await self.producer.send_batch(batch)
                    batch = await self.producer.create_batch(partition_key=key)
                    batch.add(EventData(record))
            if len(batch):
                await self.producer.send_batch(batch)
        return records

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.close()


class _KinesisSink:
    """PutRecords with the profile key as partition key; failed entries are retried, and the
    acknowledged order (which is the shard order) is what the simulation reports as sent."""

    def __init__(self, target: ExportTarget) -> None:
        self.target = target
        self._context: Any = None
        self.client: Any = None

    async def open(self) -> None:
        from aiobotocore.session import get_session

        self._context = get_session().create_client(
            "kinesis", region_name=self.target.region, endpoint_url=self.target.address,
            aws_access_key_id=self.target.key_name, aws_secret_access_key=self.target.secret,
        )
        self.client = await self._context.__aenter__()
        await self.client.describe_stream_summary(StreamName=self.target.name)  # fail early on a missing stream

    async def send(self, records: list[bytes]) -> list[bytes]:
        pending = [(r, {"Data": r, "PartitionKey": partition_key_of(r)}) for r in records]
        acked: list[bytes] = []
        for attempt in range(1, 11):
            response = await self.client.put_records(StreamName=self.target.name, Records=[e for _, e in pending])
            failed = []
            for (record, entry), result in zip(pending, response["Records"], strict=True):
                if "ErrorCode" in result:
                    failed.append((record, entry))
                else:
                    acked.append(record)
            pending = failed
            if not pending:
                return acked
            await asyncio.sleep(0.05 * attempt)  # back off before retrying throttled entries
        raise SimulationFailed(f"{len(pending)} records still failing after 10 PutRecords attempts")

    async def close(self) -> None:
        if self._context is not None:
            await self._context.__aexit__(None, None, None)


def _sink(target: ExportTarget) -> _Sink:
    return _EventHubsSink(target) if target.kind == "eventhubs" else _KinesisSink(target)


Key = tuple[tuple[tuple[str, str], ...], tuple[str, ...], str]
_STAND_IN = ("00000000-0000-4000-8000-000000000000", "stand-in")


class Simulation:
    """One flow's exports. Read ``records``/``sent``/``state``/``truth``; ``await wait()`` for the end
    of the current phase."""

    def __init__(self, flow_id: str, sandbox: str, settings: ExportSettings) -> None:
        self.flow_id = flow_id
        self.sandbox = sandbox
        self.settings = settings
        self.records: list[bytes] = []  # acknowledged by the target, in acknowledgement order
        self.phase = 0
        self.state: State = "pending"
        self.error: str | None = None
        self.audiences: tuple[tuple[str, str], ...] = ()  # (id, name) of the current phase
        self.attributes: tuple[str, ...] = ()  # mapped attribute paths of the current phase
        self.target: str = ""  # describe() of the current target (no secrets)
        self.planned = 0  # records the current phase will send
        self.phase_sent = 0
        self.windows: dict[int, WindowStats] = {}  # hour -> delivery stats (for /runs)
        self.key: Key | None = None
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._halted = 0  # the phase asked to stop (it ends at its next batch boundary)
        self._truth: tuple[int, Collection[str] | None, StreamTruth] | None = None

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "stopped", "failed")

    @property
    def truth(self) -> StreamTruth:
        """The enter/exit changes the delivered records must produce (``expected_changes``)."""
        return self.truth_for(None)

    def truth_for(self, link_namespaces: Collection[str] | None) -> StreamTruth:
        """``truth`` for a relay that links identities in ``link_namespaces`` (None: key mode)."""
        if self._truth is None or self._truth[:2] != (len(self.records), link_namespaces):
            truth = expected_changes(list(self.records), link_namespaces=link_namespaces)
            self._truth = (len(self.records), link_namespaces, truth)
        return self._truth[2]

    async def wait(self, timeout_s: float = 30.0) -> StreamTruth:
        """Until the current phase completes or has stopped (a stop lets the batch in flight finish,
        so ``records`` then holds everything the target got); raises SimulationFailed with the reason."""
        try:
            await asyncio.wait_for(self._done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"simulation of flow {self.flow_id} still {self.state} after {timeout_s:g} s "
                               f"({self.phase_sent}/{self.planned} records)") from None
        if self.state == "failed":
            raise SimulationFailed(f"simulation of flow {self.flow_id} failed: {self.error}")
        return self.truth

    def __repr__(self) -> str:
        return (f"Simulation(flow={self.flow_id}, state={self.state}, phase={self.phase}, sent={self.sent}, "
                f"target={self.target!r}, audiences={[a for a, _ in self.audiences]})")


class ExportSimulator:
    """Starts, restarts and stops flows' simulations as the Flow Service state changes."""

    def __init__(self, flow_service: FlowService, audiences: Callable[[str], Mapping[str, Audience]],
                 clock: Callable[[], float], settings: ExportSettings | None, kinesis_endpoint: str | None) -> None:
        self.flow_service = flow_service
        self.audiences = audiences
        self.clock = clock
        self.settings = settings
        self.kinesis_endpoint = kinesis_endpoint
        self.simulations: dict[str, Simulation] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- reacting to the Flow Service ----------------------------------------------------
    def flow_changed(self, sandbox: str, flow_id: str | None) -> None:
        """Called after every write; ``flow_id`` None means "something flows may use changed"."""
        box = self.flow_service.sandboxes.get(sandbox)
        flow_ids = [flow_id] if flow_id is not None else (list(box.entities["flows"]) if box else [])
        for fid in flow_ids:
            self._evaluate(sandbox, fid)

    def _evaluate(self, sandbox: str, flow_id: str) -> None:
        flow = self.flow_service.raw(sandbox, "flows", flow_id)
        simulation = self.simulations.get(flow_id)
        key: Key | None = None
        target: ExportTarget | str | None = None
        if flow is not None and flow.get("state") == "enabled" and self.settings is not None:
            audiences, attributes = self._mapping(sandbox, flow)
            if audiences:
                target = self._target(sandbox, flow)
                described = target.describe() if isinstance(target, ExportTarget) else f"unusable: {target}"
                flags = f"{target.include_names}/{target.include_timestamps}" if isinstance(target, ExportTarget) else ""
                key = (audiences, attributes, described + flags)
        if simulation is not None and simulation.key == key:
            return
        if simulation is not None:
            self._stop(simulation, "stopped")
        if key is None or target is None:
            return
        if simulation is None:
            simulation = self.simulations[flow_id] = Simulation(flow_id, sandbox, self.settings or ExportSettings())
        self._start(simulation, key, target)

    def _mapping(self, sandbox: str, flow: Mapping[str, Any]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        known = {audience.selector_id: audience for audience in self.audiences(sandbox).values()}
        audiences: list[tuple[str, str]] = []
        attributes: list[str] = []
        for transformation in flow.get("transformations", []):
            params = transformation.get("params", {})
            for selector in params.get("segmentSelectors", {}).get("selectors", []):
                value = selector["value"]
                audience = known.get(value["id"])
                # The export carries the audience's own name (Include Segment Names), not the selector's.
                audiences.append((value["id"], audience.name if audience else value.get("name", "")))
            for selector in params.get("profileSelectors", {}).get("selectors", []):
                attributes.append(selector["value"]["path"])
        return tuple(audiences), tuple(attributes)

    def _target(self, sandbox: str, flow: Mapping[str, Any]) -> ExportTarget | str:
        """The resolved target, or why exports cannot be written (shown as the simulation's error)."""
        target = self.flow_service.raw(sandbox, "targetConnections", flow["targetConnectionIds"][0])
        base = self.flow_service.raw(sandbox, "connections", target["baseConnectionId"]) if target else None
        if target is None or base is None:
            return "the flow's target or base connection no longer exists"
        params = target.get("params", {})
        auth = base.get("auth", {}).get("params", {})
        # Off unless turned on, as in Adobe's UI.
        names = params.get("includeSegmentNames") is True
        timestamps = params.get("includeSegmentTimestamps") is True
        spec_id = target["connectionSpec"]["id"]
        if spec_id == EVENT_HUBS_SPEC_ID:
            namespace = str(auth.get("namespace", ""))
            host = namespace.rsplit(":", 1)[0].strip("[]") if ":" in namespace else ""
            if host not in _LOOPBACK:
                return (f"namespace {namespace!r} is not a local emulator (host:port on 127.0.0.1); "
                        "the fake never connects to Azure")
            hub = params.get("eventHubName") or auth.get("eventHubName", "")
            return ExportTarget("eventhubs", hub, namespace, names, timestamps,
                                key_name=auth.get("sasKeyName", ""), secret=auth.get("sasKey", ""))
        if spec_id == KINESIS_SPEC_ID:
            endpoint = self.kinesis_endpoint
            if not endpoint or (urlparse(endpoint).hostname or "") not in _LOOPBACK:
                return "no local kinesis_endpoint was given to the fake; it never connects to AWS"
            return ExportTarget("kinesis", params.get("stream", ""), endpoint, names, timestamps,
                                key_name=auth.get("accessKeyId", ""), secret=auth.get("secretKey", ""),
                                region=params.get("region") or auth.get("region") or "us-east-1")
        return f"connection spec {spec_id} is not a streaming destination"

    # --- phases ------------------------------------------------------------------------------
    def _start(self, simulation: Simulation, key: Key, target: ExportTarget | str) -> None:
        simulation.phase += 1
        simulation.settings = self.settings or simulation.settings  # the current settings apply to new phases
        simulation.key = key
        simulation.audiences, simulation.attributes = key[0], key[1]
        simulation.phase_sent = 0
        simulation.planned = simulation.settings.records
        simulation.error = None
        simulation._done.clear()
        if isinstance(target, str):
            simulation.target = ""
            self._fail(simulation, target)
            return
        simulation.target = target.describe()
        simulation.state = "pending"
        task = asyncio.get_running_loop().create_task(
            self._run(simulation, target, simulation.phase), name=f"export-simulation-{simulation.flow_id}")
        simulation._task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop(self, simulation: Simulation, state: State) -> None:
        """Ask the current phase to end. Not a cancel: the batch in flight is finished and recorded,
        so ``records`` (and the truth) always hold exactly what the target acknowledged."""
        simulation.key = None
        simulation._halted = simulation.phase
        if simulation._task is None or simulation._task.done():
            if not simulation.finished:
                simulation.state = state
            simulation._done.set()

    @staticmethod
    def _halted(simulation: Simulation, phase: int) -> bool:
        return simulation.phase != phase or simulation._halted == phase

    @staticmethod
    def _end(simulation: Simulation, phase: int, state: State) -> None:
        if simulation.phase == phase:  # a superseded phase leaves state and _done to its successor
            simulation.state = state
            simulation._done.set()

    def _fail(self, simulation: Simulation, reason: str, secret: str = "", phase: int | None = None) -> None:
        if secret:
            reason = reason.replace(secret, "***")
        hour = int(self.clock() // 3600) * 3600
        simulation.windows.setdefault(hour, WindowStats()).errors.append(reason)
        log.warning("export simulation of flow %s failed: %s", simulation.flow_id, reason)
        if phase is None or simulation.phase == phase:
            simulation.error = reason
            self._end(simulation, simulation.phase, "failed")

    def _stats(self, simulation: Simulation) -> WindowStats:
        hour = int(self.clock() // 3600) * 3600
        return simulation.windows.setdefault(hour, WindowStats())

    async def _run(self, simulation: Simulation, target: ExportTarget, phase: int) -> None:
        settings = simulation.settings
        await asyncio.sleep(settings.start_delay_s)  # debounce: a change meanwhile supersedes this phase
        if self._halted(simulation, phase):
            self._end(simulation, phase, "stopped")
            return
        sink = _sink(target)
        try:
            simulation.state = "running"
            await sink.open()
            loop = asyncio.get_running_loop()
            paced_from: tuple[float, int] | None = None  # (time, records) once the first batch is in
            size = settings.batch_size if settings.rate is None else max(1, min(settings.batch_size, int(settings.rate / 10)))
            batch: list[tuple[bytes, tuple[str, ...]]] = []
            for item in self._records(simulation, target, phase):
                batch.append(item)
                if len(batch) < size:
                    continue
                before = simulation.phase_sent
                await self._deliver(simulation, sink, batch, phase)
                batch = []
                if settings.rate is not None:  # pace to the rate, from the first acknowledged batch (no
                    # catch-up burst after a slow connect)
                    if paced_from is None:
                        paced_from = (loop.time(), before)
                    sent = simulation.phase_sent - paced_from[1]
                    await asyncio.sleep(max(0.0, paced_from[0] + sent / settings.rate - loop.time()))
                else:
                    await asyncio.sleep(0)  # let the loop breathe between batches
                if self._halted(simulation, phase):
                    self._end(simulation, phase, "stopped")
                    return
            if batch:
                await self._deliver(simulation, sink, batch, phase)
            self._end(simulation, phase, "completed")
        except asyncio.CancelledError:
            self._end(simulation, phase, "stopped")
            raise
        except Exception as error:  # noqa: BLE001 - any target failure ends the phase with a reason
            self._fail(simulation, f"{type(error).__name__}: {error}", target.secret, phase)
        finally:
            with contextlib.suppress(Exception):
                await sink.close()

    def _records(self, simulation: Simulation, target: ExportTarget, phase: int) -> Iterator[tuple[bytes, tuple[str, ...]]]:
        """(record bytes, audiences in it) in generation order, projected onto the mapped attributes."""
        settings = simulation.settings
        segments = list(simulation.audiences)
        # StreamSpec wants two segments: with one mapped audience, generate with a stand-in and drop
        # it from every record (it never reaches the target, so the truth never sees it).
        drop = _STAND_IN[0] if len(segments) == 1 else None
        if drop is not None:
            segments.append(_STAND_IN)
        spec = StreamSpec(
            seed=settings.seed + (phase - 1) * 7919, profiles=settings.profiles, segments=segments,
            records=settings.records, duplicate_rate=settings.duplicate_rate, reexport_rate=settings.reexport_rate,
            out_of_order_rate=settings.out_of_order_rate, invalid_rate=settings.invalid_rate,
            legacy_existing_rate=settings.legacy_existing_rate, plus_0000_rate=settings.plus_0000_rate,
            login_rate=settings.login_rate, merge_rate=settings.merge_rate,
            include_names=target.include_names, include_timestamps=target.include_timestamps,
        )
        attributes = simulation.attributes
        for raw in generate(spec):
            try:
                document = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield raw, ()
                continue
            if not isinstance(document, dict):
                yield raw, ()
                continue
            membership = document.get("segmentMembership")
            ups = membership.get("ups", {}) if isinstance(membership, dict) else {}
            if drop is not None and isinstance(ups, dict):
                ups.pop(drop, None)
                if not ups:
                    continue  # a snapshot only about the stand-in: Adobe would not export it
            audiences = tuple(ups) if isinstance(ups, dict) else ()
            yield orjson.dumps(project(document, attributes)), audiences

    async def _deliver(self, simulation: Simulation, sink: _Sink, batch: list[tuple[bytes, tuple[str, ...]]],
                       phase: int) -> None:
        audiences_of = dict(batch)
        acked = await sink.send([record for record, _ in batch])
        simulation.records.extend(acked)  # even from a superseded phase: the target has them
        if simulation.phase == phase:
            simulation.phase_sent += len(acked)
        stats = self._stats(simulation)
        stats.records += len(acked)
        for record in acked:
            stats.bytes += len(record)
            for audience in audiences_of.get(record, ()):
                stats.by_audience[audience] = stats.by_audience.get(audience, 0) + 1

    # --- for FakePlatform ----------------------------------------------------------------------
    def window_stats(self, sandbox: str, flow_id: str) -> Mapping[int, WindowStats]:
        simulation = self.simulations.get(flow_id)
        return simulation.windows if simulation is not None and simulation.sandbox == sandbox else {}

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop every phase at its next batch boundary; cancel what does not end in time."""
        for simulation in self.simulations.values():
            self._stop(simulation, "stopped")
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
