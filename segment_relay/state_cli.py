"""`segment-relay state`: ask the membership store what it holds (read-only).

The store is the one the config (or ``--state``) names, opened without creating anything: a
missing sqlite file or DynamoDB table is an error, not a new empty store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from .config import ConfigError, environment_secrets, load_config, secrets_in
from .consumer.state.base import AliasIndex, ProfileState, StateQueries
from .errors import StartupError

state_app = typer.Typer(
    help="Ask the membership store what it holds: one profile, a segment's members, totals. Read-only.",
    no_args_is_help=True,
)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (or $SEGMENT_RELAY_CONFIG)")]
StateOption = Annotated[str | None, typer.Option("--state", help="The store (default: the config's): sqlite:PATH, dynamodb:TABLE or redis://...")]
NamespaceOption = Annotated[str, typer.Option("--namespace", help="The segment's namespace")]

T = TypeVar("T")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _store_spec(config: Path | None, state: str | None) -> str:
    from .ops.logging import configure_logging

    try:
        settings = load_config(config, state=state)
    except ConfigError as exc:
        _fail(str(exc))
        raise  # not reached
    configure_logging("WARNING", json=settings.log_format == "json",
                      secrets=[*secrets_in(settings), *environment_secrets()])
    return settings.state


@asynccontextmanager
async def _opened(spec: str) -> AsyncIterator[StateQueries]:
    from .consumer.state import open_existing_store

    if spec == "memory":
        raise StartupError("the memory store lives inside the relay's process and ends with it: there is nothing "
                           "to ask; use sqlite:PATH, dynamodb:TABLE or redis://... for state that outlives the relay")
    store = await open_existing_store(spec)
    try:
        assert isinstance(store, StateQueries)
        yield store
    finally:
        await store.close()


def _run(spec: str, work: Callable[[StateQueries], Awaitable[T]]) -> T:
    async def main() -> T:
        async with _opened(spec) as store:
            return await work(store)

    try:
        return asyncio.run(main())
    except (StartupError, ValueError, OSError) as exc:
        _fail(str(exc), 1)
        raise  # not reached


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time(qualified_at_us: int) -> str:
    return (_EPOCH + timedelta(microseconds=qualified_at_us)).isoformat().replace("+00:00", "Z")


def profile_view(profile_key: str, state: ProfileState) -> dict[str, Any]:
    """A profile's stored state as ``state show`` prints it."""
    segments = [
        {"namespace": namespace, "segment_id": segment_id, "status": value.status.value,
         "member": value.is_member, "qualified_at": _time(value.qualified_at_us)}
        for (namespace, segment_id), value in sorted(state.items())
    ]
    return {"profile_key": profile_key, "member_of": [s["segment_id"] for s in segments if s["member"]],
            "segments": segments}


def _profile_key(identity: str) -> str:
    namespace, sep, value = identity.partition(":")
    if not sep or not namespace or not value:
        _fail(f"{identity!r} is not NAMESPACE:ID, e.g. ecid:123 or email_lc_sha256:ab12...")
    return f"{namespace.lower()}:{value}"  # profile keys keep the namespace in lower case


@state_app.command("show")
def show(
    identity: Annotated[str, typer.Argument(
        help="An identity NAMESPACE:ID (the namespace in any case): a profile key, or any identity linked to one")],
    config: ConfigOption = None, state: StateOption = None,
) -> None:
    """Print one profile's canonical key, linked identities and stored memberships as JSON; exit 1
    if the store has nothing for it."""
    alias = _profile_key(identity)

    async def work(store: StateQueries) -> tuple[str, list[str], ProfileState]:
        profile_key = alias
        aliases: list[str] = []
        if isinstance(store, AliasIndex):  # identity linking: the identity may be any of the profile's
            profile_key = (await store.find_profiles([alias])).get(alias, alias)
            aliases = await store.aliases_of(profile_key)
        return profile_key, aliases, await store.load(profile_key)  # type: ignore[attr-defined]

    profile_key, aliases, found = _run(_store_spec(config, state), work)
    if not found:
        _fail(f"no state stored for {alias!r}: it is neither a profile key (the identity the profile key rule "
              "picks, see the README's \"The profile key\") nor an identity linked to one", 1)
    view = profile_view(profile_key, found)
    view["aliases"] = aliases
    typer.echo(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())


@state_app.command("members")
def members(
    segment: Annotated[str, typer.Argument(help="The segment id")],
    namespace: NamespaceOption = "ups",
    count: Annotated[bool, typer.Option("--count", help="Print only how many")] = False,
    config: ConfigOption = None, state: StateOption = None,
) -> None:
    """The profile keys that are members of SEGMENT now, one a line, as the store streams them."""
    spec = _store_spec(config, state)

    async def work(store: StateQueries) -> int:
        total = 0
        async for profile_key in store.members((namespace, segment)):
            total += 1
            if not count:
                typer.echo(profile_key)
        typer.echo(f"{total} members of {namespace}/{segment}; the store {store.scan_note}", err=True)
        return total

    total = _run(spec, work)
    if count:
        typer.echo(total)


@state_app.command("stats")
def stats(config: ConfigOption = None, state: StateOption = None) -> None:
    """Profiles, stored memberships and current members per segment, as JSON."""

    async def work(store: StateQueries) -> dict[str, Any]:
        figures = await store.stats()
        return {
            "profiles": figures.profiles,
            "memberships": figures.memberships,
            "members": {f"{namespace}/{segment}": n for (namespace, segment), n in sorted(figures.members.items())},
            "how": figures.how,
        }

    typer.echo(orjson.dumps(_run(_store_spec(config, state), work), option=orjson.OPT_INDENT_2).decode())
