"""A seeded generator of realistic Adobe Real-Time CDP export streams, and a reference model.

``generate(spec)`` yields JSON records (bytes, no newline) in delivery order, the way
they would arrive from Kinesis or Event Hubs: full profile snapshots, interleaved
across profiles, with exact re-deliveries, late (out-of-order) records, attribute-only
re-exports, legacy ``existing`` statuses, both time formats (``Z`` and ``+0000``) and,
on request, garbage lines. Memory is O(profiles), not O(records).

``expected_changes(records)`` is a deliberately plain restatement of the rules in
DESIGN.md ("Semantics that must hold"). It shares no code with
``segment_relay.consumer.membership`` or ``export``, so comparing the relay's output
with it checks the relay, not the relay against itself::

    spec = StreamSpec(seed=3, profiles=200, records=2000)
    truth = write_jsonl(spec, "stream.jsonl")   # the file, and what must come out of it
    truth.enters, truth.exits, truth.changes[:3]
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from random import Random
from typing import Any

import orjson

__all__ = [
    "DEFAULT_SEGMENTS",
    "StreamSpec",
    "StreamTruth",
    "Change",
    "Merge",
    "generate",
    "write_jsonl",
    "expected_changes",
    "reference_profile_key",
    "iso_utc",
]

#: (segment_id, name). Adobe segment ids are UUIDs, except in its own documentation,
#: whose example id ``59bd2fkd-...`` is not hexadecimal: the relay must not assume UUIDs.
DEFAULT_SEGMENTS: tuple[tuple[str, str], ...] = (
    ("3f2c6a1e-8d4b-4c7a-9e21-5b0f7d3a9c64", "High-value customers"),
    ("a7d9e0b2-1c3f-4e58-8b6a-2f4d9c0e7b13", "Cart abandoners (last 7 days)"),
    ("5e8b1f4c-9a2d-4b7e-a3c6-0d1e2f3a4b5c", "Newsletter subscribers"),
    ("c1b2d3e4-f5a6-4789-8abc-def012345678", "Lapsed buyers (90 days)"),
    ("9d0e1f2a-3b4c-4d5e-8f60-718293a4b5c6", "Loyalty Gold tier"),
    ("0b7e4d2c-6f1a-4e3b-9c8d-7a6b5c4d3e2f", "Mobile app users"),
    ("59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae", "First name equals John"),
)

_START = 1_767_225_600  # 2026-01-01T00:00:00Z
_MEMBER = frozenset(("realized", "existing"))
_STATUSES = frozenset(("realized", "existing", "exited"))


@dataclass
class StreamSpec:
    """What to generate. Rates are per delivered record (duplicate, out-of-order, invalid),
    per new event (reexport) or per segment entry (legacy existing, +0000)."""

    seed: int = 7
    profiles: int = 2000
    segments: list[tuple[str, str]] = field(default_factory=lambda: list(DEFAULT_SEGMENTS))
    records: int = 20_000
    duplicate_rate: float = 0.05  # exact byte-for-byte re-delivery of a recent record
    reexport_rate: float = 0.3  # same memberships, changed attributes
    out_of_order_rate: float = 0.03  # delivered late, after a newer record of the same profile
    invalid_rate: float = 0.0  # garbage: not JSON, no identity, unknown status, bad time
    legacy_existing_rate: float = 0.05  # a member written as "existing" instead of "realized"
    plus_0000_rate: float = 0.5  # "...+0000" instead of "...Z"
    include_names: bool = True
    include_timestamps: bool = True  # createdAt/updatedAt/mappingCreatedAt/mappingUpdatedAt
    target_record_bytes: int = 1500
    # Memberships one new event flips: None is the realistic mix (mostly one, sometimes two, of the
    # profile's usual segments); a number flips that many of all segments (a change-heavy stream).
    flips_per_event: int | None = None
    # Identity stitching, per new event: an anonymous profile logs in (its next exports add a CRM id
    # marked primary, so the top-ranked identity changes); per new profile: it is a second,
    # anonymous profile of an earlier person (another device), which a later event of theirs
    # merges with the first (the exports then carry both profiles' identities).
    login_rate: float = 0.0
    merge_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.profiles < 1 or self.records < 0:
            raise ValueError("profiles must be at least 1 and records not negative")
        if len(self.segments) < 2:
            raise ValueError("give at least two segments")
        for name in ("duplicate_rate", "reexport_rate", "out_of_order_rate", "invalid_rate",
                     "legacy_existing_rate", "plus_0000_rate", "login_rate", "merge_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.duplicate_rate + self.invalid_rate >= 1.0:
            raise ValueError("duplicate_rate + invalid_rate must leave room for new records")


Change = tuple[str, str, str, str]  # (profile_key, segment_id, "enter" | "exit", qualified_at ISO, UTC "Z")
Merge = tuple[str, tuple[str, ...], str]  # (surviving key, absorbed keys sorted, newest qualified_at ISO, UTC "Z")


@dataclass
class StreamTruth:
    """What the relay must make of a stream. ``stale``, ``duplicates`` and ``invalid_entries``
    count segment entries (like the relay's stats), the rest count records or changes."""

    records: int = 0
    invalid: int = 0  # records rejected whole
    invalid_entries: int = 0  # audience entries dropped from records processed without them (not strict)
    profiles: int = 0
    enters: int = 0
    exits: int = 0
    stale: int = 0
    duplicates: int = 0
    changes: list[Change] = field(default_factory=list)  # in delivery order
    merges: list[Merge] = field(default_factory=list)  # identity linking only; in delivery order

    @property
    def dead_letters(self) -> int:
        """Dead-letter entries the stream makes before any handler runs: records and entries."""
        return self.invalid + self.invalid_entries


# --------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------

_FIRST = ("John", "Maria", "Wei", "Aisha", "Lucas", "Sofia", "Hiroshi", "Olga", "Mateo", "Priya",
          "Liam", "Chloe", "Kwame", "Ingrid", "Diego", "Fatima", "Noah", "Elena", "Arjun", "Hannah")
_LAST = ("Doe", "Garcia", "Chen", "Okafor", "Müller", "Rossi", "Tanaka", "Ivanova", "Silva", "Patel",
         "Smith", "Dubois", "Mensah", "Larsen", "Fernández", "Haddad", "Kowalski", "Nguyen", "Byrne", "Kim")
_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "acme.com", "proton.me", "web.de")
_CITIES = (("San Jose", "CA", "95110", "US", "United States"), ("Austin", "TX", "73301", "US", "United States"),
           ("Seattle", "WA", "98101", "US", "United States"), ("Toronto", "ON", "M5H 2N2", "CA", "Canada"),
           ("London", "", "EC1A 1BB", "GB", "United Kingdom"), ("Berlin", "BE", "10115", "DE", "Germany"),
           ("Paris", "", "75001", "FR", "France"), ("Sydney", "NSW", "2000", "AU", "Australia"),
           ("Bengaluru", "KA", "560001", "IN", "India"), ("São Paulo", "SP", "01000-000", "BR", "Brazil"))
