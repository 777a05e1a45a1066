"""segment-relay: Adobe Real-Time CDP segment exports in, clean enter/exit changes out."""

from .consumer.export import IdentityItem, SegmentStatus
from .consumer.membership import ChangeType
from .handlers.api import (
    Handler,
    HandlerRetry,
    PermanentHandlerError,
    Route,
    SegmentChange,
    on_change,
    on_enter,
    on_exit,
)

__version__ = "0.1.0"

__all__ = [
    "ChangeType",
    "Handler",
    "HandlerRetry",
    "IdentityItem",
    "PermanentHandlerError",
    "Route",
    "SegmentChange",
    "SegmentStatus",
    "on_change",
    "on_enter",
    "on_exit",
]
