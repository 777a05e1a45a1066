"""segment-relay: Adobe Real-Time CDP segment exports in, clean enter/exit changes out."""

from .handlers.api import (
    BatchResult,
    Handler,
    HandlerContext,
    HandlerRetry,
    PermanentHandlerError,
    Route,
    on_change,
    on_enter,
    on_exit,
    on_merge,
)
from .model import ChangeType, IdentityItem, SegmentChange, SegmentStatus

__version__ = "0.1.0"

__all__ = [
    "BatchResult",
    "ChangeType",
    "Handler",
    "HandlerContext",
    "HandlerRetry",
    "IdentityItem",
    "PermanentHandlerError",
    "Route",
    "SegmentChange",
    "SegmentStatus",
    "on_change",
    "on_enter",
    "on_exit",
    "on_merge",
]
