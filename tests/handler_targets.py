"""Targets for tests/test_handler_loader.py: things a handler spec can name.

Imported as the top-level module ``handler_targets`` (the tests put this directory on sys.path).
"""

from __future__ import annotations

from segment_relay.handlers.api import Handler, SegmentChange

RECEIVED: list[SegmentChange] = []


async def record_change(change: SegmentChange) -> None:
    RECEIVED.append(change)


def sync_function(change: SegmentChange) -> None:
    RECEIVED.append(change)


class EchoHandler(Handler):
    name = "echo"

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg
        self.received: list[SegmentChange] = []

    async def handle(self, change: SegmentChange) -> None:
        self.received.append(change)


class NeedsArgHandler(Handler):
    name = "needs-arg"

    def __init__(self, target: str) -> None:
        if not target.startswith("https://"):
            raise ValueError(f"target must be https, got {target}")
        self.target = target

    async def handle(self, change: SegmentChange) -> None:
        pass


INSTANCE = EchoHandler("the-instance")


class Namespace:
    """For dotted attributes: ``handler_targets:Namespace.fn``."""

    fn = staticmethod(record_change)


class NotAHandler:
    pass


NOT_A_HANDLER = 42


def make_change(
    *,
    change: str = "enter",
    segment_id: str = "seg-gold",
    profile_key: str = "ecid:123",
    qualified_at: str = "2024-05-01T12:00:00+00:00",
    change_id: str | None = None,
    position: str = "42",
) -> SegmentChange:
    """A SegmentChange built directly, as the consumer would produce it."""
    from datetime import datetime

    from segment_relay.consumer.export import IdentityItem, SegmentStatus
    from segment_relay.consumer.membership import ChangeType
    from segment_relay.handlers.api import change_id_for

    kind = ChangeType(change)
    status = SegmentStatus.REALIZED if kind is ChangeType.ENTER else SegmentStatus.EXITED
    when = datetime.fromisoformat(qualified_at)
    return SegmentChange(
        change=kind,
        segment_id=segment_id,
        segment_namespace="ups",
        segment_name="Gold customers",
        profile_key=profile_key,
        identities={"ECID": [IdentityItem(id="123", primary=True)], "Email": [IdentityItem(id="a@example.com")]},
        attributes={"person": {"name": {"firstName": "Ada"}}},
        qualified_at=when,
        status=status,
        change_id=change_id or change_id_for(profile_key, "ups", segment_id, status.value,
                                             int(when.timestamp() * 1_000_000)),
        partition="shard-0",
        position=position,
    )
