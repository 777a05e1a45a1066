"""The circuit breaker's rules, on a fake clock: when it opens, when a failure counts, probes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segment_relay.handlers.circuit import CircuitBreaker, CircuitSettings, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(**settings: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    values = {"window": 10, "min_calls": 4, "failure_ratio": 0.5, "open_initial_s": 1.0, "open_max_s": 8.0, **settings}
    return CircuitBreaker(CircuitSettings(**values), clock=clock), clock  # type: ignore[arg-type]


def test_a_few_failures_among_successes_keep_it_closed_and_healthy() -> None:
    circuit, _ = breaker()
    for failed in [False] * 8 + [True, True]:
        assert circuit.record(failed) is False
    assert circuit.closed and circuit.healthy  # 2 of 10: a failure now counts toward max_attempts


def test_it_opens_at_the_failure_ratio_once_there_are_enough_calls() -> None:
    circuit, _ = breaker()
    assert circuit.record(True) is False  # 1 call: below min_calls, cannot open
    assert circuit.record(True) is False
    assert circuit.healthy is False  # but failing most of what it gets: failures no longer count
    assert circuit.record(True) is False
    assert circuit.record(True) is True  # 4 of 4 failed: open
    assert circuit.state is CircuitState.OPEN and circuit.opened == 1
    assert circuit.record(True) is False  # outcomes while open are not calls the breaker made


def test_the_window_forgets_old_outcomes() -> None:
    circuit, _ = breaker(window=4, min_calls=4)
    for failed in (False, False, True, True):  # the failure that makes it 2 of 4 opens it
        circuit.record(failed)
    assert circuit.state is CircuitState.OPEN
    circuit, _ = breaker(window=4, min_calls=4)
    for failed in (True, False, False, False, False, True):  # the first failure has left the window
        assert circuit.record(failed) is False
    assert circuit.closed


def test_probes_are_due_on_a_doubling_schedule_and_one_success_closes() -> None:
    circuit, clock = breaker()
    for _ in range(4):
        circuit.record(True)
    assert not circuit.probe_due() and circuit.seconds_to_probe() == pytest.approx(1.0)
    clock.now += 1.0
    assert circuit.probe_due()
    circuit.start_probe()
    assert circuit.state is CircuitState.PROBING and not circuit.probe_due()  # one probe at a time
    circuit.probe_result(failed=True)
    assert circuit.seconds_to_probe() == pytest.approx(2.0)
    for expected in (4.0, 8.0, 8.0):  # doubled, up to open_max_s
        clock.now += circuit.seconds_to_probe()
        circuit.start_probe()
        circuit.probe_result(failed=True)
        assert circuit.seconds_to_probe() == pytest.approx(expected)
    clock.now += circuit.seconds_to_probe()
    circuit.start_probe()
    circuit.probe_result(failed=False)
    assert circuit.closed and circuit.healthy  # the window starts afresh
    for _ in range(4):
        circuit.record(True)
    assert circuit.seconds_to_probe() == pytest.approx(1.0)  # and so does the schedule
    assert circuit.opened == 2


def test_probe_calls_out_of_turn_are_refused() -> None:
    circuit, _ = breaker()
    with pytest.raises(RuntimeError):
        circuit.start_probe()
    with pytest.raises(RuntimeError):
        circuit.probe_result(failed=False)


@pytest.mark.parametrize("settings", [
    {"window": 0}, {"min_calls": 11}, {"failure_ratio": 0.0}, {"failure_ratio": 1.5},
    {"open_initial_s": 0.0}, {"open_initial_s": 9.0},
])
def test_settings_are_checked(settings: dict[str, float]) -> None:
    values = {"window": 10, "min_calls": 4, "failure_ratio": 0.5, "open_initial_s": 1.0, "open_max_s": 8.0, **settings}
    with pytest.raises(ValueError):
        CircuitSettings(**values)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.booleans(), st.integers(1, 30)), max_size=40))
def test_successes_told_at_once_count_as_told_one_by_one(script: list[bool | int]) -> None:
    """record_successes(n) (what a worker says after a run of good calls) == n x record(False)."""
    at_once, one_by_one = breaker(window=10, min_calls=10)[0], breaker(window=10, min_calls=10)[0]
    for step in script:
        if isinstance(step, bool):
            assert at_once.record(step) == one_by_one.record(step)
        else:
            at_once.record_successes(step)
            for _ in range(step):
                one_by_one.record(False)
        assert (at_once.state, at_once.healthy, list(at_once._outcomes), at_once._failed) == (
            one_by_one.state, one_by_one.healthy, list(one_by_one._outcomes), one_by_one._failed)


def test_a_probe_never_sent_leaves_the_circuit_open_with_the_next_probe_due_at_once() -> None:
    circuit, clock = breaker()
    for _ in range(4):
        circuit.record(True)
    clock.now += 1.0
    circuit.start_probe()
    circuit.probe_result(failed=True)  # the wait doubles to 2 s
    clock.now += 2.0
    circuit.start_probe()
    circuit.probe_abandoned()  # its change was dropped (revoked) before the call: it tells nothing
    assert circuit.state is CircuitState.OPEN and circuit.probe_due()
    circuit.start_probe()
    circuit.probe_result(failed=True)
    assert circuit.seconds_to_probe() == pytest.approx(4.0)  # the schedule went on where it was
    with pytest.raises(RuntimeError):
        circuit.probe_abandoned()  # none in flight
