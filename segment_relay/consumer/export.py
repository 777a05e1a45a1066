"""The export payload model: bytes from the stream -> ProfileExport, or InvalidRecord.

Adobe writes one JSON document per profile snapshot. Only two keys matter to the
diff (``identityMap`` and ``segmentMembership``); everything else is a profile
attribute that is kept as-is and handed to handlers untouched.

Two paths, one answer. Almost every record is well formed, so msgspec decodes it straight into
typed values in one C pass (``_fast_export``): the two keys the relay reads are validated and
built, and everything else is only skipped over. The attributes are decoded later, and only if
a change of the record needs them (most records change nothing: they are re-exports). A record
msgspec refuses goes to the reference path: orjson and the pydantic model (``_validate_body``),
which decide, drop the malformed identities, and name the JSON path of what is wrong. The fast
path accepts only what the model accepts, with the same result; tests hold the two to that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, NotRequired

import msgspec
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict on 3.11

from ..model import IdentityItem, SegmentStatus
from .stored import SegmentKey

__all__ = [
    "IdentityItem",
    "InvalidEntry",
    "InvalidReason",
    "InvalidRecord",
    "ProfileExport",
    "SegmentEntry",
    "SegmentStatus",
    "export_from_document",
    "parse_export",
    "qualification_time",
    "to_epoch_us",
]

log = logging.getLogger(__name__)

# Bounds that make (profile key, namespace, segment) fit every store's key (DynamoDB refuses
# longer keys, forever): identity ids up to 1 KiB (see IdentityItem), namespaces and segment ids
# up to 256 characters.
MAX_IDENTITY_ID = 1024
MAX_NAME = 256


class InvalidReason(StrEnum):
    """Why a record was rejected; stable codes for metrics and the dead letter."""

    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    NO_IDENTITY = "no_identity"
    UNKNOWN_STATUS = "unknown_status"
    BAD_QUALIFICATION_TIME = "bad_qualification_time"
    BAD_SHAPE = "bad_shape"


class InvalidRecord(ValueError):
    """A record that cannot be processed; ``reason`` is a code, ``detail`` says exactly what is wrong."""

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidEntry(msgspec.Struct, frozen=True):
    """One malformed audience entry, dropped from a record whose other entries are processed.
    ``path`` is its JSON path (``segmentMembership.NAMESPACE.SEGMENT``, or a namespace whose value
    is not an object), ``entry`` the value as it came."""

    path: str
    reason: InvalidReason
    detail: str
    entry: Any


class SegmentEntry(msgspec.Struct, gc=False):
    """One audience of a snapshot, in document order (a Struct: one is built per segment)."""

    namespace: str
    segment_id: str
    status: SegmentStatus
    qualified_at: datetime
    qualified_at_us: int  # microseconds since the epoch: the comparison key for stale/duplicate
    name: str | None
    key: SegmentKey  # (namespace, segment_id), shared by every record of the segment


class ProfileExport(msgspec.Struct, gc=False):
    """One decoded snapshot. ``attributes`` (every top-level field but the two the relay reads)
    is decoded from ``raw`` the first time something asks for it. (A Struct: built per record.)"""

    identity_map: dict[str, list[IdentityItem]]
    segments: tuple[SegmentEntry, ...]
    decoded_attributes: dict[str, Any] | None = None  # the attributes, once decoded
    raw: bytes | None = None  # the record, for decoding them
    invalid_entries: tuple[InvalidEntry, ...] = ()  # audience entries dropped (only when not strict)

    @property
    def attributes(self) -> dict[str, Any]:
        attributes = self.decoded_attributes
        if attributes is None:
            attributes = self.decoded_attributes = _attributes_of(self.raw) if self.raw is not None else {}
        return attributes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProfileExport):
            return NotImplemented
        return (self.identity_map, self.segments, self.attributes) == (
            other.identity_map, other.segments, other.attributes)


class LazyAttributes(Mapping[str, Any]):
    """A read-only view of an export's attributes that decodes them on first use: what a change
    carries, so that a handler that never looks at them costs nothing."""

    __slots__ = ("_export", "_view")

    def __init__(self, export: ProfileExport) -> None:
        self._export = export
        self._view: Mapping[str, Any] | None = None

    @property
    def record(self) -> bytes | None:
        """The raw record the attributes come from (what the dead letter keeps of a change that
        JSON cannot carry)."""
        return self._export.raw

    def _mapping(self) -> Mapping[str, Any]:
        view = self._view
        if view is None:
            view = self._view = self._export.attributes
        return view

    def __getitem__(self, key: str) -> Any:
        return self._mapping()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())

    def __repr__(self) -> str:
        return f"LazyAttributes({dict(self._mapping())!r})"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_epoch_us(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def qualification_time(text: str) -> tuple[datetime, int]:
    """A ``lastQualificationTime`` in UTC (what handlers get) and as epoch microseconds (what is
    compared). Raises ValueError or OverflowError (e.g. year 1 with a positive offset).

    msgspec's RFC 3339 parser first, which is what the fast path decodes times with, so that both
    paths give every time the same value (they differ past six fractional digits: msgspec rounds);
    then ``datetime.fromisoformat`` for the ISO 8601 forms RFC 3339 leaves out (a record with one
    takes the reference path)."""
    try:
        moment = msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        moment = datetime.fromisoformat(text)  # raises ValueError
    return _in_utc(moment)


def _in_utc(moment: datetime) -> tuple[datetime, int]:
    if moment.tzinfo is not UTC:  # "Z", "+0000" and "+00:00" all come as UTC already
        if moment.tzinfo is None:  # Adobe always sends an offset; a bare time is read as UTC
            moment = moment.replace(tzinfo=UTC)
        else:
            moment = moment.astimezone(UTC)
    return moment, to_epoch_us(moment)


class _Segments:
    """The segment keys a stream repeats, made once: a stream has a few hundred segments at most,
    and millions of profile states then share their keys instead of holding copies. The table is
    bounded; past the bound, a key is simply made for the one record.

    Times are not kept: streaming audiences give almost every qualification its own time, and a
    table of parsed times cost more in insertions and CPU cache misses than it saved. msgspec
    parses each time while it decodes the record, which costs less."""

    MAX_KEYS = 1 << 16

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, SegmentKey]] = {}  # namespace -> segment id -> key
        self._key_count = 0

    def namespace(self, namespace: str) -> dict[str, SegmentKey]:
        keys = self.keys.get(namespace)
        if keys is None:
            keys = {}
            if self._key_count < self.MAX_KEYS:
                self.keys[namespace] = keys
        return keys

    def key(self, keys: dict[str, SegmentKey], namespace: str, segment_id: str) -> SegmentKey:
        key = keys.get(segment_id)
        if key is None:
            key = (namespace, segment_id)
            if self._key_count < self.MAX_KEYS:
                keys[segment_id] = key
                self._key_count += 1
        return key

    def entry(self, namespace: str, segment_id: str, status: SegmentStatus, time: str, name: str | None
              ) -> SegmentEntry:
        """Raises ValueError or OverflowError for a time that does not parse."""
        moment, moment_us = qualification_time(time)
        key = self.key(self.namespace(namespace), namespace, segment_id)
        return SegmentEntry(key[0], key[1], status, moment, moment_us, name, key)


_SEGMENTS = _Segments()


def parse_export(raw: bytes | str, *, strict_entries: bool = True) -> ProfileExport:
    """Decode and validate one record. Raises InvalidRecord with a precise reason.

    ``strict_entries``: a malformed audience entry rejects the whole record; otherwise it is
    dropped and named in ``invalid_entries``, and the record's other entries count."""
    export = _fast_export(raw)
    if export is not None:
        return export
    return _reference_export(raw, strict_entries)


