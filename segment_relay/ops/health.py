"""Liveness, readiness and the ops HTTP endpoints (/metrics, /healthz, /readyz).

``Health`` is the daemon's own view of itself; there is no module-level state, so every
daemon (and every test) owns its own instance.

Readiness
---------
Ready means started, not stopping, live (below), and ``extra_ready`` passing, which the relay
wires to "the pipeline runs on a started source": the replica owns shards or partitions, or
waits for some. A replica that owns nothing because there are more replicas than partitions
is ready too: it is in the group and takes work over as soon as another replica leaves.
Calling it unready would stall rolling updates (a surge pod could never become ready) and
make a PodDisruptionBudget refuse evictions. Draining after a signal is not ready.

Liveness and a blocked event loop
---------------------------------
``Health.watchdog()`` is a coroutine that beats every ``interval_s`` seconds. A slow handler
that *awaits* I/O does not stop the beats: the loop keeps running other tasks while it waits.
Beats stop only when the loop itself is stuck (a CPU-bound handler, a blocking call such as
``time.sleep`` or a synchronous HTTP client, a busy loop), which is exactly what liveness is
meant to catch.

The HTTP server runs on the same event loop, so while the loop is blocked it cannot answer at
all: the probe's ``timeoutSeconds`` runs out, and Kubernetes counts an unanswered probe as a
failure. That is the signal for a stuck loop, so the liveness probe needs a timeout of a few
seconds and ``periodSeconds x failureThreshold`` of about ``stall_after_s``. When the loop
comes back, the watchdog beats before a probe that queued up meanwhile is answered, so a loop
that recovered is live again at once. ``live`` turns False by itself only if beats stop while
the loop still answers (the watchdog task died or was never started). The watchdog also logs a
warning (and counts ``Health.stalls``) whenever it wakes up more than ``stall_after_s`` late,
so every long stall leaves a trace even when no probe saw it.

Before the first beat ``live`` is True: nothing has been measured yet, and slow start-up is
the job of a startupProbe / initialDelaySeconds. Keep the watchdog running until the ops
server is stopped (including while draining after ``mark_stopping()``), otherwise liveness
fails ``stall_after_s`` after it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

__all__ = ["Health", "OpsServer"]


class Health:
    """Started/stopping flags for readiness, an event-loop heartbeat for liveness.

    ``extra_ready`` is an optional callback that must also return True for the daemon to be
    ready, e.g. "the source owns work or is waiting for it"; it may return a non-empty string
    instead, meaning not ready for that reason ("handler circuit open: crm"). If it raises, the
    daemon is reported not ready (and the exception is logged). A stalled event loop is never ready.
    """

    def __init__(
        self,
        *,
        stall_after_s: float = 30.0,
        extra_ready: Callable[[], bool | str] | None = None,
    ) -> None:
        if stall_after_s <= 0:
            raise ValueError("stall_after_s must be > 0")
        self.stall_after_s = float(stall_after_s)
        self.extra_ready = extra_ready
        self.started = False
        self.stopping = False
        self.last_beat: float | None = None  # time.monotonic() of the last heartbeat
        self.stalls = 0  # times the watchdog woke up more than stall_after_s late

    # --- readiness ------------------------------------------------------------
    def mark_started(self) -> None:
        self.started = True

    def mark_stopping(self) -> None:
        self.stopping = True

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason); reason is "ok" when ready."""
        if not self.started:
            return False, "not started"
        if self.stopping:
            return False, "stopping"
        live, reason = self.liveness()
        if not live:  # a stalled loop does no work, whatever the source says
            return False, reason
        if self.extra_ready is not None:
            try:
                verdict = self.extra_ready()
                # True/False, or a non-empty string: not ready, for that reason.
                ok, reason = (False, verdict) if isinstance(verdict, str) and verdict else (bool(verdict), "")
            except Exception as exc:  # a broken check means "not ready", not a 500
                log.warning("readiness check raised", exc_info=True)
                return False, f"readiness check raised {type(exc).__name__}"
            if not ok:
                return False, reason or "readiness check failed"
        return True, "ok"

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    # --- liveness -------------------------------------------------------------
    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def heartbeat_age(self) -> float | None:
        """Seconds since the last heartbeat, None before the first one."""
        if self.last_beat is None:
            return None
        return time.monotonic() - self.last_beat

    def liveness(self) -> tuple[bool, str]:
        """(live, reason); reason is "ok" when live."""
        age = self.heartbeat_age()
        if age is None or age <= self.stall_after_s:
            return True, "ok"
        return False, f"event loop stalled: last heartbeat {age:.3f}s ago (limit {self.stall_after_s:g}s)"

    @property
    def live(self) -> bool:
        return self.liveness()[0]

    async def watchdog(self, interval_s: float | None = None) -> None:
        """Beat every ``interval_s`` forever; run it as a task and cancel it on shutdown.

        The default is one second, or a quarter of ``stall_after_s`` when that is shorter, so a
        short stall limit (as in tests) needs no matching interval."""
        if interval_s is None:
            interval_s = min(1.0, self.stall_after_s / 4)
        if not 0 < interval_s < self.stall_after_s:
            raise ValueError(f"interval_s must be > 0 and < stall_after_s ({self.stall_after_s:g}s)")
        while True:
            previous = self.last_beat
            self.beat()
            if previous is not None:
                late = self.last_beat - previous - interval_s  # type: ignore[operator]
                if late > self.stall_after_s:
                    self.stalls += 1
                    log.warning(
                        "event loop was blocked",
                        extra={"blocked_s": round(late, 3), "stall_after_s": self.stall_after_s},
                    )
            await asyncio.sleep(interval_s)


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


class OpsServer:
    """aiohttp server for /metrics, /healthz and /readyz.

    ``port=0`` binds a free port; after ``start()`` the bound port is in ``.port``.
    Usable as ``async with OpsServer(...) as server:``.
    """

    def __init__(self, registry: CollectorRegistry, health: Health, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        self.health = health
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("OpsServer already started")
        # The ops endpoints answer instantly; don't hold shutdown for a minute on a scrape.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- handlers -------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        live, reason = self.health.liveness()
        if live:
            return _json(200, {"status": "ok"})
        return _json(503, {"status": "stalled", "reason": reason})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reason = self.health.readiness()
        if ready:
            return _json(200, {"status": "ok"})
        return _json(503, {"status": "not ready", "reason": reason})