_STREETS = ("Park Avenue", "Main Street", "Oak Lane", "Harbour Road", "Market Street", "Elm Drive",
            "Riverside Way", "Hillcrest Road", "Station Road", "King Street")
_TIERS = ("bronze", "silver", "gold", "platinum")
_COLOURS = ("BLK", "WHT", "RED", "NVY", "GRN", "GRY")


class _Profile:
    __slots__ = ("index", "identity_map", "attributes", "affinity", "segments", "last_t", "born", "partner")

    def __init__(self, index: int) -> None:
        self.index = index
        self.identity_map: dict[str, list[dict[str, Any]]] = {}
        self.attributes: dict[str, Any] = {}
        self.affinity: list[int] = []
        # segment index -> [is_member, qualification time (epoch s)], in first-seen order
        self.segments: dict[int, list[Any]] = {}
        self.last_t = 0
        self.born = False
        self.partner: _Profile | None = None  # the same person's other profile, until they merge


class _Generator:
    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.rng = Random(spec.seed)
        self.profiles: list[_Profile | None] = [None] * spec.profiles
        self.born: list[int] = []  # profiles that have had a record (for garbage lines)
        self.clock = _START
        self.recent: deque[bytes] = deque(maxlen=256)  # candidates for exact re-delivery
        self.held: dict[int, bytes] = {}  # profile -> a record delivered after the profile's next one
        rng = Random(spec.seed ^ 0x5EED)
        self.segment_meta: list[dict[str, Any]] = []
        for _segment_id, name in spec.segments:
            created = (_START - rng.randrange(30, 900) * 86_400) * 1000 + rng.randrange(1000)
            updated = created + rng.randrange(0, 20 * 86_400) * 1000
            mapped = updated + rng.randrange(1, 10 * 86_400) * 1000
            meta: dict[str, Any] = {}
            if spec.include_timestamps:
                meta.update(createdAt=created, updatedAt=updated, mappingCreatedAt=mapped, mappingUpdatedAt=mapped)
            if spec.include_names:
                meta["name"] = name
            self.segment_meta.append(meta)
        # a few segments are popular, the rest less so
        self.segment_weights = [1.0 / (1 + i * 0.5) for i in range(len(spec.segments))]
        self._time_cache: dict[int, str] = {}

    # --- profiles ---------------------------------------------------------------------
    def _pick_profile(self) -> _Profile:
        rng, n = self.rng, self.spec.profiles
        if rng.random() < 0.3:  # hot profiles: a tenth of them get a third of the traffic
            index = rng.randrange(max(1, n // 10))
        else:
            index = rng.randrange(n)
        profile = self.profiles[index]
        if profile is None:
            profile = self.profiles[index] = self._new_profile(index)
            if self.spec.merge_rate and rng.random() < self.spec.merge_rate:
                self._make_partner(profile)
        return profile

    def _make_partner(self, profile: _Profile) -> None:
        """``profile`` becomes the second device of an earlier person: anonymous (its own ECID
        only) until a later event merges the two. Both carry the person's email address as an
        attribute (not an identity), which ``partition_key_of`` uses: one person, one partition."""
        if not self.born:
            return
        first = self.profiles[self.rng.choice(self.born)]
        if first is None or first.partner is not None or self.profiles[first.index] is not first:
            return  # already paired, or merged: this one stays a person of its own
        profile.identity_map = {"ecid": [{"id": str(self.rng.randrange(10**37, 10**38))}]}
        profile.attributes["person"] = first.attributes["person"]
        profile.attributes["personalEmail"] = first.attributes["personalEmail"]
        profile.partner, first.partner = first, profile

    def _merge_partners(self, profile: _Profile) -> None:
        """Adobe stitches the person's two profiles: from now on both indexes export one profile
        with both identity sets and, per segment, the newer of the two memberships."""
        other = profile.partner
        assert other is not None
        for namespace, items in other.identity_map.items():
            profile.identity_map.setdefault(namespace, []).extend(items)
        for index, (member, t) in other.segments.items():
            mine = profile.segments.get(index)
            if mine is None or t > mine[1]:
                profile.segments[index] = [member, t]
        profile.last_t = max(profile.last_t, other.last_t)
        profile.partner = other.partner = None
        self.profiles[other.index] = profile

    def _new_profile(self, index: int) -> _Profile:
        rng = self.rng
        profile = _Profile(index)
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        # The index keeps every profile's email its own: two generated people sharing one would be
        # one person to identity linking (and to Adobe), which the reference model does not expect.
        email = f"{first}.{last}{rng.randrange(1, 999)}.{index}@{rng.choice(_DOMAINS)}".lower()
        ecids = [{"id": str(rng.randrange(10**37, 10**38))} for _ in range(2 if rng.random() < 0.2 else 1)]
        identity_map: dict[str, list[dict[str, Any]]] = {"ecid": ecids}
        if rng.random() < 0.85:
            hashed: dict[str, Any] = {"id": hashlib.sha256(email.encode()).hexdigest()}
            if rng.random() < 0.3:
                hashed.update(primary=True, authenticatedState="authenticated")
            identity_map["email_lc_sha256"] = [hashed]
        profile.identity_map = identity_map
        city, state, postcode, country_code, _ = rng.choice(_CITIES)
        birth = datetime(1950, 1, 1) + timedelta(days=rng.randrange(0, 365 * 55))
        joined = _START - rng.randrange(30, 2000) * 86_400
        attributes: dict[str, Any] = {
            "person": {"name": {"firstName": first, "lastName": last}, "birthDate": birth.strftime("%Y-%m-%d")},
            "personalEmail": {"address": email},
        }
        if rng.random() < 0.6:
            attributes["mobilePhone"] = {"number": f"+1-{rng.randrange(200, 999)}-555-{rng.randrange(10000):04d}"}
        if rng.random() < 0.8:
            attributes["homeAddress"] = {
                "street1": f"{rng.randrange(1, 9999)} {rng.choice(_STREETS)}", "city": city,
                "stateProvince": state, "postalCode": postcode, "countryCode": country_code,
            }
        if rng.random() < 0.5:
            attributes["consents"] = {"marketing": {"email": {"val": rng.choice(("y", "n"))}}}
        attributes["loyalty"] = {
            "loyaltyID": [f"LOY-{rng.randrange(10**9):09d}"],
            "tier": rng.choice(_TIERS),
            "points": rng.randrange(0, 50_000),
            "lastActivityDate": _day(joined),
        }
        attributes["_acme"] = {
            "lifetimeValue": round(rng.uniform(0, 5000), 2),
            "lastPurchaseDate": _day(joined),
            "recentProducts": [],
        }
        profile.attributes = attributes
        weights = self.segment_weights
        chosen: list[int] = []
        for _ in range(rng.choice((1, 2, 2, 3, 3, 4))):
            pick = rng.choices(range(len(weights)), weights)[0]
            if pick not in chosen:
                chosen.append(pick)
        profile.affinity = chosen
        return profile

    # --- time -------------------------------------------------------------------------
    def _event_time(self, profile: _Profile) -> int:
        self.clock += self.rng.choice((0, 0, 1, 1, 1, 2, 3, 5))
        t = max(self.clock, profile.last_t + 1)
        profile.last_t = t
        return t

    def _format_time(self, t: int) -> str:
        text = self._time_cache.get(t)
        if text is None:
            if len(self._time_cache) > 4096:
                self._time_cache.clear()
            text = self._time_cache[t] = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return text

    # --- events -----------------------------------------------------------------------
    def _advance(self, profile: _Profile) -> None:
        """One step of the profile's true timeline: a membership change or a re-export."""
        rng = self.rng
        t = self._event_time(profile)
        segments = profile.segments
        if not profile.born:
            profile.born = True
            self.born.append(profile.index)
            for index in profile.affinity[: rng.choice((1, 1, 2))]:
                segments[index] = [True, t]
            if rng.random() < 0.15:  # left a segment before the stream began: first sighting is an exit
                unseen = [i for i in range(len(self.spec.segments)) if i not in segments]
                if unseen:
                    segments[rng.choice(unseen)] = [False, t]
        elif (partner := profile.partner) is not None and partner.born and rng.random() < 0.3:
            self._merge_partners(profile)
        elif self.spec.login_rate and "crmid" not in profile.identity_map and rng.random() < self.spec.login_rate:
            profile.identity_map["crmid"] = [
                {"id": f"CRM-{profile.index:07d}", "primary": True, "authenticatedState": "authenticated"}]
        elif rng.random() < self.spec.reexport_rate:
            for state in segments.values():  # re-evaluated members may carry a newer qualification time
                if state[0] and rng.random() < 0.3:
                    state[1] = t
        else:
            unseen = [i for i in range(len(self.spec.segments)) if i not in segments]
            if unseen and rng.random() < 0.05:
                # entered and left between two exports: the stream only ever sees the exit
                segments[rng.choice(unseen)] = [False, t]
            else:
                if self.spec.flips_per_event is None:
                    pool = profile.affinity if rng.random() < 0.92 else list(range(len(self.spec.segments)))
                    count = 2 if rng.random() < 0.2 else 1
                else:
                    pool, count = list(range(len(self.spec.segments))), self.spec.flips_per_event
                for index in rng.sample(pool, min(len(pool), count)):
                    current = segments.get(index)
                    if current is None:
                        segments[index] = [True, t]
                    else:
                        current[0] = not current[0]
                        current[1] = t
        self._touch_attributes(profile, t)

    def _touch_attributes(self, profile: _Profile, t: int) -> None:
        rng = self.rng
        attributes = profile.attributes
        loyalty = attributes["loyalty"]
        loyalty["points"] += rng.randrange(0, 400)
        loyalty["lastActivityDate"] = _day(t)
        acme = attributes["_acme"]
        if rng.random() < 0.4:
            acme["lifetimeValue"] = round(acme["lifetimeValue"] + rng.uniform(5, 300), 2)
            acme["lastPurchaseDate"] = _day(t)
        if rng.random() < 0.05:
            loyalty["tier"] = rng.choice(_TIERS)
        if rng.random() < 0.02:  # moved house
            city, state, postcode, country_code, _ = rng.choice(_CITIES)
            attributes["homeAddress"] = {
                "street1": f"{rng.randrange(1, 9999)} {rng.choice(_STREETS)}", "city": city,
                "stateProvince": state, "postalCode": postcode, "countryCode": country_code,
            }

    def _ups(self, profile: _Profile) -> dict[str, Any]:
        rng, spec = self.rng, self.spec
        ups: dict[str, Any] = {}
        for index, (member, t) in profile.segments.items():
            if member:
                status = "existing" if rng.random() < spec.legacy_existing_rate else "realized"
            else:
                status = "exited"
            suffix = "+0000" if rng.random() < spec.plus_0000_rate else "Z"
            entry = {"lastQualificationTime": self._format_time(t) + suffix, "status": status}
            entry.update(self.segment_meta[index])
            ups[spec.segments[index][0]] = entry
        return ups

    def _document(self, profile: _Profile, ups: dict[str, Any] | None = None) -> dict[str, Any]:
        attributes = profile.attributes
        document = {key: value for key, value in attributes.items()}
        document["segmentMembership"] = {"ups": self._ups(profile) if ups is None else ups}
        document["identityMap"] = profile.identity_map
        return document

    def _record(self, profile: _Profile) -> bytes:
        document = self._document(profile)
        data = orjson.dumps(document)
        gap = self.spec.target_record_bytes - len(data)
        if gap >= 16:  # fill with recently viewed products, as a tenant field group would
            count = gap // 16  # '"SKU-01234-BLK",' is 16 bytes: lands within 16 bytes under the target
            acme = dict(profile.attributes["_acme"])
            acme["recentProducts"] = [
                f"SKU-{(profile.index * 7919 + i * 104_729) % 100_000:05d}-{_COLOURS[(profile.index + i) % 6]}"
                for i in range(count)
            ]
            document["_acme"] = acme
            data = orjson.dumps(document)
        return data

    def _garbage(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(4)
        if not self.born or kind == 0:
            if self.recent and rng.random() < 0.7:
                whole = rng.choice(self.recent)
                return whole[: rng.randrange(1, len(whole) - 1)]  # a cut-off record: never valid JSON
            return rng.choice((b"<html><body>502 Bad Gateway</body></html>", b"\x00\x01\x02 not json",
                               b"{'single': 'quotes'}", b"segmentMembership=ups"))
        profile = self.profiles[rng.choice(self.born)]
        assert profile is not None
        if kind == 1 or not profile.segments:
            document = self._document(profile)
            choice = rng.randrange(4)
            if choice == 0:
                del document["identityMap"]
            elif choice == 1:
                document["identityMap"] = {}
            elif choice == 2:
                document["identityMap"] = {"ecid": [{"id": ""}]}
            else:
                document["identityMap"] = {"ecid": [{"xid": "14575006536349286404619648085736425115"}]}
            return orjson.dumps(document)
        ups = self._ups(profile)
        broken = rng.choice(list(ups))
        victim = dict(ups[broken])
        if kind == 2:
            victim["status"] = rng.choice(("pending", "Realized", "qualified", ""))
        else:
            victim["lastQualificationTime"] = rng.choice(
                ("2026-02-30T10:00:00Z", "2026-13-01T00:00:00+0000", "yesterday", "", "2026-01-01T25:61:00Z")
            )
        ups[broken] = victim
        return orjson.dumps(self._document(profile, ups))

    # --- delivery -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[bytes]:
        spec, rng = self.spec, self.rng
        remaining = spec.records
        held = self.held
        recent = self.recent
        while remaining > 0:
            if remaining <= 2 * len(held):
                # near the end: every held record still comes after a newer one of its profile
                index = next(iter(held))
                profile = self.profiles[index]
                assert profile is not None
                self._advance(profile)
                data = self._record(profile)
                recent.append(data)
                yield data
                yield held.pop(index)
                remaining -= 2
                continue
            roll = rng.random()
            if roll < spec.invalid_rate:
                yield self._garbage()
                remaining -= 1
                continue
            if roll < spec.invalid_rate + spec.duplicate_rate and recent:
                yield rng.choice(recent)
                remaining -= 1
                continue
            profile = self._pick_profile()
            self._advance(profile)
            data = self._record(profile)
            late = held.pop(profile.index, None)
            if late is not None:
                recent.append(data)
                yield data
                recent.append(late)
                yield late
                remaining -= 2
            elif profile.segments and remaining >= 2 * (len(held) + 1) and rng.random() < spec.out_of_order_rate:
                held[profile.index] = data
            else:
                recent.append(data)
                yield data
                remaining -= 1


def _day(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def generate(spec: StreamSpec) -> Iterator[bytes]:
    """Yield ``spec.records`` JSON records (bytes, no newline) in delivery order."""
    return iter(_Generator(spec))


def write_jsonl(spec: StreamSpec, path: str | Path, link_namespaces: Collection[str] | None = None) -> StreamTruth:
    """Write the stream to ``path`` (one record per line) and return what the relay must make of
    it (``link_namespaces``: with identity linking, see ``expected_changes``)."""
    with open(path, "wb") as handle:
        write = handle.write

        def tee() -> Iterator[bytes]:
            for record in generate(spec):
                write(record)
                write(b"\n")
                yield record

        return expected_changes(tee(), link_namespaces=link_namespaces)


# --------------------------------------------------------------------------------------
# the reference model
# --------------------------------------------------------------------------------------

IdentityMap = Mapping[str, Sequence[Mapping[str, Any]]]


def reference_profile_key(identity_map: IdentityMap) -> str:
    """The default profile key rule, stated plainly: primary identities if any, else all;
    the alphabetically first namespace (lower-cased); its smallest id. ``"namespace:id"``."""
    every = [(ns.lower(), item["id"], item.get("primary") is True) for ns, items in identity_map.items() for item in items]
    candidates = [(ns, i) for ns, i, primary in every if primary] or [(ns, i) for ns, i, _ in every]
    namespace = min(ns for ns, _ in candidates)
    return f"{namespace}:{min(i for ns, i in candidates if ns == namespace)}"


_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(Z|[+-]\d{2}:?\d{2})")


def _parse_time(text: Any) -> datetime | None:
    """``YYYY-MM-DDTHH:MM:SS[.ffffff]`` then ``Z``, ``+HHMM`` or ``+HH:MM``; None if not that."""
    if not isinstance(text, str):
        return None
    match = _TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                          int((fraction or "0").ljust(6, "0")), tzinfo=UTC)
    except ValueError:
        return None
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        digits = offset[1:].replace(":", "")
        moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return moment


def iso_utc(moment: datetime) -> str:
    """How ``StreamTruth.changes`` writes a qualification time: UTC, ``Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


_Entry = tuple[str, str, str, datetime]  # (namespace, segment_id, status, time)


def _usable_identity(item: Any) -> bool:
    """A non-empty string id, and optional fields of the right type; anything else is skipped."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("id"), str)
        and item["id"] != ""
        and isinstance(item.get("primary", False), bool)
        and isinstance(item.get("authenticatedState"), (str, type(None)))
    )


def _read(raw: bytes, strict_entries: bool = False
          ) -> tuple[dict[str, list[Mapping[str, Any]]], list[_Entry], int] | None:
    """The usable identities, the segment entries and the number of malformed entries dropped
    of a record, or None if it is invalid (with ``strict_entries``, one malformed entry is)."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    raw_identities = document.get("identityMap", {})
    if not isinstance(raw_identities, dict):
        return None
    identities: dict[str, list[Mapping[str, Any]]] = {}
    for namespace, items in raw_identities.items():
        if not isinstance(items, list):
            continue  # an unusable namespace is skipped, not fatal
        usable = [item for item in items if _usable_identity(item)]
        if usable:
            identities[namespace] = usable
    if not identities:
        return None
    membership = document.get("segmentMembership", {})
    if not isinstance(membership, dict):
        return None
    entries: list[_Entry] = []
    dropped = 0
    for namespace, audiences in membership.items():
        if not isinstance(audiences, dict):
            if strict_entries:
                return None
            dropped += 1
            continue
        for segment_id, value in audiences.items():
            moment = _parse_time(value.get("lastQualificationTime")) if isinstance(value, dict) else None
            if moment is None or value.get("status") not in _STATUSES:
                if strict_entries:
                    return None
                dropped += 1
                continue
            entries.append((namespace, segment_id, value["status"], moment))
    return identities, entries, dropped


def expected_changes(
    records: Iterable[bytes], key: Callable[[IdentityMap], str] = reference_profile_key, *,
    strict_entries: bool = False, link_namespaces: Collection[str] | None = None,
) -> StreamTruth:
    """Apply the DESIGN.md rules to ``records`` in delivery order, one (profile, namespace,
    segment) at a time, and return every change the relay must emit, in order.

    - a malformed audience entry is dropped (the record's others count), or with
      ``strict_entries`` (``pipeline.strict_entries``) rejects its record

    - a time older than the stored one: stale, ignored
    - the same status at the same time: duplicate, ignored
    - the same time with another status: newer (the later record wins)
    - non-member -> member: enter; member -> non-member: exit
    - first sighting of ``exited``: exit; member -> member: nothing
    - ``realized`` and ``existing`` are members, ``exited`` is not

    ``link_namespaces`` (``identity.mode = "link"``; ``["*"]`` for every namespace): a record
    belongs to the profile that already owns one of its identities (``namespace:id``, the
    namespace lower case), whatever its key would be now; a record whose identities belong to
    several profiles merges them into the one with the smallest key, each segment keeping the
    membership with the newer time (the survivor's on a tie), before its own entries count.
    Without it, a profile is ``key(identities)`` alone.
    """
    truth = StreamTruth()
    stored: dict[str, dict[tuple[str, str], tuple[str, datetime]]] = {}  # profile -> segment -> (status, time)
    profiles: set[str] = set()
    linking = None if link_namespaces is None else {namespace.lower() for namespace in link_namespaces}
    owner: dict[str, str] = {}  # identity -> the profile it belongs to
    identities_of: dict[str, list[str]] = {}  # profile -> its identities
    for raw in records:
        truth.records += 1
        read = _read(raw, strict_entries)
        if read is None:
            truth.invalid += 1
            continue
        identities, entries, dropped = read
        truth.invalid_entries += dropped
        if linking is None:
            profile = key(identities)
        else:
            mine = [f"{namespace.lower()}:{item['id']}" for namespace, items in identities.items()
                    if "*" in linking or namespace.lower() in linking for item in items]
            owners = sorted({owner[identity] for identity in mine if identity in owner})
            profile = owners[0] if owners else key(identities)
            if len(owners) > 1:
                truth.merges.append(_merge(profile, owners[1:], stored, owner, identities_of))
            for identity in mine:
                if identity not in owner:
                    owner[identity] = profile
                    identities_of.setdefault(profile, []).append(identity)
        profiles.add(profile)
        state = stored.setdefault(profile, {})
        for namespace, segment_id, status, moment in entries:
            slot = (namespace, segment_id)
            old = state.get(slot)
            if old is not None:
                old_status, old_moment = old
                if moment < old_moment:
                    truth.stale += 1
                    continue
                if moment == old_moment and status == old_status:
                    truth.duplicates += 1
                    continue
            state[slot] = (status, moment)
            is_member = status in _MEMBER
            was_member = old is not None and old[0] in _MEMBER
            if is_member and not was_member:
                truth.enters += 1
                truth.changes.append((profile, segment_id, "enter", iso_utc(moment)))
            elif not is_member and (old is None or was_member):
                truth.exits += 1
                truth.changes.append((profile, segment_id, "exit", iso_utc(moment)))
    truth.profiles = len(profiles)
    return truth


def _merge(survivor: str, absorbed: list[str], stored: dict[str, dict[tuple[str, str], tuple[str, datetime]]],
           owner: dict[str, str], identities_of: dict[str, list[str]]) -> Merge:
    """Fold the ``absorbed`` profiles (sorted) into ``survivor``: memberships, then identities."""
    state = stored.setdefault(survivor, {})
    for other in absorbed:
        for slot, value in stored.pop(other, {}).items():
            old = state.get(slot)
            if old is None or value[1] > old[1]:
                state[slot] = value
        for identity in identities_of.pop(other, []):
            owner[identity] = survivor
            identities_of.setdefault(survivor, []).append(identity)
    newest = max((moment for _, moment in state.values()), default=datetime(1970, 1, 1, tzinfo=UTC))
    return survivor, tuple(absorbed), iso_utc(newest)
