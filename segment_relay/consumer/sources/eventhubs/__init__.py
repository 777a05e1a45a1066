"""The Azure Event Hubs source: the SDK's consumer client, Blob checkpoints, load balancing across replicas."""

from .settings import EventHubsSettings, EventPosition, StartingPosition
from .source import EventHubsSource

__all__ = ["EventHubsSettings", "EventHubsSource", "EventPosition", "StartingPosition"]
