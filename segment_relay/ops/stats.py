"""What the relay counts. Plain integers on the hot path; Prometheus reads them at scrape
time through a collector, so counting costs a dict update, not a metrics call."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RelayStats:
    def __init__(self) -> None:
        self.records_read = 0
        self.records_finished = 0
        self.invalid: Counter[str] = Counter()  # by reason
        self.changes: Counter[tuple[str, str]] = Counter()  # by (segment_id, change)
        self.stale = 0
        self.duplicate = 0
        self.filtered = 0
        self.dead_letters: Counter[str] = Counter()  # by kind
        self.handler_failures: Counter[str] = Counter()  # by handler
        self.profiles_seen: set[str] | None = None  # demo and tests only: unbounded
        self.registry = CollectorRegistry(auto_describe=True)
        self.handler_latency = Histogram(
            "segment_relay_handler_latency_seconds", "Time spent in one handler call",
            ["handler", "outcome"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        # Filled by the pipeline: partition -> {"checkpoint": last committed position}
        self.partitions: dict[str, dict[str, Any]] = {}
        self.in_flight_records = 0
        self.in_flight_bytes = 0
        self._latency_children: dict[tuple[str, str], Any] = {}
        self.registry.register(_StatsCollector(self))

    # --- called by the router -------------------------------------------------
    def handler_succeeded(self, handler: str, seconds: float) -> None:
        child = self._latency_children.get((handler, "ok"))
        if child is None:  # labels() is a lock and a dict walk: look it up once per handler
            child = self._latency_children[(handler, "ok")] = self.handler_latency.labels(handler, "ok")
        child.observe(seconds)

    def handler_failed(self, handler: str, seconds: float) -> None:
        self.handler_failures[handler] += 1
        self.handler_latency.labels(handler, "error").observe(seconds)

    def dead_lettered(self, kind: str) -> None:
        self.dead_letters[kind] += 1

    # --- summaries ------------------------------------------------------------
    @property
    def enters(self) -> int:
        return sum(n for (_, change), n in self.changes.items() if change == "enter")

    @property
    def exits(self) -> int:
        return sum(n for (_, change), n in self.changes.items() if change == "exit")

    def summary(self) -> dict[str, Any]:
        summary = {
            "records": self.records_read,
            "invalid": sum(self.invalid.values()),
            "enters": self.enters,
            "exits": self.exits,
            "stale_suppressed": self.stale,
            "duplicates_suppressed": self.duplicate,
            "filtered": self.filtered,
            "dead_letters": sum(self.dead_letters.values()),
            "handler_failures": sum(self.handler_failures.values()),
        }
        if self.profiles_seen is not None:
            summary["profiles"] = len(self.profiles_seen)
        return summary


def _position_value(position: Any) -> float | None:
    try:
        return float(position)
    except (TypeError, ValueError):
        return None


class _StatsCollector(Collector):
    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        s = self.stats
        yield CounterMetricFamily("segment_relay_records_read", "Records read from the source", value=s.records_read)
        yield CounterMetricFamily(
            "segment_relay_records_finished", "Records fully processed and acknowledged", value=s.records_finished
        )
        invalid = CounterMetricFamily("segment_relay_records_invalid", "Records rejected, by reason", labels=["reason"])
        for reason, n in s.invalid.items():
            invalid.add_metric([reason], n)
        yield invalid
        changes = CounterMetricFamily(
            "segment_relay_changes", "Membership changes emitted", labels=["segment_id", "change"]
        )
        for (segment_id, change), n in s.changes.items():
            changes.add_metric([segment_id, change], n)
        yield changes
        suppressed = CounterMetricFamily(
            "segment_relay_suppressed", "Segment statuses that caused no change", labels=["reason"]
        )
        suppressed.add_metric(["stale"], s.stale)
        suppressed.add_metric(["duplicate"], s.duplicate)
        suppressed.add_metric(["filtered"], s.filtered)
        yield suppressed
        dead = CounterMetricFamily("segment_relay_dead_letters", "Entries written to the dead letter", labels=["kind"])
        for kind, n in s.dead_letters.items():
            dead.add_metric([kind], n)
        yield dead
        failures = CounterMetricFamily(
            "segment_relay_handler_failures", "Failed handler calls (each attempt)", labels=["handler"]
        )
        for handler, n in s.handler_failures.items():
            failures.add_metric([handler], n)
        yield failures
        yield GaugeMetricFamily("segment_relay_in_flight_records", "Records admitted, not finished", value=s.in_flight_records)
        yield GaugeMetricFamily("segment_relay_in_flight_bytes", "Bytes admitted, not finished", value=s.in_flight_bytes)
        checkpoint = GaugeMetricFamily(
            "segment_relay_checkpoint_position", "Last checkpointed position, by partition", labels=["partition"]
        )
        for partition, info in s.partitions.items():
            value = _position_value(info.get("checkpoint"))
            if value is not None:
                checkpoint.add_metric([partition], value)
        yield checkpoint
