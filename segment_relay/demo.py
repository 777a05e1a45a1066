"""`segment-relay demo`: the relay over a generated stream, checked against a reference model.

Needs no cloud account: it writes a realistic export stream to ``demo-out/``, runs the
relay on it with the file source, and compares what the relay did with what an
independent model of the rules says it must do.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from .app import Relay
from .config import load_config
from .ops.logging import configure_logging
from .ops.runtime import tune_gc
from .testing.exports import StreamSpec, write_jsonl


def run_demo(
    *, records: int, profiles: int, seed: int, quiet: bool, metrics_port: int | None,
    out_dir: str | Path = "demo-out",
) -> int:
    console = Console(stderr=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream_path = out / "exports.jsonl"
    for stale in ("dead-letter.jsonl", "changes.jsonl"):
        (out / stale).unlink(missing_ok=True)

    console.print(f"[bold]Generating[/] {records:,} exports of {profiles:,} profiles (seed {seed}) -> {stream_path}")
    truth = write_jsonl(StreamSpec(seed=seed, profiles=profiles, records=records, invalid_rate=0.002), stream_path)

    handlers = [f"jsonl:{out / 'changes.jsonl'}"]
    if not quiet:
        handlers.insert(0, "log")
    config = load_config(
        None, source=f"file:{stream_path}", state="memory", handlers=handlers,
        dead_letter=str(out / "dead-letter.jsonl"), metrics_port=metrics_port, log_level="ERROR",
    )
    configure_logging(config.log_level, json=True)
    relay = Relay(config, track_profiles=True)
    tune_gc()
    started = time.perf_counter()
    stats = asyncio.run(relay.run())
    elapsed = time.perf_counter() - started
    sys.stdout.flush()

    summary = stats.summary()
    rows = [
        ("records", summary["records"], truth.records),
        ("invalid (dead-lettered)", summary["invalid"], truth.invalid),
        ("profiles", summary["profiles"], truth.profiles),
        ("enters", summary["enters"], truth.enters),
        ("exits", summary["exits"], truth.exits),
        ("stale suppressed", summary["stale_suppressed"], truth.stale),
        ("duplicates suppressed", summary["duplicates_suppressed"], truth.duplicates),
        ("dead letters", summary["dead_letters"], truth.invalid),
    ]
    table = Table(title=f"segment-relay demo: {summary['records']:,} records in {elapsed:.2f} s "
                        f"({summary['records'] / max(elapsed, 1e-9):,.0f} records/s)")
    table.add_column("")
    table.add_column("relay", justify="right")
    table.add_column("expected", justify="right")
    table.add_column("")
    emitted = _changes_in(out / "changes.jsonl")
    rows.append(("changes, one by one", sum((emitted & Counter(truth.changes)).values()), len(truth.changes)))
    all_equal = emitted == Counter(truth.changes)
    for label, got, expected in rows:
        equal = got == expected
        all_equal &= equal
        table.add_row(label, f"{got:,}", f"{expected:,}", "[green]ok[/]" if equal else "[red]differs[/]")
    console.print(table)
    console.print(f"changes: {out / 'changes.jsonl'}   dead letter: {out / 'dead-letter.jsonl'}")
    if not all_equal:
        console.print("[red bold]The relay's totals differ from the reference model.[/]")
        return 1
    console.print("[green bold]Every expected change was emitted once; nothing lost, nothing doubled.[/]")
    return 0


def _changes_in(path: Path) -> Counter[tuple[str, str, str, str]]:
    """The changes the jsonl handler wrote, in the reference model's shape."""
    with open(path, "rb") as handle:
        return Counter(
            (c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])
            for c in map(orjson.loads, handle)
        )
