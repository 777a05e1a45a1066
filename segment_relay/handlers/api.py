"""The plug-in API: what a handler receives and how it says which changes it wants.

A handler is either an ``async def`` function taking one ``SegmentChange``, or a
subclass of ``Handler``. Routing is declared with ``on_enter`` / ``on_exit`` /
``on_change``, on functions or on methods of a ``Handler`` subclass::

    @on_enter("gold-customers")
    async def welcome(change: SegmentChange) -> None: ...

    class Crm(Handler):
        @on_exit()
        async def goodbye(self, change: SegmentChange) -> None: ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from ..consumer.export import IdentityItem, SegmentStatus
from ..consumer.membership import ChangeType

__all__ = [
    "ChangeType",
    "SegmentChange",
    "Handler",
    "Route",
    "on_enter",
    "on_exit",
    "on_change",
    "HandlerRetry",
    "PermanentHandlerError",
    "change_id_for",
]


def change_id_for(profile_key: str, namespace: str, segment_id: str, status: str, qualified_at_us: int) -> str:
    """Stable id of a change: the same membership event always hashes the same, across replays."""
    material = "\x1f".join((profile_key, namespace, segment_id, status, str(qualified_at_us)))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class SegmentChange:
    """One real membership change of one profile in one segment."""

    change: ChangeType
    segment_id: str
    segment_namespace: str
    segment_name: str | None
    profile_key: str
    identities: Mapping[str, Sequence[IdentityItem]]
    attributes: Mapping[str, Any]
    qualified_at: datetime
    status: SegmentStatus
    change_id: str
    partition: str
    position: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (what the log, jsonl and webhook handlers send)."""
        return {
            "change": self.change.value,
            "segment_id": self.segment_id,
            "segment_namespace": self.segment_namespace,
            "segment_name": self.segment_name,
            "profile_key": self.profile_key,
            "qualified_at": self.qualified_at.isoformat().replace("+00:00", "Z"),
            "status": self.status.value,
            "change_id": self.change_id,
            "identities": {
                namespace: [item.model_dump(exclude_defaults=True) for item in items]
                for namespace, items in self.identities.items()
            },
            "attributes": dict(self.attributes),
            "source": {"partition": self.partition, "position": self.position},
        }


class HandlerRetry(Exception):
    """Raise to ask for a retry, optionally not before ``after`` seconds (e.g. a Retry-After)."""

    def __init__(self, message: str = "retry requested", *, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class PermanentHandlerError(Exception):
    """Raise when retrying cannot help (e.g. HTTP 400): the change goes to the dead letter at once."""


@dataclass(frozen=True)
class Route:
    """Which changes a handler (or one of its methods) wants. Empty ``segments`` means all."""

    changes: frozenset[ChangeType] = frozenset(ChangeType)
    segments: frozenset[str] = frozenset()

    def matches(self, change: ChangeType, segment_id: str) -> bool:
        return change in self.changes and (not self.segments or segment_id in self.segments)


_ROUTES_ATTR = "__segment_relay_routes__"
F = TypeVar("F", bound=Callable[..., Awaitable[None]])


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
    return _route_decorator(set(ChangeType), segment_ids)


def routes_of(obj: object) -> tuple[Route, ...]:
    return tuple(getattr(obj, _ROUTES_ATTR, ()))


class Handler:
    """Base class for class handlers.

    Override ``handle`` to receive every change that ``routes`` allows, or decorate
    methods with ``on_enter`` / ``on_exit`` and leave ``handle`` alone. ``start``,
    ``flush`` and ``close`` are optional hooks: ``flush`` is awaited before the
    relay checkpoints, so a handler may fsync or commit there.

    What ``handle`` did must have left the process when it returns (sent, written to the
    OS, committed): membership state may be saved right after, and a change the state
    records as done is not emitted again after a crash. Do not keep changes in a buffer
    that only ``flush`` empties.
    """

    name: str = ""
    #: Used when neither the class nor its methods declare routes.
    routes: tuple[Route, ...] = (Route(),)

    _method_routes: tuple[tuple[str, Route], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: list[tuple[str, Route]] = []
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for route in routes_of(value):
                    found.append((attr, route))
        cls._method_routes = tuple(found)
        if found:
            cls.routes = tuple(route for _, route in found)
        if not cls.name:
            cls.name = cls.__name__

    async def start(self) -> None:
        """Open connections; called once before the first change."""

    async def handle(self, change: SegmentChange) -> None:
        if not self._method_routes:
            raise NotImplementedError(f"{type(self).__name__} must override handle() or decorate methods")
        called: set[str] = set()
        for attr, route in self._method_routes:
            # A method with several matching routes (e.g. on_enter("a") and on_change()) runs once.
            if attr not in called and route.matches(change.change, change.segment_id):
                called.add(attr)
                await getattr(self, attr)(change)

    async def flush(self) -> None:
        """Make everything handled so far durable; awaited before each checkpoint."""

    async def close(self) -> None:
        """Release resources; called once at shutdown."""


class FunctionHandler(Handler):
    """Adapts a plain ``async def fn(change)`` to the Handler interface."""

    def __init__(self, fn: Callable[[SegmentChange], Awaitable[None]], name: str | None = None) -> None:
        self.fn = fn
        self.routes = routes_of(fn) or (Route(),)
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"
        # The function is the handle method: no wrapper coroutine per change (hot path).
        self.handle = fn  # type: ignore[method-assign,assignment]
