"""Kinesis: shard readers on aiobotocore, DynamoDB leases shared by the replicas."""

from .settings import SHARD_END, InitialPosition, KinesisSettings
from .source import KinesisSource

__all__ = ["SHARD_END", "InitialPosition", "KinesisSettings", "KinesisSource"]
