"""Redis membership state: one hash per profile, conditional writes by a Lua script, shared by replicas.

Layout::

    key    {key_prefix}profile:{profile_key}       one hash per profile (the profile key verbatim)
    field  ESCAPE(namespace) + "/" + segment_id    as DynamoDB's range key: in the namespace ``%`` becomes
                                                   ``%25`` and ``/`` becomes ``%2F``, so the first ``/``
                                                   ends it and the segment id follows verbatim
    value  STATUS + "|" + QUALIFIED_AT_US          e.g. ``realized|1700000000123456``

``save_many`` runs one Lua script per profile, all in one pipeline (one round trip): EVALSHA of the script
loaded by ``open``. When the server answers NOSCRIPT (after a restart, a failover or a SCRIPT FLUSH) the
script is loaded again and the whole batch re-sent once: the script is idempotent per field, so applying
it again where it already ran is harmless. The script applies ``supersedes`` to every field
server-side, atomically: a field is replaced only by a newer qualification time, or the same time with
another status, so no writer can move a membership back in time. Times are compared as decimal integer
strings, never as Lua numbers (doubles), so any int is exact. A script touches one key only, so this
also works on Redis Cluster.

``load_many`` is one pipeline too: HMGET of the named fields of a profile, HGETALL of a profile asked
for whole. Writes are synchronous, so ``flush`` has nothing to do and ``load_many`` sees every
completed ``save_many``.
Durability is the server's (AOF/RDB, replication): configure it there.

The alias index (identity linking) lives beside the profiles::

    {key_prefix}alias:{alias}           string: the canonical profile key of an identity (SET NX claims it)
    {key_prefix}aliases:{profile_key}   set: a profile's aliases (``state show``)
    {key_prefix}redirect:{profile_key}  string: the profile that absorbed this one in a merge

Profile claims (``ProfileClaims``: replicas never diff one profile at once)::

    {key_prefix}claim:{profile_key}     string: the owner, with the claim's TTL as the key's expiry

taken and released by one-key scripts (an owner renews or frees only its own claim), one
pipeline per call.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...errors import StartupError
from ...model import SegmentStatus
from ..stored import SegmentKey, StoredMembership
from .base import ProfileState, RedirectFollowing, ScanQueries, SingleProfileAccess, Updates, Wanted
from .dynamodb import decode_segment, encode_segment

SCHEMES = ("redis", "rediss")

# KEYS[1]: a claim. ARGV: owner, ttl in ms. 1 when the owner holds it now.
CLAIM_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS[1]: a claim. ARGV: owner. Deletes it only if it is the owner's.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_STATUS = {status.value: status for status in SegmentStatus}
_INT = re.compile(r"-?(0|[1-9][0-9]*)")

# KEYS[1]: the profile's hash. ARGV: field, qualified_at_us, status, repeated. Returns how many fields it wrote.
SAVE_SCRIPT = """
local function cmp(a, b)  -- canonical decimal integers as strings: exact at any size
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then
    if na then return -1 else return 1 end
  end
  if na then a, b = string.sub(b, 2), string.sub(a, 2) end
  if #a ~= #b then
    if #a < #b then return -1 else return 1 end
  end
  if a == b then return 0 end
  if a < b then return -1 else return 1 end
end
local written = 0
for i = 1, #ARGV, 3 do
  local field, at, status = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[1], field)
  local replace = true
  if old then
    local sep = string.find(old, '|', 1, true)
    if sep then
      local c = cmp(at, string.sub(old, sep + 1))
      replace = c > 0 or (c == 0 and status ~= string.sub(old, 1, sep - 1))
    end
  end
  if replace then
    redis.call('HSET', KEYS[1], field, status .. '|' .. at)
    written = written + 1
  end
