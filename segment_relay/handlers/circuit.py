"""A circuit breaker per handler: tell a downstream outage from a poison change.

The breaker watches the outcome of the last ``window`` calls of one handler. While fewer than
``failure_ratio`` of them failed the handler is *healthy*: a change that fails now is failing
while others succeed, so its failures count toward ``retry.max_attempts`` (and it ends in the
dead letter if it keeps failing). Once at least ``min_calls`` calls are in the window and the
ratio is reached, the circuit *opens*: the relay stops calling the handler, keeps every change,
and after ``open_initial_s`` sends one *probe* (one change). A probe that succeeds closes the
circuit (the window starts afresh) and dispatch resumes in order; one that fails keeps it open
and doubles the wait, up to ``open_max_s``. Failures while the handler is not healthy never
count toward ``max_attempts``: an outage of the user's CRM is not a poison change.

Pure logic on an injected clock, so every rule is tested without waiting.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CircuitBreaker", "CircuitSettings", "CircuitState"]


class CircuitState(StrEnum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # no calls; a probe is due at ``probe_at``
    PROBING = "probing"  # one probe call is in flight


@dataclass(frozen=True)
class CircuitSettings:
    window: int = 20  # calls whose outcome is remembered
    min_calls: int = 5  # the circuit cannot open with fewer outcomes in the window
    failure_ratio: float = 0.5  # open at this share of failed calls
    open_initial_s: float = 1.0  # first wait before a probe
    open_max_s: float = 60.0  # longest wait between probes

    def __post_init__(self) -> None:
        if self.window < 1 or not 1 <= self.min_calls <= self.window:
            raise ValueError("circuit window must be >= 1 and min_calls within 1..window")
        if not 0 < self.failure_ratio <= 1:
            raise ValueError("circuit failure_ratio must be in (0, 1]")
        if not 0 < self.open_initial_s <= self.open_max_s:
            raise ValueError("circuit open_initial_s must be > 0 and at most open_max_s")


class CircuitBreaker:
    def __init__(self, settings: CircuitSettings | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or CircuitSettings()
        self._clock = clock
        self._outcomes: deque[bool] = deque(maxlen=self.settings.window)  # True = failed
        self._failed = 0
        self.state = CircuitState.CLOSED
        self.probe_at = 0.0
        self._wait_s = self.settings.open_initial_s
        self.opened = 0  # times it opened (a metric)

    @property
    def closed(self) -> bool:
        return self.state is CircuitState.CLOSED

    @property
    def healthy(self) -> bool:
        """Closed, and failing less than the ratio: a failure now counts toward max_attempts."""
        return self.state is CircuitState.CLOSED and self._failed < self.settings.failure_ratio * max(
            len(self._outcomes), self.settings.min_calls)

    def record(self, failed: bool) -> bool:
        """The outcome of one call made while closed. True if it opened the circuit."""
        if self.state is not CircuitState.CLOSED:
            return False
        outcomes = self._outcomes
        if not failed and not self._failed:  # the usual case, once per call: nothing to count
            outcomes.append(False)
            return False
        if len(outcomes) == outcomes.maxlen and outcomes[0]:
            self._failed -= 1
        outcomes.append(failed)
        self._failed += failed
        settings = self.settings
        if failed and len(outcomes) >= settings.min_calls and self._failed >= settings.failure_ratio * len(outcomes):
            self._open(settings.open_initial_s)
            return True
        return False

    def record_successes(self, count: int) -> None:
        """``count`` calls made while closed succeeded: ``record(False)`` that many times, at once."""
        if self.state is not CircuitState.CLOSED or count <= 0:
            return
        outcomes = self._outcomes
        window = outcomes.maxlen or len(outcomes) + count
        if not self._failed and len(outcomes) == window:
            return  # a full window of successes stays one
        if self._failed:  # failures leaving the window must be uncounted
            for _ in range(max(0, min(len(outcomes), len(outcomes) + count - window))):
                if outcomes.popleft():
                    self._failed -= 1
        outcomes.extend([False] * min(count, window))

    def probe_due(self) -> bool:
        return self.state is CircuitState.OPEN and self._clock() >= self.probe_at

    def start_probe(self) -> None:
        if self.state is not CircuitState.OPEN:
            raise RuntimeError(f"a probe starts from an open circuit, not {self.state}")
        self.state = CircuitState.PROBING

    def probe_result(self, failed: bool) -> None:
        """The outcome of the probe: success closes (with an empty window), failure reopens with
        a doubled wait."""
        if self.state is not CircuitState.PROBING:
            raise RuntimeError(f"no probe in flight (state {self.state})")
        if failed:
            self._open(min(self.settings.open_max_s, self._wait_s * 2))
        else:
            self.state = CircuitState.CLOSED
            self._outcomes.clear()
            self._failed = 0
            self._wait_s = self.settings.open_initial_s

    def probe_abandoned(self) -> None:
        """The probe was never sent (its change was dropped: its partition was revoked): open
        again with the probe due at once and the wait unchanged; it tells nothing either way."""
        if self.state is not CircuitState.PROBING:
            raise RuntimeError(f"no probe in flight (state {self.state})")
        self.state = CircuitState.OPEN
        self.probe_at = self._clock()

    def _open(self, wait_s: float) -> None:
        if self.state is CircuitState.CLOSED:
            self.opened += 1
        self.state = CircuitState.OPEN
        self._wait_s = wait_s
        self.probe_at = self._clock() + wait_s

    def seconds_to_probe(self) -> float:
        return max(0.0, self.probe_at - self._clock()) if self.state is CircuitState.OPEN else 0.0
