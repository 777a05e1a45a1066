"""The Event Hubs emulator against the real, unmodified *sync* azure-eventhub clients.

The emulator runs on its own event loop in a background thread; the blocking ``receive`` /
``receive_batch`` calls run in another thread and end when the test calls ``close()``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient
from support import wait_for as wait_until

from segment_relay.testing.eventhubs.amqp import Message
from segment_relay.testing.eventhubs.server import EventHubsEmulator, partition_for_key

HUB = "hub1"
DEADLINE = 20.0
T = TypeVar("T")


class ThreadedEmulator:
    """An :class:`EventHubsEmulator` served by an event loop in a daemon thread."""

    def __init__(self, hubs: dict[str, int]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="eventhubs-emulator", daemon=True)
        self.emulator = EventHubsEmulator(hubs)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the emulator's loop (its state is only touched from there)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def events(self, hub: str, partition: str) -> list[Message]:
        return self.call(lambda: self.emulator.events(hub, partition))

    def connection_string(self, hub: str) -> str:
        return self.emulator.connection_string(hub)

    def __enter__(self) -> ThreadedEmulator:
        self.thread.start()
        self.run(self.emulator.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.emulator.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(DEADLINE)
            self.loop.close()


@pytest.fixture
def emulator() -> Iterator[ThreadedEmulator]:
    with ThreadedEmulator({HUB: 4, "small": 1}) as emu:
        yield emu


def producer(emu: ThreadedEmulator, hub: str = HUB) -> EventHubProducerClient:
    return EventHubProducerClient.from_connection_string(emu.connection_string(hub))


def consumer(emu: ThreadedEmulator, hub: str = HUB) -> EventHubConsumerClient:
    # A short load-balancing interval: receive() only returns after close() once its sleep ends.
    # A short socket timeout: the sync consumer hands prefetched events to the callback one per
    # do_work(), and each do_work() on a quiet link blocks for the socket timeout (about 3 x 0.2 s
    # per event by default), so draining a prefetched backlog is slow without it.
    return EventHubConsumerClient.from_connection_string(
        emu.connection_string(hub), consumer_group="$default", load_balancing_interval=0.2, socket_timeout=0.05
    )


wait_for = functools.partial(wait_until, timeout_s=DEADLINE)  # the shared helper, with this file's deadline


def run_receiver(
    client: EventHubConsumerClient, method: str, callback: Callable[..., None], n: Callable[[], int], want: int, **kw: Any
) -> None:
    """Run ``client.<method>(callback, **kw)`` in a thread until ``n() >= want``, then close it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            getattr(client, method)(callback, **kw)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"sdk-{method}", daemon=True)
    thread.start()
    try:
        wait_for(lambda: n() >= want or bool(errors), f"{want} events (got {n()})")
    finally:
        client.close()
        thread.join(DEADLINE)
    assert not thread.is_alive(), f"{method}() did not return after close()"
    assert not errors, errors


def receive(emu: ThreadedEmulator, want: int, hub: str = HUB, **kw: Any) -> list[Any]:
    got: list[Any] = []

    def on_event(ctx: Any, event: Any) -> None:
        if event is not None:
            got.append(event)

    run_receiver(consumer(emu, hub), "receive", on_event, lambda: len(got), want, **kw)
    return got


def test_sync_send_batch_and_event_round_trip(emulator: ThreadedEmulator) -> None:
    with producer(emulator) as prod:
        batch = prod.create_batch()
        for i in range(20):
            batch.add(EventData(f"b{i}"))
        prod.send_batch(batch)
        prod.send_batch([EventData(f"l{i}") for i in range(5)])  # a plain list works too
        for i in range(5):
            prod.send_event(EventData(f"s{i}"))
    events = receive(emulator, 30, starting_position="-1")
    expected = {f"b{i}" for i in range(20)} | {f"l{i}" for i in range(5)} | {f"s{i}" for i in range(5)}
    assert sorted(e.body_as_str() for e in events) == sorted(expected)
    assert all(isinstance(e.offset, str) and e.enqueued_time is not None for e in events)
    assert sum(len(emulator.events(HUB, p)) for p in "0123") == 30


def test_sync_receive_batch(emulator: ThreadedEmulator) -> None:
    with producer(emulator, "small") as prod:
        prod.send_batch([EventData(f"e{i}") for i in range(25)])
    got: list[Any] = []
    sizes: list[int] = []

    def on_batch(ctx: Any, events: list[Any]) -> None:
        sizes.append(len(events))
        got.extend(events)

    run_receiver(
        consumer(emulator, "small"), "receive_batch", on_batch, lambda: len(got), 25,
        max_batch_size=10, starting_position="-1",
    )
    assert [e.body_as_str() for e in got] == [f"e{i}" for i in range(25)]
    assert [e.sequence_number for e in got] == list(range(25))
    assert max(sizes) <= 10


def test_sync_properties(emulator: ThreadedEmulator) -> None:
    with producer(emulator) as prod:
        props = prod.get_eventhub_properties()
        assert props["eventhub_name"] == HUB
        assert props["partition_ids"] == ["0", "1", "2", "3"]
        assert isinstance(props["created_at"], dt.datetime)
        assert prod.get_partition_properties("1")["is_empty"] is True
        prod.send_batch([EventData("a"), EventData("b")], partition_id="1")
        part = prod.get_partition_properties("1")
        assert part["is_empty"] is False
        assert part["last_enqueued_sequence_number"] == 1
        assert part["last_enqueued_offset"] == emulator.events(HUB, "1")[-1].message_annotations["x-opt-offset"]  # type: ignore[index]
    with consumer(emulator) as cons:
        assert cons.get_partition_ids() == ["0", "1", "2", "3"]
        assert cons.get_partition_properties("1")["last_enqueued_sequence_number"] == 1


def test_sync_partition_key_lands_on_the_hashed_partition(emulator: ThreadedEmulator) -> None:
    pid = partition_for_key("order-1234", ["0", "1", "2", "3"])
    with producer(emulator) as prod:
        prod.send_batch([EventData(f"k{i}") for i in range(3)], partition_key="order-1234")
        batch = prod.create_batch(partition_key="order-1234")
        batch.add(EventData("k3"))
        prod.send_batch(batch)
    stored = {p: [b"".join(m.data) for m in emulator.events(HUB, p)] for p in "0123"}
    assert stored[pid] == [b"k0", b"k1", b"k2", b"k3"]
    assert sum(len(v) for v in stored.values()) == 4
    events = receive(emulator, 4, partition_id=pid, starting_position="-1")
    assert [e.body_as_str() for e in events] == ["k0", "k1", "k2", "k3"]
    assert all(e.partition_key == b"order-1234" for e in events)  # the SDK hands back bytes
