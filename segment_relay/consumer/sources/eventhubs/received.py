"""Received events without the SDK's ``EventData``.

For each message it receives, azure-eventhub builds an ``EventData`` and with it an
``AmqpAnnotatedMessage``, which copies the message's header, properties and annotations into
objects of their own; reading ``sequence_number``, ``offset`` and ``body`` then goes through
those. The relay reads four fields of each event, so that is about 12 to 18 µs of CPU per event
on this project's machines, a sixth of everything the relay spends on an event.
``ReceivedEvent`` reads those fields straight from the AMQP message instead.

This leans on the SDK's internals (its pyamqp transport's ``Message``, a consumer's
``_message_buffer``, ``_next_message_in_buffer`` and ``_last_received_event``), so it is applied
only when they are what this module expects, and never with tracing on (the SDK's tracing reads
each event's properties); otherwise the SDK's own ``EventData`` is used as it is. azure-eventhub
is pinned, and ``tests/test_eventhubs_source.py`` checks field by field that the two agree for
events received from the emulator, so an SDK upgrade that changes any of this fails a test.
"""

from __future__ import annotations

import functools
import logging
import types
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

_SEQUENCE = b"x-opt-sequence-number"
_OFFSET = b"x-opt-offset"
_ENQUEUED = b"x-opt-enqueued-time"


class ReceivedEvent:
    """One received event: what the relay reads of it, as ``EventData`` would give it."""

    __slots__ = ("_annotations", "message", "sequence_number")

    def __init__(self, message: Any) -> None:
        self.message = message
        self._annotations = message.message_annotations or {}
        self.sequence_number: int | None = self._annotations.get(_SEQUENCE)

    @property
    def offset(self) -> str | None:  # the SDK reconnects from the last event's offset
        try:
            return str(self._annotations[_OFFSET].decode("UTF-8"))
        except (KeyError, AttributeError):
            return None

    @property
    def enqueued_time(self) -> datetime | None:
        from azure.eventhub._utils import utc_from_timestamp  # the SDK's own conversion, its sentinel included

        timestamp = self._annotations.get(_ENQUEUED)
        return utc_from_timestamp(float(timestamp) / 1000) if timestamp else None  # type: ignore[no-any-return]

    def body_bytes(self) -> bytes | None:
        """The data sections joined (how Adobe sends its JSON); None for another kind of body."""
        data = self.message.data
        return b"".join(data) if data is not None else None

    def as_event_data(self) -> Any:
        """The SDK's own ``EventData`` for this message (for a body that is not data sections)."""
        from azure.eventhub import EventData

        return EventData._from_message(self.message)  # noqa: SLF001 - what the SDK itself calls


def _next_received_event(consumer: Any) -> ReceivedEvent:
    """Stands in for the SDK consumer's ``_next_message_in_buffer``."""
    event = ReceivedEvent(consumer._message_buffer.popleft())  # noqa: SLF001
    consumer._last_received_event = event  # noqa: SLF001 - read when the SDK reconnects (its offset)
    return event


def receive_light_events(consumer: Any) -> bool:
    """Make ``consumer`` (the SDK's aio ``EventHubConsumer``) hand over ``ReceivedEvent`` objects,
    if its internals are what this module expects and tracing is off. Returns whether it does."""
    from azure.eventhub._tracing import is_tracing_enabled

    transport = getattr(consumer, "_amqp_transport", None)
    usable = (getattr(transport, "KIND", None) == "pyamqp" and hasattr(consumer, "_message_buffer")
              and callable(getattr(consumer, "_next_message_in_buffer", None)) and not is_tracing_enabled())
    if usable:
        consumer._next_message_in_buffer = types.MethodType(_next_received_event, consumer)  # noqa: SLF001
    else:
        log.debug("using the SDK's EventData for received events")
    return usable


@functools.cache
def light_consumer_client(base: type) -> Any:
    """A subclass of the SDK's ``EventHubConsumerClient`` whose partition consumers hand over
    ``ReceivedEvent`` objects."""

    class LightConsumerClient(base):  # type: ignore[misc, valid-type]
        def _create_consumer(self, *args: Any, **kwargs: Any) -> Any:
            consumer = super()._create_consumer(*args, **kwargs)
            receive_light_events(consumer)
            return consumer

    return LightConsumerClient
