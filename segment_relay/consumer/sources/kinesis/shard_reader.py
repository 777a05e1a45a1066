"""Reads ONE Kinesis shard with GetRecords and yields batches of SourceRecords.

Positions are Kinesis sequence numbers (``SequenceNumber``, decimal strings). Compare them with
``int()``, never as strings: their length is not guaranteed to be the same across shards or services.

Memory: with a ``ReadAhead``, room for the records a GetRecords call may return is reserved
before the call and what the call did not use is given back at once; the rest is released by
whoever takes the batch. So no response waits in memory for room, whatever the limit. A call
asks for ``get_records_limit`` records or the reader's share of the read-ahead if that is less
(``ReadAhead.share``: with 4 shards and the default 10,000, 1,250 each), so that every shard
keeps a call in flight: a limit of 10,000 does not make the shards take turns.

Retries (the client makes one attempt per call, see ``aws.py``):

- throttling (ProvisionedThroughputExceeded, ...) and network / 5xx errors: back off with
  full jitter up to ``settings.max_backoff_s`` and repeat the same call with the same
  iterator (iterators may be reused); counted in ``throttled`` and ``errors``;
- ExpiredIteratorException (an iterator older than 5 minutes, e.g. after a long
  back-pressure pause at ``yield``): a fresh iterator AFTER_SEQUENCE_NUMBER the last
  sequence yielded, or the original start if nothing was yielded yet. Nothing is lost or
  repeated; counted in ``expired``. (One edge: a LATEST start whose iterator expires before
  any record was yielded restarts at the new LATEST; that takes 5 minutes of failing
  GetRecords calls, since an idle reader polls every ``idle_wait_s``);
- anything else (stream or shard deleted, access denied, ...) is raised out of
  ``batches()`` unchanged, with ``explain()``'s sentence added as a note (``add_note``:
  shown in its traceback, so ``log.exception`` prints it).

A closed shard (after a split or merge) ends when GetRecords returns no
NextShardIterator: ``ended`` is set, ``last_sequence`` is the last sequence yielded (None if
the shard had no records for this reader) and ``batches()`` finishes.

KPL aggregation (``settings.deaggregate``): each aggregated record is split into its user
records with the ``aws-kinesis-agg`` package, and every sub-record carries the PARENT's
sequence number as its position. A checkpoint therefore covers a whole aggregated record:
committing that position says all of its sub-records are finished, and a restart resumes
after it. Whatever commits must only commit a position once every record carrying it is
finished (records of one aggregated record come in one batch, consecutively).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NewType

from ..base import ReadAhead, SourceRecord
from .aws import Backoff, KinesisClient, error_code, explain, is_expired_iterator, is_retryable, is_throttle
from .settings import SHARD_END, InitialPosition, KinesisSettings

__all__ = ["SequenceNumber", "ShardReader"]

#: A Kinesis sequence number: a decimal string of up to 128 digits (compare as int, never as text).
SequenceNumber = NewType("SequenceNumber", str)

log = logging.getLogger(__name__)

FIRST_CALL_RECORDS = 1000

_STOPPED: Any = object()  # a call that stop() interrupted


class ShardReader:
    """GetRecords loop over one shard. Use from one task; ``stop()`` from the same event loop."""

    def __init__(
        self,
        client: KinesisClient,
        settings: KinesisSettings,
        shard_id: str,
        *,
        start_after: str | None,
        start_at: InitialPosition | None = None,
        on_lag: Callable[[str, int], None] | None = None,
        read_ahead: ReadAhead | None = None,
    ) -> None:
        if start_after == SHARD_END:
            raise ValueError(f"shard {shard_id} is checkpointed at SHARD_END: there is nothing left to read")
        self.start_at = InitialPosition(start_at or settings.initial_position)
        if start_after is None and self.start_at is InitialPosition.AT_TIMESTAMP and settings.initial_timestamp is None:
            raise ValueError("initial_position AT_TIMESTAMP needs initial_timestamp in the [kinesis] settings")
        if not 1 <= settings.get_records_limit <= 10_000:
            raise ValueError(f"get_records_limit must be within 1..10000, not {settings.get_records_limit}")
        self._split = _deaggregator() if settings.deaggregate else None
        self.client = client
        self.settings = settings
        self.shard_id = shard_id
        self.start_after = start_after
        self.on_lag = on_lag
        self.read_ahead = read_ahead
        self.ended = False  # the shard is closed and every record of it was yielded
        self.last_sequence: str | None = None  # sequence number of the last record yielded
        self.calls = 0  # successful GetRecords calls
        self.records = 0  # Kinesis records yielded (before de-aggregation)
        self.throttled = 0  # throttling errors met (GetRecords and GetShardIterator)
        self.errors = 0  # network and 5xx errors met
        self.expired = 0  # expired iterators replaced
        self._backoff = Backoff(settings.max_backoff_s)
        self._stopping = asyncio.Event()
        self._inflight: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"ShardReader({self.settings.stream_name!r}, {self.shard_id!r}, last={self.last_sequence!r})"

    def stop(self) -> None:
        """End ``batches()`` now: interrupts the idle wait, a backoff, and the call in flight
        (cancelled; its records, if any, are not yielded and will be read again by whoever
        resumes from the checkpoint)."""
        self._stopping.set()
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def batches(self) -> AsyncIterator[tuple[list[SourceRecord[SequenceNumber]], int]]:
        """Non-empty batches in shard order, until the shard ends or ``stop()``, each with the
        number of Kinesis records it came from (KPL aggregates hold several). With a read-ahead,
        those stay reserved: whoever takes the batch releases them."""
        read_ahead = self.read_ahead
        if read_ahead is None:
            async for batch in self._batches(None):
                yield batch
            return
        read_ahead.join()
        try:
            async for batch in self._batches(read_ahead):
                yield batch
        finally:
            read_ahead.leave()

    async def _batches(self, read_ahead: ReadAhead | None
                       ) -> AsyncIterator[tuple[list[SourceRecord[SequenceNumber]], int]]:
        most = self.settings.get_records_limit
        pace = self.settings.min_get_records_interval_s
        loop = asyncio.get_running_loop()
        last_call = -pace
        iterator: str | None = None
        while not self._stopping.is_set():
            if iterator is None:
                iterator = await self._shard_iterator()
                if iterator is None:
                    return  # stopped
            # AWS allows 5 GetRecords per second per shard: keep under it instead of
            # provoking throttling while catching up.
            wait = last_call + pace - loop.time()
            if wait > 0:
                await self._wait_stopping(wait)
                if self._stopping.is_set():
                    return
            # A call asks for get_records_limit records, or fewer when the read-ahead is shared by
            # many shards (see ReadAhead.share): memory stays within it at any limit. The first
            # call asks for no more than FIRST_CALL_RECORDS: the other shards' readers are still
            # starting, so the share is not known yet, and the first records come sooner.
            limit = most if read_ahead is None else min(most, read_ahead.share())
            if self.calls == 0:
                limit = min(limit, FIRST_CALL_RECORDS)
            if read_ahead is not None:
                await read_ahead.reserve(limit)
            last_call = loop.time()
            try:
                response = await self._call(self.client.get_records, ShardIterator=iterator, Limit=limit)
            except Exception as exc:
                if read_ahead is not None:
                    read_ahead.release(limit)
                if is_expired_iterator(exc):
                    self.expired += 1
                    log.info("shard iterator expired; taking a new one",
                             extra={"shard": self.shard_id, "after": self.last_sequence})
                    iterator = None
                    continue
                if is_retryable(exc):
                    await self._pause("GetRecords", exc)
                    continue
                exc.add_note(f"shard {self.shard_id}: {explain(exc, self.settings)}")
                raise
            except BaseException:
                if read_ahead is not None:
                    read_ahead.release(limit)
                raise
            if read_ahead is not None:  # give back at once what the call did not fill
                read_ahead.release(limit if response is _STOPPED else limit - len(response.get("Records") or ()))
            if response is _STOPPED:
                return
            self._backoff.reset()
            self.calls += 1
            lag = response.get("MillisBehindLatest")
            if lag is not None and self.on_lag is not None:
                self.on_lag(self.shard_id, int(lag))
            records = response.get("Records") or []
            next_iterator = response.get("NextShardIterator")
            if next_iterator is None:
                self.ended = True  # set before the last batch goes out: it is the shard's last
            if records:
                batch = self._batch(records)
                self.last_sequence = records[-1]["SequenceNumber"]
                self.records += len(records)
                if batch:  # empty only if every record was an empty KPL aggregate
                    yield batch, len(records)
                elif read_ahead is not None:
                    read_ahead.release(len(records))
            if self.ended:
                log.info("shard ended", extra={"shard": self.shard_id, "last_sequence": self.last_sequence})
                return
            iterator = next_iterator
            if not records:
                await self._wait_stopping(self.settings.idle_wait_s)

    # --- internals --------------------------------------------------------------------
    def _batch(self, records: list[dict[str, Any]]) -> list[SourceRecord[SequenceNumber]]:
        if self._split is None:
            return [SourceRecord(record["SequenceNumber"], record["Data"]) for record in records]
        split = self._split
        return [SourceRecord(record["SequenceNumber"], data) for record in records for data in split(record["Data"])]

    def _iterator_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"StreamName": self.settings.stream_name, "ShardId": self.shard_id}
        after = self.last_sequence or self.start_after
        if after is not None:
            args.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=after)
        elif self.start_at is InitialPosition.AT_TIMESTAMP:
            args.update(ShardIteratorType="AT_TIMESTAMP", Timestamp=self.settings.initial_timestamp)
        else:
            args.update(ShardIteratorType=self.start_at.value)
        return args

    async def _shard_iterator(self) -> str | None:
        """A new iterator at the resume point; None if stopped."""
        args = self._iterator_args()
        while not self._stopping.is_set():
            try:
                response = await self._call(self.client.get_shard_iterator, **args)
            except Exception as exc:
                if is_retryable(exc):
                    await self._pause("GetShardIterator", exc)
                    continue
                exc.add_note(f"shard {self.shard_id}: {explain(exc, self.settings)}")
                raise
            if response is _STOPPED:
                return None
            self._backoff.reset()
            iterator: str = response["ShardIterator"]
            return iterator
        return None

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        """One API call that ``stop()`` can cancel: returns _STOPPED if it did."""
        if self._stopping.is_set():
            return _STOPPED
        call = asyncio.ensure_future(method(**kwargs))
        self._inflight = call
        try:
            return await call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Only our own stop() is swallowed; a cancellation of the reading task goes on up.
            if call.cancelled() and self._stopping.is_set() and (current is None or current.cancelling() == 0):
                return _STOPPED
            raise
        finally:
            self._inflight = None

    async def _pause(self, operation: str, exc: BaseException) -> None:
        if is_throttle(exc):
            self.throttled += 1
        else:
            self.errors += 1
        delay = self._backoff.next_delay()
        log.warning("%s failed on shard %s (%s); retrying in %.2f s", operation, self.shard_id,
                    error_code(exc) or type(exc).__name__, delay,
                    extra={"shard": self.shard_id, "error": error_code(exc) or type(exc).__name__,
                           "delay_s": round(delay, 3)})
        await self._wait_stopping(delay)

    async def _wait_stopping(self, seconds: float) -> None:
        """Sleep ``seconds`` unless stop() comes first."""
        if seconds <= 0 or self._stopping.is_set():
            return
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass


# --- KPL de-aggregation ------------------------------------------------------------------
_AGG_INSTALL_HINT = ("settings.deaggregate is on, but the aws-kinesis-agg package is not installed: "
                     "pip install aws-kinesis-agg")


def _deaggregator() -> Callable[[bytes], Iterator[bytes]]:
    """The user records of one Kinesis record: its sub-records if it is a KPL aggregate
    (magic header, protobuf body, MD5 digest all valid), else the record itself."""
    try:
        # The package's deaggregator module puts its own folder on sys.path so that its
        # generated messages_pb2 can import config_pb2; import it first for that.
        import aws_kinesis_agg
        import aws_kinesis_agg.deaggregator  # noqa: F401
        from aws_kinesis_agg import messages_pb2
    except ImportError as exc:
        raise ImportError(_AGG_INSTALL_HINT) from exc

    magic: bytes = aws_kinesis_agg.MAGIC
    digest_size: int = aws_kinesis_agg.DIGEST_SIZE

    def split(data: bytes) -> Iterator[bytes]:
        if len(data) > len(magic) + digest_size and data.startswith(magic):
            body = data[len(magic):-digest_size]
            if hashlib.md5(body).digest() == data[-digest_size:]:
                aggregate = messages_pb2.AggregatedRecord()
                try:
                    aggregate.ParseFromString(body)
                except Exception:  # noqa: BLE001 - not a valid aggregate after all: pass it on whole
                    log.warning("record has the KPL header but does not parse; passing it on as is")
                else:
                    for sub in aggregate.records:
                        yield bytes(sub.data)
                    return
        yield data

    return split
