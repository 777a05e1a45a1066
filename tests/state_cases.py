"""Data and checks shared by the store tests (imported as a top-level module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from segment_relay.consumer.export import SegmentStatus
from segment_relay.consumer.membership import StoredMembership

REALIZED, EXISTING, EXITED = SegmentStatus.REALIZED, SegmentStatus.EXISTING, SegmentStatus.EXITED

# (namespace, segment_id) pairs that an encoding of the two into one key could get wrong.
AWKWARD_KEYS = [
    ("ups", "seg-1"),
    ("a/b", "c"),  # must not collide with the next one
    ("a", "b/c"),
    ("a/b/", "/c/"),
    ("%2F", "x"),  # a namespace spelling the escape itself
    ("/", "x"),
    ("%", "%2F"),
    ("a|b", "c|d"),  # the value separator inside a key changes nothing
    ("ns:x", "profile:y"),
    ("", ""),
    ("ns with spaces", "Ünïcødé ✓"),
]


async def check_save_many_keeps_the_conditional_rules(store: Any, open_replica: Callable[[], Awaitable[Any]]) -> None:
    """A shared store's save_many never moves a membership back in time: not inside one call, not
    across calls, not from another replica's client (``open_replica()`` returns one, opened)."""
    def m(status: SegmentStatus, at: int) -> StoredMembership:
        return StoredMembership(status, at)

    key, other = ("ups", "seg-1"), ("aep", "seg-2")
    await store.save_many({"p": {key: m(REALIZED, 20), other: m(REALIZED, 20)}, "q": {key: m(EXITED, 5)}})
    # One call: older values are refused while the newer ones beside them, in the same call, are applied.
    await store.save_many({
        "p": {key: m(EXITED, 10), other: m(EXITED, 30)},
        "q": {key: m(EXISTING, 5)},  # same time, another status: replaces
        "r": {key: m(REALIZED, 1)},
    })
    expected = {"p": {key: m(REALIZED, 20), other: m(EXITED, 30)}, "q": {key: m(EXISTING, 5)},
                "r": {key: m(REALIZED, 1)}}
    assert await store.load_many(dict.fromkeys(expected)) == expected
    replica = await open_replica()
    try:
        await replica.save_many({"p": {key: m(EXISTING, 19), other: m(REALIZED, 29)}, "r": {key: m(REALIZED, 1)}})
    finally:
        await replica.close()
    assert await store.load_many({"p": [key, other], "q": None, "r": [key]}) == expected