def _reference_export(raw: bytes | str, strict_entries: bool = True) -> ProfileExport:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord(InvalidReason.NOT_JSON, f"not valid JSON: {exc}") from None
    export = export_from_document(document, strict_entries=strict_entries)
    export.raw = raw if isinstance(raw, bytes) else raw.encode()  # for the dead letter (LazyAttributes.record)
    return export


def export_from_document(document: Any, *, strict_entries: bool = True) -> ProfileExport:
    """Validate an already decoded document (the reference path: pydantic decides and explains)."""
    if not isinstance(document, dict):
        raise InvalidRecord(
            InvalidReason.NOT_OBJECT, f"expected a JSON object, got {type(document).__name__}"
        )
    invalid_entries: list[InvalidEntry] = []
    if not strict_entries and isinstance(document.get("segmentMembership"), dict):
        kept, invalid_entries = _split_entries(document["segmentMembership"])
        document = {**document, "segmentMembership": kept}
    try:
        body = _validate_body(document)
    except ValidationError as exc:
        raise _invalid_from(exc) from None
    if not body.identityMap:
        raise InvalidRecord(
            InvalidReason.NO_IDENTITY, "identityMap has no identity with a non-empty string id"
        )
    segments: list[SegmentEntry] = []
    append = segments.append
    for namespace, audiences in body.segmentMembership.items():
        for segment_id, membership in audiences.items():
            try:
                entry = _SEGMENTS.entry(namespace, segment_id, membership["status"],
                                        membership["lastQualificationTime"], _text_or_none(membership.get("name")))
            except (ValueError, OverflowError):
                path = f"segmentMembership.{namespace}.{segment_id}"
                problem = InvalidRecord(
                    InvalidReason.BAD_QUALIFICATION_TIME,
                    f"{path}.lastQualificationTime: cannot parse {membership['lastQualificationTime']!r} as an ISO-8601 time",
                )
                if strict_entries:
                    raise problem from None
                original = document["segmentMembership"][namespace][segment_id]
                invalid_entries.append(InvalidEntry(path, problem.reason, problem.detail, original))
                continue
            append(entry)
    identity_map = {
        namespace: [IdentityItem(item.id, item.primary, item.authenticatedState) for item in items]
        for namespace, items in body.identityMap.items()
    }
    attributes = dict(document)
    attributes.pop("identityMap", None)
    attributes.pop("segmentMembership", None)
    return ProfileExport(identity_map, tuple(segments), attributes,  # the reference path decodes them at once
                         invalid_entries=tuple(invalid_entries))


