"""The Event Hubs emulator against the real, unmodified azure-eventhub aio SDK."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from azure.eventhub import EventData
from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient
from support import poll

from segment_relay.testing.eventhubs.amqp import (
    AMQP_HEADER,
    Described,
    Frame,
    FrameReader,
    Message,
    Symbol,
    Timestamp,
    UInt,
    composite,
    decode_message,
    encode_frame,
    encode_message,
    encode_value,
)
from segment_relay.testing.eventhubs.server import (
    SELECTOR,
    EventHubsEmulator,
    _header_end,
    partition_for_key,
    runtime_metric_annotations,
    transfer_performative,
)

HUB = "hub1"
DEADLINE = 20.0


@pytest.fixture
async def emulator() -> AsyncIterator[EventHubsEmulator]:
    emu = EventHubsEmulator({HUB: 4, "small": 1})
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


def producer(emu: EventHubsEmulator, hub: str = HUB, **kw: Any) -> EventHubProducerClient:
    return EventHubProducerClient.from_connection_string(emu.connection_string(hub), **kw)


def consumer(emu: EventHubsEmulator, hub: str = HUB, **kw: Any) -> EventHubConsumerClient:
    # a short load-balancing interval: receive() only returns after close() once its sleep ends
    kw.setdefault("load_balancing_interval", 0.2)
    return EventHubConsumerClient.from_connection_string(emu.connection_string(hub), consumer_group="$default", **kw)


wait_for = functools.partial(poll, timeout_s=DEADLINE)  # the shared helper, with this file's deadline


async def receive(
    emu: EventHubsEmulator,
    n: int,
    *,
    hub: str = HUB,
    before_wait: Callable[[], Awaitable[None]] | None = None,
    **receive_kw: Any,
) -> list[Any]:
    """Receive until ``n`` events arrived (then stop); returns the events in arrival order."""
    got: list[Any] = []
    client = consumer(emu, hub)

    async def on_event(ctx: Any, event: Any) -> None:
        if event is not None:
            got.append(event)

    task = asyncio.create_task(client.receive(on_event, **receive_kw))
    try:
        if before_wait is not None:
            await before_wait()
        await wait_for(lambda: len(got) >= n, f"{n} events (got {len(got)})")
    finally:
        await client.close()
        await task
    return got


async def test_round_trip_batch_and_singles(emulator: EventHubsEmulator) -> None:
    n = 60
    async with producer(emulator) as prod:
        batch = await prod.create_batch()
        for i in range(n - 10):
            ev = EventData(f"body-{i}".encode())
            ev.properties = {"i": i, "kind": "batch"}
            batch.add(ev)
        await prod.send_batch(batch)
        for i in range(n - 10, n):
            ev = EventData(f"body-{i}".encode())
            ev.properties = {"i": i, "kind": "single"}
            await prod.send_event(ev)

    events = await receive(emulator, n, starting_position="-1")
    assert len(events) == n
    by_i = {ev.properties[b"i"]: ev for ev in events}
    assert sorted(by_i) == list(range(n))
    for i, ev in by_i.items():
        assert ev.body_as_str() == f"body-{i}"
        assert ev.properties[b"kind"] == (b"batch" if i < n - 10 else b"single")
        assert isinstance(ev.offset, str)
        assert ev.enqueued_time is not None
    # per partition, sequence numbers are dense from 0 (round robin spread the events)
    per_partition = [emulator.events(HUB, p) for p in "0123"]
    assert sum(len(p) for p in per_partition) == n
    for stored in per_partition:
        assert [m.message_annotations["x-opt-sequence-number"] for m in stored] == list(range(len(stored)))  # type: ignore[index]


async def test_receive_batch(emulator: EventHubsEmulator) -> None:
    async with producer(emulator, "small") as prod:
        await prod.send_batch([EventData(f"e{i}") for i in range(25)])
    got: list[Any] = []
    client = consumer(emulator, "small")

    async def on_batch(ctx: Any, events: list[Any]) -> None:
        got.extend(events)

    task = asyncio.create_task(client.receive_batch(on_batch, max_batch_size=10, starting_position="-1"))
    try:
        await wait_for(lambda: len(got) >= 25, "25 events")
    finally:
        await client.close()
        await task
    assert [e.body_as_str() for e in got] == [f"e{i}" for i in range(25)]
    assert [e.sequence_number for e in got] == list(range(25))


async def test_properties(emulator: EventHubsEmulator) -> None:
    async with producer(emulator) as prod:
        props = await prod.get_eventhub_properties()
        assert props["eventhub_name"] == HUB
        assert props["partition_ids"] == ["0", "1", "2", "3"]
        assert isinstance(props["created_at"], dt.datetime)
        empty = await prod.get_partition_properties("2")
        assert empty["is_empty"] is True
        assert empty["last_enqueued_sequence_number"] == -1
        assert empty["last_enqueued_offset"] == "-1"
        await prod.send_batch([EventData("a"), EventData("b"), EventData("c")], partition_id="2")
        full = await prod.get_partition_properties("2")
        assert full["is_empty"] is False
        assert full["beginning_sequence_number"] == 0
        assert full["last_enqueued_sequence_number"] == 2
        assert int(full["last_enqueued_offset"]) > 0
        assert full["last_enqueued_time_utc"] >= dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        assert await prod.get_partition_ids() == ["0", "1", "2", "3"]
    async with consumer(emulator) as cons:
        assert (await cons.get_partition_properties("2"))["last_enqueued_sequence_number"] == 2


async def test_partition_id_and_key(emulator: EventHubsEmulator) -> None:
    async with producer(emulator) as prod:
        await prod.send_event(EventData("p3"), partition_id="3")
        await prod.send_batch([EventData("p1a"), EventData("p1b")], partition_id="1")
        for _ in range(3):
            await prod.send_batch([EventData("k")], partition_key="user-42")
            await prod.send_event(EventData("k2"), partition_key="device-7")
    pid42 = partition_for_key("user-42", ["0", "1", "2", "3"])
    pid7 = partition_for_key("device-7", ["0", "1", "2", "3"])
    bodies = {p: [b"".join(m.data) for m in emulator.events(HUB, p)] for p in "0123"}
    assert b"p3" in bodies["3"]
    assert [b for b in bodies["1"] if b.startswith(b"p1")] == [b"p1a", b"p1b"]
    assert bodies[pid42].count(b"k") == 3
    assert bodies[pid7].count(b"k2") == 3
    assert sum(len(v) for v in bodies.values()) == 9

    events = await receive(emulator, 3, partition_id=pid42, starting_position="-1")
    keyed = [e for e in events if e.body_as_str() == "k"]
    assert keyed and all(e.partition_key == b"user-42" for e in keyed)  # the SDK hands back bytes
    stored = [m for m in emulator.events(HUB, pid42) if m.data == [b"k"]]
    assert [m.message_annotations["x-opt-partition-key"] for m in stored] == ["user-42"] * 3  # type: ignore[index]


async def test_starting_positions(emulator: EventHubsEmulator) -> None:
    async with producer(emulator) as prod:
        for i in range(10):
            await prod.send_event(EventData(f"e{i}"), partition_id="0")
    stored = emulator.events(HUB, "0")
    offsets = [m.message_annotations["x-opt-offset"] for m in stored]  # type: ignore[index]
    times = [int(m.message_annotations["x-opt-enqueued-time"]) for m in stored]  # type: ignore[index]

    async def seqs(n: int, position: Any, inclusive: bool) -> list[int]:
        events = await receive(
            emulator, n, partition_id="0", starting_position=position, starting_position_inclusive=inclusive
        )
        return [e.sequence_number for e in events[:n]]

    t = times[4]
    when = dt.datetime.fromtimestamp(t / 1000, dt.UTC)
    incl = [i for i, x in enumerate(times) if x >= t]
    excl = [i for i, x in enumerate(times) if x > t]
    exclusive_case = (len(excl), when, False, excl) if excl else (len(incl), when, True, incl)  # all in one ms
    cases: list[tuple[int, Any, bool, list[int]]] = [
        (10, "-1", False, list(range(10))),
        (7, 3, True, list(range(3, 10))),  # an int is a sequence number
        (6, 3, False, list(range(4, 10))),
        (5, offsets[5], True, list(range(5, 10))),  # a str is an offset
        (4, offsets[5], False, list(range(6, 10))),
        (len(incl), when, True, incl),  # a datetime is an enqueued time
        exclusive_case,
    ]
    results = await asyncio.gather(*(seqs(n, pos, inclusive) for n, pos, inclusive, _ in cases))
    assert results == [expected for *_, expected in cases]


async def test_latest_receives_only_new_events(emulator: EventHubsEmulator) -> None:
    async with producer(emulator) as prod:
        await prod.send_batch([EventData("old1"), EventData("old2")], partition_id="0")

        async def attached_then_send() -> None:
            await wait_for(lambda: emulator.active_consumers(HUB) == 1, "consumer attached")
            await prod.send_batch([EventData("new1"), EventData("new2")], partition_id="0")

        events = await receive(emulator, 2, partition_id="0", before_wait=attached_then_send)  # default @latest
    assert [e.body_as_str() for e in events] == ["new1", "new2"]
    assert [e.sequence_number for e in events] == [2, 3]


async def test_waiting_consumer_is_woken_and_credit_is_exact(emulator: EventHubsEmulator) -> None:
    # more events than the default prefetch (300): the client only re-grants credit at zero
    n = 700
    got: list[Any] = []
    client = consumer(emulator, "small", prefetch=50)

    async def on_event(ctx: Any, event: Any) -> None:
        got.append(event)

    task = asyncio.create_task(client.receive(on_event, starting_position="-1"))
    try:
        await wait_for(lambda: emulator.active_consumers("small") == 1, "consumer attached")
        async with producer(emulator, "small") as prod:
            for start in range(0, n, 100):
                await prod.send_batch([EventData(f"e{i}") for i in range(start, start + 100)])
        await wait_for(lambda: len(got) >= n, f"{n} events")
    finally:
        await client.close()
        await task
    assert [e.sequence_number for e in got] == list(range(n))


async def test_one_megabyte_event_and_batch(emulator: EventHubsEmulator) -> None:
    big = os.urandom(1_000_000)
    async with producer(emulator, "small") as prod:
        await prod.send_event(EventData(big))
        batch = await prod.create_batch()
        chunk = os.urandom(10_000)
        count = 0
        while True:
            try:
                batch.add(EventData(chunk))
            except ValueError:
                break
            count += 1
        assert batch.size_in_bytes > 900_000
        await prod.send_batch(batch)
    events = await receive(emulator, 1 + count, hub="small", starting_position="-1")
    assert b"".join(events[0].body) == big
    assert all(b"".join(e.body) == chunk for e in events[1:])
    assert len(events) == 1 + count


async def test_owner_level_stealing(emulator: EventHubsEmulator) -> None:
    async with producer(emulator, "small") as prod:
        await prod.send_batch([EventData("a"), EventData("b")])
    first: list[Any] = []
    errors: list[Exception] = []
    c1 = consumer(emulator, "small")

    async def on_event1(ctx: Any, event: Any) -> None:
        first.append(event)

    async def on_error(ctx: Any, error: Exception) -> None:
        errors.append(error)

    t1 = asyncio.create_task(
        c1.receive(on_event1, partition_id="0", owner_level=1, starting_position="-1", on_error=on_error)
    )
    try:
        await wait_for(lambda: len(first) >= 2, "first consumer's events")
        second = await receive(emulator, 2, hub="small", partition_id="0", owner_level=2, starting_position="-1")
        assert [e.body_as_str() for e in second] == ["a", "b"]
        await wait_for(lambda: any("stolen" in str(e) for e in errors), "link stolen error")
    finally:
        await c1.close()
        await t1


async def test_server_busy_is_retried(emulator: EventHubsEmulator) -> None:
    emulator.server_busy(1)
    async with producer(emulator, "small", retry_backoff_factor=0.05) as prod:
        await prod.send_event(EventData("after-busy"))
    assert emulator.pending_server_busy == 0  # the first attempt was rejected, the retry stored it
    assert [b"".join(m.data) for m in emulator.events("small", "0")] == [b"after-busy"]


async def test_detach_and_drop_recovery(emulator: EventHubsEmulator) -> None:
    async with producer(emulator, "small", retry_backoff_factor=0.05) as prod:
        await prod.send_event(EventData("one"))
        emulator.detach_links()
        await prod.send_event(EventData("two"))
        emulator.drop_connections()
        await prod.send_event(EventData("three"))
    events = await receive(emulator, 3, hub="small", starting_position="-1")
    assert [e.body_as_str() for e in events] == ["one", "two", "three"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_module_entry_point() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "segment_relay.testing.eventhubs", "--port", str(port), "--hub", "cli:2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert f"127.0.0.1:{port}" in line and "EntityPath=cli" in line
        async with EventHubProducerClient.from_connection_string(line.strip()) as prod:
            assert await prod.get_partition_ids() == ["0", "1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


async def test_retention_evicts_oldest_events() -> None:
    async with EventHubsEmulator({"r": 1}, retention=3) as emu:
        async with producer(emu, "r") as prod:
            await prod.send_batch([EventData(f"e{i}") for i in range(5)])
            props = await prod.get_partition_properties("0")
        assert props["beginning_sequence_number"] == 2
        assert props["last_enqueued_sequence_number"] == 4
        events = await receive(emu, 3, hub="r", starting_position="-1")
        assert [(e.sequence_number, e.body_as_str()) for e in events] == [(2, "e2"), (3, "e3"), (4, "e4")]


# --------------------------------------------------------------------------------------
# Runtime metrics (track_last_enqueued_event_properties)
# --------------------------------------------------------------------------------------


def test_hand_encoded_transfer_matches_the_codec() -> None:
    for handle, small_id, settled, more in [(0, 0, True, False), (1, 255, False, True), (300, 256, True, True)]:
        for delivery_id in (small_id, 0xFFFFFFFF):
            tag = struct.pack(">I", delivery_id)
            fast = transfer_performative(handle, delivery_id, tag, settled, more)
            generic = encode_value(
                composite(
                    "transfer",
                    handle=UInt(handle),
                    delivery_id=UInt(delivery_id),
                    delivery_tag=tag,
                    message_format=UInt(0),
                    settled=settled,
                    more=more,
                )
            )
            assert fast == generic


def test_runtime_metric_section_decodes_and_goes_after_the_header() -> None:
    section = runtime_metric_annotations(12345678901, 987654321098, 1_700_000_000_123, 1_700_000_000_456)
    for header in (None, {"durable": True, "ttl": UInt(60000)}):
        stored = encode_message(
            Message(header=header, message_annotations={"x-opt-offset": "7"}, data=[b"body"])
        )
        at = _header_end(stored)
        msg = decode_message(stored[:at] + section + stored[at:])
        if header is None:
            assert msg.header is None
        else:
            assert msg.header is not None and msg.header["durable"] is True and msg.header["ttl"] == 60000
        assert msg.message_annotations == {"x-opt-offset": "7"} and msg.data == [b"body"]
        da = msg.delivery_annotations
        assert da == {
            "last_enqueued_sequence_number": 12345678901,
            "last_enqueued_offset": "987654321098",
            "last_enqueued_time_utc": 1_700_000_000_123,
            "runtime_info_retrieval_time_utc": 1_700_000_000_456,
        }
        assert da is not None
        assert type(da["last_enqueued_sequence_number"]) is int  # the codec reads an AMQP long as int
        assert isinstance(da["last_enqueued_time_utc"], Timestamp)
        assert type(da["last_enqueued_offset"]) is str
        assert all(isinstance(k, Symbol) for k in da)


async def test_last_enqueued_event_properties(emulator: EventHubsEmulator) -> None:
    async with producer(emulator, "small") as prod:
        await prod.send_batch([EventData(f"e{i}") for i in range(10)])
    stored = emulator.events("small", "0")
    last_offset = stored[-1].message_annotations["x-opt-offset"]  # type: ignore[index]
    last_time = int(stored[-1].message_annotations["x-opt-enqueued-time"])  # type: ignore[index]

    seen: list[tuple[int, dict[str, Any] | None]] = []
    client = consumer(emulator, "small")

    async def on_event(ctx: Any, event: Any) -> None:
        seen.append((event.sequence_number, ctx.last_enqueued_event_properties))

    task = asyncio.create_task(
        client.receive(on_event, starting_position="-1", track_last_enqueued_event_properties=True)
    )
    try:
        await wait_for(lambda: len(seen) >= 10, "10 events")
    finally:
        await client.close()
        await task
    assert [seq for seq, _ in seen] == list(range(10))
    for _, props in seen:
        # the partition's state when the event was sent, not the event's own position
        assert props is not None
        assert props["sequence_number"] == 9
        assert props["offset"] == last_offset
        assert props["enqueued_time"] == dt.datetime.fromtimestamp(last_time / 1000, dt.UTC)
        assert props["retrieval_time"] >= props["enqueued_time"]

    # a link that did not ask gets no delivery-annotations
    plain: list[Any] = []
    client = consumer(emulator, "small")

    async def on_plain(ctx: Any, event: Any) -> None:
        plain.append(ctx.last_enqueued_event_properties)

    task = asyncio.create_task(client.receive(on_plain, starting_position="-1"))
    try:
        await wait_for(lambda: len(plain) >= 10, "10 events")
    finally:
        await client.close()
        await task
    assert plain[:10] == [None] * 10


async def test_last_enqueued_event_properties_follow_new_events(emulator: EventHubsEmulator) -> None:
    seen: list[dict[str, Any] | None] = []
    client = consumer(emulator, "small")

    async def on_event(ctx: Any, event: Any) -> None:
        seen.append(ctx.last_enqueued_event_properties)

    task = asyncio.create_task(client.receive(on_event, track_last_enqueued_event_properties=True))  # @latest
    try:
        await wait_for(lambda: emulator.active_consumers("small") == 1, "consumer attached")
        async with producer(emulator, "small") as prod:
            await prod.send_event(EventData("a"))
            await wait_for(lambda: len(seen) >= 1, "first event")
            await prod.send_event(EventData("b"))
            await wait_for(lambda: len(seen) >= 2, "second event")
    finally:
        await client.close()
        await task
    offsets = [m.message_annotations["x-opt-offset"] for m in emulator.events("small", "0")]  # type: ignore[index]
    assert [(p or {}).get("sequence_number") for p in seen] == [0, 1]
    assert [(p or {}).get("offset") for p in seen] == offsets


# --------------------------------------------------------------------------------------
# The peer's session incoming-window, seen from a raw AMQP client (our own codec)
# --------------------------------------------------------------------------------------


class RawClient:
    """A bare AMQP connection (no SASL) to drive session flow control by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader()
        self.queue: list[Frame] = []

    @classmethod
    async def connect(cls, emu: EventHubsEmulator, max_frame_size: int = 65536) -> RawClient:
        reader, writer = await asyncio.open_connection(emu.host, emu.port)
        client = cls(reader, writer)
        writer.write(AMQP_HEADER)
        client.send(composite("open", container_id="raw", max_frame_size=UInt(max_frame_size)))
        assert (await client.next()).name == "open"
        return client

    def send(self, perf: Described, channel: int = 0) -> None:
        self.writer.write(encode_frame(channel, perf))

    async def next(self) -> Frame:
        while not self.queue:
            data = await asyncio.wait_for(self.reader.read(65536), DEADLINE)
            assert data, "connection closed"
            self.queue.extend(f for f in self.frames.feed(data) if isinstance(f, Frame))
        return self.queue.pop(0)

    async def transfers(self, n: int) -> list[Frame]:
        out: list[Frame] = []
        while len(out) < n:
            frame = await self.next()
            assert frame.name == "transfer", frame.name
            out.append(frame)
        return out

    async def barrier(self, handle: int) -> None:
        """Attach and detach a spare link: the emulator answers inline, so any transfer it was
        free to send (one synchronous burst) comes before the reply."""
        cbs = composite("source", address="$cbs")
        self.send(composite("attach", name=f"b{handle}", handle=UInt(handle), role=True, source=cbs, target=cbs))
        frame = await self.next()
        assert frame.name == "attach", f"expected no transfer before the barrier, got {frame.name}"
        self.send(composite("detach", handle=UInt(handle), closed=True))
        assert (await self.next()).name == "detach"

    def window(self, next_incoming_id: int, incoming_window: int, **link: Any) -> None:
        self.send(
            composite(
                "flow",
                next_incoming_id=UInt(next_incoming_id),
                incoming_window=UInt(incoming_window),
                next_outgoing_id=UInt(0),
                outgoing_window=UInt(1000),
                **link,
            )
        )

    async def consume(self, emu: EventHubsEmulator, hub: str, window: int, credit: int) -> None:
        self.send(
            composite("begin", next_outgoing_id=UInt(0), incoming_window=UInt(window), outgoing_window=UInt(1000))
        )
        assert (await self.next()).name == "begin"
        source = composite(
            "source",
            address=f"amqps://{emu.host}:{emu.port}/{hub}/ConsumerGroups/$default/Partitions/0",
            filter={SELECTOR: Described(SELECTOR, "amqp.annotation.x-opt-offset > '-1'")},
        )
        self.send(
            composite(
                "attach", name="r", handle=UInt(0), role=True, source=source, target=composite("target", address="r")
            )
        )
        assert (await self.next()).name == "attach"
        self.window(0, window, handle=UInt(0), delivery_count=UInt(0), link_credit=UInt(credit))

    def close(self) -> None:
        self.writer.close()


