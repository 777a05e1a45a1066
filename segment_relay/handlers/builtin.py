"""The handlers that ship with the relay: ``log``, ``jsonl`` and ``webhook``.

All three send ``SegmentChange.to_dict()``, so a change looks the same on stdout,
in a file and in an HTTP body. ``log`` and ``jsonl`` take batches (one write per batch);
``webhook`` posts one change per request, or arrays of them with ``webhook:URL#batch=N``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from ..model import ChangeType
from .api import BatchResult, Handler, HandlerRetry, PermanentHandlerError, Route, SegmentChange

#: The log and jsonl handlers write every change, merges included (they are a record of what happened).
_EVERY_CHANGE = (Route(frozenset(ChangeType)),)

__all__ = ["LogHandler", "JsonlHandler", "WebhookBatchHandler", "WebhookHandler", "redact_url", "parse_retry_after"]


def encode_change(change: SegmentChange) -> bytes:
    """``change.to_dict()`` as JSON. A change that JSON cannot carry (attributes nested deeper
    than orjson's 255 levels, an integer past 64 bits) is refused for good: PermanentHandlerError,
    so that it goes to the dead letter instead of being tried again and again."""
    try:
        return orjson.dumps(change.to_dict())
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise PermanentHandlerError(f"change {change.change_id} cannot be encoded as JSON: {exc}") from None


def _encode_all(changes: Sequence[SegmentChange]) -> tuple[list[bytes], list[SegmentChange], BatchResult | None]:
    """Each change encoded on its own, so one that cannot be does not fail the others: the
    encoded ones, their changes, and the refused ones as a BatchResult (None if there are none)."""
    dumps = orjson.dumps
    try:
        return [dumps(change.to_dict()) for change in changes], list(changes), None
    except (TypeError, orjson.JSONEncodeError):
        pass  # rare: find which
    encoded: list[bytes] = []
    kept: list[SegmentChange] = []
    refused = BatchResult()
    for change in changes:
        try:
            encoded.append(encode_change(change))
            kept.append(change)
        except PermanentHandlerError as exc:
            refused.fail(change, exc)
    return encoded, kept, refused


def _lines(changes: Sequence[SegmentChange]) -> tuple[bytes, BatchResult | None]:
    encoded, _, refused = _encode_all(changes)
    return b"".join([line + b"\n" for line in encoded]), refused


def _raise_refused(change: SegmentChange, refused: BatchResult | None) -> None:
    """What a single-change ``handle`` raises for a change its batch path refused."""
    if refused is not None:
        raise refused.failures[change.change_id]


class LogHandler(Handler):
    """Writes one JSON line per change to stdout: the zero-configuration way to see what the relay does."""

    name = "log"
    routes = _EVERY_CHANGE

    def __init__(self, stream: IO[bytes] | None = None, *, name: str | None = None) -> None:
        # None means "whatever sys.stdout is at write time", so redirection (and test capture) keeps working.
        self._stream = stream
        if name:
            self.name = name

    @property
    def description(self) -> str:
        return "one JSON line per change on stdout"

    def __repr__(self) -> str:
        return "LogHandler()" if self._stream is None else f"LogHandler({self._stream!r})"

    def _target(self) -> IO[bytes]:
        if self._stream is not None:
            return self._stream
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:  # a text-only stdout replacement: write text
            return cast(IO[bytes], _TextAsBinary(sys.stdout))
        return buffer

    async def handle(self, change: SegmentChange) -> None:
        self._target().write(encode_change(change) + b"\n")

    async def handle_batch(self, changes: Sequence[SegmentChange]) -> BatchResult | None:
        lines, refused = _lines(changes)
        self._target().write(lines)
        return refused

    async def flush(self) -> None:
        """Push buffered lines out before a checkpoint, so a reader of the pipe is never behind it."""
        self._target().flush()

    async def close(self) -> None:
        await self.flush()  # never close stdout: it is not ours


class _TextAsBinary:
    """Minimal binary facade over a text stream that has no ``.buffer``."""

    def __init__(self, text: IO[str]) -> None:
        self._text = text

    def write(self, data: bytes) -> int:
        return self._text.write(data.decode("utf-8"))

    def flush(self) -> None:
        self._text.flush()


class JsonlHandler(Handler):
    """Appends one JSON object per change to a file.

    Each line is handed to the OS when ``handle`` returns (an unbuffered write), so a killed
    process loses nothing it reported as handled, even if membership state was committed
    after it; ``flush`` fsyncs before each checkpoint, for a machine that goes down."""

    name = "jsonl"
    routes = _EVERY_CHANGE

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        if not str(path):
            raise ValueError("jsonl handler needs a file path")
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._regular = True  # a regular file is fsynced; a pipe or a device (/dev/stdout) cannot be
        self.count = 0
        if name:
            self.name = name

    @property
    def description(self) -> str:
        return f"append JSON lines to {self.path}"

    def __repr__(self) -> str:
        return f"JsonlHandler({str(self.path)!r})"

    async def start(self) -> None:
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open until close()
        try:
            self._regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
            if self._regular and file.tell() > 0 and not _ends_with_newline(self.path):
                # A crash mid-line left a torn last line: start ours on a fresh line so only that one is bad.
                file.write(b"\n")
        except BaseException:
            file.close()
            raise
        self._file = file

    async def handle(self, change: SegmentChange) -> None:
        _raise_refused(change, await self.handle_batch((change,)))

    async def handle_batch(self, changes: Sequence[SegmentChange]) -> BatchResult | None:
        """One write for the whole batch, handed to the OS before this returns."""
        if self._file is None:
            raise RuntimeError(f"{self!r} is not started: await start() before handle()")
        lines, refused = _lines(changes)
        data = memoryview(lines)
        while data:  # a raw write may take less than everything (a signal, a nearly full disk)
            written = self._file.write(data)
            data = data[written or 0:]
        self.count += len(changes) - (len(refused.failures) if refused is not None else 0)
        return refused

    async def flush(self) -> None:
        """fsync: the relay checkpoints right after this returns."""
        if self._file is None or not self._regular:
            return
        await asyncio.to_thread(os.fsync, self._file.fileno())

    async def close(self) -> None:
        if self._file is None:
            return
        try:
            await self.flush()
        finally:
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as existing:
        existing.seek(-1, os.SEEK_END)
        return existing.read(1) == b"\n"


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…`` without userinfo, path, query or fragment, for logs and errors.

    Webhook URLs often carry their credentials (a password, ``?sig=...&code=...``, or a token
    in the path as Slack- and Zapier-style hooks do), so the relay never prints a URL any other
    way. A removed path shows as ``/…`` and a removed query as ``?…``. When the URL
    is too malformed to tell the host from the userinfo, only the scheme is kept.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        return "<unparseable URL>"
    scheme = parts.scheme if re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme) else ""
    if not parts.netloc:
        # "host/x", "user:pw@host", "https:/x": without "//" we cannot tell a secret from a host.
        return f"{scheme}:…" if scheme in ("http", "https") else "<not an absolute http(s) URL>"
    if "@" in parts.path:
        # An unescaped "/" in a password splits the userinfo into netloc and path: show neither.
        return f"{scheme}://…"
    host = parts.netloc.rpartition("@")[2]
    redacted = f"{scheme}://{host}" + ("/…" if parts.path not in ("", "/") else parts.path)
    if parts.query:
        redacted += "?…"
    return redacted


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # older Pythons return None instead of raising
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322 says UTC with unknown origin
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


class WebhookHandler(Handler):
    """POSTs each change as JSON to a URL, with ``Idempotency-Key: <change_id>`` so the receiver can
    drop the duplicates that at-least-once delivery produces.

    429 and 5xx ask the router to retry (honouring Retry-After); other 4xx go straight to the
    dead letter. Redirects are not followed: a POST silently turned into a GET would look like success.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            # ValueError's own text may quote the URL: never show it.
            raise ValueError(f"webhook URL {shown} is not a valid URL (bad host or port)") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"webhook URL {shown} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"webhook URL {shown} has no host")
        if not timeout_s > 0:
            raise ValueError(f"webhook timeout_s must be > 0, got {timeout_s!r}")
        self._headers = dict(headers or {})
        if (parts.username or parts.password) and any(k.lower() == "authorization" for k in self._headers):
            raise ValueError(
                f"webhook URL {shown} carries credentials and an Authorization header is also set: use one"
            )
        # Send the URL exactly as configured (signed query strings break when re-encoded); let yarl
        # encode only a URL that is not already valid ASCII without spaces.
        self._url = URL(url, encoded=True) if re.fullmatch(r"[!-~]+", url) else URL(url)
        self._shown = shown
        self.timeout_s = float(timeout_s)
        self._session: aiohttp.ClientSession | None = None
        if name:
            self.name = name

    @property
    def url(self) -> str:
        """The redacted URL: safe to print. The real one is deliberately not exposed."""
        return self._shown

    @property
    def description(self) -> str:
        return f"POST JSON to {self._shown}"

    def __repr__(self) -> str:
        return f"WebhookHandler({self._shown!r})"

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def handle(self, change: SegmentChange) -> None:
        status, retry_after, _ = await self._post(encode_change(change), change.change_id)
        self._judge(status, retry_after)

    async def _post(self, body: bytes, idempotency_key: str) -> tuple[int, str | None, bytes]:
        session = self._session
        if session is None:
            raise RuntimeError(f"{self!r} is not started: await start() before handle()")
        headers = {**self._headers, "Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        try:
            async with session.post(self._url, data=body, headers=headers, allow_redirects=False) as response:
                # Read it all, so the connection can be reused (and a batch answer can name failures).
                return response.status, response.headers.get("Retry-After"), await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # aiohttp's own messages may quote the full URL: describe the failure without it.
            raise HandlerRetry(f"POST {self._shown} failed: {_describe_transport_error(exc)}") from None

    def _judge(self, status: int, retry_after: str | None) -> None:
        """Raise what a non-2xx status means (for the whole request)."""
        if 200 <= status < 300:
            return
        if status in (408, 429) or 500 <= status < 600:
            after = parse_retry_after(retry_after)
            hint = f", Retry-After {after:g}s" if after is not None else ""
            raise HandlerRetry(f"POST {self._shown} answered HTTP {status}{hint}", after=after)
        if 300 <= status < 400:
            raise PermanentHandlerError(
                f"POST {self._shown} answered HTTP {status} (redirect): configure the final URL"
            )
        raise PermanentHandlerError(f"POST {self._shown} answered HTTP {status}")

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class WebhookBatchHandler(WebhookHandler):
    """POSTs arrays of up to ``batch`` changes (``webhook:URL#batch=N``): one JSON array of
    ``to_dict()`` objects per request, with ``Idempotency-Key`` a hash of the change ids.

    The whole request succeeds or fails as the single-change webhook does (429/5xx retried with
    Retry-After, other 4xx permanent: the relay then splits the array to find the change that is
    refused). A 2xx answer may name failures with a JSON object ``{"failed": [change_id, ...],
    "rejected": [change_id, ...]}``: ``failed`` ones are retried, ``rejected`` ones go to the dead
    letter, every other change of the array is done."""

    def __init__(self, url: str, *, batch: int, **options: Any) -> None:
        super().__init__(url, **options)
        if batch < 1:
            raise ValueError(f"webhook batch size must be at least 1, got {batch}")
        self.batch_max_changes = batch

    @property
    def description(self) -> str:
        return f"POST JSON arrays of up to {self.batch_max_changes} changes to {self._shown}"

    async def handle_batch(self, changes: Sequence[SegmentChange]) -> BatchResult | None:
        encoded, kept, refused = _encode_all(changes)
        if not kept:
            return refused
        key = hashlib.sha256("\x1f".join(change.change_id for change in kept).encode()).hexdigest()[:32]
        status, retry_after, answer = await self._post(b"[" + b",".join(encoded) + b"]", key)
        self._judge(status, retry_after)
        reported = self._failures(answer, kept)
        if refused is None:
            return reported
        if reported is not None:
            refused.failures.update(reported.failures)
        return refused

    def _failures(self, answer: bytes, changes: Sequence[SegmentChange]) -> BatchResult | None:
        try:
            parsed = orjson.loads(answer) if answer.strip() else None
        except orjson.JSONDecodeError:
            return None  # any 2xx body that is not such an object means: all done
        if not isinstance(parsed, dict):
            return None
        result = BatchResult()
        by_id = {change.change_id: change for change in changes}
        for field, error in (("failed", None), ("rejected", PermanentHandlerError)):
            for change_id in parsed.get(field) or ():
                change = by_id.get(change_id) if isinstance(change_id, str) else None
                if change is not None:
                    reason = f"POST {self._shown}: the receiver reported change {change_id} as {field}"
                    result.fail(change, error(reason) if error is not None else HandlerRetry(reason))
        return result if result.failures else None


def _describe_transport_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    os_error = getattr(exc, "os_error", None)  # ClientConnectorError keeps the socket error here
    strerror = getattr(os_error if os_error is not None else exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        return f"{type(exc).__name__} ({strerror})"
    return type(exc).__name__
