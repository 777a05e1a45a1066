"""/healthz and /readyz of a real relay, over real HTTP, through its lifecycle.

Ready: started, not draining, the event loop alive, and the source running, whether it owns
work or waits for it. Live: the event loop is not stuck. A slow handler that awaits is neither
a liveness nor a readiness problem; a handler that blocks the loop makes the probes go
unanswered, which Kubernetes counts as failures, and the loop is live again once it is free.

The relay runs in a thread with its own event loop, so that the test can probe it while that
loop is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from segment_relay import Handler, SegmentChange
from segment_relay.app import Relay
from segment_relay.config import load_config
from segment_relay.ops.health import Health, OpsServer

STALL_S = 0.3  # the relay's stall limit in these tests (30 s in production)
DEADLINE_S = 10.0  # the longest anything here may take to happen
RECORD = json.dumps({
    "identityMap": {"ecid": [{"id": "12345678901234567890123456789012345678"}]},
    "segmentMembership": {"ups": {"gold": {"status": "realized", "lastQualificationTime": "2026-05-01T10:00:00Z"}}},
}).encode() + b"\n"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def probe(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]] | None:
    """(status, JSON body), or None when nothing answered within ``timeout``: what a kubelet
    counts as a failed probe."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except TimeoutError:
        return None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            return None
        raise


class Gated(Handler):
    """A handler whose ``start`` and ``handle`` wait until the test opens their gates.

    ``handle`` waits like a slow downstream call (awaiting, the loop runs on) or, with
    ``block_loop``, like a synchronous call that blocks the event loop."""

    name = "gated"

    def __init__(self, *, block_loop: bool = False) -> None:
        self.block_loop = block_loop
        self.may_start = threading.Event()
        self.may_finish = threading.Event()
        self.handling = threading.Event()
        self.handled = 0

    def open_all(self) -> None:
        self.may_start.set()
        self.may_finish.set()

    async def start(self) -> None:
        await asyncio.to_thread(self.may_start.wait, DEADLINE_S)

    async def handle(self, change: SegmentChange) -> None:
        self.handling.set()
        if self.block_loop:
            self.may_finish.wait(DEADLINE_S)  # the bug liveness exists for: nothing else runs meanwhile
        else:
            await asyncio.to_thread(self.may_finish.wait, DEADLINE_S)
        self.handled += 1


