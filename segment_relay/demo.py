"""`segment-relay demo`: the whole system on one machine, with no Adobe or cloud account.

In one process: a local fake of Adobe (IMS, Flow Service, Segmentation) with its export
simulator, the project's Event Hubs emulator, ``provision apply`` of a destination file against
the fake, then the relay (sqlite state, the ``log`` handler) consuming what the simulator
exports, with a live progress line and metrics served. At the end the relay's totals are set
beside the simulator's true ones (an independent model of the rules over exactly what it sent),
and every change is checked one by one.

``--source kinesis`` does the same over kinesalite and dynalite (needs Node, see emulators/);
``--source file`` skips Adobe and the emulators: a generated JSONL file through the file source.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .app import Relay
from .config import RelayConfig, load_config
from .ops.logging import configure_logging
from .ops.metrics import RelaySnapshot
from .ops.runtime import tune_gc
from .testing.exports import Change, Merge, StreamSpec, StreamTruth, write_jsonl

HUB = "adobe-exports"  # lower case: the checkpoint names KEDA reads are lower-cased
STREAM = "adobe-exports"
DEMO_AUDIENCE_COUNT = 4
DEMO_ATTRIBUTES = ["person.name.firstName", "person.name.lastName", "personalEmail.address", "loyalty.tier"]
# Identity stitching in the simulated traffic: visitors who log in (their top-ranked identity
# changes) and people with two profiles that Adobe later merges.
DEMO_LOGIN_RATE = 0.02
DEMO_MERGE_RATE = 0.1


@dataclass(frozen=True)
class DemoOptions:
    source: str = "eventhubs"
    records: int = 5000
    profiles: int = 500
    seed: int = 7
    rate: float | None = None  # exports per second; None: as fast as the target takes them
    quiet: bool = False
    metrics_port: int | None = 0  # 0: any free port
    out_dir: Path = Path("demo-out")


def run_demo(options: DemoOptions) -> int:
    console = Console(stderr=True)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("dead-letter.jsonl", "changes.jsonl", "state.sqlite", "checkpoints.sqlite", "destination.toml"):
        for suffix in ("", "-wal", "-shm"):
            (options.out_dir / (stale + suffix)).unlink(missing_ok=True)
    configure_logging("ERROR", json=True)
    tune_gc()
    if options.source == "file":
        return _file_demo(options, console)
    return asyncio.run(_platform_demo(options, console))


# --- the whole system: Adobe fake -> emulator -> relay --------------------------------------------
async def _platform_demo(options: DemoOptions, console: Console) -> int:
    from .provisioning.destination import load_destination
    from .provisioning.session import provisioner_for
    from .testing.platform import DEFAULT_AUDIENCES, ExportSettings, FakePlatform

    audiences = DEFAULT_AUDIENCES[:DEMO_AUDIENCE_COUNT]
    exports = ExportSettings(records=options.records, profiles=options.profiles, seed=options.seed,
                             rate=options.rate, invalid_rate=0.002, login_rate=DEMO_LOGIN_RATE,
                             merge_rate=DEMO_MERGE_RATE)
    async with contextlib.AsyncExitStack() as stack:
        target = await stack.enter_async_context(_target(options, console))
        fake = await stack.enter_async_context(
            FakePlatform(audiences=DEFAULT_AUDIENCES, exports=exports, kinesis_endpoint=target.kinesis_endpoint)
        )
        console.print(f"[bold]Adobe (local fake)[/] at {fake.url}: IMS, Flow Service, Segmentation")

        # One audience by id, the others by name: both ways a destination file can name them.
        refs = [f'{{ id = "{audiences[0].id}" }}'] + [f'{{ name = "{a.name}" }}' for a in audiences[1:]]
        path = options.out_dir / "destination.toml"
        path.write_text(_destination_file(fake.url, fake.credentials.client_id, fake.credentials.org_id,
                                          refs, target.section))
        secrets = {"ADOBE_CLIENT_SECRET": fake.credentials.client_secret, **target.secrets}
        destination = load_destination(path, secrets)
        console.rule(f"segment-relay provision apply {path}")
        async with provisioner_for(destination, on_step=lambda s: console.print(
            f"  {s.action:>7} {s.what}: {s.name} [dim]{s.detail}[/dim]")) as provisioner:
            steps = await provisioner.reconcile(apply=True)
        flow_id = next(s.id for s in steps if s.what == "dataflow")
        assert flow_id is not None
        simulation = await fake.simulation(flow_id)
        console.print(f"[bold]Adobe exports[/] {options.records:,} profile snapshots of {options.profiles:,} "
                      f"profiles in {len(audiences)} audiences to {target.description}")

        console.rule("segment-relay run")
        config = load_config(
            None, **target.relay_settings(options.out_dir), state=f"sqlite:{options.out_dir / 'state.sqlite'}",
            handlers=_handlers(options), dead_letter=str(options.out_dir / "dead-letter.jsonl"),
            segments=[a.id for a in audiences], metrics_port=options.metrics_port, log_level="ERROR",
            pipeline={"checkpoint_interval_s": 1.0},
        )
        relay = Relay(config, track_profiles=True)
        started = time.perf_counter()
        running = asyncio.create_task(relay.run())
        await _until_ready(relay, running)
        if relay.ops is not None:
            console.print(f"metrics: http://127.0.0.1:{relay.ops.port}/metrics  probes: /healthz /readyz")
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            while not (simulation.finished and relay.pipeline.records_finished >= simulation.sent):
                if running.done():
                    running.result()  # raises what stopped it
                    raise RuntimeError("the relay stopped before it read every export")
                live.update(_progress(simulation.sent, simulation.planned, relay.snapshot(), started))
                await asyncio.sleep(0.25)
        relay.stop()
        stats = await running
        elapsed = time.perf_counter() - started
        if simulation.error:
            console.print(f"[red]the export simulator failed: {simulation.error}[/]")
            return 1
        title = (f"segment-relay demo ({options.source}): {stats.records_read:,} exports in {elapsed:.1f} s, "
                 f"checked against the simulator's truth")
        return _summary(console, stats, simulation.truth_for(_linking(config)), options.out_dir, title)


@dataclass
class _Target:
    description: str
    section: str  # the destination file's target section
    secrets: dict[str, str]
    relay: dict[str, Any]
    kinesis_endpoint: str | None = None

    def relay_settings(self, out: Path) -> dict[str, Any]:
        settings = dict(self.relay)
        if "eventhubs" in settings:
            settings["eventhubs"] = {**settings["eventhubs"], "checkpoint_path": str(out / "checkpoints.sqlite")}
        return settings


@contextlib.asynccontextmanager
async def _target(options: DemoOptions, console: Console) -> AsyncIterator[_Target]:
    if options.source == "eventhubs":
        from .testing.eventhubs.server import EventHubsEmulator

        async with EventHubsEmulator({HUB: 4}) as emulator:
            namespace = f"127.0.0.1:{emulator.port}"
            console.print(f"[bold]Event Hubs (local emulator)[/] at {namespace}: hub {HUB!r}, 4 partitions")
            yield _Target(
                description=f"event hub {HUB!r}",
                section=f'[eventhubs]\nnamespace = "{namespace}"\nhub = "{HUB}"\nsas_key_name = "adobe-send"\n',
                secrets={"ADOBE_EVENTHUBS_SAS_KEY": "demo-sas-key"},
                relay={"source": f"eventhubs:{HUB}", "eventhubs": {
                    "connection_string": emulator.connection_string(HUB), "load_balancing_interval_s": 1.0}},
            )
        return
    if options.source != "kinesis":
        raise ValueError(f"unknown demo source {options.source!r}: use eventhubs, kinesis or file")
    from aiobotocore.session import get_session

    from .testing.aws import FAKE_AWS_ENV, start_dynalite, start_kinesalite
    from .testing.kinesis import create_stream

    with contextlib.ExitStack() as processes:
        kinesalite = start_kinesalite()
        processes.callback(kinesalite.stop)
        dynalite = start_dynalite()
        processes.callback(dynalite.stop)
        os.environ.update(FAKE_AWS_ENV)  # the relay's AWS chain; this process ends with the demo
        async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
            await create_stream(client, STREAM, 4)
        console.print(f"[bold]Kinesis (kinesalite)[/] at {kinesalite.endpoint}: stream {STREAM!r}, 4 shards; "
                      f"DynamoDB (dynalite) at {dynalite.endpoint}")
        yield _Target(
            description=f"Kinesis stream {STREAM!r}",
            section=f'[kinesis]\nstream = "{STREAM}"\nregion = "{FAKE_AWS_ENV["AWS_DEFAULT_REGION"]}"\n',
            secrets={"ADOBE_KINESIS_ACCESS_KEY_ID": FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                     "ADOBE_KINESIS_SECRET_KEY": FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"]},
            relay={"source": f"kinesis:{STREAM}", "kinesis": {
                "endpoint_url": kinesalite.endpoint, "dynamodb_endpoint_url": dynalite.endpoint,
                "application": "segment-relay-demo", "idle_wait_s": 0.2}},
            kinesis_endpoint=kinesalite.endpoint,
        )


def _destination_file(url: str, client_id: str, org_id: str, audiences: list[str], target: str) -> str:
    return f"""# Written by `segment-relay demo`: the destination it provisions against the local Adobe fake.
