"""Settings of the Event Hubs source (filled from the [eventhubs] config section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple


class EventPosition(NamedTuple):
    """Where an event sits in its partition, as the pipeline tracks it.

    A checkpoint needs both the sequence number and the offset. Printed (dead letters,
    handler changes) and graphed, it is the sequence number.
    """

    sequence_number: int
    offset: str

    def __str__(self) -> str:
        return str(self.sequence_number)

    def __float__(self) -> float:
        return float(self.sequence_number)


class StartingPosition:
    """Where a partition with no checkpoint starts: ``earliest``, ``latest`` or a time.
    A checkpoint always wins over it."""

    EARLIEST = "earliest"
    LATEST = "latest"

    @staticmethod
    def for_sdk(value: str | datetime) -> str | datetime:
        """The SDK's spelling: "-1" is the start of the retained events, "@latest" the end."""
        if isinstance(value, datetime):
            return value
        if value == StartingPosition.EARLIEST:
            return "-1"
        if value == StartingPosition.LATEST:
            return "@latest"
        raise ValueError(f"unknown starting position {value!r}: use earliest, latest or an ISO-8601 time")


@dataclass(frozen=True)
class EventHubsSettings:
    hub: str
    # Either a connection string (SAS) or a namespace plus an Azure credential. Secrets stay out of repr.
    connection_string: str | None = field(default=None, repr=False)
    fully_qualified_namespace: str | None = None
    consumer_group: str = "$Default"
    # A dry run: read through this consumer group instead, with no ownership and no checkpoints
    # written, starting after consumer_group's checkpoints (see EventHubsSource).
    read_only_consumer_group: str | None = None
    checkpoint_connection_string: str | None = field(default=None, repr=False)
    checkpoint_account_url: str | None = None
    checkpoint_path: str | None = None  # a sqlite file instead of Blob storage (one host)
    checkpoint_container: str = "segment-relay-checkpoints"
    starting_position: str | datetime = StartingPosition.EARLIEST
    max_batch_size: int = 300  # events per callback from the SDK
    prefetch: int = 300  # events the SDK asks the service for ahead of the callback, per partition
    load_balancing_interval_s: float = 10.0
    ownership_expiration_s: float | None = None  # None: 6 x load_balancing_interval_s (the SDK's rule)
    load_balancing_strategy: str = "greedy"  # greedy | balanced
    lag_interval_s: float = 10.0  # how often the lag metrics ask the service for each partition's newest event
    # Events read ahead of the pipeline, across partitions (the relay sets it to
    # pipeline.max_in_flight_records), on top of the SDK's prefetch per partition.
    read_ahead_events: int = 10_000
    # For embedding and tests: an azure.core AsyncTokenCredential used instead of azure-identity's
    # DefaultAzureCredential, and extra keyword arguments for the SDK clients.
    credential: Any = field(default=None, repr=False, compare=False)
    client_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.connection_string is None) == (self.fully_qualified_namespace is None):
            raise ValueError("give exactly one of connection_string or fully_qualified_namespace")
        stores = (self.checkpoint_connection_string, self.checkpoint_account_url, self.checkpoint_path)
        if sum(store is not None for store in stores) != 1:
            raise ValueError("give exactly one of checkpoint_connection_string, checkpoint_account_url or checkpoint_path")

    @property
    def ownership_expiration(self) -> float:
        return self.ownership_expiration_s if self.ownership_expiration_s is not None else 6 * self.load_balancing_interval_s
