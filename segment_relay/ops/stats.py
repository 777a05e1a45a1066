"""What the relay counts. Plain integers on the hot path; Prometheus reads them at scrape
time through a collector, so counting costs a dict update, not a metrics call."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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
        self.handler_latency: dict[tuple[str, str], LatencyHistogram] = {}  # by (handler, outcome)
        # Filled by the pipeline: partition -> {"checkpoint": last committed position}
        self.partitions: dict[str, dict[str, Any]] = {}
        self.in_flight: Any = None  # the pipeline's InFlightLimit (records, bytes), read at scrape time
        self.partition_lag_ms: dict[str, float] = {}  # e.g. Kinesis MillisBehindLatest, by shard
        self.partition_lag_events: dict[str, int] = {}  # Event Hubs: newest sequence number - last read
        self.owned_partitions: Callable[[], Collection[str]] | None = None  # set by a source that shares work
        self.registry.register(_StatsCollector(self))

    # --- called by the router -------------------------------------------------
    def handler_succeeded(self, handler: str, seconds: float) -> None:
        self._latency(handler, "ok").observe(seconds)

    def handler_failed(self, handler: str, seconds: float) -> None:
        self.handler_failures[handler] += 1
        self._latency(handler, "error").observe(seconds)

    def _latency(self, handler: str, outcome: str) -> LatencyHistogram:
        histogram = self.handler_latency.get((handler, outcome))
        if histogram is None:
            histogram = self.handler_latency[(handler, outcome)] = LatencyHistogram()
        return histogram

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


class LatencyHistogram:
    """Bucket counts and a sum, read by the collector at scrape time. prometheus_client's own
    Histogram takes a lock per bucket and per sum on every observation; this is on the hot path."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        buckets, running = [], 0
        for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


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
        latency = HistogramMetricFamily(
            "segment_relay_handler_latency_seconds", "Time spent in one handler call",
            labels=["handler", "outcome"],
        )
        for (handler, outcome), histogram in s.handler_latency.items():
            latency.add_metric([handler, outcome], histogram.cumulative(), histogram.total)
        yield latency
        failures = CounterMetricFamily(
            "segment_relay_handler_failures", "Failed handler calls (each attempt)", labels=["handler"]
        )
        for handler, n in s.handler_failures.items():
            failures.add_metric([handler], n)
        yield failures
        records, size = (s.in_flight.records, s.in_flight.bytes) if s.in_flight is not None else (0, 0)
        yield GaugeMetricFamily("segment_relay_in_flight_records", "Records admitted, not finished", value=records)
        yield GaugeMetricFamily("segment_relay_in_flight_bytes", "Bytes admitted, not finished", value=size)
        checkpoint = GaugeMetricFamily(
            "segment_relay_checkpoint_position", "Last checkpointed position, by partition", labels=["partition"]
        )
        for partition, info in s.partitions.items():
            value = _position_value(info.get("checkpoint"))
            if value is not None:
                checkpoint.add_metric([partition], value)
        yield checkpoint
        for name, documentation, values in (
            ("segment_relay_partition_lag_milliseconds",
             "How far reading is behind the newest record, by partition (Kinesis: MillisBehindLatest; "
             "Event Hubs: enqueued-time gap)", s.partition_lag_ms),
            ("segment_relay_partition_lag_events",
             "Events enqueued after the last one read, by partition (Event Hubs)", s.partition_lag_events),
        ):
            lag = GaugeMetricFamily(name, documentation, labels=["partition"])
            for partition, value in values.items():
                lag.add_metric([partition], value)
            yield lag
        if s.owned_partitions is not None:
            yield GaugeMetricFamily(
                "segment_relay_partitions_owned", "Shards or partitions this replica owns now",
                value=len(s.owned_partitions()),
            )
