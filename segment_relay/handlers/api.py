"""The plug-in API: what a handler receives and how it says which changes it wants.

A handler is either an ``async def`` function taking one ``SegmentChange``, or a
subclass of ``Handler``. Routing is declared with ``on_enter`` / ``on_exit`` /
``on_change``, on functions or on methods of a ``Handler`` subclass::

    @on_enter("gold-customers")
    async def welcome(change: SegmentChange) -> None: ...

    class Crm(Handler):
        @on_exit()
        async def goodbye(self, change: SegmentChange) -> None: ...

A ``Handler`` subclass that defines ``handle_batch(changes)`` gets its changes in batches
instead (the relay collects them); it may return a ``BatchResult`` naming the changes that
failed. Any ``handle``, ``handle_batch`` or routed method that takes a second parameter is
also given a ``HandlerContext`` (attempt number, deadline, logger, metrics).
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from ..model import MEMBERSHIP_CHANGES, ChangeType, IdentityItem, SegmentChange, SegmentStatus, change_id_for

__all__ = [
    "BatchResult",
    "ChangeType",
    "FunctionHandler",
    "Handler",
    "HandlerContext",
    "HandlerMetrics",
    "HandlerRetry",
    "IdentityItem",
    "PermanentHandlerError",
    "Route",
    "SegmentChange",
    "SegmentStatus",
    "batch_call",
    "change_call",
    "change_id_for",
    "is_batch_handler",
    "on_change",
    "on_enter",
    "on_exit",
    "on_merge",
    "wants_context",
]


class HandlerRetry(Exception):
    """Raise to ask for a retry, optionally not before ``after`` seconds (e.g. a Retry-After)."""

    def __init__(self, message: str = "retry requested", *, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class PermanentHandlerError(Exception):
    """Raise when retrying cannot help (e.g. HTTP 400): the change goes to the dead letter at once.

    Raised by ``handle_batch`` for a whole batch of several changes, it means "one of these is
    bad": the relay splits the batch to find it, and only the change that fails alone is
    dead-lettered."""


class BatchResult:
    """What ``handle_batch`` may return: the changes that failed, each with why. Every change of
    the batch not named here is done. An error that is a ``PermanentHandlerError`` sends the
    change to the dead letter at once; a ``HandlerRetry`` sets the wait; anything else is retried
    with backoff like a failed ``handle``."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures: dict[str, BaseException] = {}  # change_id -> why

    def fail(self, change: SegmentChange, error: BaseException | str = "failed") -> None:
        self.failures[change.change_id] = error if isinstance(error, BaseException) else HandlerRetry(error)

    def __repr__(self) -> str:
        return f"BatchResult(failed={len(self.failures)})"


