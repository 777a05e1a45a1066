"""The switches tests pull: injected error responses, added latency, denied permissions, and the
record of every request (with credentials redacted)."""

from __future__ import annotations

import random as random_module
import re
from dataclasses import dataclass, field
from typing import Any

from .catalog import SECRET_KEYS
from .patch import PatchError, parse_pointer

__all__ = ["Fault", "Latency", "Faults", "RecordedRequest", "redact", "required_permissions", "PERMISSIONS",
           "REDACTED"]

REDACTED = "<redacted>"

# The AEP permission names involved (notes §1.2: connecting needs View + Manage Destinations;
# activating needs View Destinations, Activate Destinations, View Profiles and View Segments).
PERMISSIONS = ("View Destinations", "Manage Destinations", "Activate Destinations", "View Profiles", "View Segments")


def _matcher(method: str | None, path: str | None) -> tuple[str | None, re.Pattern[str] | None]:
    return (method.upper() if method else None), (re.compile(path) if path else None)


@dataclass
class Fault:
    """Answer the next ``remaining`` matching requests with ``status`` instead of handling them."""

    status: int
    remaining: int
    method: str | None = None
    path: str | None = None  # a regular expression searched in the request path
    retry_after: float | None = None  # seconds, sent as Retry-After (429 and 503)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        wanted_method, pattern = _matcher(self.method, self.path)
        return (self.remaining > 0 and (wanted_method is None or wanted_method == method)
                and (pattern is None or pattern.search(path) is not None))


@dataclass
class Latency:
    """Delay matching requests by ``seconds`` (``remaining`` None: forever). ``answer_only``: the
    request is carried out at once and only its answer is late, which is how a write that times
    out looks from the client (it was done; the client cannot know)."""

    seconds: float
    method: str | None = None
    path: str | None = None
    remaining: int | None = None
    answer_only: bool = False

    def matches(self, method: str, path: str) -> bool:
        wanted_method, pattern = _matcher(self.method, self.path)
        return ((self.remaining is None or self.remaining > 0) and (wanted_method is None or wanted_method == method)
                and (pattern is None or pattern.search(path) is not None))


@dataclass
class Faults:
    faults: list[Fault] = field(default_factory=list)
    latencies: list[Latency] = field(default_factory=list)
    throttle_rate: float = 0.0  # the share of platform calls (/data/...) that answer 429 on their own
    random: random_module.Random = field(default_factory=random_module.Random)
    throttled: int = 0

    def take(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                fault.hits += 1
                return fault
        if self.throttle_rate > 0 and path.startswith("/data/") and self.random.random() < self.throttle_rate:
            self.throttled += 1
            return Fault(429, 0, retry_after=0)
        return None

    def delay(self, method: str, path: str) -> tuple[float, float]:
        """Seconds to wait before handling a request, and after it before answering."""
        before = after = 0.0
        for latency in self.latencies:
            if latency.matches(method, path):
                if latency.remaining is not None:
                    latency.remaining -= 1
                if latency.answer_only:
                    after += latency.seconds
                else:
                    before += latency.seconds
        return before, after

    def clear(self) -> None:
        self.faults.clear()
        self.latencies.clear()

    @property
    def pending(self) -> int:
        return sum(f.remaining for f in self.faults)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake answered, as a test may assert on it. Credentials are redacted."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: dict[str, str]
    body: Any  # parsed JSON, the form as a dict (IMS), raw text, or None
    status: int
    response: Any  # parsed JSON or None
    response_headers: dict[str, str]
    request_id: str
    at: float

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


def redact(value: Any) -> Any:
    """A copy with every credential replaced: known secret keys, and JSON Patch values aimed at them."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        target = value.get("path")
        secret_target = False
        if isinstance(target, str) and "op" in value:
            try:
                tokens = parse_pointer(target)
                secret_target = bool(tokens) and tokens[-1] in SECRET_KEYS
            except PatchError:
                pass
        for key, item in value.items():
            if key in SECRET_KEYS or (secret_target and key == "value"):
                out[key] = REDACTED
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def redact_headers(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.items():
        if key.lower() == "authorization":
            out[key] = "Bearer " + REDACTED if value.lower().startswith("bearer ") else REDACTED
        else:
            out[key] = value
    return out


_FLOW_WRITE_ACTIVATION = ("View Destinations", "Activate Destinations", "View Profiles", "View Segments")


def required_permissions(method: str, family: str, path: str) -> tuple[str, ...]:
    """What AEP permissions a call needs (the first one missing is named in the 403)."""
    if family == "segmentation":
        return ("View Segments",)
    if family != "flow":
        return ()
    if method == "GET":
        return ("View Destinations",)
    parts = [p for p in path.split("/") if p]
    resource = parts[3] if len(parts) > 3 else ""
    if resource == "flows":
        if method == "DELETE" or (len(parts) > 5 and parts[5] == "action"):
            return ("View Destinations", "Activate Destinations")
        return _FLOW_WRITE_ACTIVATION
    return ("View Destinations", "Manage Destinations")
