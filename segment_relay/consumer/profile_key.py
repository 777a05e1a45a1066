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

    def __post_init__(self) -> None:
        rank = {ns.lower(): i for i, ns in reversed(list(enumerate(self.namespace_priority)))}
        object.__setattr__(self, "_rank", rank)

    def key_for(self, identity_map: Mapping[str, Sequence[IdentityItem]]) -> str:
        candidates: dict[str, list[str]] = {}
        if self.prefer_primary:
            for namespace, items in identity_map.items():
                primary = [item.id for item in items if item.primary]
                if primary:
                    candidates.setdefault(namespace.lower(), []).extend(primary)
        if not candidates:
            for namespace, items in identity_map.items():
                ids = [item.id for item in items if item.id]
                if ids:
                    candidates.setdefault(namespace.lower(), []).extend(ids)
        if not candidates:
            raise InvalidRecord(InvalidReason.NO_IDENTITY, "identityMap has no usable identity")
        unranked = len(self._rank)
        namespace = min(candidates, key=lambda ns: (self._rank.get(ns, unranked), ns))
        return f"{namespace}:{min(candidates[namespace])}"
