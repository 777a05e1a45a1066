"""The `segment-relay` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from .config import ConfigError, environment_secrets, load_config, secrets_in
from .errors import StartupError
from .provisioning.cli import app as provision_app
from .state_cli import state_app

app = typer.Typer(
    help="Consume Adobe Real-Time CDP segment exports and call handlers on real enter/exit changes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (or $SEGMENT_RELAY_CONFIG)")] = None,
    source: Annotated[str | None, typer.Option(help="file:PATH, file:- for stdin, kinesis:STREAM or eventhubs:HUB")] = None,
    state: Annotated[str | None, typer.Option(help="memory, sqlite:PATH, dynamodb:TABLE or redis://HOST:PORT/DB")] = None,
    handler: Annotated[list[str] | None, typer.Option("--handler", "-H", help="log | jsonl:PATH | webhook:URL | NAME[:ARG] | module:attr; repeatable")] = None,
    dead_letter: Annotated[str | None, typer.Option("--dead-letter", help="JSONL file for invalid records and failed changes")] = None,
    segments: Annotated[str | None, typer.Option(help="Comma-separated segment ids to keep; others are ignored")] = None,
    checkpoint_file: Annotated[str | None, typer.Option("--checkpoint-file", help="file source: resume point kept here")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Serve /metrics, /healthz, /readyz on this port")] = None,
    metrics_host: Annotated[str | None, typer.Option("--metrics-host", help="Address for the metrics server")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the changes that would fire (JSON lines on stdout) and the totals; call no handler, save no state, move no checkpoint, write no dead letter, take no lease. Not for Event Hubs yet")] = False,
) -> None:
    """Run the relay until the source ends or SIGINT/SIGTERM; then drain, checkpoint and exit 0."""
    from .app import Relay
    from .ops.logging import configure_logging
    from .ops.runtime import tune_gc

    try:
        settings = load_config(
            config, source=source, state=state, handlers=handler, dead_letter=dead_letter,
            segments=segments, checkpoint_file=checkpoint_file, metrics_port=metrics_port,
            metrics_host=metrics_host, log_level=log_level,
        )
        configure_logging(settings.log_level, json=settings.log_format == "json",
                          secrets=[*secrets_in(settings), *environment_secrets()])
        relay = _dry_run_relay(settings) if dry_run else Relay(settings)
    except ConfigError as exc:
        _fail(str(exc))
        return
    tune_gc()
    try:
        stats = asyncio.run(relay.run())
    except (StartupError, FileNotFoundError, ValueError, OSError) as exc:  # e.g. no stream, foreign checkpoint
        _fail(str(exc), 1)
        return
    summary = {"dry_run": True, **stats.summary()} if dry_run else stats.summary()
    typer.echo(orjson.dumps({"summary": summary}).decode(), err=True)


def _dry_run_relay(settings: Any) -> Any:
    from .app import Relay
    from .consumer.deadletter import MemoryDeadLetter
    from .dry_run import DryRunStore, dry_run_config, dry_run_source

    config = dry_run_config(settings)
    return Relay(config, source=dry_run_source(config), store=DryRunStore(config.state),
                 dead_letter=MemoryDeadLetter())


@app.command()
def validate(
    file: Annotated[str, typer.Argument(help="JSONL file of export records, or - for stdin")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per invalid record")] = False,
) -> None:
    """Check every record of FILE; report each invalid one with its line and reason. Exit 1 if any."""
    from .consumer.export import InvalidRecord, parse_export
    from .consumer.profile_key import ProfileKeyRule

    rule = ProfileKeyRule()
    records = invalid = 0
    try:
        stream = sys.stdin.buffer if file == "-" else open(file, "rb")
    except OSError as exc:
        _fail(f"cannot read {file!r}: {exc.strerror}")
        return
    with stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            records += 1
            try:
                rule.key_for(parse_export(line).identity_map)
            except InvalidRecord as exc:
                invalid += 1
                if as_json:
                    typer.echo(orjson.dumps({"line": line_number, "reason": exc.reason.value, "detail": exc.detail}).decode())
                else:
                    typer.echo(f"line {line_number}: {exc.reason.value}: {exc.detail}")
    typer.echo(f"{records} records, {invalid} invalid", err=True)
    if invalid:
        raise typer.Exit(1)


@app.command("handlers")
def list_handlers() -> None:
    """List the built-in handlers and those installed as plug-ins (entry points)."""
    from .handlers.loader import available_handlers

    for name, description in available_handlers().items():
        typer.echo(f"{name:20} {description}")


@app.command()
def demo(
    source: Annotated[str, typer.Option(help="eventhubs (emulator), kinesis (kinesalite, needs Node) or file")] = "eventhubs",
    records: Annotated[int, typer.Option(help="Profile exports Adobe sends")] = 5000,
    profiles: Annotated[int, typer.Option(help="Profiles in the simulated population")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the simulated population")] = 7,
    rate: Annotated[float | None, typer.Option(help="Exports per second (default: as fast as the target takes them)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the change lines")] = False,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Serve metrics and probes here while it runs (0: any free port)")] = 0,
    out: Annotated[Path, typer.Option(help="Directory for the destination file, state, changes and dead letter")] = Path("demo-out"),
) -> None:
    """The whole system on this machine, no cloud account: a local Adobe fake provisions and exports, the relay consumes, and its totals are checked against the truth."""
    from .demo import DemoOptions, run_demo

    if source not in ("eventhubs", "kinesis", "file"):
        _fail("--source: use eventhubs, kinesis or file")
    options = DemoOptions(source=source, records=records, profiles=profiles, seed=seed, rate=rate, quiet=quiet,
                          metrics_port=metrics_port, out_dir=out)
    try:
        code = run_demo(options)
    except StartupError as exc:  # e.g. --source kinesis without Node
        _fail(str(exc), 1)
        return
    raise typer.Exit(code)


app.add_typer(provision_app, name="provision")
app.add_typer(state_app, name="state")

dead_letter_app = typer.Typer(help="List, show and replay dead-letter entries (a file, s3:// or azblob:// dead letter).",
                              no_args_is_help=True)
app.add_typer(dead_letter_app, name="dead-letter")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (or $SEGMENT_RELAY_CONFIG)")]
DeadLetterOption = Annotated[str | None, typer.Option("--dead-letter", help="The dead letter (default: the config's)")]
KindOption = Annotated[str | None, typer.Option(help="invalid_record, invalid_entry or failed_change")]
ReasonOption = Annotated[str | None, typer.Option(help="Only entries with this reason")]
PartitionOption = Annotated[str | None, typer.Option(help="Only entries of this partition")]
SinceOption = Annotated[str | None, typer.Option(help="Only entries written at or after this ISO-8601 time")]


def _dead_letter_config(config: Path | None, dead_letter: str | None) -> Any:
    from .config import RelayConfig

    try:
        settings: RelayConfig = load_config(config, dead_letter=dead_letter)
    except ConfigError as exc:
        _fail(str(exc))
        raise  # not reached: _fail exits
    from .ops.logging import configure_logging

    configure_logging(settings.log_level if settings.log_level != "INFO" else "WARNING",
                      json=settings.log_format == "json", secrets=[*secrets_in(settings), *environment_secrets()])
    return settings


def _since(value: str | None) -> Any:
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since: {value!r} is not an ISO-8601 time, e.g. 2026-12-01T00:00:00Z")
        raise
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def _entries(settings: Any, kind: str | None, reason: str | None, partition: str | None, since: Any
                   ) -> tuple[list[Any], set[str]]:
    from .app import build_dead_letter
    from .consumer.deadletter.reader import matches, reader_for

    reader = reader_for(build_dead_letter(settings))
    try:
        found = [stored async for stored in reader.entries()
                 if matches(stored.entry, kind=kind, reason=reason, partition=partition, since=since)]
        return found, await reader.replayed()
    finally:
        await reader.close()


@dead_letter_app.command("list")
def dead_letter_list(
    config: ConfigOption = None, dead_letter: DeadLetterOption = None, kind: KindOption = None,
    reason: ReasonOption = None, partition: PartitionOption = None, since: SinceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per entry")] = False,
) -> None:
    """One line per entry: its id (OBJECT#LINE), time, kind, reason, partition and position; then counts."""
    settings = _dead_letter_config(config, dead_letter)
    try:
        found, replayed = asyncio.run(_entries(settings, kind, reason, partition, _since(since)))
    except (StartupError, ValueError) as exc:
        _fail(str(exc), 1)
        return
    counts: dict[str, int] = {}
    for stored in found:
        entry = stored.entry
        counts[str(entry.get("kind"))] = counts.get(str(entry.get("kind")), 0) + 1
        fields = {"id": stored.id, "at": entry.get("at"), "kind": entry.get("kind"), "reason": entry.get("reason"),
                  "partition": entry.get("partition"), "position": entry.get("position"),
                  "replayed": stored.id in replayed}
        if as_json:
            typer.echo(orjson.dumps(fields).decode())
        else:
            typer.echo(f"{stored.id}  {fields['at']}  {fields['kind']}  {fields['reason']}  "
                       f"partition {fields['partition']} position {fields['position']}"
                       + ("  (replayed)" if fields["replayed"] else ""))
    typer.echo(f"{len(found)} entries: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
               + f"; {sum(stored.id in replayed for stored in found)} replayed", err=True)


@dead_letter_app.command("show")
def dead_letter_show(
    entry_id: Annotated[str, typer.Argument(help="The entry's id, as list prints it (OBJECT#LINE)")],
    config: ConfigOption = None, dead_letter: DeadLetterOption = None,
) -> None:
    """Print one entry, whole, as JSON."""
    settings = _dead_letter_config(config, dead_letter)
    try:
        found, _ = asyncio.run(_entries(settings, None, None, None, None))
    except (StartupError, ValueError) as exc:
        _fail(str(exc), 1)
        return
    for stored in found:
        if stored.id == entry_id:
            typer.echo(orjson.dumps(stored.entry, option=orjson.OPT_INDENT_2).decode())
            return
    _fail(f"no entry {entry_id!r} in this dead letter (see: segment-relay dead-letter list)", 1)


@dead_letter_app.command("replay")
def dead_letter_replay(
    config: ConfigOption = None, dead_letter: DeadLetterOption = None, kind: KindOption = None,
    reason: ReasonOption = None, partition: PartitionOption = None, since: SinceOption = None,
    handler: Annotated[list[str] | None, typer.Option("--handler", "-H", help="Re-drive failed changes to these handlers instead of their own; repeatable")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be replayed; change nothing")] = False,
) -> None:
    """Put invalid records and entries through the pipeline again (same validation and state store)
    and re-drive failed changes to their handler; each entry once (replayed ones are marked)."""
    from .replay import replay_dead_letter

    settings = _dead_letter_config(config, dead_letter)
    try:
        report = asyncio.run(replay_dead_letter(settings, handler_specs=handler, dry_run=dry_run, kind=kind,
                                                reason=reason, partition=partition, since=_since(since)))
    except (StartupError, ConfigError, ValueError) as exc:
        _fail(str(exc), 1)
        return
    typer.echo(orjson.dumps({"dry_run": dry_run, **report.to_dict()}).decode())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
