"""Handlers that tests/test_cli.py names by ``module:attr`` in a subprocess (PYTHONPATH=tests)."""

from __future__ import annotations

import asyncio
import os

from segment_relay import SegmentChange

# Set by the test: seconds each change takes, so a SIGTERM lands mid-run.
DELAY_S = float(os.environ.get("CLI_TARGETS_DELAY_S", "0"))


async def slow(change: SegmentChange) -> None:
    await asyncio.sleep(DELAY_S)


async def fails_on_some(change: SegmentChange) -> None:
    """Poison: about one change in sixteen (those whose id starts with 0) always fails; the rest
    succeed, so the handler stays healthy and those are dead-lettered after the retries."""
    if change.change_id.startswith("0"):
        raise RuntimeError("downstream refuses this one")


async def refuses_poison(change: SegmentChange) -> None:
    """Refuses the changes of segment "poison" while CLI_TARGETS_POISON=refuse; appends every
    change it takes to $CLI_TARGETS_OUT (one line each: profile, segment, change)."""
    from segment_relay.handlers.api import PermanentHandlerError

    if change.segment_id == "poison" and os.environ.get("CLI_TARGETS_POISON") == "refuse":
        raise PermanentHandlerError("the CRM has no such audience")
    with open(os.environ["CLI_TARGETS_OUT"], "a") as out:
        out.write(f"{change.profile_key} {change.segment_id} {change.change.value}\n")
