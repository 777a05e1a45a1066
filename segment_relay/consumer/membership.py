"""The diff rules: stored membership + a new snapshot -> the real enter/exit changes.

Per (profile, segment):
- older than stored            -> stale, ignored
- same status at the same time -> duplicate, ignored
- same time, different status  -> counts as newer (the later record wins)
- non-member -> member          -> enter
- member -> non-member          -> exit
- first sighting of ``exited``  -> exit
- member -> member, later time  -> nothing (an attribute or identity re-export)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from .export import ProfileExport, SegmentEntry, SegmentStatus

SegmentKey = tuple[str, str]  # (namespace, segment_id)


class ChangeType(StrEnum):
    ENTER = "enter"
    EXIT = "exit"


class StoredMembership(NamedTuple):
    # A NamedTuple: immutable like a frozen dataclass, and several times cheaper to build
    # (one is built per segment of every record).
    status: SegmentStatus
    qualified_at_us: int

    @property
    def is_member(self) -> bool:
        return self.status.is_member


def supersedes(new: StoredMembership, old: StoredMembership | None) -> bool:
    """True when ``new`` may replace ``old``: the one ordering every store enforces."""
    if old is None:
        return True
    if new.qualified_at_us != old.qualified_at_us:
        return new.qualified_at_us > old.qualified_at_us
    return new.status != old.status


@dataclass(slots=True)
class Transition:
    entry: SegmentEntry
    change: ChangeType


@dataclass(slots=True)
class MembershipDiff:
    transitions: list[Transition] = field(default_factory=list)
    updates: dict[SegmentKey, StoredMembership] = field(default_factory=dict)
    stale: int = 0
    duplicate: int = 0
    filtered: int = 0


def diff_membership(
    stored: Mapping[SegmentKey, StoredMembership],
    export: ProfileExport,
    segment_filter: Collection[str] | None = None,
) -> MembershipDiff:
    """Compare one snapshot with what is stored. Transitions keep the record's segment order."""
    result = MembershipDiff()
    exited = SegmentStatus.EXITED
    for entry in export.segments:
        if segment_filter is not None and entry.segment_id not in segment_filter:
            result.filtered += 1
            continue
        key = (entry.namespace, entry.segment_id)
        new = StoredMembership(entry.status, entry.qualified_at_us)
        old = stored.get(key)
        if old is None:
            was_member = None  # never seen
        elif supersedes(new, old):
            was_member = old.status is not exited
        else:
            if new.qualified_at_us < old.qualified_at_us:
                result.stale += 1
            else:
                result.duplicate += 1
            continue
        result.updates[key] = new
        if entry.status is not exited:
            if not was_member:  # first sighting, or back in
                result.transitions.append(Transition(entry, ChangeType.ENTER))
        elif was_member is not False:  # first sighting of exited, or a member leaving
            result.transitions.append(Transition(entry, ChangeType.EXIT))
    return result