# --- the fast path -------------------------------------------------------------------------------
_FastName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]


class _FastMembership(msgspec.Struct, gc=False):
    status: SegmentStatus
    lastQualificationTime: datetime  # RFC 3339, parsed by msgspec; any other form takes the reference path
    name: Any = None  # cosmetic: used only when it is a string


class _FastBody(msgspec.Struct, gc=False):
    """What the model requires, as msgspec types; any other field is skipped, not built."""

    identityMap: dict[_FastName, list[IdentityItem]] = {}
    segmentMembership: dict[_FastName, dict[_FastName, _FastMembership]] = {}


_decode_body = msgspec.json.Decoder(_FastBody).decode


def _fast_export(raw: bytes | str) -> ProfileExport | None:
    """The export of a well-formed record, or None to let the model decide."""
    try:
        body = _decode_body(raw)
    except Exception:  # noqa: BLE001 - anything msgspec refuses (or chokes on): the model decides
        return None
    if isinstance(raw, bytes) and not raw.isascii():
        # msgspec only checks the UTF-8 of the strings it builds; the model path refuses a record
        # with bad UTF-8 anywhere (it is not JSON), and so must this one.
        try:
            raw.decode()
        except UnicodeDecodeError:
            return None
    identity_map = body.identityMap
    if not identity_map:
        return None
    if not all(identity_map.values()):  # an empty list, e.g. "ecid": [], is dropped as the model drops it
        identity_map = {namespace: items for namespace, items in identity_map.items() if items}
        if not identity_map:
            return None
    segments: list[SegmentEntry] = []
    append = segments.append
    shared = _SEGMENTS
    for namespace, audiences in body.segmentMembership.items():
        keys = shared.keys.get(namespace) or shared.namespace(namespace)
        for segment_id, membership in audiences.items():
            moment = membership.lastQualificationTime
            if moment.tzinfo is UTC:  # the usual case, inlined
                moment_us = (moment - _EPOCH) // _MICROSECOND
            else:
                try:
                    moment, moment_us = _in_utc(moment)
                except OverflowError:  # e.g. year 1 with a positive offset
                    return None
            key = keys.get(segment_id) or shared.key(keys, namespace, segment_id)
            name = membership.name
            append(SegmentEntry(key[0], key[1], membership.status, moment, moment_us,
                                name if type(name) is str else None, key))
    return ProfileExport(identity_map, tuple(segments), None, raw if isinstance(raw, bytes) else raw.encode())


def _attributes_of(raw: bytes) -> dict[str, Any]:
    """Every top-level field of a record the fast path accepted, but the two the relay reads."""
    try:
        document = msgspec.json.decode(raw)
    except Exception:  # noqa: BLE001 - msgspec's own limits differ by a hair between its decoders
        document = json.loads(raw)
    document.pop("identityMap", None)
    document.pop("segmentMembership", None)
    return document


# --- the model (reference path) ------------------------------------------------------------------
class _Identity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    # Strict types: a value that is not what XDM says makes the item unusable (and dropped).
    id: StrictStr = Field(min_length=1, max_length=MAX_IDENTITY_ID)
    primary: StrictBool = False
    authenticatedState: StrictStr | None = None


class _Membership(TypedDict):
    # A TypedDict, not a model: validated just the same, without building an object per segment.
    # createdAt/updatedAt/mappingCreatedAt/mappingUpdatedAt (epoch ms, optional) are not used,
    # and a malformed one must not cost the record, so they are not declared.
    status: SegmentStatus
    # Parsed by qualification_time, not pydantic: it reads both "Z" and "+0000", as the fast path does.
    lastQualificationTime: StrictStr
    name: NotRequired[Any]  # cosmetic: used only when it is a string


