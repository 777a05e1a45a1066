"""Which identity names a profile (ProfileKeyRule)."""

from __future__ import annotations

import itertools
import random

import pytest

from segment_relay.consumer.export import IdentityItem, InvalidReason, InvalidRecord, parse_export
from segment_relay.consumer.profile_key import ProfileKeyRule


def ids(**namespaces: list[str | tuple[str, bool]]) -> dict[str, list[IdentityItem]]:
    """ids(ecid=["a", ("b", True)]): a tuple marks a primary identity."""
    out: dict[str, list[IdentityItem]] = {}
    for namespace, items in namespaces.items():
        out[namespace] = [
            IdentityItem(id=item[0], primary=item[1]) if isinstance(item, tuple) else IdentityItem(id=item)
            for item in items
        ]
    return out


def test_primary_wins_over_priority_and_alphabet() -> None:
    identity_map = ids(crm=["c1"], ecid=["e1"], email=["m2", ("m1", True)])
    assert ProfileKeyRule(namespace_priority=("crm", "ecid")).key_for(identity_map) == "email:m1"
    assert ProfileKeyRule().key_for(identity_map) == "email:m1"


def test_only_primary_ids_are_candidates_within_the_namespace() -> None:
    # "a0" is smaller but not primary: the primary one wins.
    assert ProfileKeyRule().key_for(ids(ecid=["a0", ("z9", True)])) == "ecid:z9"


def test_several_primaries_use_priority_among_them() -> None:
    identity_map = ids(ecid=[("e1", True)], email=[("m1", True)], crm=["c1"])
    assert ProfileKeyRule(namespace_priority=("crm", "email", "ecid")).key_for(identity_map) == "email:m1"
    assert ProfileKeyRule().key_for(identity_map) == "ecid:e1"


def test_prefer_primary_off_uses_the_priority_list() -> None:
    identity_map = ids(crm=["c1"], ecid=[("e1", True)], email=["m1"])
    rule = ProfileKeyRule(namespace_priority=("email", "crm"), prefer_primary=False)
    assert rule.key_for(identity_map) == "email:m1"
    # Without a priority list, prefer_primary=False falls back to the alphabet, primary or not.
    assert ProfileKeyRule(prefer_primary=False).key_for(identity_map) == "crm:c1"


@pytest.mark.parametrize(
    ("priority", "expected"),
    [
        (("crm", "email", "ecid"), "crm:c1"),
        (("email", "crm", "ecid"), "email:m1"),
        (("ecid", "email", "crm"), "ecid:e1"),
        (("absent", "ecid", "crm"), "ecid:e1"),
        (("absent", "other"), "crm:c1"),  # none present: alphabetical
        (("email", "crm", "email"), "email:m1"),  # a repeated name keeps its first rank
    ],
)
def test_priority_order(priority: tuple[str, ...], expected: str) -> None:
    identity_map = ids(ecid=["e1"], email=["m1"], crm=["c1"])
    assert ProfileKeyRule(namespace_priority=priority).key_for(identity_map) == expected


def test_namespaces_compare_case_insensitively_and_key_is_lower_case() -> None:
    identity_map = ids(ECID=["e1"], Email=["m1"])
    assert ProfileKeyRule(namespace_priority=("email",)).key_for(identity_map) == "email:m1"
    assert ProfileKeyRule(namespace_priority=("EcId",)).key_for(identity_map) == "ecid:e1"
    assert ProfileKeyRule().key_for(identity_map) == "ecid:e1"


def test_namespaces_differing_only_in_case_are_merged() -> None:
    identity_map = ids(ECID=["e5"], ecid=["e3"], Ecid=["e9"])
    assert ProfileKeyRule().key_for(identity_map) == "ecid:e3"


def test_smallest_id_within_the_namespace() -> None:
    assert ProfileKeyRule().key_for(ids(ecid=["66", "14", "9"])) == "ecid:14"  # plain string order
    assert ProfileKeyRule().key_for(ids(ecid=[("b", True), ("a", True)])) == "ecid:a"


def test_fallback_is_the_alphabetically_first_namespace() -> None:
    assert ProfileKeyRule().key_for(ids(zeta=["z"], email_lc_sha256=["h"], ecid=["e"])) == "ecid:e"
    # Alphabetical order is on the lower-cased namespace.
    assert ProfileKeyRule().key_for(ids(Zeta=["z"], alpha=["a"], Beta=["b"])) == "alpha:a"


def test_samples_key() -> None:
    current = parse_export(b'{"identityMap": {"ecid": [{"id": "145"}], "email_lc_sha256": '
                           b'[{"id": "6553", "primary": true}]}}')
    assert ProfileKeyRule(namespace_priority=("ecid",)).key_for(current.identity_map) == "email_lc_sha256:6553"
    assert ProfileKeyRule(namespace_priority=("ecid",), prefer_primary=False).key_for(current.identity_map) == "ecid:145"


def test_no_identity_is_invalid() -> None:
    with pytest.raises(InvalidRecord) as caught:
        ProfileKeyRule().key_for({})
    assert caught.value.reason is InvalidReason.NO_IDENTITY


def test_deterministic_regardless_of_dict_and_list_order() -> None:
    entries = [("ecid", "e2"), ("ecid", "e1"), ("Email", "m1"), ("email", "m0"), ("crm", "c1"), ("ECID", "e0")]
    rules = [
        ProfileKeyRule(),
        ProfileKeyRule(namespace_priority=("email", "ecid")),
        ProfileKeyRule(namespace_priority=("nope",), prefer_primary=False),
    ]
    rng = random.Random(7)
    for primary_index in (None, 0, 3):
        keys: dict[int, set[str]] = {i: set() for i in range(len(rules))}
        for _ in range(60):
            shuffled = entries[:]
            rng.shuffle(shuffled)
            identity_map: dict[str, list[IdentityItem]] = {}
            for namespace, ident in shuffled:
                primary = primary_index is not None and (namespace, ident) == entries[primary_index]
                identity_map.setdefault(namespace, []).append(IdentityItem(id=ident, primary=primary))
            for i, rule in enumerate(rules):
                keys[i].add(rule.key_for(identity_map))
        assert all(len(found) == 1 for found in keys.values()), keys


def test_every_permutation_of_namespaces_gives_one_key() -> None:
    groups = [("b", ["2", "1"]), ("A", ["3"]), ("c", ["0"])]
    results = {
        ProfileKeyRule(namespace_priority=("c",)).key_for({ns: [IdentityItem(id=i) for i in items] for ns, items in order})
        for order in itertools.permutations(groups)
    }
    assert results == {"c:0"}
