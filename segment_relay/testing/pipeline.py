"""Run export records through the real pipeline in memory and see what each handler handled.

For the tests of handler packages: no files, no cloud, no event loop plumbing::

    from segment_relay.testing.exports import StreamSpec, expected_changes, generate
    from segment_relay.testing.pipeline import run_exports

    records = list(generate(StreamSpec(records=500)))
    seen = await run_exports(records, [MyHandler()])
    seen["MyHandler"]                 # the SegmentChanges it handled
    expected_changes(records).changes  # what the rules say must come out

The records go through the same ``Pipeline`` as in ``segment-relay run`` (decode, validate,
profile key, diff, routing, retries, dead letter), with a memory membership store unless
another is given. Handlers are started before the first change and closed at the end, as in
the daemon.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any

from ..consumer.deadletter import DeadLetter, MemoryDeadLetter
from ..consumer.identity import IdentityResolver
from ..consumer.pipeline import Pipeline, PipelineSettings
from ..consumer.profile_key import ProfileKeyRule
from ..consumer.sources.base import Batch, PartitionListener, SourceRecord, SourceSnapshot
from ..consumer.state.base import AliasIndex, MembershipStore
from ..consumer.state.memory import MemoryStore
from ..handlers.api import (
    BatchResult,
    FunctionHandler,
    Handler,
    SegmentChange,
    batch_call,
    change_call,
    is_batch_handler,
)
from ..handlers.router import BatchSettings, CircuitSettings, RetryPolicy, Router

__all__ = ["FAST_RETRY", "RecordsSource", "run_exports"]

#: Retries without real waiting, so a test of a failing handler takes milliseconds.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.005, max_retry_after_s=0.01)

HandlerLike = Handler | Callable[[SegmentChange], Awaitable[None]]


class RecordsSource:
    """A source over records in memory: one partition, positions 1, 2, ... in the given order."""

    def __init__(self, records: Iterable[bytes | str], *, partition: str = "exports", batch_size: int = 500) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.name = f"memory:{partition}"
        self.partition = partition
        self.batch_size = batch_size
        self.committed: Any = None  # the last position the pipeline checkpointed
        self._records = records
        self._stopping = False

    async def start(self, listener: PartitionListener) -> None:
        self._stopping = False
        listener.assigned(self.partition, 0)

    async def batches(self) -> AsyncIterator[Batch[int]]:
        batch: list[SourceRecord[int]] = []
        for position, data in enumerate(self._records, start=1):
            if self._stopping:
                return
            batch.append(SourceRecord(position, data.encode() if isinstance(data, str) else data))
            if len(batch) >= self.batch_size:
                yield Batch(self.partition, 0, batch)
                batch = []
        if batch and not self._stopping:
            yield Batch(self.partition, 0, batch)

    async def commit(self, partition: str, position: int) -> None:
        self.committed = position

    def stop(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        pass

    def snapshot(self) -> SourceSnapshot:
        return SourceSnapshot()


class _Recording(Handler):
    """Delegates to a handler and notes each change it handled without failing."""

    def __init__(self, inner: Handler, seen: list[SegmentChange]) -> None:
        self.inner = inner
        self.name = inner.name
        self.routes = inner.routes  # the router selects by these, exactly as for the handler itself
        self.batch_max_changes = inner.batch_max_changes
        self._seen = seen
        # The wrapper always takes a context; the inner handler gets one only if it asks.
        self._inner_call, self._inner_context = batch_call(inner) if is_batch_handler(inner) else change_call(inner)

    async def start(self) -> None:
        await self.inner.start()

    async def handle(self, change: SegmentChange, context: Any = None) -> None:  # type: ignore[override]
        await (self._inner_call(change, context) if self._inner_context else self._inner_call(change))
        self._seen.append(change)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


class _RecordingBatches(_Recording):
    """The same for a batch handler: every change of a call not reported failed counts as handled."""

    async def handle_batch(self, changes: Sequence[SegmentChange], context: Any = None) -> BatchResult | None:
        result = await (self._inner_call(changes, context) if self._inner_context else self._inner_call(changes))
        failed = result.failures if isinstance(result, BatchResult) else {}
        self._seen.extend(change for change in changes if change.change_id not in failed)
        return result


def _as_handler(handler: HandlerLike) -> Handler:
    if isinstance(handler, Handler):
        return handler
    if inspect.iscoroutinefunction(handler):
        return FunctionHandler(handler)
    raise TypeError(f"{handler!r} is neither a Handler nor an async function taking a SegmentChange")


async def run_exports(
    records: Iterable[bytes | str],
    handlers: Sequence[HandlerLike],
    *,
    segments: Collection[str] | None = None,
    key_rule: ProfileKeyRule | None = None,
    store: MembershipStore | None = None,
    dead_letter: DeadLetter | None = None,
    retry: RetryPolicy = FAST_RETRY,
    batch: BatchSettings | None = None,
    circuit: CircuitSettings | None = None,
    concurrency: int = 64,
    partition: str = "exports",
    link_namespaces: Collection[str] | None = None,
    batch_size: int = 500,
) -> dict[str, list[SegmentChange]]:
    """Feed ``records`` (JSON export records, one per item) through the pipeline to ``handlers``
    and return, by handler name, the changes each one handled successfully.

    A handler is a ``Handler`` (single-change or batch) or an ``async def fn(change)``; names
    must be unique. Each list is in the order the handler finished the changes: one profile's
    changes in stream order, different profiles interleaved (``concurrency=1`` makes the whole
    list of a single-change handler follow the stream). A change a handler gave up on is not
    listed; it went to ``dead_letter`` (pass a ``MemoryDeadLetter`` to look at it), as do
    invalid records. ``segments`` keeps only those segment ids, like the ``segments`` setting;
    pass a ``store`` to start from, or keep, membership state across runs. ``link_namespaces``
    turns identity linking on (``identity.mode = "link"``; ``["*"]`` for every namespace).
    ``batch_size``: records per source batch (the handlers' ``batch`` settings are apart).
    """
    seen: dict[str, list[SegmentChange]] = {}
    recording: list[Handler] = []
    for handler in map(_as_handler, handlers):
        if handler.name in seen:
            raise ValueError(f"two handlers are named {handler.name!r}; give them distinct names")
        wrapper = _RecordingBatches if is_batch_handler(handler) else _Recording
        recording.append(wrapper(handler, seen.setdefault(handler.name, [])))
    dead = dead_letter if dead_letter is not None else MemoryDeadLetter()
    store = store if store is not None else MemoryStore()
    identity = None
    if link_namespaces is not None:
        if not isinstance(store, AliasIndex):
            raise ValueError(f"{store!r} keeps no identity links")
        identity = IdentityResolver(store, link_namespaces)
    pipeline = Pipeline(
        RecordsSource(records, partition=partition, batch_size=batch_size),
        store,
        Router(recording, dead, retry=retry, batch=batch, circuit=circuit, concurrency=concurrency),
        dead,
        key_rule=key_rule,
        identity=identity,
        settings=PipelineSettings(
            checkpoint_interval_s=3600.0,  # one final checkpoint is all a test needs
            segment_filter=frozenset(segments) if segments else None,
        ),
    )
    await pipeline.run()
    return seen

