"""The types the consumer and the handlers share, and the one interface between them.

This module imports nothing of the relay: ``consumer/`` (reading, diffing, checkpoints) and
``handlers/`` (the plug-in API and the router) both depend on it, and on nothing of each other.

    consumer.pipeline --(ChangeSink.deliver: per profile, its changes in order)--> handlers.router

The values here are built on the hot path (one ``SegmentChange`` per change, one
``IdentityItem`` per identity of every record), so they are frozen msgspec Structs: immutable
like frozen dataclasses and several times cheaper to build (``IdentityItem`` is also what the
export decoder builds straight from the JSON).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Protocol

import msgspec

__all__ = [
    "ChangeSink",
    "MEMBERSHIP_CHANGES",
    "ChangeType",
    "Claim",
    "IdentityItem",
    "PendingChange",
    "SegmentChange",
    "SegmentStatus",
    "change_id_for",
    "merge_id_for",
]


class ChangeType(StrEnum):
    ENTER = "enter"
    EXIT = "exit"
    MERGE = "merge"  # two or more profiles found to be one person (identity linking); see SegmentChange


#: The changes of a segment membership: what a handler gets unless it asks for merges too.
MEMBERSHIP_CHANGES = frozenset({ChangeType.ENTER, ChangeType.EXIT})


class SegmentStatus(StrEnum):
    REALIZED = "realized"
    EXISTING = "existing"  # deprecated by Adobe in 2023, still found in old streams: means member
    EXITED = "exited"

    @property
    def is_member(self) -> bool:
        return self is not SegmentStatus.EXITED


class IdentityItem(msgspec.Struct, frozen=True, gc=False):
    """One identity of a profile's ``identityMap`` (XDM field names).

    The length bound on ``id`` applies when an export is decoded (1 KiB bounds what any store
    must key on: DynamoDB refuses longer keys, forever)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    primary: bool = False
    authenticatedState: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The identity as Adobe sends it, without the fields left at their defaults."""
        item: dict[str, Any] = {"id": self.id}
        if self.primary:
            item["primary"] = True
        if self.authenticatedState is not None:
            item["authenticatedState"] = self.authenticatedState
        return item


def merge_id_for(survivor: str, absorbed: Sequence[str]) -> str:
    """Stable id of a merge: the same profiles merged give the same id, across replays."""
    material = "\x1f".join(("merge", survivor, *sorted(absorbed)))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def change_id_for(profile_key: str, namespace: str, segment_id: str, status: str, qualified_at_us: int) -> str:
    """Stable id of a change: the same membership event always hashes the same, across replays."""
    material = "\x1f".join((profile_key, namespace, segment_id, status, str(qualified_at_us)))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


class SegmentChange(msgspec.Struct, frozen=True, gc=False):
    """One real membership change of one profile in one segment, or a merge of profiles.

    A ``merge`` (``change`` is ``ChangeType.MERGE``) says that the profiles ``merged_keys`` were
    found to be the same person as ``profile_key`` (an export carried identities of each) and
    were absorbed into it; their memberships are ``profile_key``'s from now on. It comes before
    the profile's other changes of the same record. Its segment fields are empty,
    ``qualified_at`` is the newest qualification time of the merged memberships and ``status``
    carries no meaning (``realized``).

    ``gc=False``: nothing in a change refers back to it, so the cyclic collector need not track
    the millions of them a busy relay builds."""

    change: ChangeType
    segment_id: str
    segment_namespace: str
    segment_name: str | None
    profile_key: str
    identities: Mapping[str, Sequence[IdentityItem]]
    attributes: Mapping[str, Any]
    qualified_at: datetime
    status: SegmentStatus
    change_id: str
    partition: str
    position: str
    merged_keys: tuple[str, ...] = ()  # a merge: the profile keys absorbed into profile_key

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (what the log, jsonl and webhook handlers send)."""
        if self.change is ChangeType.MERGE:
            return {
                "change": self.change.value,
                "profile_key": self.profile_key,
                "merged_keys": list(self.merged_keys),
                "qualified_at": self.qualified_at.isoformat().replace("+00:00", "Z"),
                "change_id": self.change_id,
                "identities": {
                    namespace: [item.to_dict() for item in items] for namespace, items in self.identities.items()
                },
                "attributes": dict(self.attributes),
                "source": {"partition": self.partition, "position": self.position},
            }
        return {
            "change": self.change.value,
            "segment_id": self.segment_id,
            "segment_namespace": self.segment_namespace,
            "segment_name": self.segment_name,
            "profile_key": self.profile_key,
            "qualified_at": self.qualified_at.isoformat().replace("+00:00", "Z"),
            "status": self.status.value,
            "change_id": self.change_id,
            "identities": {
                namespace: [item.to_dict() for item in items] for namespace, items in self.identities.items()
            },
            "attributes": dict(self.attributes),
            "source": {"partition": self.partition, "position": self.position},
        }


class Claim(Protocol):
    """Whether the partition a change was read from is still this replica's: once it is revoked
    (a lease lost, an ownership moved), nothing more of what was read under it may reach a handler."""

    @property
    def revoked(self) -> bool: ...


#: A change and the claim it was read under.
PendingChange = tuple[SegmentChange, Claim]


class ChangeSink(Protocol):
    """What the pipeline hands changes to; ``handlers.router.Router`` is the one that ships.

    ``deliver`` takes the changes of one step of the pipeline, one sequence per profile in the
    order they must be handled, and returns at once; ``done(i)`` is called once every change of
    profile ``i`` was handled, dead-lettered, or skipped because its claim was revoked (for a
    profile with no change a handler wants, at once, from within ``deliver``). Profiles are
    handled concurrently; the changes of one profile never overlap and keep their order.
    ``read_at`` is when the oldest record of the step was read (``time.monotonic()``): the age
    that ``retry.max_age_s`` limits starts there. ``flush`` makes what was handled durable (the
    pipeline checkpoints right after it); ``start`` and ``close`` bracket the run.
    """

    async def start(self) -> None: ...

    def deliver(self, profiles: Sequence[Sequence[PendingChange]], done: Callable[[int], None],
                read_at: float | None = None) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
