"""The dead letter's entries: what each kind holds, and one JSON line for any of them.

Every entry has ``kind`` (``invalid_record``, ``invalid_entry`` or ``failed_change``), ``reason``,
``detail``, ``partition``, ``position`` and ``at``; an invalid record carries the raw bytes (``raw``
as text, or ``raw_base64`` when they are not UTF-8); an invalid entry (one audience entry dropped
from a record that was processed without it) its ``path`` and the ``entry`` as it came; a failed
change carries the change, the ``handler`` and the number of ``attempts``.

Every entry can be written: a change that JSON cannot carry (attributes nested deeper than
orjson's limit, an integer past 64 bits) is written as a summary (every field of the change but
its attributes, which become ``{"not_encodable": why, "preview": a bounded repr}``) plus the
raw record it came from, so it can still be replayed. A dead letter that refused such an entry
would hold up its partition for ever.
"""

from __future__ import annotations

import base64
import hashlib
import reprlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from ...model import IdentityItem, SegmentChange
from ..export import LazyAttributes


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def raw_fields(raw: bytes) -> dict[str, str]:
    try:
        return {"raw": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(raw).decode("ascii")}


def invalid_record_entry(raw: bytes, *, reason: str, detail: str, partition: str, position: str) -> dict[str, Any]:
    return {"kind": "invalid_record", "reason": reason, "detail": detail,
            "partition": partition, "position": position, "at": _now(), **raw_fields(raw)}


def invalid_entry_entry(entry: Any, *, path: str, reason: str, detail: str, partition: str, position: str,
                        identities: Mapping[str, Sequence[IdentityItem]] | None = None) -> dict[str, Any]:
    found = {"kind": "invalid_entry", "reason": reason, "detail": detail, "path": path,
             "partition": partition, "position": position, "at": _now(), "entry": entry}
    if identities is not None:
        found["identities"] = {namespace: [item.to_dict() for item in items] for namespace, items in identities.items()}
    return found


def failed_change_entry(
    change: SegmentChange, *, handler: str, attempts: int, reason: str, detail: str, partition: str, position: str,
) -> dict[str, Any]:
    return {"kind": "failed_change", "reason": reason, "detail": detail, "handler": handler,
            "attempts": attempts, "partition": partition, "position": position, "at": _now(),
            "change": change}


_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxdict, _PREVIEW.maxlist, _PREVIEW.maxstring, _PREVIEW.maxother = 4, 12, 12, 120, 120
_PREVIEW_CHARS = 2_000


def _change_fields(change: SegmentChange) -> dict[str, Any]:
    try:
        return change.to_dict()
    except Exception as exc:  # noqa: BLE001 - e.g. attributes that cannot be decoded: summarise
        return _summary(change, exc)


def _unencodable(value: Any, error: BaseException) -> dict[str, str]:
    """What stands for a value JSON could not carry: why, and a bounded repr of its start."""
    try:
        preview = _PREVIEW.repr(value)[:_PREVIEW_CHARS]
    except Exception as exc:  # noqa: BLE001
        preview = f"<no preview: {type(exc).__name__}>"
    return {"not_encodable": f"{type(error).__name__}: {error}", "preview": preview}


def _summary(change: SegmentChange, error: BaseException) -> dict[str, Any]:
    """The change without its attributes, which JSON could not carry."""
    try:
        attributes: Any = dict(change.attributes)
    except Exception as exc:  # noqa: BLE001 - attributes that cannot even be decoded
        attributes = f"<not decodable: {type(exc).__name__}>"
    return {
        "change": change.change.value, "segment_id": change.segment_id, "segment_namespace": change.segment_namespace,
        "segment_name": change.segment_name, "profile_key": change.profile_key,
        "qualified_at": change.qualified_at.isoformat().replace("+00:00", "Z"), "status": change.status.value,
        "change_id": change.change_id,
        "identities": {namespace: [item.to_dict() for item in items] for namespace, items in change.identities.items()},
        "attributes": _unencodable(attributes, error),
        "source": {"partition": change.partition, "position": change.position},
    }


def encode_entry(entry: dict[str, Any]) -> bytes:
    """One JSON line for ``entry``, whatever it holds (see the module's docstring)."""
    change = entry.get("change")
    if not isinstance(change, SegmentChange):
        try:
            return orjson.dumps(entry) + b"\n"
        except (TypeError, orjson.JSONEncodeError) as exc:  # an audience entry nested too deep
            return orjson.dumps({**entry, "entry": _unencodable(entry.get("entry"), exc)}) + b"\n"
    fields = _change_fields(change)
    try:
        return orjson.dumps({**entry, "change": fields}) + b"\n"
    except (TypeError, orjson.JSONEncodeError) as exc:
        record = change.attributes.record if isinstance(change.attributes, LazyAttributes) else None
        summarised = {**entry, "change": _summary(change, exc)}
        if record is not None:
            summarised.update(raw_fields(record))
        return orjson.dumps(summarised) + b"\n"


def entry_identity(entry: Mapping[str, Any]) -> str:
    """What makes an entry the same one when a record is processed again (after a crash, by the
    partition's next owner): its kind, partition and position, and what it is about, never when or
    why it was written. ``entry`` is one being stored or one read back from a sink."""
    kind = entry.get("kind")
    if kind == "failed_change":
        change = entry.get("change")
        change_id = change.change_id if isinstance(change, SegmentChange) else (change or {}).get("change_id")
        about = f"{entry.get('handler')}|{change_id}"
    elif kind == "invalid_entry":
        about = f"{entry.get('path')}|{_digest(entry.get('entry'))}"
    else:  # the record itself: the same position of a rewritten file is not the same record
        about = _digest(entry.get("raw", entry.get("raw_base64")))
    return f"{kind}|{entry.get('partition')}|{entry.get('position')}|{about}"


def _digest(value: Any) -> str:
    try:
        data = value.encode() if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        data = repr(value).encode()
    return hashlib.blake2b(data, digest_size=12).hexdigest()
