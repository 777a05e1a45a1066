"""Pipeline throughput against the cost of just decoding the JSON. Run by hand:

    .venv/bin/python bench/pipeline.py [--records N] [--repeat 3] [--profile]

Generates N realistic export records (~1.5 KB each, seeded) into a temp file, then measures
records/s of (a) bare ``orjson.loads`` over the same records, (b) the whole pipeline
(FileSource -> decode, validate, key, diff, dispatch to a no-op async handler, checkpoints on)
with MemoryStore, (c) the same with SqliteStore, and (d) ``changes``: a change-heavy stream
(every record flips about two memberships) through the pipeline with MemoryStore and the
built-in ``jsonl`` handler writing to /dev/null, and (e, f) ``memory-link`` and ``sqlite-link``:
(b) and (c) with identity linking (``identity.mode = "link"``), each judged against its key-mode
variant in the same run (the linking cost). Each pipeline variant runs in a fresh
subprocess (``--variant NAME``) so its peak RSS is its own; every measurement is pinned to one
CPU (the pipeline is single-threaded asyncio; SQLite's flush and the file reads use worker
threads, which then share that CPU). The variants run ``--repeat`` times, interleaved; each run
is judged against an orjson floor measured just before and after it in its own process, the
median ratio counts, and every run is printed.

``--profile`` runs the memory and changes variants under cProfile instead and prints where the
time per record goes: the self time of each area of the relay per record, then the top entries.
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

from bench.common import peak_rss_kb, print_areas, print_pstats, run_variant, self_time_by_area  # noqa: E402

VARIANTS = ("memory", "sqlite", "changes", "memory-link", "sqlite-link")
# Each variant's records/s against bare orjson.loads over the same records, in the same run.
TARGETS = {"memory": 0.20, "sqlite": 0.12, "changes": 0.06, "memory-link": 0.17, "sqlite-link": 0.10}
LINK_SUFFIX = "-link"
# A linking variant's median ratio against its key-mode variant's, in the same run: at most 15% slower.
LINK_COST_TARGET = 0.85
CHANGE_HEAVY = {"reexport_rate": 0.0, "duplicate_rate": 0.0, "out_of_order_rate": 0.0, "flips_per_event": 2}


def _pin(cpu: int | None) -> int | None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def bench_orjson(path: Path) -> dict[str, float]:
    """Bare orjson.loads over every record of ``path``, timed without the reading: the records
    are read 20,000 at a time so that this adds little to the process's peak RSS."""
    import itertools

    import orjson

    loads = orjson.loads
    records = seconds = 0.0
    with open(path, "rb") as stream:
        while chunk := [line for line in itertools.islice(stream, 20_000) if line.strip()]:
            gc.collect()
            started = time.perf_counter()
            for record in chunk:
                loads(record)
            seconds += time.perf_counter() - started
            records += len(chunk)
    return {"records": records, "seconds": seconds}


# --- the pipeline, in a child process -------------------------------------------------------
async def _run_pipeline(path: Path, variant: str, workdir: Path, checkpoint_interval_s: float) -> dict:
    from segment_relay.consumer.deadletter import MemoryDeadLetter
    from segment_relay.consumer.identity import IdentityResolver
    from segment_relay.consumer.pipeline import Pipeline, PipelineSettings
    from segment_relay.consumer.sources.file import FileSource
    from segment_relay.consumer.state import MemoryStore, SqliteStore
    from segment_relay.handlers.api import FunctionHandler, Handler, SegmentChange
    from segment_relay.handlers.builtin import JsonlHandler
    from segment_relay.handlers.router import Router
    from segment_relay.ops.runtime import tune_gc

    async def noop(change: SegmentChange) -> None:
        return None

    handler: Handler = JsonlHandler(os.devnull) if variant == "changes" else FunctionHandler(noop, name="noop")
    # As `segment-relay run` opens it by default (claims.mode "auto" is off on sqlite).
    store = SqliteStore(workdir / f"state-{os.getpid()}.db", links_with_state=True) \
        if variant.startswith("sqlite") else MemoryStore()
    identity = IdentityResolver(store) if variant.endswith(LINK_SUFFIX) else None
    dead_letter = MemoryDeadLetter()
    checkpoint = workdir / f"checkpoint-{variant}-{os.getpid()}.json"
    source = FileSource(str(path), checkpoint_path=str(checkpoint))
    pipeline = Pipeline(source, store, Router([handler], dead_letter), dead_letter, identity=identity,
                        settings=PipelineSettings(checkpoint_interval_s=checkpoint_interval_s))
    tune_gc()  # what `segment-relay run` does at start
    rss_before = peak_rss_kb()
    cpu_started = time.process_time()
    started = time.perf_counter()
    snapshot = await pipeline.run()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    return {
        "variant": variant,
        "records": snapshot.records_read,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_kb": rss_before,
        "peak_rss_kb": peak_rss_kb(),
        "checkpoint_line": json.loads(checkpoint.read_text())["line"],
        "enters": snapshot.enters,
        "exits": snapshot.exits,
        "dead_letters": len(dead_letter.entries),
    }


