"""`segment-relay provision plan|apply|status|destroy FILE`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from .destination import Destination, load_destination
from .errors import ProvisioningError
from .provisioner import Provisioner, Step
from .retry import DEFAULT_TIMEOUT_S
from .session import provisioner_for

T = TypeVar("T")

app = typer.Typer(
    help="Set up the Adobe side (destination, dataflow, audiences) from a destination file. "
    "Credentials come from the environment variables the file names.",
    no_args_is_help=True,
)

FileArg = Annotated[Path, typer.Argument(help="The destination file (TOML)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables")]
CredentialsOpt = Annotated[bool, typer.Option(
    "--update-credentials", help="Send the destination's secrets again (after rotating them: Adobe never shows "
    "them, so a new one cannot be seen to differ)")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, help="Seconds one call to Adobe may take, answer included, before it counts as failed")]

_STYLE = {"create": "green", "update": "yellow", "enable": "cyan", "disable": "cyan", "delete": "red",
          "keep": "dim", "absent": "dim"}


def _run(file: Path, as_json: bool, work: Callable[[Provisioner], Awaitable[T]], *, need_target_secrets: bool = True,
         title: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> T:
    console = Console(stderr=True)
    destination: Destination | None = None
    try:
        destination = load_destination(file, need_target_secrets=need_target_secrets)
        shown = destination

        def show(step: Step) -> None:
            if not as_json:
                console.print(_line(step))

        async def go() -> T:
            async with provisioner_for(shown, on_step=show, timeout_s=timeout_s) as provisioner:
                with console.status(title or "talking to Adobe", spinner="dots") if not as_json else _nothing():
                    return await work(provisioner)

        return asyncio.run(go())
    except ProvisioningError as exc:
        message = mask_secrets(str(exc), destination.secret_values() if destination is not None else [])
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1) from None


def mask_secrets(message: str, secrets: list[str]) -> str:
    """``message`` with each secret replaced by ``***`` wherever it stands as a whole token (not
    inside a longer run of letters and digits): never echo a secret, even one an API repeated,
    and never garble a message because a short secret happens to be a common syllable."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):  # one that contains another first
        message = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", message)
    return message


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _line(step: Step) -> str:
    style = _STYLE.get(step.action, "")
    detail = f" [dim]{step.detail}[/dim]" if step.detail else ""
    return f"[{style}]{step.action:>7}[/{style}] {step.what}: {step.name}{detail}"


def _emit(as_json: bool, document: dict[str, Any]) -> None:
    if as_json:
        typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


def _counts(steps: list[Step]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.action] = counts.get(step.action, 0) + 1
    return counts


@app.command()
def plan(
    file: FileArg,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    update_credentials: CredentialsOpt = False,
    detailed_exitcode: Annotated[bool, typer.Option(
        "--detailed-exitcode", help="Exit 0 when nothing would change, 2 when something would, 1 on an error (CI)")] = False,
) -> None:
    """Show what apply would change, field by field. Reads only; writes nothing."""
    steps = _run(file, as_json, lambda p: p.reconcile(apply=False, update_credentials=update_credentials),
                 title="reading Adobe's side", timeout_s=timeout)
    changes = [s for s in steps if s.action != "keep"]
    _emit(as_json, {"changes": len(changes), "steps": [s.as_dict() for s in steps]})
    if not as_json:
        Console(stderr=True).print(f"plan: {len(changes)} change(s)" if changes else "plan: nothing to change")
    if detailed_exitcode and changes:
        raise typer.Exit(2)


@app.command()
def apply(
    file: FileArg,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    update_credentials: CredentialsOpt = False,
) -> None:
    """Create what is missing and repair what drifted. Idempotent: a second run changes nothing, and
    a call that timed out is never repeated blindly (what it may have created is looked up first)."""
    steps = _run(file, as_json, lambda p: p.reconcile(apply=True, update_credentials=update_credentials),
                 title="applying", timeout_s=timeout)
    _emit(as_json, {"counts": _counts(steps), "steps": [s.as_dict() for s in steps]})
    if not as_json:
        Console(stderr=True).print("applied: " + ", ".join(f"{n} {a}" for a, n in _counts(steps).items()))


@app.command()
def status(file: FileArg, as_json: JsonOpt = False, runs: Annotated[int, typer.Option(help="Recent runs to show")] = 5,
           timeout: TimeoutOpt = DEFAULT_TIMEOUT_S) -> None:
    """The dataflow's state, its activated audiences and attributes, and its recent runs."""
    report = _run(file, as_json, lambda p: p.status(runs), need_target_secrets=False, title="reading status",
                  timeout_s=timeout)
    if as_json:
        _emit(True, report)
        return
    console = Console()
    flow = report.get("flow")
    if flow is None:
        console.print(f"dataflow {report['name']!r} does not exist in sandbox {report['sandbox']!r}: run apply")
        raise typer.Exit(3)
    console.print(f"dataflow [bold]{report['name']}[/bold] ({flow['id']}) in sandbox {report['sandbox']}: "
                  f"[bold]{flow['state']}[/bold]")
    table = Table("audience id", "name", title="activated audiences")
    for audience in report["audiences"]:
        table.add_row(str(audience["id"]), str(audience.get("name") or ""))
    console.print(table)
    console.print("attributes: " + (", ".join(report["attributes"]) or "none"))
    runs_table = Table("run", "status", "started", "in", "out", "failed", title="recent runs")
    for run in report["runs"]:
        runs_table.add_row(*(str(run.get(k) if run.get(k) is not None else "") for k in
                             ("id", "status", "started", "input", "output", "failed")))
    console.print(runs_table)


@app.command()
def destroy(
    file: FileArg,
    as_json: JsonOpt = False,
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking (scripts)")] = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Delete the dataflow, then the target, source and base connections this file manages."""
    if not yes:
        listed = _run(file, as_json, lambda p: p.destroy(apply=False), need_target_secrets=False, title="reading",
                      timeout_s=timeout)
        if not any(step.action == "delete" for step in listed):
            _emit(as_json, {"steps": [s.as_dict() for s in listed]})
            return
        if as_json or not typer.confirm("delete these?", err=True):
            typer.echo("error: not deleted; pass --yes to delete without asking", err=True)
            raise typer.Exit(1)
    steps = _run(file, as_json, lambda p: p.destroy(apply=True), need_target_secrets=False, title="deleting",
                 timeout_s=timeout)
    _emit(as_json, {"counts": _counts(steps), "steps": [s.as_dict() for s in steps]})
