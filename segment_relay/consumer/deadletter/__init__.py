"""Where records and changes that cannot be processed go, so nothing is silently lost.

``entries`` says what an entry holds; ``base`` what every dead letter does; ``file`` writes
to this host (a rotated JSONL file, stdout), ``objects`` to S3 or Azure Blob storage in batches.
"""

from __future__ import annotations

from .base import DeadLetter, LineDeadLetter
from .entries import encode_entry, raw_fields
from .file import JsonlDeadLetter, StdoutDeadLetter
from .memory import MemoryDeadLetter

__all__ = ["DeadLetter", "JsonlDeadLetter", "LineDeadLetter", "MemoryDeadLetter", "StdoutDeadLetter", "encode_entry",
           "raw_fields"]
