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
