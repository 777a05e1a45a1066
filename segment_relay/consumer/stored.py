"""What the relay keeps per (profile, segment): the value every membership store saves, and its key.

Its own module because both the export decoder (which hands out one shared value per distinct
time and status) and the diff and the stores use it.
"""

from __future__ import annotations

import msgspec

from ..model import SegmentStatus

__all__ = ["SegmentKey", "StoredMembership"]

SegmentKey = tuple[str, str]  # (namespace, segment_id)


class StoredMembership(msgspec.Struct, frozen=True, gc=False):
    # A frozen Struct: immutable like a frozen dataclass, and several times cheaper to build.
    # Immutable also lets every profile with the same (status, time) share one value.
    status: SegmentStatus
    qualified_at_us: int

    @property
    def is_member(self) -> bool:
        return self.status.is_member