name = "segment-relay demo"
sandbox = "prod"
audiences = [{", ".join(audiences)}]
attributes = {orjson.dumps(DEMO_ATTRIBUTES).decode()}
include_segment_names = true       # exports carry audience names: the changes' segment_name

[adobe]
org_id = "{org_id}"
client_id = "{client_id}"
client_secret_env = "ADOBE_CLIENT_SECRET"
ims_url = "{url}"
platform_url = "{url}"

{target}"""


async def _until_ready(relay: Relay, running: asyncio.Task[RelaySnapshot]) -> None:
    while not relay.pipeline.running:
        if running.done():
            running.result()
            raise RuntimeError("the relay stopped while starting")
        await asyncio.sleep(0.05)


def _progress(sent: int, planned: int, stats: RelaySnapshot, started: float) -> Table:
    elapsed = max(time.perf_counter() - started, 1e-9)
    table = Table.grid(padding=(0, 2))
    table.add_row(
        f"Adobe exported [bold]{sent:,}[/]/{planned:,}",
        f"relay finished [bold]{stats.records_finished:,}[/] ({stats.records_finished / elapsed:,.0f}/s)",
        f"enters [green]{stats.enters:,}[/]", f"exits [red]{stats.exits:,}[/]",
        f"suppressed {stats.pipeline.duplicate + stats.pipeline.stale:,}",
        f"dead letters {sum(stats.dead_letters.values()):,}",
    )
    return table


def _handlers(options: DemoOptions) -> list[str]:
    handlers = [f"jsonl:{options.out_dir / 'changes.jsonl'}"]
    return handlers if options.quiet else ["log", *handlers]


# --- the file source only ---------------------------------------------------------------------------
def _file_demo(options: DemoOptions, console: Console) -> int:
    out = options.out_dir
    stream_path = out / "exports.jsonl"
    console.print(f"[bold]Generating[/] {options.records:,} exports of {options.profiles:,} profiles "
                  f"(seed {options.seed}) -> {stream_path}")
    config: RelayConfig = load_config(
        None, source=f"file:{stream_path}", state="memory", handlers=_handlers(options),
        dead_letter=str(out / "dead-letter.jsonl"), metrics_port=options.metrics_port, log_level="ERROR",
    )
    truth = write_jsonl(StreamSpec(seed=options.seed, profiles=options.profiles, records=options.records,
                                   invalid_rate=0.002, login_rate=DEMO_LOGIN_RATE, merge_rate=DEMO_MERGE_RATE),
                        stream_path, _linking(config))
    relay = Relay(config, track_profiles=True)
    started = time.perf_counter()
    stats = asyncio.run(relay.run())
    elapsed = time.perf_counter() - started
    title = (f"segment-relay demo (file): {stats.records_read:,} records in {elapsed:.2f} s "
             f"({stats.records_read / max(elapsed, 1e-9):,.0f} records/s)")
    return _summary(console, stats, truth, out, title)


def _linking(config: RelayConfig) -> list[str] | None:
    """The namespaces the relay links identities in, for the truth (None: it keys profiles only)."""
    return config.identity.link_namespaces if config.identity.mode == "link" else None


# --- the verdict ------------------------------------------------------------------------------------
def _summary(console: Console, stats: RelaySnapshot, truth: StreamTruth, out: Path, title: str) -> int:
    sys.stdout.flush()
    summary = stats.summary()
    rows = [
        ("records", summary["records"], truth.records),
        ("invalid records (dead-lettered)", summary["invalid"], truth.invalid),
        ("invalid audience entries (dead-lettered alone)", summary["invalid_entries"], truth.invalid_entries),
        ("profiles", summary["profiles"], truth.profiles),
        ("enters", summary["enters"], truth.enters),
        ("exits", summary["exits"], truth.exits),
        ("stale suppressed", summary["stale_suppressed"], truth.stale),
        ("duplicates suppressed", summary["duplicates_suppressed"], truth.duplicates),
        ("dead letters", summary["dead_letters"], truth.dead_letters),
        ("profiles merged", summary.get("merges", 0), sum(len(absorbed) for _, absorbed, _ in truth.merges)),
    ]
    emitted, merged = _changes_in(out / "changes.jsonl")
    expected, merges = Counter(truth.changes), Counter(truth.merges)
    rows.append(("changes, one by one", sum((emitted & expected).values()), len(truth.changes)))
    rows.append(("merges, one by one", sum((merged & merges).values()), len(truth.merges)))
    table = Table(title=title)
    table.add_column("")
    table.add_column("relay", justify="right")
    table.add_column("truth", justify="right")
    table.add_column("")
    all_equal = emitted == expected and merged == merges
    for label, got, want in rows:
        equal = got == want
        all_equal &= equal
        table.add_row(label, f"{got:,}", f"{want:,}", "[green]ok[/]" if equal else "[red]differs[/]")
    console.print(table)
    console.print(f"changes: {out / 'changes.jsonl'}   dead letter: {out / 'dead-letter.jsonl'}")
    if not all_equal:
        console.print("[red bold]The relay's totals differ from the truth.[/]")
        return 1
    console.print("[green bold]Every true change was handled once: nothing lost, nothing doubled.[/]")
    return 0


def _changes_in(path: Path) -> tuple[Counter[Change], Counter[Merge]]:
    """The membership changes and the merges the jsonl handler wrote, in the reference model's shapes."""
    changes: Counter[Change] = Counter()
    merges: Counter[Merge] = Counter()
    if path.exists():
        with open(path, "rb") as handle:
            for c in map(orjson.loads, handle):
                if c["change"] == "merge":
                    merges[(c["profile_key"], tuple(c["merged_keys"]), c["qualified_at"])] += 1
                else:
                    changes[(c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])] += 1
    return changes, merges
