"""Process logging: one JSON object per line on stderr, with secrets redacted and values bounded.

stdout is reserved for the ``log`` handler's change lines, so logging always goes to stderr
unless a stream is passed explicitly.

JSON line fields: ``ts`` (ISO-8601 UTC, ``Z``), ``level``, ``logger``, ``msg``, every field the
caller passed with ``extra={...}``, ``exc`` (formatted traceback) and ``stack`` when present.
An extra field whose name collides with one of those gets an ``extra_`` prefix. Values that
are not JSON-serialisable are ``str()``'d.

Every record that reaches the relay's handler, its own or a library's (botocore, azure, aiohttp
at DEBUG), is cleaned first: the secrets the configuration names, and anything shaped like a
secret whoever logged it (request signing headers and signatures, bearer and session tokens, SAS
signatures, account and shared access keys, passwords in URLs), become ``***``; then every value
is cut to a bounded length (a record's fields can be megabytes: an export, a response body).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

import orjson

__all__ = ["JsonFormatter", "SecretRedactingFilter", "TextFormatter", "bound", "configure_logging", "redact",
           "redact_shapes"]

REDACTED = "***"
MIN_SECRET_LEN = 4  # shorter "secrets" would redact ordinary text
MAX_VALUE_CHARS = 2_000  # an extra field's string (the start and the end are kept)
MAX_MESSAGE_CHARS = 8_000  # the message
MAX_TRACE_CHARS = 16_000  # a traceback or stack

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_CORE_FIELDS = ("ts", "level", "logger", "msg", "exc", "stack")
_HANDLER_MARK = "_segment_relay_handler"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


# --- redaction ------------------------------------------------------------------
def _pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    usable = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}
    if not usable:
        return None
    # Longest first, so a secret that contains another is replaced whole.
    return re.compile("|".join(re.escape(s) for s in sorted(usable, key=len, reverse=True)))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (len >= 4) replaced by ``***``."""
    pattern = _pattern(secrets)
    return text if pattern is None else pattern.sub(REDACTED, text)


# Secret shapes, whoever logs them: the name is kept, the value becomes ***.
_HEADERS_WHOLE = r"authorization|proxy-authorization|x-amz-security-token|x-ms-authorization-auxiliary"
_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    # A quoted header value, spaces included: botocore's {'X-Amz-Security-Token': b'...', 'Authorization': b'AWS4-...'}
    (re.compile(rf"""(?i)(['"]?\b(?:{_HEADERS_WHOLE})['"]?\s*[:=]\s*b?(['"]))(.*?)(\2)"""), rf"\1{REDACTED}\4"),
    # An unquoted one, to the end of its line: "Authorization: Bearer ..." in a raw request
    (re.compile(rf"(?im)^(\s*(?:{_HEADERS_WHOLE})\s*:[ \t]*)(\S.*)$"), rf"\1{REDACTED}"),
    # name=value / name: value, the value up to a delimiter: signatures (SigV4, SAS sig=), session
    # tokens in canonical requests and query strings, connection string keys, OAuth secrets and tokens
    (re.compile(r"""(?i)(\b(?:x-amz-security-token|x-amz-signature|x-amz-credential|signature|sig|sharedaccesskey|"""
                r"""accountkey|client_secret|access_token|refresh_token|id_token|password|api[-_]?key)\b['"]?"""
                r"""\s*[=:]\s*b?['"]?)([^\s'",;&}\]]+)"""), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1{REDACTED}"),
    # scheme://user:password@host
    (re.compile(r"""(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@'"]*:)([^@\s/'"]+)(@)"""), rf"\1{REDACTED}\3"),
)


def redact_shapes(text: str) -> str:
    """``text`` with every value shaped like a secret replaced by ``***`` (see _SHAPES)."""
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def bound(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and its end (where a
    traceback says what went wrong)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…[{len(text) - 2 * half} chars cut]…{text[-half:]}"


class SecretRedactingFilter(logging.Filter):
    """Replaces secrets in the message, extra fields, traceback and stack text with ``***``, and
    bounds their length (see the module's docstring).

    Install it on a handler (``configure_logging`` does), not on a logger: logger filters
    don't see records propagated from child loggers. The record is cleaned in place, so
    handlers that run after this one see the cleaned record too.

    Extra fields: strings are cleaned, including inside dicts/lists/tuples/sets; any other
    value whose ``str()`` contains a secret, or is too long, is replaced by its cleaned ``str()``.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._pattern = _pattern(secrets)

    def _redact(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        return redact_shapes(text)

    def _clean(self, text: str, limit: int = MAX_VALUE_CHARS) -> str:
        return bound(self._redact(text), limit)

    def _clean_value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self._clean(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if depth < 8:
            if isinstance(value, dict):
                return {self._clean_value(k, depth + 1): self._clean_value(v, depth + 1) for k, v in value.items()}
            if type(value) in (list, tuple, set, frozenset):
                return type(value)(self._clean_value(v, depth + 1) for v in value)
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
                return type(value)(*(self._clean_value(v, depth + 1) for v in value))
        try:
            text = str(value)
        except Exception:
            return object.__repr__(value)
        cleaned = self._clean(text)
        return value if cleaned == text else cleaned

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad format args: let the handler report it as usual
            return True
        record.msg = self._clean(message, MAX_MESSAGE_CHARS)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text, MAX_TRACE_CHARS)
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info, MAX_TRACE_CHARS)
        for key, value in _extras(record).items():
            setattr(record, key, self._clean_value(value))
        return True


# --- formatting -----------------------------------------------------------------
def _iso_utc(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _default(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return object.__repr__(value)


def _dumps(payload: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(payload, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        # e.g. ints beyond 64 bits or circular references: degrade field by field.
        safe: dict[str, Any] = {}
        for key, value in payload.items():
            try:
                orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)
                safe[key] = value
            except (TypeError, orjson.JSONEncodeError):
                safe[key] = _default(value)
        return orjson.dumps(safe, default=_default, option=orjson.OPT_NON_STR_KEYS)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            payload[f"extra_{key}" if key in _CORE_FIELDS else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return _dumps(payload).decode()


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs; extra fields are appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        first, sep, rest = line.partition("\n")
        fields = " ".join(f"{k}={_default(v)}" for k, v in extras.items())
        return f"{first} {fields}{sep}{rest}"


_CHATTY_LIBRARIES = ("azure", "botocore", "aiobotocore", "urllib3")


def configure_logging(
    level: str | int = "INFO",
    *,
    stream: IO[str] | None = None,
    json: bool = True,
    secrets: Iterable[str] = (),
) -> None:
    """Send root logging to ``stream`` (default: stderr) as JSON lines (or text).

    Calling it again replaces the handler installed by the previous call; handlers installed
    by anything else (e.g. pytest's capture) are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(SecretRedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # The cloud SDKs log every connection, link and HTTP request at INFO: the relay's own
    # lines say what matters. Their detail comes back with DEBUG.
    library_level = logging.NOTSET if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
