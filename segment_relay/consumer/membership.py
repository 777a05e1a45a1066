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

import msgspec

from ..model import ChangeType, SegmentStatus
from .export import ProfileExport, SegmentEntry
from .stored import SegmentKey, StoredMembership

__all__ = ["ChangeType", "MembershipDiff", "SegmentKey", "StoredMembership", "Transition", "diff_membership",
           "supersedes"]

def supersedes(new: StoredMembership, old: StoredMembership | None) -> bool:
    """True when ``new`` may replace ``old``: the one ordering every store enforces."""
    if old is None:
        return True
    if new.qualified_at_us != old.qualified_at_us:
        return new.qualified_at_us > old.qualified_at_us
    return new.status != old.status


#: (the segment entry of the snapshot, enter or exit): a plain tuple, one is built per change
Transition = tuple[SegmentEntry, ChangeType]


class MembershipDiff(msgspec.Struct, gc=False):
    """What one snapshot changes: transitions in segment order, the new stored values, and the
    counts of what it did not change. (A Struct: one is built per record.)"""

    transitions: list[Transition]
    updates: dict[SegmentKey, StoredMembership]
    stale: int = 0
    duplicate: int = 0
    filtered: int = 0


_EXITED = SegmentStatus.EXITED
_ENTER = ChangeType.ENTER
_EXIT = ChangeType.EXIT


def diff_membership(
    stored: Mapping[SegmentKey, StoredMembership],
    export: ProfileExport,
    segment_filter: Collection[str] | None = None,
) -> MembershipDiff:
    """Compare one snapshot with what is stored. Transitions keep the record's segment order.

    ``supersedes`` is inlined below: this runs once per segment of every record."""
    transitions: list[Transition] = []
    updates: dict[SegmentKey, StoredMembership] = {}
    result = MembershipDiff(transitions, updates)
    for entry in export.segments:
        if segment_filter is not None and entry.segment_id not in segment_filter:
            result.filtered += 1
            continue
        key = entry.key
        status = entry.status
        at = entry.qualified_at_us
        old = stored.get(key)
        if old is None:
            was_member = None  # never seen
        elif at > old.qualified_at_us or (at == old.qualified_at_us and status is not old.status):
            was_member = old.status is not _EXITED
        else:
            if at < old.qualified_at_us:
                result.stale += 1
            else:
                result.duplicate += 1
            continue
        updates[key] = StoredMembership(status, at)
        if status is not _EXITED:
            if not was_member:  # first sighting, or back in
                transitions.append((entry, _ENTER))
        elif was_member is not False:  # first sighting of exited, or a member leaving
            transitions.append((entry, _EXIT))
    return result