end
return written
"""


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo or ``password=`` query parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable redis URL>"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name == "password" for name, _ in pairs):
            query = urlencode([(name, "***" if name == "password" else value) for name, value in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_password(url: str) -> str | None:
    """The password a redis URL carries (userinfo or ``password=`` query parameter), if any."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return parts.password
    except ValueError:
        return None
    for name, value in parse_qsl(parts.query):
        if name == "password" and value:
            return value
    return None


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a redis glob (SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def encode_value(value: StoredMembership) -> str:
    return f"{value.status.value}|{value.qualified_at_us}"


def decode_value(raw: str) -> StoredMembership:
    status, sep, at = raw.partition("|")
    if not sep or status not in _STATUS or not _INT.fullmatch(at):
        raise ValueError(f"not a membership value: {raw!r}")
    return StoredMembership(_STATUS[status], int(at))


class RedisStore(SingleProfileAccess, ScanQueries, RedirectFollowing):
    """Membership state in Redis (see the module docstring for the layout), for replicas on many hosts.

    ``url`` is a redis-py URL: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, or ``rediss://`` for TLS.
    """

    def __init__(self, url: str, *, key_prefix: str = "segment-relay:") -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"invalid redis URL {redact_url(url)!r}: {exc}") from None
        if parts.scheme not in SCHEMES:
            raise ValueError(f"invalid redis URL {redact_url(url)!r}: use redis://HOST:PORT/DB or rediss://...")
        self.url = url
        self.key_prefix = key_prefix
        self._client: Any = None
        self._sha: str | None = None

    def __repr__(self) -> str:
        return f"RedisStore({redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"

    scan_note = "SCANs every profile key under the store's prefix (there is no index by segment)"

    def key(self, profile_key: str) -> str:
        return f"{self.key_prefix}profile:{profile_key}"

    # --- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        from redis.asyncio import Redis
        from redis.exceptions import RedisError

        self._client = Redis.from_url(self.url, decode_responses=True)
        try:
            self._sha = await self._client.script_load(SAVE_SCRIPT)
        except (RedisError, OSError) as exc:
            await self.close()
            raise StartupError(f"membership store {self!r} cannot be opened: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def flush(self) -> None:
        pass  # every save is written before it returns

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()  # closes the connection pool it created from the URL (redis-py >= 5.0.1)

    # --- reads and writes ----------------------------------------------------------------
    async def load_many(self, profiles: Wanted) -> dict[str, ProfileState]:
        assert self._client is not None, "store not opened"
        # What each queued command answers for: (profile, None) for HGETALL, (profile, keys) for HMGET.
        asked: list[tuple[str, list[SegmentKey] | None]] = []
        async with self._client.pipeline(transaction=False) as pipe:
            for profile_key, segments in profiles.items():
                if segments is None:
                    pipe.hgetall(self.key(profile_key))
                    asked.append((profile_key, None))
                elif segments:  # HMGET of no field is an error, and there is nothing to read
                    keys = list(segments)
                    pipe.hmget(self.key(profile_key), [encode_segment(*key) for key in keys])
                    asked.append((profile_key, keys))
            if not asked:
                return {}
            replies = await pipe.execute()
        states: dict[str, ProfileState] = {}
        for (profile_key, named), reply in zip(asked, replies, strict=True):
            if named is None:
                state = {decode_segment(field): decode_value(value) for field, value in reply.items()}
            else:  # HMGET answers in the order asked, None for a missing field
                state = {key: decode_value(value) for key, value in zip(named, reply, strict=True) if value is not None}
            if state:
                states[profile_key] = state
        return states

    # --- the alias index ---------------------------------------------------------------------
    async def _alias_owners(self, aliases: list[str]) -> dict[str, str]:
        assert self._client is not None, "store not opened"
        values = await self._client.mget([f"{self.key_prefix}alias:{alias}" for alias in aliases])
        return {alias: key for alias, key in zip(aliases, values, strict=True) if key is not None}

    async def _claim_owners(self, claims: Mapping[str, str]) -> dict[str, str]:
        assert self._client is not None, "store not opened"
        aliases = list(claims)
        async with self._client.pipeline(transaction=False) as pipe:
            for alias in aliases:
                name = f"{self.key_prefix}alias:{alias}"
                pipe.set(name, claims[alias], nx=True)  # the conditional create: the first claim wins
                pipe.get(name)
            replies = await pipe.execute()
        owners = {alias: replies[2 * index + 1] for index, alias in enumerate(aliases)}
        won: dict[str, list[str]] = {}
        for index, alias in enumerate(aliases):
            if replies[2 * index]:
                won.setdefault(claims[alias], []).append(alias)
        if won:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, mine in won.items():
                    pipe.sadd(f"{self.key_prefix}aliases:{key}", *mine)
                await pipe.execute()
        return owners

    async def _redirect_targets(self, keys: list[str]) -> dict[str, str]:
        assert self._client is not None, "store not opened"
        values = await self._client.mget([f"{self.key_prefix}redirect:{key}" for key in keys])
        return {key: target for key, target in zip(keys, values, strict=True) if target is not None}

    async def redirect_profiles(self, redirects: Mapping[str, str]) -> None:
        """The redirect first (lookups follow it from then on), then the aliases moved to the
        survivor and the absorbed profile dropped: a crash in between leaves only extra work."""
        assert self._client is not None, "store not opened"
        prefix = self.key_prefix
        for absorbed, survivor in redirects.items():
            await self._client.set(f"{prefix}redirect:{absorbed}", survivor)
            aliases = await self._client.smembers(f"{prefix}aliases:{absorbed}")
            async with self._client.pipeline(transaction=False) as pipe:
                for alias in aliases:
                    pipe.set(f"{prefix}alias:{alias}", survivor)
                if aliases:
                    pipe.sadd(f"{prefix}aliases:{survivor}", *aliases)
                pipe.delete(f"{prefix}aliases:{absorbed}", self.key(absorbed))
                await pipe.execute()

    # --- profile claims ------------------------------------------------------------------------
    async def claim_profiles(self, keys: Collection[str], owner: str, ttl_s: float) -> set[str]:
        assert self._client is not None, "store not opened"
        names = list(keys)
        if not names:
            return set()
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self._client.pipeline(transaction=False) as pipe:
            for key in names:
                pipe.eval(CLAIM_SCRIPT, 1, f"{self.key_prefix}claim:{key}", owner, ttl_ms)
            replies = await pipe.execute()
        return {key for key, reply in zip(names, replies, strict=True) if reply == 1}

    async def release_profiles(self, keys: Collection[str], owner: str) -> None:
        assert self._client is not None, "store not opened"
        if not keys:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.eval(RELEASE_SCRIPT, 1, f"{self.key_prefix}claim:{key}", owner)
            await pipe.execute()

    async def aliases_of(self, profile_key: str) -> list[str]:
        assert self._client is not None, "store not opened"
        return sorted(await self._client.smembers(f"{self.key_prefix}aliases:{profile_key}"))

    # --- asking the state (operators' tool) -------------------------------------------------
    async def _profile_keys(self, count: int = 1000) -> AsyncIterator[list[str]]:
        """The hash names of every profile, a SCAN page at a time (a key may come twice: SCAN's rule)."""
        pattern = _glob_escape(self.key(""))+ "*"
        cursor: int | str = 0
        while True:
            cursor, names = await self._client.scan(cursor=cursor, match=pattern, count=count)
            if names:
                yield names
            if int(cursor) == 0:
                return

    async def profiles(self) -> AsyncIterator[tuple[str, ProfileState]]:
        assert self._client is not None, "store not opened"
        skip = len(self.key(""))
        seen: set[str] = set()  # SCAN may return a key twice while the keyspace is rehashed
        async for names in self._profile_keys():
            names = [name for name in names if name not in seen]
            seen.update(names)
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(name)
                replies = await pipe.execute()
            for name, reply in zip(names, replies, strict=True):
                if reply:
                    yield name[skip:], {decode_segment(field): decode_value(value) for field, value in reply.items()}

    async def members(self, segment: SegmentKey) -> AsyncIterator[str]:
        assert self._client is not None, "store not opened"
        skip = len(self.key(""))
        field = encode_segment(*segment)
        seen: set[str] = set()
        async for names in self._profile_keys():
            names = [name for name in names if name not in seen]
            seen.update(names)
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hget(name, field)  # only the one field: the scan reads keys, not whole profiles
                replies = await pipe.execute()
            for name, reply in zip(names, replies, strict=True):
                if reply is not None and decode_value(reply).is_member:
                    yield name[skip:]

    async def save_many(self, updates: Updates) -> None:
        assert self._client is not None, "store not opened"
        from redis.exceptions import NoScriptError

        batch: list[tuple[str, list[str]]] = []
        for profile_key, changes in updates.items():
            if not changes:
                continue
            args: list[str] = []
            for key, value in changes.items():
                args += (encode_segment(*key), str(value.qualified_at_us), value.status.value)
            batch.append((self.key(profile_key), args))
        if not batch:
            return
        try:
            await self._run_scripts(batch)
        except NoScriptError:
            # The server lost its script cache (restart, failover, SCRIPT FLUSH). Load the script again and
            # re-send the whole batch once: where a script did run, running it again changes nothing.
            self._sha = await self._client.script_load(SAVE_SCRIPT)
            await self._run_scripts(batch)

    async def _run_scripts(self, batch: list[tuple[str, list[str]]]) -> None:
        """One EVALSHA per (key, args) of ``batch``, in one pipeline; raises the first error.

        A NOSCRIPT answer anywhere in the batch is raised first, so the caller can recover from it even
        when another command failed too.
        """
        from redis.exceptions import NoScriptError

        async with self._client.pipeline(transaction=False) as pipe:
            for name, args in batch:
                pipe.evalsha(self._sha, 1, name, *args)
            replies = await pipe.execute(raise_on_error=False)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            raise next((error for error in errors if isinstance(error, NoScriptError)), errors[0])