_METRIC_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# The relay's own segment_relay_handler_* families (ops/metrics.py) and the sample names they
# expose: a handler's metric may not take any of them, or /metrics would show one name twice.
_RELAY_COUNTERS = ("calls", "failures", "circuit_opened", "dropped_changes")
_RELAY_GAUGES = ("pending_changes", "circuit_open")
_RELAY_HISTOGRAMS = ("latency_seconds", "batch_size")
RELAY_HANDLER_METRICS = frozenset(
    [*_RELAY_COUNTERS, *_RELAY_GAUGES, *_RELAY_HISTOGRAMS]
    + [f"{name}{suffix}" for name in _RELAY_COUNTERS for suffix in ("_total", "_created")]
    + [f"{name}{suffix}" for name in _RELAY_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count", "_created")]
)


class HandlerMetrics:
    """Counters and gauges a handler adds to ``/metrics``, labelled with its name.

    ``metrics.count("crm_responses", status="429")`` becomes
    ``segment_relay_handler_crm_responses_total{handler="crm-sync",status="429"}``;
    ``metrics.set("crm_quota_left", 120)`` becomes ``segment_relay_handler_crm_quota_left``.
    A name keeps the label names it was first used with, and may not be one of the relay's own
    (``calls``, ``failures``, ... see RELAY_HANDLER_METRICS)."""

    def __init__(self, handler: str) -> None:
        self.handler = handler
        self.counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._label_names: dict[str, tuple[str, ...]] = {}

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up: amount must not be negative")
        series = self.counters.setdefault(self._check(name, labels), {})
        key = tuple(sorted((label, str(value)) for label, value in labels.items()))
        series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        series = self.gauges.setdefault(self._check(name, labels), {})
        series[tuple(sorted((label, str(v)) for label, v in labels.items()))] = float(value)

    def _check(self, name: str, labels: dict[str, Any]) -> str:
        names = tuple(sorted(labels))
        known = self._label_names.setdefault(name, names)
        if not _METRIC_NAME.fullmatch(name) or not all(_METRIC_NAME.fullmatch(label) for label in names):
            raise ValueError(f"metric and label names are lower-case letters, digits and _: {name!r} {names}")
        if "handler" in names:
            raise ValueError("the label 'handler' is set by the relay")
        if name in RELAY_HANDLER_METRICS or name.removesuffix("_total") in RELAY_HANDLER_METRICS:
            raise ValueError(f"metric {name!r} is one of the relay's own segment_relay_handler_* metrics: "
                             "choose another name")
        if known != names:
            raise ValueError(f"metric {name!r} was first used with labels {known}, now with {names}")
        return name


@dataclass(slots=True)
class HandlerContext:
    """Handed to a handler that takes a second parameter: about this call, and the handler's own
    logger and metrics."""

    handler: str
    attempt: int  # 1 for the first call with these changes; for a batch, the highest of its changes
    deadline: float  # time.monotonic() by which the call must return (retry.handler_timeout_s)
    log: logging.Logger  # "segment_relay.handler.<name>"
    metrics: HandlerMetrics

    def time_left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Route:
    """Which changes a handler (or one of its methods) wants. Empty ``segments`` means all."""

    changes: frozenset[ChangeType] = MEMBERSHIP_CHANGES
    segments: frozenset[str] = frozenset()

    def matches(self, change: ChangeType, segment_id: str) -> bool:
        return change in self.changes and (not self.segments or segment_id in self.segments)


_ROUTES_ATTR = "__segment_relay_routes__"
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _route_decorator(changes: Collection[ChangeType], segment_ids: tuple[str, ...]) -> Callable[[F], F]:
    for segment_id in segment_ids:
        if not isinstance(segment_id, str) or not segment_id:
            raise TypeError(f"segment ids must be non-empty strings, got {segment_id!r}")
    route = Route(frozenset(changes), frozenset(segment_ids))

    def decorate(fn: F) -> F:
        routes = list(getattr(fn, _ROUTES_ATTR, ()))
        routes.append(route)
        setattr(fn, _ROUTES_ATTR, tuple(routes))
        return fn

    return decorate


def on_enter(*segment_ids: str) -> Callable[[F], F]:
    """Call the decorated handler when a profile enters one of these segments (any, if none given)."""
    return _route_decorator({ChangeType.ENTER}, segment_ids)


def on_exit(*segment_ids: str) -> Callable[[F], F]:
    """Call the decorated handler when a profile exits one of these segments (any, if none given)."""
    return _route_decorator({ChangeType.EXIT}, segment_ids)


def on_change(*segment_ids: str) -> Callable[[F], F]:
    """Call the decorated handler on enter and exit of these segments (any, if none given)."""
    return _route_decorator(MEMBERSHIP_CHANGES, segment_ids)


def on_merge() -> Callable[[F], F]:
    """Call the decorated handler when profiles are merged (identity linking): the change is a
    ``merge`` whose ``profile_key`` absorbed ``merged_keys``. Merges reach no handler that does
    not ask for them."""
    return _route_decorator({ChangeType.MERGE}, ())


def routes_of(obj: object) -> tuple[Route, ...]:
    return tuple(getattr(obj, _ROUTES_ATTR, ()))


def wants_context(fn: Callable[..., Any]) -> bool:
    """Does this (bound) handle, handle_batch or routed method take a context after the change(s)?"""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: no context
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


class Handler:
    """Base class for class handlers.

    Override ``handle`` to receive every change that ``routes`` allows, or decorate
    methods with ``on_enter`` / ``on_exit`` and leave ``handle`` alone, or define
    ``handle_batch(changes)`` to receive them in batches. ``start``, ``flush`` and ``close``
    are optional hooks: ``flush`` is awaited before the relay checkpoints, so a handler may
    fsync or commit there.

    What ``handle`` or ``handle_batch`` did must have left the process when it returns (sent,
    written to the OS, committed): membership state is saved right after, and a change the state
    records as done is not emitted again after a crash. Do not keep changes in a buffer that
    only ``flush`` empties: batching is the relay's job.
    """

    name: str = ""
    #: Used when neither the class nor its methods declare routes.
    routes: tuple[Route, ...] = (Route(),)
    #: For a batch handler: at most this many changes per call (default: batch.max_changes).
    batch_max_changes: int | None = None

    _method_routes: tuple[tuple[str, Route, bool], ...] = ()  # (method name, route, wants a context)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: list[tuple[str, Route, bool]] = []
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for route in routes_of(value):
                    found.append((attr, route, _method_wants_context(value)))
        cls._method_routes = tuple(found)
        if found:
            cls.routes = tuple(route for _, route, _ in found)
        if not cls.name:
            cls.name = cls.__name__

    async def start(self) -> None:
        """Open connections; called once before the first change."""

    async def handle(self, change: SegmentChange) -> None:
        await self._call_routes(change, None)

    async def _call_routes(self, change: SegmentChange, context: HandlerContext | None) -> None:
        """The routed methods that match ``change``, each once, with the context if it takes one."""
        if not self._method_routes:
            raise NotImplementedError(f"{type(self).__name__} must override handle() or decorate methods")
        called: set[str] = set()
        for attr, route, takes_context in self._method_routes:
            # A method with several matching routes (e.g. on_enter("a") and on_change()) runs once.
            if attr not in called and route.matches(change.change, change.segment_id):
                called.add(attr)
                method = getattr(self, attr)
                await (method(change, context) if takes_context else method(change))

    async def flush(self) -> None:
        """Make everything handled so far durable; awaited before each checkpoint."""

    async def close(self) -> None:
        """Release resources; called once at shutdown."""


def _method_wants_context(fn: Callable[..., Any]) -> bool:
    """An unbound method: self, the change, and maybe a context."""
    try:
        parameters = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(parameters) >= 3


def change_call(handler: Handler) -> tuple[Callable[..., Awaitable[Any]], bool]:
    """What to call for each change of a single-change handler, and whether to pass a context."""
    if "handle" not in vars(handler) and type(handler).handle is Handler.handle:
        if any(takes for _, _, takes in handler._method_routes):  # a routed method asks for one
            return handler._call_routes, True
        return handler.handle, False
    return handler.handle, wants_context(handler.handle)


def batch_call(handler: Handler) -> tuple[Callable[..., Awaitable[Any]], bool]:
    """What to call for each batch of a batch handler, and whether to pass a context."""
    call = handler.handle_batch  # type: ignore[attr-defined]
    return call, wants_context(call)


def is_batch_handler(handler: Handler) -> bool:
    return callable(getattr(handler, "handle_batch", None))


class FunctionHandler(Handler):
    """Adapts a plain ``async def fn(change)`` (or ``fn(change, context)``) to the Handler interface."""

    def __init__(self, fn: Callable[..., Awaitable[None]], name: str | None = None) -> None:
        self.fn = fn
        self.routes = routes_of(fn) or (Route(),)
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"
        # The function is the handle method: no wrapper coroutine per change (hot path).
        self.handle = fn  # type: ignore[method-assign,assignment]
