"""RFC 6902 JSON Patch (add, remove, replace, move, copy, test) over RFC 6901 pointers.

Applied to a deep copy, all or nothing, as Flow Service PATCH does: one bad operation and the
entity is left as it was (the caller gets a 400 naming the operation).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PatchError", "apply_patch", "parse_pointer"]


class PatchError(ValueError):
    pass


def parse_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"path {pointer!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if token == "-" and for_add:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise PatchError(f"{token!r} is not an array index")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise PatchError(f"array index {index} is out of range (length {len(container)})")
    return index


def _parent(document: Any, tokens: list[str], pointer: str) -> tuple[Any, str]:
    if not tokens:
        raise PatchError("the whole document cannot be the target")
    node = document
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path {pointer!r}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_add=False)]
        else:
            raise PatchError(f"path {pointer!r}: {token!r} is inside a scalar")
    return node, tokens[-1]


def _get(document: Any, pointer: str) -> Any:
    node = document
    for token in parse_pointer(pointer):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_add=False)]
        else:
            raise PatchError(f"path {pointer!r} does not exist")
    return node


def _add(document: Any, pointer: str, value: Any) -> None:
    parent, last = _parent(document, parse_pointer(pointer), pointer)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise PatchError(f"path {pointer!r}: the parent is a scalar")


def _remove(document: Any, pointer: str) -> Any:
    parent, last = _parent(document, parse_pointer(pointer), pointer)
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {pointer!r} does not exist")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, for_add=False))
    raise PatchError(f"path {pointer!r}: the parent is a scalar")


def apply_patch(document: dict[str, Any], operations: Any) -> dict[str, Any]:
    """The patched copy of ``document``; raises PatchError (message names the failing op)."""
    if not isinstance(operations, list) or not operations:
        raise PatchError("the body must be a non-empty JSON array of JSON Patch operations (RFC 6902)")
    result = copy.deepcopy(document)
    for number, operation in enumerate(operations):
        try:
            if not isinstance(operation, dict):
                raise PatchError("an operation must be an object")
            op, path = operation.get("op"), operation.get("path")
            if not isinstance(op, str) or not isinstance(path, str):
                raise PatchError("an operation needs string 'op' and 'path'")
            op = op.lower()
            if op in ("add", "replace", "test") and "value" not in operation:
                raise PatchError(f"'{op}' needs a 'value'")
            if op == "add":
                _add(result, path, copy.deepcopy(operation["value"]))
            elif op == "remove":
                _remove(result, path)
            elif op == "replace":
                _remove(result, path)
                _add(result, path, copy.deepcopy(operation["value"]))
            elif op in ("move", "copy"):
                source = operation.get("from")
                if not isinstance(source, str):
                    raise PatchError(f"'{op}' needs a string 'from'")
                if op == "move" and (path + "/").startswith(source + "/") and path != source:
                    raise PatchError("cannot move a value into itself")
                value = _remove(result, source) if op == "move" else copy.deepcopy(_get(result, source))
                _add(result, path, value)
            elif op == "test":
                if _get(result, path) != operation["value"]:
                    raise PatchError(f"test failed at {path!r}")
            else:
                raise PatchError(f"unknown op {op!r} (use add, remove, replace, move, copy or test)")
        except PatchError as error:
            raise PatchError(f"operation {number}: {error}") from None
    return result
