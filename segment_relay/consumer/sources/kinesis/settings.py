"""Settings of the Kinesis source (filled from the [kinesis] config section)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class InitialPosition(StrEnum):
    """Where a shard with no checkpoint starts. Child shards of a reshard always start at
    TRIM_HORIZON, so nothing written to them before their lease was taken is skipped."""

    TRIM_HORIZON = "TRIM_HORIZON"
    LATEST = "LATEST"
    AT_TIMESTAMP = "AT_TIMESTAMP"


SHARD_END = "SHARD_END"  # the checkpoint of a shard read to its end and fully processed


@dataclass(frozen=True)
class KinesisSettings:
    stream: str  # name or ARN; calls always pass the name (kinesalite rejects ARN-only calls)
    application: str = "segment-relay"  # names the lease table; one application = one consumer group
    region: str | None = None  # None: the standard AWS chain (AWS_REGION, profile, ...)
    endpoint_url: str | None = None  # Kinesis endpoint override (tests, VPC endpoints)
    dynamodb_endpoint_url: str | None = None  # DynamoDB endpoint override for the lease table
    worker_id: str | None = None  # None: hostname + pid; must be unique per replica
    initial_position: InitialPosition = InitialPosition.TRIM_HORIZON
    initial_timestamp: datetime | None = None  # for AT_TIMESTAMP
    get_records_limit: int = 1000  # records per GetRecords call (max 10,000)
    idle_wait_s: float = 1.0  # wait after an empty GetRecords before polling again
    min_get_records_interval_s: float = 0.2  # AWS allows 5 GetRecords per second per shard
    lease_duration_s: float = 10.0  # a lease not renewed for this long is free to take (KCL: failoverTime)
    renew_interval_s: float = 10.0 / 3  # how often the owner renews its leases
    shard_sync_interval_s: float = 60.0  # how often ListShards looks for new shards
    max_backoff_s: float = 10.0  # ceiling of the backoff on throttling and network errors
    deaggregate: bool = False  # KPL aggregated records (needs aws-kinesis-agg)
    # Records read ahead of the pipeline, across shards (the relay sets it to
    # pipeline.max_in_flight_records); a GetRecords call never asks for more than this.
    read_ahead_records: int = 10_000

    @property
    def stream_name(self) -> str:
        """The name part of an ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME) or the name itself."""
        if self.stream.startswith("arn:"):
            return self.stream.rsplit("/", 1)[-1]
        return self.stream

    @property
    def lease_table(self) -> str:
        return f"{self.application}-leases"