async def test_session_window_limits_transfers(emulator: EventHubsEmulator) -> None:
    async with producer(emulator, "small") as prod:
        await prod.send_batch([EventData(f"e{i}") for i in range(10)])
    raw = await RawClient.connect(emulator)
    try:
        await raw.consume(emulator, "small", window=3, credit=10)  # credit for all, window for 3
        got = await raw.transfers(3)
        await raw.barrier(1)
        raw.window(3, 2)  # a session flow (no handle) opens the window by 2
        got += await raw.transfers(2)
        await raw.barrier(2)
        raw.window(5, 100)
        got += await raw.transfers(5)
    finally:
        raw.close()
    assert [f.fields["delivery_id"] for f in got] == list(range(10))
    assert [decode_message(f.payload).data for f in got] == [[f"e{i}".encode()] for i in range(10)]


async def test_session_window_pauses_inside_a_multi_frame_delivery(emulator: EventHubsEmulator) -> None:
    body = os.urandom(3000)
    async with producer(emulator, "small") as prod:
        await prod.send_event(EventData(body))
    raw = await RawClient.connect(emulator, max_frame_size=512)  # ~7 frames for one event
    try:
        await raw.consume(emulator, "small", window=1, credit=1)
        frames = await raw.transfers(1)
        while frames[-1].fields["more"]:
            await raw.barrier(1)  # one frame per window slot, even mid-delivery
            raw.window(len(frames), 1)
            frames += await raw.transfers(1)
    finally:
        raw.close()
    assert len(frames) > 5
    assert all(len(encode_frame(0, f.performative, f.payload)) <= 512 for f in frames)
    assert decode_message(b"".join(f.payload for f in frames)).data == [body]
