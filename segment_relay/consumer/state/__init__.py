"""Where per-profile membership state lives between records (and restarts)."""

from __future__ import annotations

from pathlib import Path

from ...errors import StoreMissing
from .base import MembershipStore, ProfileState
from .dynamodb import DynamoDBStore
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SqliteStore

STORE_SPECS = "'memory' or 'sqlite:PATH' or 'dynamodb:TABLE' or 'redis://HOST:PORT/DB' (or rediss://)"


def open_store(spec: str, *, profile_claims: bool = True) -> MembershipStore:
    """Build a store from its spec: ``memory``, ``sqlite:PATH``, ``dynamodb:TABLE`` or a redis URL.

    ``profile_claims`` False says that no other replica works on this one's profiles at the same
    time (``claims.mode`` off): a sqlite store then writes new identity links with the state, in
    its flush, instead of committing each claim at once.

    ``dynamodb:TABLE`` takes its region and endpoint from the standard AWS environment
    (``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_DYNAMODB``) and credentials
    from botocore's usual chain. The table is created on ``open`` if it is missing.

    ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` for TLS) is the spec and the URL at once.
    """
    if spec.startswith(("redis://", "rediss://")):
        return RedisStore(spec)  # raises ValueError for a URL redis-py could not use
    kind, _, arg = spec.partition(":")
    if kind == "memory" and not arg:
        return MemoryStore()
    if kind == "sqlite" and arg:
        return SqliteStore(arg, links_with_state=not profile_claims)
    if kind == "dynamodb" and arg:
        return DynamoDBStore(arg)  # raises ValueError for a name DynamoDB would refuse
    raise ValueError(f"unknown state store {spec!r}: use {STORE_SPECS}")


async def open_existing_store(spec: str) -> MembershipStore:
    """``open_store(spec)``, opened, without creating anything: raises ``StoreMissing`` for a
    sqlite file or a DynamoDB table that is not there (a redis database always is)."""
    store = open_store(spec)
    if isinstance(store, SqliteStore) and not Path(store.path).is_file():
        raise StoreMissing(f"no sqlite state file at {store.path!r}")
    if isinstance(store, DynamoDBStore):
        store.create_table = False
    await store.open()
    return store


__all__ = ["MembershipStore", "ProfileState", "MemoryStore", "SqliteStore", "DynamoDBStore", "RedisStore",
           "open_existing_store", "open_store"]
