"""The `segment-relay` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from .config import ConfigError, environment_secrets, load_config, secrets_in
from .errors import StartupError
from .provisioning.cli import app as provision_app

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
        relay = Relay(settings)
    except ConfigError as exc:
        _fail(str(exc))
        return
    tune_gc()
    try:
        stats = asyncio.run(relay.run())
    except (StartupError, FileNotFoundError, ValueError, OSError) as exc:  # e.g. no stream, foreign checkpoint
        _fail(str(exc), 1)
        return
    typer.echo(orjson.dumps({"summary": stats.summary()}).decode(), err=True)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