# Namespaces and segment ids: bounded so that (namespace, segment) fits every store's key.
_Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]


class _Body(BaseModel):
    """The two keys the relay interprets. Validated by pydantic; attributes are not."""

    model_config = ConfigDict(extra="ignore")

    identityMap: dict[_Name, list[_Identity]] = Field(default_factory=dict)
    segmentMembership: dict[_Name, dict[_Name, _Membership]] = Field(default_factory=dict)


def _validate_body(document: dict[str, Any]) -> _Body:
    """Validate; if only some identities are malformed, drop them and validate again.

    One malformed identity must not cost the whole record."""
    try:
        body = _Body.model_validate(document)
    except ValidationError as exc:
        identities = document.get("identityMap")
        if not isinstance(identities, dict) or not any(
            error["loc"][:1] == ("identityMap",) for error in exc.errors(include_url=False)
        ):
            raise
        body = _Body.model_validate({**document, "identityMap": _usable_identities(identities)})
    if not all(body.identityMap.values()):  # e.g. "ecid": []
        body.identityMap = {namespace: items for namespace, items in body.identityMap.items() if items}
    return body


def _usable_identities(identities: dict[str, Any]) -> dict[str, list[Any]]:
    usable: dict[str, list[Any]] = {}
    for namespace, items in identities.items():
        if isinstance(items, list):
            kept = [item for item in items if _usable(item)]
            if kept:
                usable[namespace] = kept
    return usable


def _usable(item: Any) -> bool:
    """An identity we can key on: a non-empty string id, and well-typed optional fields."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("id"), str)
        and 0 < len(item["id"]) <= MAX_IDENTITY_ID
        and isinstance(item.get("primary", False), bool)
        and isinstance(item.get("authenticatedState"), (str, type(None)))
    )


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_ENTRY = TypeAdapter(_Membership)
_NAME = TypeAdapter(_Name)


def _split_entries(membership: dict[Any, Any]) -> tuple[dict[str, dict[str, Any]], list[InvalidEntry]]:
    """The audience entries the model accepts, and the others as InvalidEntry, each alone (a
    namespace whose value is not an object, or whose name is out of bounds, is one entry)."""
    kept: dict[str, dict[str, Any]] = {}
    invalid: list[InvalidEntry] = []

    def refuse(loc: tuple[Any, ...], exc: ValidationError, value: Any) -> None:
        problem = _invalid_from(exc, prefix=loc)
        invalid.append(InvalidEntry(".".join(str(part) for part in loc), problem.reason, problem.detail, value))

    for namespace, audiences in membership.items():
        try:
            _NAME.validate_python(namespace)
            if not isinstance(audiences, dict):
                _ENTRY.validate_python(audiences)  # raises: not an object
        except ValidationError as exc:
            refuse(("segmentMembership", namespace), exc, audiences)
            continue
        usable = kept[namespace] = {}
        for segment_id, entry in audiences.items():
            try:
                _NAME.validate_python(segment_id)
                _ENTRY.validate_python(entry)
            except ValidationError as exc:
                refuse(("segmentMembership", namespace, segment_id), exc, entry)
                continue
            usable[segment_id] = entry
    return kept, invalid


def _invalid_from(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> InvalidRecord:
    """Turn pydantic's first error into one of our reasons, naming the JSON path (``prefix``:
    where the validated value sits in the record)."""
    error = exc.errors(include_url=False)[0]
    loc = prefix + tuple(error["loc"])
    path = ".".join(str(part) for part in loc)
    kind = error["type"]
    if loc and loc[0] == "identityMap":
        return InvalidRecord(InvalidReason.NO_IDENTITY, f"{path}: {error['msg']}")
    if loc and loc[-1] == "status" and len(loc) == 4:
        if kind == "missing":
            return InvalidRecord(InvalidReason.UNKNOWN_STATUS, f"{path}: missing")
        return InvalidRecord(
            InvalidReason.UNKNOWN_STATUS,
            f"{path}: {error.get('input')!r} is not one of realized, existing, exited",
        )
    if loc and loc[-1] == "lastQualificationTime" and len(loc) == 4:
        if kind == "missing":
            return InvalidRecord(InvalidReason.BAD_QUALIFICATION_TIME, f"{path}: missing")
        return InvalidRecord(
            InvalidReason.BAD_QUALIFICATION_TIME,
            f"{path}: cannot parse {error.get('input')!r} as an ISO-8601 time",
        )
    return InvalidRecord(InvalidReason.BAD_SHAPE, f"{path or '<root>'}: {error['msg']}")
