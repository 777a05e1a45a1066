"""Which identity names a profile: the key under which membership state is kept.

Rule (deterministic for a given identityMap and configuration):

1. If ``prefer_primary`` is on and some identity is flagged ``primary: true``,
   only the primary identities are candidates.
2. Among the candidates, the first namespace of ``namespace_priority`` that is
   present wins (namespaces compare case-insensitively).
3. If none of the priority namespaces is present, the alphabetically first
   namespace is used.
4. Within the chosen namespace the smallest id (plain string order) wins.

The key is ``"<namespace>:<id>"`` with the namespace in lower case.

Limit: the key follows the identity graph. If a later export of the same person
carries an identity that ranks higher (a new primary, or an email where there
was only an ECID), the key changes and the membership history starts afresh
under the new key: a member then shows up as a new ``enter``. Put the most
stable namespace first in the priority list (a CRM id, then a hashed email,
then ECID) to make this rare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .export import IdentityItem, InvalidReason, InvalidRecord


@dataclass(frozen=True)
class ProfileKeyRule:
    namespace_priority: Sequence[str] = ()
    prefer_primary: bool = True
    _rank: dict[str, int] = field(init=False, repr=False, compare=False)
    _namespaces: dict[str, tuple[int, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rank = {ns.lower(): i for i, ns in reversed(list(enumerate(self.namespace_priority)))}
        object.__setattr__(self, "_rank", rank)
        object.__setattr__(self, "_namespaces", {})  # namespace as sent -> (rank, lower case): few, cached

    def _namespace(self, namespace: str) -> tuple[int, str]:
        known = self._namespaces.get(namespace)
        if known is None:
            lowered = namespace.lower()
            known = (self._rank.get(lowered, len(self._rank)), lowered)
            if len(self._namespaces) < 10_000:  # namespaces are few; the bound only guards odd streams
                self._namespaces[namespace] = known
        return known

    def key_for(self, identity_map: Mapping[str, Sequence[IdentityItem]]) -> str:
        # One pass, smallest (not-primary, rank, namespace, id) wins: this is the rule above,
        # since any primary beats every non-primary when prefer_primary is on. The comparison is
        # spelled out field by field instead of building a tuple per identity (this runs per record).
        namespaces = self._namespaces
        prefer_primary = self.prefer_primary
        best_id: str | None = None
        best_secondary = True  # not primary
        best_rank = 0
        best_namespace = ""
        for namespace, items in identity_map.items():
            known = namespaces.get(namespace)
            rank, lowered = known if known is not None else self._namespace(namespace)
            for item in items:
                identity = item.id
                if not identity:
                    continue
                secondary = not (prefer_primary and item.primary)
                if best_id is not None:
                    if secondary != best_secondary:
                        if secondary:
                            continue
                    elif rank != best_rank:
                        if rank > best_rank:
                            continue
                    elif lowered != best_namespace:
                        if lowered > best_namespace:
                            continue
                    elif identity >= best_id:
                        continue
                best_id, best_secondary, best_rank, best_namespace = identity, secondary, rank, lowered
        if best_id is None:
            raise InvalidRecord(InvalidReason.NO_IDENTITY, "identityMap has no usable identity")
        return f"{best_namespace}:{best_id}"
