"""The export payload model: bytes from the stream -> ProfileExport, or InvalidRecord.

Adobe writes one JSON document per profile snapshot. Only two keys matter to the
diff (``identityMap`` and ``segmentMembership``); everything else is a profile
attribute that is kept as-is and handed to handlers untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, NotRequired

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, StringConstraints, ValidationError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict on 3.11


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


class SegmentStatus(StrEnum):
    REALIZED = "realized"
    EXISTING = "existing"  # deprecated by Adobe in 2023, still found in old streams: means member
    EXITED = "exited"

    @property
    def is_member(self) -> bool:
        return self is not SegmentStatus.EXITED


class IdentityItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    # Strict types: a value that is not what XDM says makes the item unusable (and dropped).
    # 1 KiB bounds what any store must key on (DynamoDB refuses longer keys, forever).
    id: StrictStr = Field(min_length=1, max_length=1024)
    primary: StrictBool = False
    authenticatedState: StrictStr | None = None


class _Membership(TypedDict):
    # A TypedDict, not a model: validated just the same, without building an object per segment.
    # createdAt/updatedAt/mappingCreatedAt/mappingUpdatedAt (epoch ms, optional) are not used,
    # and a malformed one must not cost the record, so they are not declared.
    status: SegmentStatus
    # Parsed by datetime.fromisoformat, not pydantic: it reads both "Z" and "+0000", and its
    # stdlib timezone makes the epoch arithmetic three times cheaper (per segment, per record).
    lastQualificationTime: StrictStr
    name: NotRequired[Any]  # cosmetic: used only when it is a string


# Namespaces and segment ids: bounded so that (namespace, segment) fits every store's key.
_Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Body(BaseModel):
    """The two keys the relay interprets. Validated by pydantic; attributes are not."""

    model_config = ConfigDict(extra="ignore")

    identityMap: dict[_Name, list[IdentityItem]] = Field(default_factory=dict)
    segmentMembership: dict[_Name, dict[_Name, _Membership]] = Field(default_factory=dict)


def _validate_body(document: dict[str, Any]) -> _Body:
    """Validate; if only some identities are malformed, drop them and validate again.

    One malformed identity must not cost the whole record. The retry is off the hot path:
    well-formed records validate in one call with no Python in between.
    """
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
        and 0 < len(item["id"]) <= 1024
        and isinstance(item.get("primary", False), bool)
        and isinstance(item.get("authenticatedState"), (str, type(None)))
    )


@dataclass(slots=True)  # not frozen: frozen dataclasses are slow to build, and this is built per segment
class SegmentEntry:
    """One audience of a snapshot, in document order."""

    namespace: str
    segment_id: str
    status: SegmentStatus
    qualified_at: datetime
    qualified_at_us: int  # microseconds since the epoch: the comparison key for stale/duplicate
    name: str | None


@dataclass(slots=True)  # not frozen: built per record, and frozen dataclasses are slow to build
class ProfileExport:
    identity_map: dict[str, list[IdentityItem]]
    segments: tuple[SegmentEntry, ...]
    attributes: dict[str, Any]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_epoch_us(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def parse_export(raw: bytes | str) -> ProfileExport:
    """Decode and validate one record. Raises InvalidRecord with a precise reason."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord(InvalidReason.NOT_JSON, f"not valid JSON: {exc}") from None
    return export_from_document(document)


def export_from_document(document: Any) -> ProfileExport:
    if not isinstance(document, dict):
        raise InvalidRecord(
            InvalidReason.NOT_OBJECT, f"expected a JSON object, got {type(document).__name__}"
        )
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
                moment, moment_us = _utc_and_epoch_us(membership["lastQualificationTime"])
            except (ValueError, OverflowError):
                raise InvalidRecord(
                    InvalidReason.BAD_QUALIFICATION_TIME,
                    f"segmentMembership.{namespace}.{segment_id}.lastQualificationTime: "
                    f"cannot parse {membership['lastQualificationTime']!r} as an ISO-8601 time",
                ) from None
            append(SegmentEntry(
                namespace, segment_id, membership["status"], moment, moment_us,
                _text_or_none(membership.get("name")),
            ))
    attributes = dict(document)
    attributes.pop("identityMap", None)
    attributes.pop("segmentMembership", None)
    return ProfileExport(identity_map=body.identityMap, segments=tuple(segments), attributes=attributes)


def _utc_and_epoch_us(text: str) -> tuple[datetime, int]:
    """The time in UTC (what handlers get) and as epoch microseconds (what is compared).
    Raises ValueError or OverflowError (e.g. year 1 with a positive offset)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not UTC:
        if moment.tzinfo is None:  # Adobe always sends an offset; a bare time is read as UTC
            moment = moment.replace(tzinfo=UTC)
        else:
            moment = moment.astimezone(UTC)
    return moment, (moment - _EPOCH) // _MICROSECOND


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _invalid_from(exc: ValidationError) -> InvalidRecord:
    """Turn pydantic's first error into one of our reasons, naming the JSON path."""
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
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
