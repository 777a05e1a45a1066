"""Flow Service list queries: ``property=`` filters, ``orderby``, ``limit`` and continuation tokens.

Filter syntax (notes §2.5, Adobe's sort-and-filter guide):

- ``property=<path><op><value>`` with op ``==`` ``!=`` ``>`` ``<`` ``>=`` ``<=`` ``~`` (contains),
  or a bare ``property=<path>`` (the field exists)
- ``==`` takes several values separated by commas: any of them (OR); ``!=`` then means none of them
- ``[]`` after a path step goes into an array, matching if any element matches:
  ``transformations[].params.segmentSelectors.selectors[].value.id==<id>``. Without ``[]`` a path
  that meets an array does not match (as with Adobe, the brackets are required)
- several ``property=`` parameters must all hold (AND)
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import ApiError

__all__ = ["Filter", "parse_filters", "matches", "order", "paginate", "resolve"]

_FILTER = re.compile(r"^(?P<path>[A-Za-z0-9_@$:\[\]\.]+?)(?P<op>==|!=|>=|<=|>|<|~)(?P<value>.*)$")
_PATH = re.compile(r"^[A-Za-z0-9_@$:]+(\[\])?(\.[A-Za-z0-9_@$:]+(\[\])?)*$")
_MISSING = object()


@dataclass(frozen=True)
class Filter:
    path: str
    op: str | None  # None: the field exists
    values: tuple[str, ...]


def parse_filters(raw: Iterable[str]) -> list[Filter]:
    filters: list[Filter] = []
    for text in raw:
        text = text.strip()
        match = _FILTER.match(text)
        if match is None:
            if not _PATH.match(text):
                raise ApiError(400, f"Invalid property filter {text!r}: use <path>==<value>[,<value>...]")
            filters.append(Filter(text, None, ()))
            continue
        path, op, value = match["path"], match["op"], match["value"]
        if not _PATH.match(path):
            raise ApiError(400, f"Invalid property path {path!r} in filter {text!r}")
        values = tuple(v.strip() for v in value.split(",")) if op in ("==", "!=") else (value.strip(),)
        filters.append(Filter(path, op, values))
    return filters


def resolve(document: Any, path: str) -> list[Any]:
    """Every value at ``path`` (``[]`` steps fan out over arrays)."""
    nodes: list[Any] = [document]
    for step in path.split("."):
        fan_out = step.endswith("[]")
        key = step[:-2] if fan_out else step
        found: list[Any] = []
        for node in nodes:
            value = node.get(key, _MISSING) if isinstance(node, dict) else _MISSING
            if value is _MISSING:
                continue
            if fan_out:
                if isinstance(value, list):
                    found.extend(value)
            else:
                found.append(value)
        nodes = found
    return nodes


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _equal(value: Any, text: str) -> bool:
    if isinstance(value, bool):
        return str(value).lower() == text.lower()
    if isinstance(value, (int, float)):
        number = _number(text)
        return number is not None and float(value) == number
    if isinstance(value, str):
        return value == text
    return False


def _compare(value: Any, op: str, text: str) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        number = _number(text)
        if number is None:
            return False
        left: Any = float(value)
        right: Any = number
    elif isinstance(value, str):
        left, right = value, text
    else:
        return False
    return {">": left > right, "<": left < right, ">=": left >= right, "<=": left <= right}[op]


def _holds(document: Any, rule: Filter) -> bool:
    values = [v for v in resolve(document, rule.path) if not isinstance(v, (dict, list)) or rule.op is None]
    if rule.op is None:
        return any(v is not None for v in values)
    if rule.op == "==":
        return any(_equal(v, text) for v in values for text in rule.values)
    if rule.op == "!=":
        return not any(_equal(v, text) for v in values for text in rule.values)
    if rule.op == "~":
        needle = rule.values[0].lower()
        return any(isinstance(v, str) and needle in v.lower() for v in values)
    return any(_compare(v, rule.op, rule.values[0]) for v in values)


def matches(document: Any, filters: Sequence[Filter]) -> bool:
    return all(_holds(document, rule) for rule in filters)


def order(items: list[dict[str, Any]], orderby: str | None, default: str = "-updatedAt") -> list[dict[str, Any]]:
    """Sort by ``orderby`` (``field`` ascending, ``-field`` descending, comma-separated); missing last."""
    keys = [k.strip() for k in (orderby or default).split(",") if k.strip()]
    result = list(items)
    for key in reversed(keys):
        descending = key.startswith("-")
        field = key.lstrip("+-")
        if not _PATH.match(field) or "[]" in field:
            raise ApiError(400, f"Invalid orderby field {field!r}")

        def sort_key(item: dict[str, Any], field: str = field) -> tuple[int, Any]:
            found = resolve(item, field)
            value = found[0] if found else None
            if value is None or isinstance(value, (dict, list)):
                return (1, "")
            return (0, value if not isinstance(value, bool) else int(value))

        present = [i for i in result if sort_key(i)[0] == 0]
        absent = [i for i in result if sort_key(i)[0] == 1]
        try:
            present.sort(key=sort_key, reverse=descending)
        except TypeError:  # mixed types under one field: compare as text
            present.sort(key=lambda i: str(sort_key(i)[1]), reverse=descending)
        result = present + absent
    return result


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"offset": offset})).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = data["offset"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError
        return offset
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ApiError(400, "Invalid continuationToken: pass back the token from _links.next unchanged") from None


def paginate(items: list[Any], limit: int, token: str | None) -> tuple[list[Any], str | None]:
    """One page and the token of the next one (None on the last page).

    The token is an offset into the ordered result: an entity updated between two pages moves to the
    front and may be skipped or seen twice, as with any offset paging; re-list to be sure."""
    offset = _decode_token(token) if token else 0
    page = items[offset: offset + limit]
    following = offset + limit
    return page, (_encode_token(following) if following < len(items) else None)
