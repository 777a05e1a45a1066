"""Identity linking: which stored profile an export belongs to, whatever identity now ranks first.

Every usable identity of an export in a linking namespace is an *alias* (``namespace:id``, the
namespace in lower case, as in a profile key). The store's alias index (``AliasIndex``) maps each
alias to the canonical key of its profile. For the records of a batch, in read order:

- no alias known: a new profile, keyed by the ``ProfileKeyRule``, owning all the aliases;
- the aliases name one profile: that one (new aliases are added to it);
- they name several: one person Adobe has now merged. The smallest key survives (the same
  result whatever the arrival order); the others are *absorbed*: the pipeline combines their
  memberships into the survivor, emits a ``merge`` change, and, after the handlers, redirects
  each absorbed key to the survivor (``redirect_profiles``).

New aliases are claimed by conditional create before the record's changes are handed over, so
two replicas seeing one person at once agree on one profile: a claim that finds its alias held
by another profile makes that a merge, resolved in the next round. Claims record no membership,
so a crash after them repeats the record's changes, never loses them.

An identity that disappears from a later export stays linked: Adobe's graph may drop it from one
export and carry it again in the next, and unlinking would split the history.

Each record keeps the profile it had when it came, and a merge rides on the record that showed
it, so the changes are the same however the records were batched. Within this process, a merge
decided here but not yet redirected in the store is remembered (``_absorbed``), so later records
of the absorbed profile go to the survivor at once (and merge it again, silently: combining is
idempotent, and the record that carried the merge may have been dropped before it was saved).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..model import IdentityItem
from .state.base import AliasIndex

log = logging.getLogger(__name__)

__all__ = ["IdentityResolver", "IdentityStats", "Merge", "Resolved", "aliases_of"]

IdentityMap = Mapping[str, Sequence[IdentityItem]]

ALL_NAMESPACES = "*"
_UNSEEN = ""  # a namespace not in the prefix cache yet (no real prefix is empty)
_PREFIXES_MAX = 10_000
MAX_ROUNDS = 8  # claim rounds per batch: each one settles every alias it claims, so two are the usual most


@dataclass
class IdentityStats:
    """What linking did (metrics)."""

    profiles_created: int = 0  # new canonical profiles
    identities_linked: int = 0  # aliases claimed for a profile
    merges: int = 0  # profiles absorbed into another


class Merge(NamedTuple):
    """Profiles a record showed to be its profile's person: combined into it just before that
    record is diffed, as if the records had come one at a time."""

    absorbed: tuple[str, ...]  # sorted: combined in the same order every time
    announced: tuple[str, ...]  # of those, the ones that existed before (a ``merge`` change names them)


class Resolved(NamedTuple):
    """Where the records of a batch go: each one's profile key, in order, and the merges, by the
    index of the record that carries each (in order; most batches have none). Keys, not an
    object per record: this is made for every record."""

    keys: list[str]
    merges: dict[int, Merge]


def aliases_of(identity_map: IdentityMap, namespaces: Collection[str] | None,
               prefixes: dict[str, str | None] | None = None) -> list[str]:
    """The aliases of an export: ``namespace:id`` of every identity in a linking namespace
    (``namespaces`` lower case; None: every namespace). ``prefixes`` remembers, per namespace as
    written, its ``lowered:`` prefix or None when it does not link (this runs for every record)."""
    if prefixes is None:
        prefixes = {}
    aliases: list[str] = []
    for namespace, items in identity_map.items():
        prefix = prefixes.get(namespace, _UNSEEN)
        if prefix == _UNSEEN:
            lowered = namespace.lower()
            prefix = None if namespaces is not None and lowered not in namespaces else lowered + ":"
            if len(prefixes) >= _PREFIXES_MAX:
                prefixes.clear()  # exports that invent namespaces: stay bounded
            prefixes[namespace] = prefix
        if prefix is None:
            continue
        for item in items:
            if item.id:
                aliases.append(prefix + item.id)
    return aliases


class IdentityResolver:
    """Resolves the records of a batch to canonical profiles (see the module docstring)."""

    def __init__(self, index: AliasIndex, link_namespaces: Collection[str] = (ALL_NAMESPACES,)) -> None:
        self.index = index
        lowered = {namespace.lower() for namespace in link_namespaces}
        self.namespaces: frozenset[str] | None = None if ALL_NAMESPACES in lowered else frozenset(lowered)
        self.stats = IdentityStats()
        self._absorbed: dict[str, str] = {}  # absorbed -> survivor, decided here, not yet redirected in the store
        self._redirected: dict[str, str] = {}  # ...redirected since the last resolve started
        self._prefixes: dict[str, str | None] = {}  # aliases_of's cache

    def _survivor(self, key: str, decided: Mapping[str, str]) -> str:
        absorbed = self._absorbed
        while True:
            target = decided.get(key) or absorbed.get(key)
            if target is None:
                return key
            key = target

    async def resolve(self, records: Sequence[tuple[IdentityMap, str]]) -> Resolved:
        """The profile of each export (its identities, and its key by the profile key rule), in
        order; claims the new aliases. Raises what the store raises; nothing is decided then (the
        caller retries the whole batch, and claims already made are found again)."""
        self._forget_redirected()  # before the lookup: from now on it sees those redirects
        identity_maps = [identity_map for identity_map, _ in records]
        rule_keys = [key for _, key in records]
        namespaces, prefixes = self.namespaces, self._prefixes
        wanted = [aliases_of(identity_map, namespaces, prefixes) for identity_map in identity_maps]
        owners = await self.index.find_profiles({alias for aliases in wanted for alias in aliases})
        created: set[str] = set()  # profiles this call made
        counted: set[str] = set()  # ...of which those already counted in profiles_created
        for _ in range(MAX_ROUNDS):
            claims: dict[str, str] = {}
            decided: dict[str, str] = {}  # absorbed -> survivor, merges decided in this round
            plan, joins = self._plan(rule_keys, wanted, owners, claims, decided, created)
            if not claims:
                return self._settle(plan, joins, created)
            won = await self.index.claim_aliases(claims)
            owners.update(won)
            mine = {alias for alias, key in claims.items() if won.get(alias, key) == key}
            self.stats.identities_linked += len(mine)
            new_profiles = {claims[alias] for alias in mine} & created - counted
            self.stats.profiles_created += len(new_profiles)
            counted |= new_profiles
            if len(mine) == len(claims):
                return self._settle(plan, joins, created)
            # Another writer holds some of them: plan again knowing it (the claims won stay ours).
            log.debug("identity claims raced with another writer; resolving again",
                      extra={"lost": len(claims) - len(mine)})
        raise RuntimeError(f"identity claims did not settle in {MAX_ROUNDS} rounds")  # a store that answers wrong

    def _plan(self, rule_keys: Sequence[str], wanted: list[list[str]], owners: Mapping[str, str],
              claims: dict[str, str], decided: dict[str, str], created: set[str],
              ) -> tuple[list[str], dict[int, list[str]]]:
        """Each record's profile and, by record index, the profiles a record joins to its own,
        with the aliases to claim in ``claims`` and the merges in ``decided``. Records are taken
        in order: a later one sees what an earlier one decided, an earlier one keeps the profile
        it had."""
        plan: list[str] = []
        joins: dict[int, list[str]] = {}
        absorbed = self._absorbed
        owner_of = owners.get
        for index, (rule_key, aliases) in enumerate(zip(rule_keys, wanted, strict=True)):
            if aliases and not decided:
                # The usual record: every identity known, all of one live profile.
                first = owner_of(aliases[0])
                if first is not None and first not in absorbed:
                    for alias in aliases:
                        if owner_of(alias) != first:
                            break
                    else:
                        plan.append(first)
                        continue
            joined: list[str] = []
            stored = {key for alias in aliases if (key := owners.get(alias) or claims.get(alias)) is not None}
            if not stored:
                key = self._survivor(rule_key, decided)
                if aliases:
                    created.add(key)
            else:
                survivors = {self._survivor(key, decided) for key in stored}
                key = min(survivors)
                # A stored key merged here but not redirected in the store yet is merged again
                # (silently: combining is idempotent): the record that carried the merge may have
                # been dropped (its partition revoked) before it was saved.
                for other in stored | survivors:
                    if other != key and decided.get(other) != key:
                        decided[other] = key
                        joined.append(other)
            for alias in aliases:
                if alias not in owners and alias not in claims:
                    claims[alias] = key
            plan.append(key)
            if joined:
                joins[index] = joined
        return plan, joins

    def _settle(self, plan: list[str], joins: dict[int, list[str]], created: set[str]) -> Resolved:
        """Every record to the profile it had when it came, carrying the merges it decided.
        A merge is announced for the profiles that existed before it: stored before this batch
        (and not merged here already), or given to an earlier record of the batch. A profile this
        call created only to lose its claims to another writer's (the race) was never seen."""
        merges: dict[int, Merge] = {}
        if not joins:
            return Resolved(plan, merges)
        keyed: set[str] = set()  # the profiles of the records before this one
        absorbed = self._absorbed
        for index, key in enumerate(plan):
            joined = joins.get(index)
            if joined:
                ordered = tuple(sorted(joined))
                announced = tuple(other for other in ordered
                                  if other not in absorbed and (other not in created or other in keyed))
                self.stats.merges += len(announced)
                absorbed.update(dict.fromkeys(ordered, key))
                merges[index] = Merge(ordered, announced)
            keyed.add(key)
        return Resolved(plan, merges)

    def redirected(self, redirects: Mapping[str, str]) -> None:
        """The store now redirects these keys (absorbed -> survivor) itself: they are forgotten
        here when the next resolve starts. Not at once: a resolve in flight may have looked them
        up before the redirect, and must still know them, or it would take an absorbed profile
        for a live one (and announce its merge again)."""
        self._redirected.update(redirects)

    def _forget_redirected(self) -> None:
        absorbed = self._absorbed
        for key, survivor in self._redirected.items():
            if absorbed.get(key) == survivor:  # not merged on elsewhere meanwhile (a chain)
                del absorbed[key]
        self._redirected.clear()
