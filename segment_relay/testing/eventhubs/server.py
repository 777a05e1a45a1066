"""An in-memory Event Hubs emulator: an asyncio AMQP 1.0 server the unmodified azure-eventhub SDK talks to.

Speaks what the SDK needs (see ``/work/shared/notes/eventhubs-emulation.md``): SASL ANONYMOUS,
open/begin/attach/flow/transfer/disposition/detach/end/close with full-length performatives,
CBS ``put-token`` on ``$cbs``, ``$management`` READ of hub and partition properties, producer
links (single events and batches, to a partition, by partition key or round robin), consumer
links with selector filters on offset / sequence number / enqueued time, exact credit flow,
the peer's session incoming-window, pre-settled multi-frame deliveries, runtime-metric
delivery-annotations (``track_last_enqueued_event_properties``), owner-level (epoch) stealing
and a few fault hooks.

It never imports the SDK.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from segment_relay.testing.eventhubs.amqp import (
    AMQP_HEADER,
    BATCH_MESSAGE_FORMAT,
    SASL_HEADER,
    Array,
    Described,
    Frame,
    FrameReader,
    Int,
    Long,
    Message,
    ProtocolHeader,
    Symbol,
    Timestamp,
    UByte,
    UInt,
    ULong,
    composite,
    decode_message,
    encode_frame,
    encode_message,
    read_composite,
)

__all__ = ["EventHubsEmulator", "partition_for_key"]

log = logging.getLogger(__name__)

MAX_FRAME_SIZE = 65536
MAX_MESSAGE_SIZE = 1048576
WINDOW = 0x7FFFFFFF
PRODUCER_CREDIT = 1000
BURST_BYTES = 1 << 20  # a consumer burst stops here to flush and drain (bounds memory with large events)
SELECTOR = Symbol("apache.org:selector-filter:string")
EPOCH = Symbol("com.microsoft:epoch")
RUNTIME_METRIC = Symbol("com.microsoft:enable-receiver-runtime-metric")
_FILTER_RE = re.compile(
    r"amqp\.annotation\.(x-opt-offset|x-opt-sequence-number|x-opt-enqueued-time)\s*(>=|>)\s*'([^']*)'"
)


# --------------------------------------------------------------------------------------
# Partition key hashing: Jenkins lookup3 as used by the service and the SDK's buffered producer
# --------------------------------------------------------------------------------------

_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = ((a - c) & _M) ^ _rot(c, 4)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rot(a, 6)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rot(b, 8)
    b = (b + a) & _M
    a = ((a - c) & _M) ^ _rot(c, 16)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rot(a, 19)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rot(b, 4)
    b = (b + a) & _M
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int, int]:
    c = ((c ^ b) - _rot(b, 14)) & _M
    a = ((a ^ c) - _rot(c, 11)) & _M
    b = ((b ^ a) - _rot(a, 25)) & _M
    c = ((c ^ b) - _rot(b, 16)) & _M
    a = ((a ^ c) - _rot(c, 4)) & _M
    b = ((b ^ a) - _rot(a, 14)) & _M
    c = ((c ^ b) - _rot(b, 24)) & _M
    return a, b, c


def _word(chars: list[int]) -> int:
    return sum(ch << (8 * i) for i, ch in enumerate(chars))


def _hash_code(key: str) -> int:
    if not key:
        return 0
    data = [ord(ch) for ch in key]
    n = len(data)
    a = b = c = (0xDEADBEEF + n) & _M
    p = 0
    while n - p > 12:
        a = (a + _word(data[p : p + 4])) & _M
        b = (b + _word(data[p + 4 : p + 8])) & _M
        c = (c + _word(data[p + 8 : p + 12])) & _M
        a, b, c = _mix(a, b, c)
        p += 12
    rest = data[p:]
    if rest:
        a = (a + _word(rest[0:4])) & _M
        b = (b + _word(rest[4:8])) & _M
        c = (c + _word(rest[8:12])) & _M
        a, b, c = _final(a, b, c)
    h = (c ^ b) & 0xFFFF
    return h - 0x10000 if h >= 0x8000 else h


def partition_for_key(key: str, partition_ids: list[str]) -> str:
    """The partition a keyed event goes to (the SDK's ``PartitionResolver`` rule)."""
    h = _hash_code(key)
    n = len(partition_ids)
    return partition_ids[abs(h % n)]


# --------------------------------------------------------------------------------------
# Hand-encoded hot paths (byte-identical to the generic codec, see the tests)
# --------------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct(">IBBH")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_NULLS5 = b"\x40" * 5  # rcv-settle-mode, state, resume, aborted, batchable


def _uint(v: int) -> bytes:
    # the smallest uint encoding, as the codec picks it
    if v == 0:
        return b"\x43"
    if v <= 0xFF:
        return bytes((0x52, v))
    return b"\x70" + _U32.pack(v)


def transfer_performative(handle: int, delivery_id: int, tag: bytes, settled: bool, more: bool) -> bytes:
    """An encoded ``transfer`` with all 11 fields (message-format 0).

    The generic ``composite()`` + ``encode_value`` path costs ~10 µs per event; this is ~1 µs.
    """
    body = b"".join(
        (
            _uint(handle),
            _uint(delivery_id),
            b"\xa0" + bytes((len(tag),)) + tag,
            b"\x43",
            b"\x41" if settled else b"\x42",
            b"\x41" if more else b"\x42",
            _NULLS5,
        )
    )
    return b"\x00\x53\x14\xc0" + bytes((len(body) + 1, 11)) + body


def _sym(name: str) -> bytes:
    return b"\xa3" + bytes((len(name),)) + name.encode("ascii")


_K_SEQ = _sym("last_enqueued_sequence_number") + b"\x81"  # long, always the 8-byte form
_K_TIME = _sym("last_enqueued_time_utc") + b"\x83"  # timestamp
_K_RETRIEVED = _sym("runtime_info_retrieval_time_utc") + b"\x83"  # timestamp
_K_OFFSET = _sym("last_enqueued_offset") + b"\xa1"  # str8 (an offset has at most 20 digits)


def runtime_metric_annotations(seq: int, offset: int, enqueued_ms: int, retrieved_ms: int) -> bytes:
    """The delivery-annotations section the SDK reads with ``track_last_enqueued_event_properties``
    (``azure/eventhub/_utils.py: get_last_enqueued_event_properties``): a map of 4 symbol keys."""
    off = str(offset).encode("ascii")
    body = b"".join(
        (
            _K_SEQ,
            _I64.pack(seq),
            _K_TIME,
            _I64.pack(enqueued_ms),
            _K_RETRIEVED,
            _I64.pack(retrieved_ms),
            _K_OFFSET,
            bytes((len(off),)),
            off,
        )
    )
    return b"\x00\x53\x71\xc1" + bytes((len(body) + 1, 8)) + body


def _header_end(payload: bytes) -> int:
    """Where delivery-annotations go: after the header section, if the stored message has one."""
    if not payload.startswith(b"\x00\x53\x70"):
        return 0
    code = payload[3]
    if code == 0xC0:
        return 5 + payload[4]
    if code == 0xD0:
        return 8 + _U32.unpack_from(payload, 4)[0]
    return 4  # 0x45: empty list


# --------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------


@dataclass
class _Partition:
    pid: str
    retention: int | None = None
    first_seq: int = 0
    next_offset: int = 0
    payloads: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    waiters: set[asyncio.Event] = field(default_factory=set)

    @property
    def end_seq(self) -> int:
        return self.first_seq + len(self.payloads)

    def append(self, message: Message, partition_key: str | None) -> None:
        seq = self.end_seq
        offset = self.next_offset
        now = max(int(time.time() * 1000), self.times[-1] if self.times else 0)
        ann: dict[Any, Any] = dict(message.message_annotations or {})
        ann[Symbol("x-opt-sequence-number")] = Long(seq)
        ann[Symbol("x-opt-offset")] = str(offset)
        ann[Symbol("x-opt-enqueued-time")] = Timestamp(now)
        if partition_key is not None:
            ann[Symbol("x-opt-partition-key")] = partition_key
        message.message_annotations = ann
        message.delivery_annotations = None
        payload = encode_message(message)
        self.payloads.append(payload)
        self.offsets.append(offset)
        self.times.append(now)
        self.next_offset += len(payload)
        if self.retention is not None and len(self.payloads) > self.retention:
            drop = len(self.payloads) - self.retention
            del self.payloads[:drop], self.offsets[:drop], self.times[:drop]
            self.first_seq += drop
        for w in self.waiters:
            w.set()

    def start_seq(self, filter_expr: str | None) -> int:
        """The first sequence number a consumer link with this selector filter receives."""
        if filter_expr is None:
            return self.end_seq
        m = _FILTER_RE.search(filter_expr)
        if m is None:
            raise ValueError(f"unsupported filter {filter_expr!r}")
        kind, op, value = m.groups()
        inclusive = op == ">="
        if kind == "x-opt-offset":
            if value == "@latest":
                return self.end_seq
            if value == "-1":
                return self.first_seq
            idx = (bisect.bisect_left if inclusive else bisect.bisect_right)(self.offsets, int(value))
            return self.first_seq + idx
        if kind == "x-opt-sequence-number":
            n = int(value)
            start = n if inclusive else n + 1
            return min(max(start, self.first_seq), self.end_seq)
        t = int(value)
        idx = (bisect.bisect_left if inclusive else bisect.bisect_right)(self.times, t)
        return self.first_seq + idx

    def runtime_metrics(self) -> bytes:
        """The delivery-annotations section with this (non-empty) partition's current state."""
        return runtime_metric_annotations(
            self.end_seq - 1, self.offsets[-1], self.times[-1], max(int(time.time() * 1000), self.times[-1])
        )

    def properties(self, hub: str) -> dict[str, Any]:
        empty = not self.payloads
        return {
            "name": hub,
            "partition": self.pid,
            "begin_sequence_number": Long(self.first_seq if not empty else -1 if self.end_seq == 0 else self.end_seq),
            "last_enqueued_sequence_number": Long(self.end_seq - 1),
            "last_enqueued_offset": str(self.offsets[-1]) if not empty else "-1",
            "last_enqueued_time_utc": Timestamp(self.times[-1] if not empty else 0),
            "is_partition_empty": empty,
        }


@dataclass
class _Hub:
    name: str
    partitions: dict[str, _Partition]
    created_at: int
    round_robin: itertools.cycle[str]
    # (consumer group, partition id) -> receiver links reading it
    readers: dict[tuple[str, str], list[_Link]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Connections, sessions, links
# --------------------------------------------------------------------------------------


class _LinkClosed(Exception):
    pass


@dataclass
class _Link:
    session: _Session
    name: str
    handle: int
    kind: str  # "cbs-req", "cbs-resp", "mgmt-req", "mgmt-resp", "producer", "consumer"
    address: str
    hub: _Hub | None = None
    partition: _Partition | None = None
    consumer_group: str = ""
    epoch: int | None = None
    runtime_metrics: bool = False  # the attach desired com.microsoft:enable-receiver-runtime-metric
    # receiving side (our role receiver)
    received: int = 0  # delivery count
    credit: int = 0
    buffer: bytearray = field(default_factory=bytearray)
    buffer_format: int = 0
    buffer_delivery_id: int = 0
    buffer_settled: bool = False
    # sending side
    next_seq: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    closed: bool = False
    detach_sent: bool = False


@dataclass
class _Session:
    conn: _Connection
    channel: int
    next_outgoing_id: int = 0  # transfer frames we sent
    next_incoming_id: int = 0  # transfer frames we received
    next_delivery_id: int = 0
    links: dict[int, _Link] = field(default_factory=dict)
    reply_links: dict[str, _Link] = field(default_factory=dict)
    # The peer's session window (2.5.6): we may send transfer ids below its next-incoming-id +
    # incoming-window. Frames beyond it wait in ``backlog``; a consumer that found the window shut
    # sets ``blocked`` so the peer's next flow wakes it.
    peer_window_end: int = 0
    backlog: deque[bytes] = field(default_factory=deque)
    blocked: bool = False

    def window(self) -> int:
        """Transfer frames the peer still accepts (serial-number arithmetic, never negative)."""
        w = (self.peer_window_end - self.next_outgoing_id) & _M
        return 0 if w > 0x7FFFFFFF else w


class _Connection:
    def __init__(self, server: EventHubsEmulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.sessions: dict[int, _Session] = {}
        self.peer_max_frame = 512
        self.closed = False
        # Output is coalesced: one transport write (one syscall) per burst instead of per frame.
        # Everything goes through ``_out`` so frame order is kept; a flush runs before any await
        # (explicitly, or via call_soon for frames queued from another connection's dispatch).
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    # ---- output ----
    def _write(self, data: bytes) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        self._out.append(data)
        self._out_size += len(data)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        if not self.writer.is_closing():
            self.writer.write(data)

    def send(self, channel: int, perf: Described | None, payload: bytes = b"", frame_type: int = 0) -> None:
        if self.closed or self.writer.is_closing():
            return
        self._write(encode_frame(channel, perf, payload, frame_type))

    def send_transfer(self, s: _Session, frame: bytes) -> None:
        """Send one encoded transfer frame if the peer's session window allows, else queue it."""
        if self.closed:
            return
        if s.backlog or not s.window():
            s.backlog.append(frame)
            return
        self._write(frame)
        s.next_outgoing_id = (s.next_outgoing_id + 1) & _M

    def _window_update(self, s: _Session, next_incoming_id: int | None, incoming_window: int) -> None:
        # A null next-incoming-id means the peer has not seen our begin: count from our initial id, 0.
        s.peer_window_end = ((next_incoming_id or 0) + incoming_window) & _M
        while s.backlog and s.window():
            self._write(s.backlog.popleft())
            s.next_outgoing_id = (s.next_outgoing_id + 1) & _M
        if s.blocked and not s.backlog and s.window():
            s.blocked = False
            for link in s.links.values():
                if link.kind == "consumer":
                    link.wake.set()

    def send_flow(self, link: _Link) -> None:
        s = link.session
        self.send(
            s.channel,
            composite(
                "flow",
                next_incoming_id=UInt(s.next_incoming_id & _M),
                incoming_window=UInt(WINDOW),
                next_outgoing_id=UInt(s.next_outgoing_id & _M),
                outgoing_window=UInt(WINDOW),
                handle=UInt(link.handle),
                delivery_count=UInt(link.received & _M),
                link_credit=UInt(link.credit),
            ),
        )

    def send_message(self, link: _Link, payload: bytes, settled: bool = True) -> None:
        """One delivery, split into frames of at most the peer's max-frame-size."""
        s = link.session
        delivery_id = s.next_delivery_id
        s.next_delivery_id = (delivery_id + 1) & _M
        tag = _U32.pack(delivery_id)
        last = transfer_performative(link.handle, delivery_id, tag, settled, False)
        chunk = max(self.peer_max_frame - 8 - len(last), 64)
        if len(payload) <= chunk:
            self.send_transfer(s, _FRAME_HEADER.pack(8 + len(last) + len(payload), 2, 0, s.channel) + last + payload)
            return
        more = transfer_performative(link.handle, delivery_id, tag, settled, True)
        for pos in range(0, len(payload), chunk):
            part = payload[pos : pos + chunk]
            perf = more if pos + chunk < len(payload) else last
            self.send_transfer(s, _FRAME_HEADER.pack(8 + len(perf) + len(part), 2, 0, s.channel) + perf + part)

    def detach(self, link: _Link, condition: str | None = None, description: str = "") -> None:
        if link.detach_sent:
            return
        link.detach_sent = True
        self._close_link(link)
        error = composite("error", condition=condition, description=description) if condition else None
        self.send(link.session.channel, composite("detach", handle=UInt(link.handle), closed=True, error=error))

    def _close_link(self, link: _Link) -> None:
        link.closed = True
        link.wake.set()
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()
        if link.partition is not None:
            link.partition.waiters.discard(link.wake)
        if link.kind == "consumer" and link.hub is not None and link.partition is not None:
            readers = link.hub.readers.get((link.consumer_group, link.partition.pid), [])
            if link in readers:
                readers.remove(link)

    def abort(self) -> None:
        self.closed = True
        for s in self.sessions.values():
            for link in list(s.links.values()):
                self._close_link(link)
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    # ---- input ----
    async def run(self) -> None:
        try:
            await self._handshake()
            frames = FrameReader(MAX_FRAME_SIZE)
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    break
                for frame in frames.feed(data):
                    if isinstance(frame, ProtocolHeader):
                        continue
                    self._dispatch(frame)
                    if self.closed:
                        break
                self.flush()
                await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, _LinkClosed):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("eventhubs emulator: connection failed")
        finally:
            self.abort()
            self.server._connections.discard(self)

    async def _handshake(self) -> None:
        header = await self.reader.readexactly(8)
        if header == SASL_HEADER:
            self._write(SASL_HEADER)
            self.send(0, composite("sasl-mechanisms", sasl_server_mechanisms=["ANONYMOUS"]), frame_type=1)
            self.flush()
            frames = FrameReader(MAX_FRAME_SIZE)
            done = False
            while not done:
                data = await self.reader.read(4096)
                if not data:
                    raise ConnectionError("closed during SASL")
                for frame in frames.feed(data):
                    if isinstance(frame, Frame) and frame.name == "sasl-init":
                        self.send(0, composite("sasl-outcome", code=UByte(0)), frame_type=1)
                        self.flush()
                        done = True
            if frames.pending:
                raise ConnectionError("unexpected bytes after SASL")
            header = await self.reader.readexactly(8)
        if header != AMQP_HEADER:
            self._write(AMQP_HEADER)
            self.flush()
            raise ConnectionError(f"unsupported protocol header {header!r}")
        self._write(AMQP_HEADER)

    def _dispatch(self, frame: Frame) -> None:
        name = frame.name
        if name is None:
            return  # heartbeat
        f = frame.fields
        ch = frame.channel
        if name == "open":
            self.peer_max_frame = int(f["max_frame_size"] or 0xFFFFFFFF)
            self.send(
                0,
                composite(
                    "open",
                    container_id="segment-relay-eventhubs",
                    hostname=f.get("hostname"),
                    max_frame_size=UInt(MAX_FRAME_SIZE),
                    channel_max=65535,
                ),
            )
        elif name == "begin":
            new = self.sessions[ch] = _Session(self, ch)
            self._window_update(new, None, int(f["incoming_window"] or 0))
            self.send(
                ch,
                composite(
                    "begin",
                    remote_channel=ch,
                    next_outgoing_id=UInt(0),
                    incoming_window=UInt(WINDOW),
                    outgoing_window=UInt(WINDOW),
                    handle_max=UInt(0xFFFFFFFF),
                ),
            )
        elif name == "attach":
            self._attach(self.sessions[ch], f)
        elif name == "flow":
            self._flow(self.sessions[ch], f)
        elif name == "transfer":
            self._transfer(self.sessions[ch], f, frame.payload)
        elif name == "disposition":
            pass
        elif name == "detach":
            session = self.sessions.get(ch)
            link = session.links.pop(int(f["handle"]), None) if session else None
            if link is not None:
                if link.detach_sent:
                    return
                link.detach_sent = True
                self._close_link(link)
            self.send(ch, composite("detach", handle=UInt(f["handle"]), closed=bool(f["closed"])))
        elif name == "end":
            session = self.sessions.pop(ch, None)
            if session is not None:
                for link in session.links.values():
                    self._close_link(link)
            self.send(ch, composite("end"))
        elif name == "close":
            self.send(0, composite("close"))
            self.closed = True

    # ---- links ----
    def _attach(self, session: _Session, f: dict[str, Any]) -> None:
        client_receiver = bool(f["role"])
        source, target = f["source"], f["target"]
        terminus = source if client_receiver else target
        tfields = composite_fields(terminus)
        raw = tfields.get("address")
        path = _path(str(raw) if raw is not None else "")
        handle = int(f["handle"])
        link = _Link(session, str(f["name"]), handle, "", path)
        props = f.get("properties") or {}
        error: tuple[str, str] | None = None
        if path in ("$cbs", "$management"):
            prefix = "cbs" if path == "$cbs" else "mgmt"
            link.kind = f"{prefix}-{'resp' if client_receiver else 'req'}"
            if client_receiver:
                session.reply_links[path] = link
        else:
            error = self._attach_entity(link, path, client_receiver, props, tfields)
            link.runtime_metrics = link.kind == "consumer" and RUNTIME_METRIC in _symbols(f.get("desired_capabilities"))
        session.links[handle] = link
        if source is None:
            source = composite("source", address=path)
        if target is None:
            target = composite("target", address=path)
        self.send(
            session.channel,
            composite(
                "attach",
                name=link.name,
                handle=UInt(handle),
                role=not client_receiver,
                snd_settle_mode=UByte(1) if link.kind == "consumer" else f.get("snd_settle_mode"),
                rcv_settle_mode=UByte(0),
                source=source,
                target=target,
                initial_delivery_count=UInt(0) if client_receiver else None,
                max_message_size=ULong(MAX_MESSAGE_SIZE),
                # offered like the service does; the SDK itself never checks it
                offered_capabilities=[RUNTIME_METRIC] if link.runtime_metrics else None,
            ),
        )
        if error is not None:
            self.detach(link, *error)
            return
        if not client_receiver:
            link.credit = PRODUCER_CREDIT
            self.send_flow(link)
        elif link.kind == "consumer":
            self._admit_consumer(link)

    def _attach_entity(
        self, link: _Link, path: str, client_receiver: bool, props: dict[Any, Any], tfields: dict[str, Any]
    ) -> tuple[str, str] | None:
        parts = path.split("/")
        hub = self.server._hubs.get(parts[0])
        if hub is None:
            return ("amqp:not-found", f"The messaging entity '{parts[0]}' could not be found.")
        link.hub = hub
        if not client_receiver:
            link.kind = "producer"
            if len(parts) == 3 and parts[1].lower() == "partitions":
                link.partition = hub.partitions.get(parts[2])
                if link.partition is None:
                    return ("amqp:not-found", f"Partition '{parts[2]}' not found in '{hub.name}'.")
            elif len(parts) != 1:
                return ("amqp:not-found", f"Unknown address '{path}'.")
            return None
        link.kind = "consumer"
        if len(parts) != 5 or parts[1].lower() != "consumergroups" or parts[3].lower() != "partitions":
            return ("amqp:not-found", f"Unknown address '{path}'.")
        link.consumer_group = parts[2]
        partition = hub.partitions.get(parts[4])
        if partition is None:
            return ("amqp:not-found", f"Partition '{parts[4]}' not found in '{hub.name}'.")
        link.partition = partition
        epoch = props.get(EPOCH, props.get("com.microsoft:epoch"))
        link.epoch = int(epoch) if epoch is not None else None
        filters = tfields.get("filter") or {}
        expr = filters.get(SELECTOR)
        if isinstance(expr, Described):
            expr = expr.value
        try:
            link.next_seq = partition.start_seq(str(expr) if expr is not None else None)
        except ValueError as exc:
            return ("amqp:invalid-field", str(exc))
        return None

    def _admit_consumer(self, link: _Link) -> None:
        assert link.hub is not None and link.partition is not None
        if self.server._busy_receivers > 0:
            self.server._busy_receivers -= 1
            self.detach(link, "com.microsoft:server-busy", "The server is busy. Please retry later.")
            return
        readers = link.hub.readers.setdefault((link.consumer_group, link.partition.pid), [])
        epochs = [r.epoch for r in readers if r.epoch is not None]
        top = max(epochs) if epochs else None
        if top is not None and (link.epoch is None or link.epoch < top):
            self.detach(
                link,
                "amqp:link:stolen",
                f"Receiver with epoch '{link.epoch}' cannot be created: a receiver with epoch '{top}' already exists.",
            )
            return
        if link.epoch is not None:
            for old in list(readers):
                old.session.conn.detach(
                    old,
                    "amqp:link:stolen",
                    f"New receiver with higher epoch of '{link.epoch}' is created hence current receiver "
                    f"with epoch '{old.epoch}' is getting disconnected.",
                )
        readers.append(link)
        link.partition.waiters.add(link.wake)
        link.task = asyncio.get_running_loop().create_task(self._pump(link))

    async def _pump(self, link: _Link) -> None:
        partition = link.partition
        assert partition is not None
        s = link.session
        while not link.closed and not self.closed:
            if link.credit > 0 and link.next_seq < partition.end_seq:
                if s.backlog or not s.window():
                    s.blocked = True  # the peer's next flow that opens the window wakes us
                else:
                    if link.next_seq < partition.first_seq:
                        link.next_seq = partition.first_seq
                    # Runtime metrics: the partition state cannot change within this synchronous
                    # burst, so the section is encoded once per burst and spliced into each event.
                    metrics = partition.runtime_metrics() if link.runtime_metrics else None
                    while (
                        link.credit > 0
                        and link.next_seq < partition.end_seq
                        and not s.backlog
                        and self._out_size < BURST_BYTES
                    ):
                        payload = partition.payloads[link.next_seq - partition.first_seq]
                        if metrics is not None:
                            at = _header_end(payload)
                            payload = payload[:at] + metrics + payload[at:]
                        self.send_message(link, payload)
                        link.next_seq += 1
                        link.credit -= 1
                        link.received = (link.received + 1) & _M
                    self.flush()
                    await self.writer.drain()
                    continue
            link.wake.clear()
            await link.wake.wait()

    def _flow(self, session: _Session, f: dict[str, Any]) -> None:
        nid = f.get("next_incoming_id")
        self._window_update(session, None if nid is None else int(nid), int(f.get("incoming_window") or 0))
        handle = f.get("handle")
        if handle is None:
            return
        link = session.links.get(int(handle))
        if link is None or link.kind not in ("consumer", "cbs-resp", "mgmt-resp"):
            return
        peer_count = f.get("delivery_count")
        peer_count = link.received if peer_count is None else int(peer_count)
        link.credit = max(0, (peer_count + int(f.get("link_credit") or 0) - link.received) & _M)
        if link.credit > 0x7FFFFFFF:
            link.credit = 0
        link.wake.set()

    def _transfer(self, session: _Session, f: dict[str, Any], payload: bytes) -> None:
        session.next_incoming_id = (session.next_incoming_id + 1) & _M
        link = session.links.get(int(f["handle"]))
        if link is None or link.closed:
            return
        if not link.buffer:
            link.buffer_format = int(f.get("message_format") or 0)
            link.buffer_delivery_id = int(f["delivery_id"] or 0)
            link.buffer_settled = bool(f.get("settled"))
        link.buffer += payload
        if f.get("more"):
            return
        data = bytes(link.buffer)
        link.buffer.clear()
        link.received = (link.received + 1) & _M
        link.credit -= 1
        delivery_id = link.buffer_delivery_id
        state: Described
        try:
            if link.kind in ("cbs-req", "mgmt-req"):
                self._request(session, link, decode_message(data))
                state = composite("accepted")
            else:
                state = self.server._produce(link, data, link.buffer_format)
        except Exception as exc:
            log.exception("eventhubs emulator: bad delivery")
            state = composite("rejected", error=composite("error", condition="amqp:decode-error", description=str(exc)))
        if not link.buffer_settled:
            self.send(
                session.channel,
                composite(
                    "disposition", role=True, first=UInt(delivery_id), last=UInt(delivery_id), settled=True, state=state
                ),
            )
        if link.credit < PRODUCER_CREDIT // 2:
            link.credit = PRODUCER_CREDIT
            self.send_flow(link)

    def _request(self, session: _Session, link: _Link, request: Message) -> None:
        props = request.properties or {}
        app = request.application_properties or {}
        status, description, body = 200, "OK", None
        if link.kind == "cbs-req":
            status, description = 202, "Accepted"
            reply = session.reply_links.get("$cbs")
        else:
            reply = session.reply_links.get("$management")
            status, description, body = self.server._management(app)
        if reply is None or reply.closed:
            return
        response = Message(
            properties={"message_id": props.get("message_id"), "correlation_id": props.get("message_id")},
            application_properties={"status-code": Int(status), "status-description": description},
            value=body,
            has_value=True,
        )
        self.send_message(reply, encode_message(response))
        reply.credit -= 1
        reply.received = (reply.received + 1) & _M


def composite_fields(value: Any) -> dict[str, Any]:
    if not isinstance(value, Described):
        return {}
    r = read_composite(value)
    return r[1] if r else {}


def _symbols(value: Any) -> list[Any]:
    # a multiple="true" field: null, one value, or an array/list of values (1.4)
    if value is None:
        return []
    if isinstance(value, Array):
        return value.items
    if isinstance(value, list):
        return value
    return [value]


def _path(address: str) -> str:
    if "://" in address:
        return urlparse(address).path.strip("/")
    return address.strip("/")


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class EventHubsEmulator:
    """An in-memory Event Hubs namespace served over plain-TCP AMQP 1.0.

    ``hubs`` maps hub names to partition counts. ``retention`` caps the events kept per
    partition (older ones are evicted; sequence numbers and offsets keep growing).
    """

    def __init__(self, hubs: dict[str, int], host: str = "127.0.0.1", port: int = 0, retention: int | None = None):
        self.host = host
        self._port = port
        self.retention = retention
        now = int(time.time() * 1000)
        self._hubs: dict[str, _Hub] = {}
        for name, count in hubs.items():
            pids = [str(i) for i in range(count)]
            self._hubs[name] = _Hub(name, {p: _Partition(p, retention) for p in pids}, now, itertools.cycle(pids))
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._busy_receivers = 0

    @property
    def port(self) -> int:
        return self._port

    def connection_string(self, hub: str) -> str:
        return (
            f"Endpoint=sb://{self.host}:{self.port};SharedAccessKeyName=k;SharedAccessKey=v;"
            f"EntityPath={hub};UseDevelopmentEmulator=true"
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> EventHubsEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            # stop() cancels us. Ending normally matters: Python 3.11's StreamReaderProtocol calls
            # task.exception() on this handler task and would log the CancelledError as an error.
            pass
        finally:
            self._tasks.discard(task)
            for s in conn.sessions.values():
                for link in s.links.values():
                    if link.task is not None:
                        link.task.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    # ---- inspection and fault hooks ----
    def events(self, hub: str, partition: str) -> list[Message]:
        """The stored events of a partition, with their service annotations."""
        return [decode_message(p) for p in self._hubs[hub].partitions[partition].payloads]

    def active_consumers(self, hub: str) -> int:
        """How many consumer links are currently attached to ``hub``."""
        return sum(len(links) for links in self._hubs[hub].readers.values())

    def detach_links(self, condition: str = "amqp:link:detach-forced", description: str = "detached by test") -> None:
        """Detach every producer and consumer link (the SDK reconnects)."""
        for conn in list(self._connections):
            for s in conn.sessions.values():
                for link in list(s.links.values()):
                    if link.kind in ("producer", "consumer") and not link.detach_sent:
                        conn.detach(link, condition, description)

    def drop_connections(self) -> None:
        """Abort every TCP connection without any AMQP close."""
        for conn in list(self._connections):
            conn.abort()

    def server_busy(self, n: int) -> None:
        """Reject the next ``n`` producer deliveries with ``com.microsoft:server-busy``."""
        self._busy = n

    def receivers_busy(self, n: int) -> None:
        """Refuse the next ``n`` consumer link attaches with ``com.microsoft:server-busy`` (the
        service does this under load; the SDK backs off and attaches again)."""
        self._busy_receivers = n

    @property
    def pending_receivers_busy(self) -> int:
        return self._busy_receivers

    @property
    def pending_server_busy(self) -> int:
        """How many of the :meth:`server_busy` rejections are still to come."""
        return self._busy

    # ---- entity operations ----
    def _produce(self, link: _Link, data: bytes, message_format: int) -> Described:
        if link.kind != "producer" or link.hub is None:
            return composite(
                "rejected", error=composite("error", condition="amqp:not-allowed", description="not a sender")
            )
        if self._busy > 0:
            self._busy -= 1
            return composite(
                "rejected",
                error=composite("error", condition="com.microsoft:server-busy", description="The server is busy."),
            )
        hub = link.hub
        if message_format == BATCH_MESSAGE_FORMAT:
            envelope = decode_message(data)
            messages = [decode_message(d) for d in envelope.data]
            key = _partition_key(envelope) or next((k for k in map(_partition_key, messages) if k), None)
        else:
            messages = [decode_message(data)]
            key = _partition_key(messages[0])
        if link.partition is not None:
            partition = link.partition
        elif key is not None:
            partition = hub.partitions[partition_for_key(key, list(hub.partitions))]
        else:
            partition = hub.partitions[next(hub.round_robin)]
        for m in messages:
            partition.append(m, key)
        return composite("accepted")

    def _management(self, app: dict[Any, Any]) -> tuple[int, str, Any]:
        if app.get("operation") != "READ":
            return 400, f"Unsupported operation {app.get('operation')!r}", None
        hub = self._hubs.get(str(app.get("name")))
        if hub is None:
            return 404, f"The messaging entity '{app.get('name')}' could not be found.", None
        kind = app.get("type")
        if kind == "com.microsoft:eventhub":
            return (
                200,
                "OK",
                {
                    "name": hub.name,
                    "created_at": Timestamp(hub.created_at),
                    "partition_ids": list(hub.partitions),
                    "partition_count": Int(len(hub.partitions)),
                    "type": "com.microsoft:eventhub",
                },
            )
        if kind == "com.microsoft:partition":
            partition = hub.partitions.get(str(app.get("partition")))
            if partition is None:
                return 404, f"Partition '{app.get('partition')}' not found.", None
            return 200, "OK", partition.properties(hub.name)
        return 400, f"Unsupported type {kind!r}", None


def _partition_key(message: Message) -> str | None:
    ann = message.message_annotations or {}
    key = ann.get(Symbol("x-opt-partition-key"))
    if isinstance(key, bytes):
        return key.decode("utf-8")
    return None if key is None else str(key)