def child_main(args: argparse.Namespace) -> None:
    """One run of a variant, bracketed by a bare orjson.loads pass over the same stream just before
    and just after it in this same process: the machine's speed drifts (this is a shared VM, and
    its speed changes by up to 2x from one second to the next), and the ratio uses the floor
    measured around the run itself."""
    _pin(args.cpu)
    path = Path(args.input)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    before = bench_orjson(path)
    result = asyncio.run(_run_pipeline(path, args.variant, workdir, args.checkpoint_interval))
    after = bench_orjson(path)
    result["floor_us"] = (before["seconds"] + after["seconds"]) / 2 / before["records"] * 1e6
    print("RESULT " + json.dumps(result), flush=True)


def _run_child_once(path: Path, variant: str, workdir: Path, args: argparse.Namespace, cpu: int | None) -> dict:
    for leftover in workdir.glob("state-*.db*"):
        leftover.unlink()  # every sqlite run starts from an empty database
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--input", str(path),
               "--workdir", str(workdir), "--checkpoint-interval", str(args.checkpoint_interval)]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    return run_variant(command, f"{variant} variant")


def _median_ratio(results: list[dict]) -> float:
    ratios = sorted(run["ratio"] for run in results)
    return ratios[len(ratios) // 2]


# --- --profile --------------------------------------------------------------------------
AREAS = (  # (substring of the file path, area); the first match wins
    ("segment_relay/consumer/export.py", "decode + validate (export.py; orjson.loads counts here)"),
    ("segment_relay/consumer/profile_key.py", "profile key"),
    ("segment_relay/consumer/membership.py", "diff (membership.py)"),
    ("segment_relay/consumer/pipeline.py", "pipeline: steps, changes, saving, finishing"),
    ("segment_relay/consumer/ordering.py", "pipeline: profile gate, in-flight limit, watermarks"),
    ("segment_relay/consumer/state/", "membership store"),
    ("segment_relay/consumer/sources/", "source (file)"),
    ("segment_relay/consumer/deadletter", "dead letter"),
    ("segment_relay/handlers/dispatch.py", "handler dispatch (chains, calls, retries)"),
    ("segment_relay/handlers/router.py", "router (routing into chains)"),
    ("segment_relay/handlers/", "handlers (the handler itself)"),
    ("segment_relay/model.py", "change ids, to_dict (model.py)"),
    ("asyncio/", "asyncio (event loop, tasks)"),
    ("pydantic", "pydantic"),
)


def profile_variant(path: Path, variant: str, workdir: Path, args: argparse.Namespace, top: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    result = asyncio.run(_run_pipeline(path, variant, workdir, args.checkpoint_interval))
    profiler.disable()
    print(f"\ncProfile of the {variant} variant: {result['records']:,} records in {result['seconds']:.2f}s "
          f"(profiling overhead included)\n")
    print_areas(self_time_by_area(profiler, AREAS), "record", result["records"])
    print_pstats(profiler, top, ("tottime", "cumulative"))


# --- main -------------------------------------------------------------------------------------
def _row(name: str, records: int, seconds: float, base_rate: float | None, rss_kb: int | None,
         target: float | None, cpu_seconds: float | None = None) -> str:
    rate = records / seconds
    ratio = rate / base_rate if base_rate else None
    rss = "-" if rss_kb is None else f"{rss_kb / 1024:.0f} MiB"
    cpu_rate = "-" if cpu_seconds is None else f"{records / cpu_seconds:,.0f}"
    target_text = "-" if target is None else f">={target:.2f}x"
    verdict = "-" if target is None or ratio is None else ("PASS" if ratio >= target else "MISS")
    ratio_text = "1.00x" if ratio is None else f"{ratio:.3f}x"
    return (f"{name:<18} {rate:>11,.0f} {1e6 / rate:>10.1f} {ratio_text:>9} {rss:>9} {cpu_rate:>12} "
            f"{target_text:>10} {verdict:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--profiles", type=int, default=None, help="default: records / 5")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--checkpoint-interval", type=float, default=1.0,
                        help="seconds between checkpoints (production default is 5)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant; the median ratio counts")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which pipeline variants to run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin measurements to one CPU")
    parser.add_argument("--profile", action="store_true", help="cProfile the memory and changes variants instead")
    # internal: one pipeline variant in this (child) process
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child_main(args)
        return
    variants = [variant for variant in args.variants.split(",") if variant]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    from segment_relay.testing.exports import StreamSpec, write_jsonl

    cpu = None if args.no_pin or not hasattr(os, "sched_getaffinity") else max(os.sched_getaffinity(0))
    profiles = args.profiles or max(1, args.records // 5)
    with tempfile.TemporaryDirectory(prefix="segment-relay-bench-") as tmp:
        workdir = Path(tmp)
        streams = {"realistic": workdir / "stream.jsonl", "change-heavy": workdir / "changes.jsonl"}
        truths = {}
        for name, path in streams.items():
            extra = CHANGE_HEAVY if name == "change-heavy" else {}
            spec = StreamSpec(seed=args.seed, records=args.records, profiles=profiles, **extra)
            started = time.perf_counter()
            truth = truths[name] = write_jsonl(spec, path)
            size = path.stat().st_size
            print(f"{name}: {truth.records:,} records, {size / truth.records:,.0f} B/record avg, "
                  f"{truth.profiles:,} profiles, seed {spec.seed}, in {time.perf_counter() - started:.1f}s: "
                  f"{truth.enters:,} enters, {truth.exits:,} exits "
                  f"({(truth.enters + truth.exits) / truth.records:.2f} changes/record), {truth.stale:,} stale "
                  f"and {truth.duplicates:,} duplicate segment entries")
        stream_of = {"memory": "realistic", "sqlite": "realistic", "changes": "change-heavy",
                     "memory-link": "realistic", "sqlite-link": "realistic"}
        if args.profile:
            _pin(cpu)
            for variant in ("memory", "changes"):
                profile_variant(streams[stream_of[variant]], variant, workdir, args)
            return

        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        for _ in range(args.repeat):  # interleaved, so a slow moment of the machine hits every variant
            for variant in variants:
                run = _run_child_once(streams[stream_of[variant]], variant, workdir, args, cpu)
                run["floor_rate"] = 1e6 / run["floor_us"]
                run["ratio"] = run["records"] / run["seconds"] / run["floor_rate"]
                runs[variant].append(run)

    print(f"\none CPU{'' if cpu is None else f' (cpu {cpu})'}, {args.repeat} runs each, checkpoint every "
          f"{args.checkpoint_interval:g}s, python {sys.version.split()[0]}; records/s is wall time, "
          f"rec/cpu-s is CPU time of all threads; 'vs loads' is against bare orjson.loads of the same stream, "
          f"measured just before and after each run in its own process; the result is judged on the median "
          f"of the runs' ratios\n")
    print(f"{'':<18} {'records/s':>11} {'us/record':>10} {'vs loads':>9} {'peak RSS':>9} {'rec/cpu-s':>12} "
          f"{'target':>10} {'result':>6}")
    problems = []
    for variant, results in runs.items():
        median = sorted(results, key=lambda run: run["ratio"])[len(results) // 2]
        print(_row(f"orjson.loads ({stream_of[variant][:6]})", 1, 1 / median["floor_rate"], None, None, None))
        print(_row(f"pipeline {variant}", median["records"], median["seconds"], median["floor_rate"],
                   max(run["peak_rss_kb"] for run in results), TARGETS[variant], median["cpu_seconds"]))
        truth = truths[stream_of[variant]]
        for run in results:
            if (run["enters"], run["exits"], run["records"]) != (truth.enters, truth.exits, truth.records):
                problems.append(f"{variant}: relay made {run['enters']} enters / {run['exits']} exits of "
                                f"{run['records']} records; expected {truth.enters} / {truth.exits} of {truth.records}")
            if run["checkpoint_line"] != truth.records:
                problems.append(f"{variant}: final checkpoint at line {run['checkpoint_line']}, not {truth.records}")
    print()
    for variant, results in runs.items():
        each = ", ".join(f"{run['seconds']:.2f}s = {run['ratio']:.3f}x" for run in results)
        ratios = sorted(run["ratio"] for run in results)
        print(f"{variant}: runs {each} (median {ratios[len(ratios) // 2]:.3f}x, best {ratios[-1]:.3f}x); "
              f"RSS {results[0]['rss_before_kb'] / 1024:.0f} MiB after imports -> "
              f"{max(run['peak_rss_kb'] for run in results) / 1024:.0f} MiB peak")
    for variant, results in runs.items():
        key_mode = variant.removesuffix(LINK_SUFFIX)
        if variant == key_mode or key_mode not in runs:
            continue
        cost = _median_ratio(results) / _median_ratio(runs[key_mode])
        print(f"identity linking: {variant} / {key_mode} = {cost:.3f}x of the key mode's throughput (target >= "
              f"{LINK_COST_TARGET:.2f}x): {'PASS' if cost >= LINK_COST_TARGET else 'MISS'}")
    print("changes: " + ("match the reference model" if not problems else "MISMATCH\n  " + "\n  ".join(problems)))


if __name__ == "__main__":
    main()
