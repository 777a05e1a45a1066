"""What the relay reports: one read-only snapshot of its parts, and Prometheus metrics drawn from it.

The pipeline, the router and the source each keep their own plain counters on the hot path and
hand out typed snapshots (``PipelineSnapshot``, ``HandlerSnapshot``, ``SourceSnapshot``); nobody
writes into a shared stats object. ``RelaySnapshot`` puts the three together; the Prometheus
collector builds every metric from a fresh one at scrape time.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..consumer.pipeline import PipelineSnapshot
from ..consumer.sources.base import SourceSnapshot
from ..handlers.dispatch import HandlerSnapshot

__all__ = ["RelaySnapshot", "metrics_registry"]


@dataclass(frozen=True)
class RelaySnapshot:
    pipeline: PipelineSnapshot
    handlers: tuple[HandlerSnapshot, ...]
    source: SourceSnapshot
    event_loop_stalls: int = 0  # times the watchdog woke up late (ops.health)

    @property
    def records_read(self) -> int:
        return self.pipeline.records_read

    @property
    def records_finished(self) -> int:
        return self.pipeline.records_finished

    @property
    def enters(self) -> int:
        return self.pipeline.enters

    @property
    def exits(self) -> int:
        return self.pipeline.exits

    @property
    def dead_letters(self) -> dict[str, int]:
        """Dead-letter entries by kind."""
        found = {"invalid_record": self.pipeline.dead_letters,
                 "invalid_entry": sum(self.pipeline.invalid_entries.values()),
                 "failed_change": sum(handler.dead_letters for handler in self.handlers)}
        return {kind: n for kind, n in found.items() if n}

    def summary(self) -> dict[str, Any]:
        p = self.pipeline
        summary: dict[str, Any] = {
            "records": p.records_read,
            "invalid": sum(p.invalid.values()),
            "invalid_entries": sum(p.invalid_entries.values()),
            "enters": p.enters,
            "exits": p.exits,
            "stale_suppressed": p.stale,
            "duplicates_suppressed": p.duplicate,
            "filtered": p.filtered,
            "dead_letters": sum(self.dead_letters.values()),
            "handler_failures": sum(handler.failures for handler in self.handlers),
        }
        if p.records_dropped:
            summary["dropped_revoked"] = p.records_dropped
        if p.profiles_seen is not None:
            summary["profiles"] = p.profiles_seen
        if p.identity is not None:  # identity.mode "link"
            summary["merges"] = p.identity.merges
        return summary


def metrics_registry(snapshot: Callable[[], RelaySnapshot], *, runtime: bool = True) -> CollectorRegistry:
    """A registry whose collector renders ``snapshot()`` at each scrape; with ``runtime``, also the
    process (CPU, memory, open files), Python platform and garbage collector metrics that
    prometheus_client's default registry would carry (the relay's registry is its own)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RelayCollector(snapshot))
    if runtime:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class _RelayCollector(Collector):
    def __init__(self, snapshot: Callable[[], RelaySnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self.snapshot()
        build = GaugeMetricFamily("segment_relay_build_info", "The relay's version (always 1)",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        yield CounterMetricFamily("segment_relay_event_loop_stalls",
                                  "Times the event loop woke up later than the liveness watchdog allows",
                                  value=s.event_loop_stalls)
        yield from _pipeline_metrics(s)
        yield from _handler_metrics(s.handlers)
        yield from _source_metrics(s.source)


def _pipeline_metrics(s: RelaySnapshot) -> Iterator[Any]:
    p = s.pipeline
    yield CounterMetricFamily("segment_relay_records_read", "Records read from the source", value=p.records_read)
    yield CounterMetricFamily(
        "segment_relay_records_finished", "Records fully processed and acknowledged", value=p.records_finished)
    yield CounterMetricFamily(
        "segment_relay_records_dropped", "Records read under a partition assignment that was revoked before "
        "they were acknowledged (the partition's new owner reads them again)", value=p.records_dropped)
    invalid = CounterMetricFamily("segment_relay_records_invalid", "Records rejected, by reason", labels=["reason"])
    for reason, n in p.invalid.items():
        invalid.add_metric([reason], n)
    yield invalid
    entries = CounterMetricFamily("segment_relay_entries_invalid", "Audience entries dropped from their record and "
                                  "dead-lettered alone, by reason", labels=["reason"])
    for reason, n in p.invalid_entries.items():
        entries.add_metric([reason], n)
    yield entries
    changes = CounterMetricFamily("segment_relay_changes", "Membership changes emitted", labels=["segment_id", "change"])
    for (segment_id, change), n in p.changes.items():
        changes.add_metric([segment_id, change], n)
    yield changes
    suppressed = CounterMetricFamily("segment_relay_suppressed", "Segment statuses that caused no change",
                                     labels=["reason"])
    suppressed.add_metric(["stale"], p.stale)
    suppressed.add_metric(["duplicate"], p.duplicate)
    suppressed.add_metric(["filtered"], p.filtered)
    yield suppressed
    dead = CounterMetricFamily("segment_relay_dead_letters", "Entries written to the dead letter", labels=["kind"])
    for kind, n in s.dead_letters.items():
        dead.add_metric([kind], n)
    yield dead
    if p.identity is not None:  # identity.mode "link"
        yield CounterMetricFamily("segment_relay_profiles_created", "New canonical profiles (identity linking)",
                                  value=p.identity.profiles_created)
        yield CounterMetricFamily("segment_relay_identities_linked", "Identities linked to a profile",
                                  value=p.identity.identities_linked)
        yield CounterMetricFamily("segment_relay_profile_merges", "Profiles absorbed into another by a merge",
                                  value=p.identity.merges)
    if p.claims is not None:  # claims.mode on
        yield GaugeMetricFamily("segment_relay_profile_claims_held", "Profiles this replica holds a claim on",
                                value=p.claims.held)
        yield CounterMetricFamily("segment_relay_profile_claim_waits",
                                  "Steps that found a profile claimed by another replica and waited",
                                  value=p.claims.waits)
    yield GaugeMetricFamily("segment_relay_in_flight_records", "Records admitted, not finished",
                            value=p.in_flight_records)
    yield GaugeMetricFamily("segment_relay_in_flight_bytes", "Bytes admitted, not finished", value=p.in_flight_bytes)
    yield GaugeMetricFamily("segment_relay_profile_records_waiting",
                            "Records waiting for an earlier record of their profile to finish",
                            value=p.profiles_waiting)
    for name, documentation, histogram in (
        ("segment_relay_record_latency_seconds", "From reading a record to finishing it (its changes handled, "
         "its state saved)", p.record_latency),
        ("segment_relay_change_age_seconds", "From a change's lastQualificationTime (Adobe's clock) to its "
         "handlers being done", p.change_age),
    ):
        family = HistogramMetricFamily(name, documentation)
        family.add_metric([], histogram.cumulative(), histogram.total)
        yield family
    # Counts and times, not positions: a Kinesis sequence number (56 digits) does not survive a float.
    written = CounterMetricFamily("segment_relay_checkpoints", "Checkpoints committed, by partition",
                                  labels=["partition"])
    for partition, count in p.checkpoints_written.items():
        written.add_metric([partition], count)
    yield written
    last = GaugeMetricFamily("segment_relay_last_checkpoint_timestamp_seconds",
                             "When the last checkpoint of each partition was committed (Unix time)", labels=["partition"])
    for partition, at in p.checkpointed_at.items():
        last.add_metric([partition], at)
    yield last


def _handler_metrics(handlers: tuple[HandlerSnapshot, ...]) -> Iterator[Any]:
    latency = HistogramMetricFamily("segment_relay_handler_latency_seconds", "Time spent in one handler call",
                                    labels=["handler", "outcome"])
    sizes = HistogramMetricFamily("segment_relay_handler_batch_size", "Changes per handle_batch call",
                                  labels=["handler"])
    failures = CounterMetricFamily("segment_relay_handler_failures", "Changes that failed a handler try",
                                   labels=["handler"])
    calls = CounterMetricFamily("segment_relay_handler_calls", "Handler calls (handle or handle_batch)",
                                labels=["handler"])
    pending = GaugeMetricFamily("segment_relay_handler_pending_changes",
                                "Changes handed to a handler's dispatcher and not done yet", labels=["handler"])
    circuit = GaugeMetricFamily("segment_relay_handler_circuit_open",
                                "1 while a handler's circuit is open (its changes are held, a probe is sent "
                                "on a schedule), else 0", labels=["handler"])
    opened = CounterMetricFamily("segment_relay_handler_circuit_opened", "Times a handler's circuit opened",
                                 labels=["handler"])
    dropped = CounterMetricFamily("segment_relay_handler_dropped_changes",
                                  "Changes never handed to the handler because their partition was revoked",
                                  labels=["handler"])
    # Handlers' own metrics: one family per kind and name across handlers, with every label name
    # any of them used (a label a handler does not set is empty), so that none is lost or mislabelled.
    custom: dict[tuple[str, str], list[tuple[str, dict[str, str], float]]] = {}
    for h in handlers:
        for outcome, histogram in h.latency.items():
            if histogram.count:
                latency.add_metric([h.name, outcome], histogram.cumulative(), histogram.total)
        if h.batch_sizes is not None and h.batch_sizes.count:
            sizes.add_metric([h.name], h.batch_sizes.cumulative(), h.batch_sizes.total)
        failures.add_metric([h.name], h.failures)
        calls.add_metric([h.name], h.calls)
        pending.add_metric([h.name], h.pending)
        circuit.add_metric([h.name], 0 if h.circuit == "closed" else 1)
        opened.add_metric([h.name], h.circuit_opened)
        dropped.add_metric([h.name], h.dropped)
        for kind, series_by_name in (("counter", h.counters), ("gauge", h.gauges)):
            for name, series in series_by_name.items():
                samples = custom.setdefault((kind, name), [])
                samples.extend((h.name, dict(labels), value) for labels, value in series.items())
    yield from (latency, sizes, failures, calls, pending, circuit, opened, dropped)
    for (kind, name), samples in custom.items():
        label_names = sorted({label for _, labels, _ in samples for label in labels})
        documentation = f"Reported by handlers through HandlerContext.metrics ({name})"
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(f"segment_relay_handler_{name}", documentation, labels=["handler", *label_names])
        for handler, labels, value in samples:
            family.add_metric([handler, *(labels.get(label, "") for label in label_names)], value)
        yield family


def _source_metrics(source: SourceSnapshot) -> Iterator[Any]:
    for name, documentation, values in (
        ("segment_relay_partition_lag_seconds",
         "How far reading is behind the newest record, by partition (Kinesis: MillisBehindLatest; "
         "Event Hubs: enqueued-time gap)", {partition: ms / 1000 for partition, ms in source.lag_ms.items()}),
        ("segment_relay_partition_lag_events",
         "Events enqueued after the last one read, by partition (Event Hubs)", source.lag_events),
    ):
        lag = GaugeMetricFamily(name, documentation, labels=["partition"])
        for partition, value in values.items():
            lag.add_metric([partition], value)
        yield lag
    if source.owned is not None:
        yield GaugeMetricFamily("segment_relay_partitions_owned", "Shards or partitions this replica owns now",
                                value=len(source.owned))