class RelayThread:
    """``Relay.run()`` on an event loop of its own, in a thread."""

    def __init__(self, relay: Relay) -> None:
        assert relay.ops is not None, "the relay needs a metrics port"
        self.relay = relay
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="relay", daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self.loop = asyncio.get_running_loop()
            await self.relay.run()

        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def start(self) -> None:
        self._thread.start()
        ops = self.relay.ops
        assert ops is not None
        wait_until(lambda: ops.port != 0 or not self._thread.is_alive(), "the ops server to listen")
        assert self._thread.is_alive(), f"the relay ended at start: {self.error!r}"

    def url(self, path: str) -> str:
        assert self.relay.ops is not None
        return self.relay.ops.url + path

    def stop(self) -> None:
        """What SIGTERM does, from outside the relay's loop."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
                self.loop.call_soon_threadsafe(self.relay.stop)

    def join(self) -> None:
        self._thread.join(DEADLINE_S)
        assert not self._thread.is_alive(), "the relay did not finish"
        assert self.error is None, f"the relay failed: {self.error!r}"


@pytest.fixture
def relay_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, Gated], RelayThread]]:
    """Starts a relay on a source (``file:PATH`` or ``file:-``) with a gated handler; always
    stops it afterwards."""
    for name in [name for name in os.environ if name.startswith("SEGMENT_RELAY_")]:
        monkeypatch.delenv(name)
    started: list[tuple[RelayThread, Gated]] = []

    def start(source: str, handler: Gated) -> RelayThread:
        config = load_config(
            None, source=source, state="memory", handlers=[f"jsonl:{tmp_path / 'changes.jsonl'}"],
            dead_letter=str(tmp_path / "dead-letter.jsonl"), metrics_host="127.0.0.1", metrics_port=0,
        )
        relay = Relay(config, extra_handlers=[handler])
        relay.health.stall_after_s = STALL_S  # the watchdog's interval follows it
        thread = RelayThread(relay)
        started.append((thread, handler))
        thread.start()
        return thread

    yield start
    for thread, handler in started:  # a failed test must not leave a relay waiting
        handler.open_all()
        thread.stop()
        thread.join()


def test_ready_once_the_source_runs_even_before_it_has_work(
    relay_with: Callable[[str, Gated], RelayThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream with nothing in it yet: stdin is a pipe the test holds open.
    read_end, write_end = os.pipe()
    stdin = os.fdopen(read_end, "rb")
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        handler = Gated()
        relay = relay_with("file:-", handler)

        live, ready = probe(relay.url("/healthz")), probe(relay.url("/readyz"))
        assert live == (200, {"status": "ok"})
        assert ready is not None and ready[0] == 503  # handlers still starting, source not open

        handler.may_start.set()
        wait_until(lambda: probe(relay.url("/readyz")) == (200, {"status": "ok"}), "ready while waiting for records")
        assert relay.relay.pipeline.running and relay.relay.pipeline.in_flight == 0  # owns nothing, waits

        handler.may_finish.set()
        os.write(write_end, RECORD)  # work arrives, and is done
        wait_until(lambda: handler.handled == 1, "the record to be handled")
        assert probe(relay.url("/readyz")) == (200, {"status": "ok"})
    finally:
        os.close(write_end)  # the end of the stream: the relay finishes on its own
    relay.join()
    stdin.close()


def test_a_slow_handler_keeps_the_relay_live_and_ready_and_a_drain_is_not_ready(
    tmp_path: Path, relay_with: Callable[[str, Gated], RelayThread]
) -> None:
    exports = tmp_path / "exports.jsonl"
    exports.write_bytes(RECORD)
    handler = Gated()
    handler.may_start.set()
    relay = relay_with(f"file:{exports}", handler)
    assert handler.handling.wait(DEADLINE_S)

    # The handler keeps awaiting for several stall limits: every probe is answered, and OK.
    until = time.monotonic() + 4 * STALL_S
    while time.monotonic() < until:
        assert probe(relay.url("/healthz")) == (200, {"status": "ok"})
        assert probe(relay.url("/readyz")) == (200, {"status": "ok"})
    assert relay.relay.health.stalls == 0

    relay.stop()  # SIGTERM with the change still in flight: draining is not ready, but live
    wait_until(lambda: probe(relay.url("/readyz")) == (503, {"status": "not ready", "reason": "stopping"}),
               "not ready once draining")
    assert probe(relay.url("/healthz")) == (200, {"status": "ok"})
    handler.may_finish.set()
    relay.join()
    assert handler.handled == 1


def test_a_blocked_event_loop_fails_liveness_until_it_is_free(
    tmp_path: Path, relay_with: Callable[[str, Gated], RelayThread]
) -> None:
    exports = tmp_path / "exports.jsonl"
    exports.write_bytes(RECORD)
    handler = Gated(block_loop=True)
    handler.may_start.set()
    relay = relay_with(f"file:{exports}", handler)
    assert handler.handling.wait(DEADLINE_S)
    blocked_at = time.monotonic()

    # Nothing answers while the loop is blocked: each probe is a failure for the kubelet.
    assert probe(relay.url("/healthz"), timeout=0.5) is None
    assert probe(relay.url("/readyz"), timeout=0.5) is None
    assert time.monotonic() - blocked_at > STALL_S

    handler.may_finish.set()  # the loop is free again: live at once, and the stall is on record
    wait_until(lambda: relay.relay.health.stalls >= 1, "the watchdog to record the stall")
    relay.join()
    assert handler.handled == 1


async def test_a_loop_that_stopped_beating_is_neither_live_nor_ready() -> None:
    health = Health(stall_after_s=STALL_S, extra_ready=lambda: True)
    health.mark_started()
    async with OpsServer(CollectorRegistry(), health) as server, aiohttp.ClientSession() as session:

        async def get(path: str) -> tuple[int, dict[str, Any]]:
            async with session.get(server.url + path, timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status, await response.json()

        health.beat()
        assert await get("/readyz") == (200, {"status": "ok"})
        health.last_beat = time.monotonic() - 10 * STALL_S  # as if the watchdog had stopped beating
        for path in ("/healthz", "/readyz"):
            status, body = await get(path)
            assert status == 503 and "heartbeat" in body["reason"], path


async def test_the_watchdog_beats_well_within_a_short_stall_limit() -> None:
    health = Health(stall_after_s=STALL_S)
    watchdog = asyncio.create_task(health.watchdog())  # no interval given: derived from the limit
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        beats: set[float] = set()
        while len(beats) < 3:  # three beats, each well inside the limit
            assert loop.time() < deadline, "the watchdog does not beat"
            if health.last_beat is not None:
                beats.add(health.last_beat)
                assert health.live
            await asyncio.sleep(0.01)
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
