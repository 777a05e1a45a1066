"""Pipeline throughput against the cost of just decoding the JSON. Run by hand:

    .venv/bin/python bench/pipeline.py [--records N] [--profile]

Generates N realistic export records (~1.5 KB each, seeded) into a temp file, then measures
records/s of (a) bare ``orjson.loads`` over the same records, (b) the whole pipeline
(FileSource -> decode, validate, key, diff, dispatch to a no-op async handler, checkpoints on)
with MemoryStore, (c) the same with SqliteStore. Each pipeline variant runs in a fresh
subprocess (``--variant memory|sqlite``) so its peak RSS is its own; every measurement is
pinned to one CPU (the pipeline is single-threaded asyncio; SQLite's flush and the file
reads use worker threads, which then share that CPU).

``--profile`` runs the memory variant under cProfile instead and prints the top entries.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_kb, print_pstats, run_variant  # noqa: E402

TARGETS = {"memory": 50_000, "sqlite": 20_000}  # records/s on one core


def _pin(cpu: int | None) -> int | None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def bench_orjson(path: Path, repeat: int) -> dict[str, float]:
    import orjson

    records = [line.rstrip(b"\n") for line in path.read_bytes().splitlines() if line.strip()]
    loads = orjson.loads
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        for record in records:
            loads(record)
        best = min(best, time.perf_counter() - started)
    return {"records": len(records), "seconds": best}


# --- (b), (c) the pipeline, in a child process --------------------------------------------
async def _run_pipeline(path: Path, variant: str, workdir: Path, checkpoint_interval_s: float) -> dict:
    from segment_relay.consumer.deadletter import MemoryDeadLetter
    from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
    from segment_relay.consumer.sources.file import FileSource
    from segment_relay.consumer.state import MemoryStore, SqliteStore
    from segment_relay.handlers.api import FunctionHandler, SegmentChange
    from segment_relay.handlers.router import Router

    async def noop(change: SegmentChange) -> None:
        return None

    store = MemoryStore() if variant == "memory" else SqliteStore(workdir / f"state-{os.getpid()}.db")
    dead_letter = MemoryDeadLetter()
    source = FileSource(str(path), checkpoint_path=str(workdir / f"checkpoint-{variant}-{os.getpid()}.json"))
    pipeline = Pipeline(
        source, store, Router([FunctionHandler(noop, name="noop")], dead_letter), dead_letter,
        settings=PipelineSettings(checkpoint_interval_s=checkpoint_interval_s),
    )
    from segment_relay.ops.runtime import tune_gc

    tune_gc()  # what `segment-relay run` does at start
    rss_before = peak_rss_kb()
    cpu_started = time.process_time()
    started = time.perf_counter()
    stats = await pipeline.run()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    checkpoint = json.loads((workdir / f"checkpoint-{variant}-{os.getpid()}.json").read_text())
    return {
        "variant": variant,
        "records": stats.records_read,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_kb": rss_before,
        "peak_rss_kb": peak_rss_kb(),
        "checkpoint_line": checkpoint["line"],
        "summary": stats.summary(),
    }


def child_main(args: argparse.Namespace) -> None:
    _pin(args.cpu)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    result = asyncio.run(_run_pipeline(Path(args.input), args.variant, workdir, args.checkpoint_interval))
    print("RESULT " + json.dumps(result), flush=True)


def run_child(path: Path, variant: str, workdir: Path, args: argparse.Namespace, cpu: int | None) -> dict:
    """The best (shortest wall time) of ``--repeat`` fresh runs; peak RSS is the largest seen."""
    runs = [_run_child_once(path, variant, workdir, args, cpu) for _ in range(args.repeat)]
    best = min(runs, key=lambda run: run["seconds"])
    best["peak_rss_kb"] = max(run["peak_rss_kb"] for run in runs)
    best["all_seconds"] = [run["seconds"] for run in runs]
    return best


def _run_child_once(path: Path, variant: str, workdir: Path, args: argparse.Namespace, cpu: int | None) -> dict:
    for leftover in workdir.glob("state-*.db*"):
        leftover.unlink()  # every sqlite run starts from an empty database
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--input", str(path),
               "--workdir", str(workdir), "--checkpoint-interval", str(args.checkpoint_interval)]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    return run_variant(command, f"{variant} variant")


# --- --profile --------------------------------------------------------------------------
def profile_memory(path: Path, workdir: Path, args: argparse.Namespace, top: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    result = asyncio.run(_run_pipeline(path, "memory", workdir, args.checkpoint_interval))
    profiler.disable()
    print(f"\ncProfile of the memory variant: {result['records']:,} records in {result['seconds']:.2f}s "
          f"(profiling overhead included)\n")
    print_pstats(profiler, top, ("cumulative", "tottime"))


# --- main -------------------------------------------------------------------------------------
def _row(name: str, records: int, seconds: float, base_rate: float | None, rss_kb: int | None,
         target: int | None, cpu_seconds: float | None = None) -> str:
    rate = records / seconds
    ratio = "1.00x" if base_rate is None else f"{rate / base_rate:.3f}x"
    rss = "-" if rss_kb is None else f"{rss_kb / 1024:.0f} MiB"
    cpu_rate = "-" if cpu_seconds is None else f"{records / cpu_seconds:,.0f}"
    target_text = "-" if target is None else f">={target:,}"
    verdict = "-" if target is None else ("PASS" if rate >= target else "MISS")
    return (f"{name:<18} {rate:>11,.0f} {1e6 / rate:>10.1f} {ratio:>9} {rss:>9} {cpu_rate:>12} "
            f"{target_text:>10} {verdict:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--profiles", type=int, default=None, help="default: records / 5")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0,
                        help="seconds between checkpoints (production default is 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts")
    parser.add_argument("--no-pin", action="store_true", help="do not pin measurements to one CPU")
    parser.add_argument("--profile", action="store_true", help="cProfile the memory variant instead")
    # internal: one pipeline variant in this (child) process
    parser.add_argument("--variant", choices=("memory", "sqlite"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child_main(args)
        return

    from segment_relay.testing.exports import StreamSpec, write_jsonl

    cpu = None if args.no_pin or not hasattr(os, "sched_getaffinity") else max(os.sched_getaffinity(0))
    spec = StreamSpec(seed=args.seed, records=args.records, profiles=args.profiles or max(1, args.records // 5))
    with tempfile.TemporaryDirectory(prefix="segment-relay-bench-") as tmp:
        workdir = Path(tmp)
        path = workdir / "stream.jsonl"
        started = time.perf_counter()
        truth = write_jsonl(spec, path)
        size = path.stat().st_size
        print(f"generated {truth.records:,} records, {size / truth.records:,.0f} B/record avg, "
              f"{truth.profiles:,} profiles, seed {spec.seed} in {time.perf_counter() - started:.1f}s: "
              f"{truth.enters:,} enters, {truth.exits:,} exits, {truth.stale:,} stale and "
              f"{truth.duplicates:,} duplicate segment entries")
        if args.profile:
            _pin(cpu)
            profile_memory(path, workdir, args)
            return

        results = {variant: run_child(path, variant, workdir, args, cpu) for variant in ("memory", "sqlite")}
        previous = os.sched_getaffinity(0) if cpu is not None else None
        _pin(cpu)
        floor = bench_orjson(path, args.repeat)
        if previous is not None:
            os.sched_setaffinity(0, previous)

    base_rate = floor["records"] / floor["seconds"]
    print(f"\none CPU{'' if cpu is None else f' (cpu {cpu})'}, best of {args.repeat}, checkpoint every "
          f"{args.checkpoint_interval:g}s, python {sys.version.split()[0]}; records/s is wall time, "
          f"rec/cpu-s is CPU time of all threads\n")
    print(f"{'':<18} {'records/s':>11} {'us/record':>10} {'vs loads':>9} {'peak RSS':>9} {'rec/cpu-s':>12} "
          f"{'target':>10} {'result':>6}")
    print(_row("orjson.loads", floor["records"], floor["seconds"], None, None, None))
    problems = []
    for variant, result in results.items():
        print(_row(f"pipeline {variant}", result["records"], result["seconds"], base_rate,
                   result["peak_rss_kb"], TARGETS[variant], result["cpu_seconds"]))
        summary = result["summary"]
        if (summary["enters"], summary["exits"], summary["records"]) != (truth.enters, truth.exits, truth.records):
            problems.append(f"{variant}: relay made {summary['enters']} enters / {summary['exits']} exits of "
                            f"{summary['records']} records; expected {truth.enters} / {truth.exits} of {truth.records}")
        if result["checkpoint_line"] != truth.records:
            problems.append(f"{variant}: final checkpoint at line {result['checkpoint_line']}, not {truth.records}")
    print()
    for variant, result in results.items():
        runs = ", ".join(f"{seconds:.2f}" for seconds in result["all_seconds"])
        print(f"{variant}: wall {result['seconds']:.2f}s (runs: {runs}), cpu {result['cpu_seconds']:.2f}s, "
              f"RSS {result['rss_before_kb'] / 1024:.0f} MiB after imports -> {result['peak_rss_kb'] / 1024:.0f} "
              f"MiB peak, checkpoint at line {result['checkpoint_line']:,}")
    print("changes: " + ("match the reference model" if not problems else "MISMATCH\n  " + "\n  ".join(problems)))


if __name__ == "__main__":
    main()
