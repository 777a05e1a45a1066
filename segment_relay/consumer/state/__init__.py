"""Where per-profile membership state lives between records (and restarts)."""

from __future__ import annotations

from .base import MembershipStore, ProfileState
from .dynamodb import DynamoDBStore
from .memory import MemoryStore
from .sqlite import SqliteStore

STORE_SPECS = "'memory' or 'sqlite:PATH' or 'dynamodb:TABLE'"


def open_store(spec: str) -> MembershipStore:
    """Build a store from its spec: ``memory``, ``sqlite:PATH`` or ``dynamodb:TABLE``.

    ``dynamodb:TABLE`` takes its region and endpoint from the standard AWS environment
    (``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_DYNAMODB``) and credentials
    from botocore's usual chain. The table is created on ``open`` if it is missing.
    """
    kind, _, arg = spec.partition(":")
    if kind == "memory" and not arg:
        return MemoryStore()
    if kind == "sqlite" and arg:
        return SqliteStore(arg)
    if kind == "dynamodb" and arg:
        return DynamoDBStore(arg)  # raises ValueError for a name DynamoDB would refuse
    raise ValueError(f"unknown state store {spec!r}: use {STORE_SPECS}")


__all__ = ["MembershipStore", "ProfileState", "MemoryStore", "SqliteStore", "DynamoDBStore", "open_store"]
