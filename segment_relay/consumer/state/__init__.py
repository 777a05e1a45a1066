"""Where per-profile membership state lives between records (and restarts)."""

from __future__ import annotations

from .base import MembershipStore, ProfileState
from .memory import MemoryStore
from .sqlite import SqliteStore


def open_store(spec: str) -> MembershipStore:
    """Build a store from its spec: ``memory`` or ``sqlite:PATH``."""
    kind, _, arg = spec.partition(":")
    if kind == "memory" and not arg:
        return MemoryStore()
    if kind == "sqlite" and arg:
        return SqliteStore(arg)
    raise ValueError(f"unknown state store {spec!r}: use 'memory' or 'sqlite:PATH'")


__all__ = ["MembershipStore", "ProfileState", "MemoryStore", "SqliteStore", "open_store"]
