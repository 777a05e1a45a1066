"""Kinesis consumer throughput: segment-relay against async-kinesis and a bare aiobotocore loop.
Run by hand:

    .venv/bin/python bench/kinesis.py [--records N] [--shards 4] [--limits 1000,10000] [--profile]

In one run: starts kinesalite and dynalite (segment_relay.testing.aws, stopped by PID at the
end, even on error; kinesalite with emulators/kinesalite-fast-sequence.js, which makes its
per-record sequence-number parsing about 2x cheaper so that the emulator limits the consumers
less; KINESALITE_ORIGINAL=1 runs it as published), creates one stream and pre-loads N generated RT-CDP exports (~1.5 KB,
seeded, profiles = N/5) with PutRecords, 4 batches in flight, before any timer starts. Then the
whole stream is consumed from TRIM_HORIZON three ways, each in a fresh subprocess
(``--variant NAME``) so that its peak RSS (VmHWM) is its own:

- ``relay``: segment_relay.app.Relay, source kinesis:STREAM, state memory, a no-op handler,
  checkpoints every 1 s into a fresh DynamoDB lease table (dynalite), idle_wait_s 0.05;
  stops when ``relay.pipeline.records_finished == N``;
- ``async-kinesis``: its Consumer (pip install -e '.[bench]'), TRIM_HORIZON, JSON decoding
  only (its JsonProcessor with orjson as the decoder, so both sides pay the same per-record
  decode), sleep_time_no_records 0.05; stops after N records;

``--pace none`` (the default) paces neither consumer (relay min_get_records_interval_s 0,
async-kinesis shard_fetch_rate 1000): kinesalite enforces no per-shard limit, so this measures
each consumer's own cost, like the bare loop. ``--pace aws`` holds both to AWS's 5 GetRecords
per second per shard (0.2 s; shard_fetch_rate 5), where Limit 1000 caps a shard at 5,000
records/s;
- ``bare``: aiobotocore, one task per shard, GetShardIterator TRIM_HORIZON, GetRecords,
  ``orjson.loads(record["Data"])`` discarded: what a plain aiobotocore consumer costs. It is
  not a ceiling for the relay, which decodes GetRecords bodies with msgspec instead of
  botocore's parser (kinesis/aws.py: about 3.6 instead of 12 us per record).

Every variant is timed from its start (client creation; for the relay also the lease table
and lease taking) until the N-th record is read (bare, async-kinesis) or finished (relay).
Each variant runs at every GetRecords Limit in ``--limits``, ``--repeat`` times, interleaved;
the fastest run counts. The consumer subprocess is pinned to CPU 1 and kinesalite and
dynalite (every thread) to CPU 0, so emulator and consumer never share a core; kinesalite's
CPU seconds during the phase come from /proc/PID/stat.

``--profile`` pre-loads as above, then runs only the relay variant under cProfile (pinned
the same way) and prints its top entries by tottime and by cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.metadata
import inspect
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file is bench/kinesis.py: with bench/ first on sys.path (as for any script), it would
# shadow async-kinesis's top-level package `kinesis`. Drop that entry (shared code is imported as bench.common).
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_kb, print_pstats, run_variant  # noqa: E402

VARIANTS = ("relay", "async-kinesis", "bare")
LABELS = {"relay": "segment-relay", "async-kinesis": "async-kinesis", "bare": "bare aiobotocore"}
TARGET_VS_ASYNC_KINESIS = 2.5  # segment-relay records/s at least this times async-kinesis at its best Limit
TARGET_VS_BARE = 0.9  # ... and at least this fraction of the bare loop
# The relay at the largest Limit is no slower than at the smallest: at least this ratio of their
# best runs. Not 1.0: the two read the same way (a call asks for at most the reader's share of the
# read-ahead, see ReadAhead.share), and best-of-3 runs on this VM differ by up to 5% between two
# runs of the same thing.
TARGET_BIG_LIMIT = 0.95
TARGET_PEAK_RSS_MB = 300
EMULATOR_CPU = 0
CONSUMER_CPU = 1
INSTALL_HINT = "pip install -e '.[bench]'"


async def noop(change: Any) -> None:
    """The relay's handler (loaded as ``__main__:noop`` in the child)."""
    return None


# --- /proc helpers -------------------------------------------------------------------------
def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (all its threads) from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def pin_process(pid: int, cpu: int) -> int:
    """Pin every thread of ``pid`` to ``cpu`` (sched_setaffinity(pid) alone moves only the main
    thread; node's V8 and libuv threads would stay free). Returns how many threads were pinned."""
    pinned = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {cpu})
            pinned += 1
        except (ProcessLookupError, PermissionError):
            pass
    return pinned


def async_kinesis_version() -> str | None:
    try:
        version = importlib.metadata.version("async-kinesis")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        import kinesis  # noqa: F401
    except ImportError:
        return None
    return version


# --- the variants (run in the child) --------------------------------------------------------
class Phase:
    """Wall time, this process's CPU time and the emulators' CPU time over one measured phase."""

    def __init__(self, kinesalite_pid: int | None, dynalite_pid: int | None) -> None:
        self.pids = {"kinesalite": kinesalite_pid, "dynalite": dynalite_pid}
        self.first_record_s: float | None = None

    def start(self) -> None:
        self.emulator_cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.cpu = time.process_time()
        self.started = time.perf_counter()

    def first_record(self) -> None:
        if self.first_record_s is None:
            self.first_record_s = time.perf_counter() - self.started

    def end(self, records: int, **extra: Any) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        cpu = time.process_time() - self.cpu
        result: dict[str, Any] = {"records": records, "seconds": seconds, "cpu_seconds": cpu,
                                  "first_record_s": self.first_record_s}
        for name, pid in self.pids.items():
            before, after = self.emulator_cpu[name], cpu_seconds(pid)
            result[f"{name}_cpu_s"] = None if before is None or after is None else after - before
        return result | extra


async def drive_relay(relay: Any, phase: Phase, total: int, timeout_s: float, unit: str,
                      on_tick: Any = None) -> dict[str, Any]:
    """Run ``relay`` from the phase's start until ``total`` records are finished, then stop it
    gracefully; the phase's result plus the stop time and the relay's summary. ``on_tick()`` is
    called at each poll (e.g. to note when every partition is claimed)."""
    from segment_relay.ops.runtime import tune_gc

    tune_gc()  # what `segment-relay run` does at start
    pipeline = relay.pipeline
    phase.start()
    run = asyncio.create_task(relay.run())
    deadline = time.monotonic() + timeout_s
    while pipeline.records_finished < total:
        if run.done():
            run.result()  # raises what stopped it
            raise SystemExit(f"relay stopped after {pipeline.records_finished:,} of {total:,} {unit}")
        if time.monotonic() > deadline:
            raise SystemExit(f"relay timed out after {pipeline.records_finished:,} of {total:,} {unit}")
        if pipeline.records_read:
            phase.first_record()
        if on_tick is not None:
            on_tick()
        await asyncio.sleep(0.005)
    result = phase.end(pipeline.records_finished, records_read=pipeline.records_read)
    stopping = time.perf_counter()
    relay.stop()
    await asyncio.wait_for(run, 60)
    result["stop_s"] = time.perf_counter() - stopping
    result["summary"] = relay.snapshot().summary()
    return result


async def run_relay(args: argparse.Namespace, phase: Phase, workdir: Path) -> dict[str, Any]:
    from segment_relay.app import Relay
    from segment_relay.config import load_config

    application = f"bench-{uuid.uuid4().hex[:8]}"
    config = load_config(
        None, source=f"kinesis:{args.stream}", state="memory", handlers=[f"{__name__}:noop"],
        dead_letter=str(workdir / f"dead-letter-{os.getpid()}.jsonl"),
        pipeline={"checkpoint_interval_s": args.checkpoint_interval},
        kinesis={"endpoint_url": args.kinesis_endpoint, "dynamodb_endpoint_url": args.dynamodb_endpoint,
                 "application": application, "get_records_limit": args.limit, "idle_wait_s": args.idle_wait,
                 "min_get_records_interval_s": args.relay_pace},
    )
    relay = Relay(config)
    result = await drive_relay(relay, phase, args.records, args.timeout, "records")
    result["application"] = application
    return result


async def run_async_kinesis(args: argparse.Namespace, phase: Phase) -> dict[str, Any]:
    import orjson
    from aiobotocore.session import AioSession
    from kinesis import Consumer
    from kinesis.aggregators import SimpleAggregator
    from kinesis.processors import Processor
    from kinesis.serializers import JsonSerializer

    class OrjsonProcessor(Processor, SimpleAggregator, JsonSerializer):
        """async-kinesis's JsonProcessor with orjson as the decoder (its own uses ujson if
        installed, else the stdlib json, about 3x slower per document)."""

        def deserialize(self, data: bytes) -> Any:
            return orjson.loads(data)

    options: dict[str, Any] = {
        "session": AioSession(), "endpoint_url": args.kinesis_endpoint, "region_name": "us-east-1",
        "iterator_type": "TRIM_HORIZON", "record_limit": args.limit, "shard_fetch_rate": args.ak_fetch_rate,
        "sleep_time_no_records": args.idle_wait, "max_queue_size": 10_000, "idle_timeout": 5.0,
        "processor": OrjsonProcessor() if args.ak_decoder == "orjson" else None,
    }
    accepted = inspect.signature(Consumer).parameters  # older releases lack some (idle_timeout: 3.x)
    dropped = sorted(set(options) - set(accepted))
    if dropped:
        print(f"async-kinesis {async_kinesis_version()}: Consumer takes no {', '.join(dropped)}; left out",
              file=sys.stderr)
    phase.start()
    received = 0
    deadline = time.monotonic() + args.timeout
    async with Consumer(args.stream, **{k: v for k, v in options.items() if k in accepted}) as consumer:
        while received < args.records:
            async for _item in consumer:  # the decoded document, discarded
                received += 1
                if received == 1:
                    phase.first_record()
                if received >= args.records:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"async-kinesis timed out after {received:,} of {args.records:,} records")
        return phase.end(received)


async def run_bare(args: argparse.Namespace, phase: Phase) -> dict[str, Any]:
    import orjson
    from aiobotocore.session import get_session

    loads = orjson.loads
    phase.start()
    received = 0
    done = asyncio.Event()
    async with get_session().create_client("kinesis", endpoint_url=args.kinesis_endpoint,
                                           region_name="us-east-1") as client:
        shards = (await client.list_shards(StreamName=args.stream))["Shards"]

        async def read(shard_id: str) -> None:
            nonlocal received
            response = await client.get_shard_iterator(StreamName=args.stream, ShardId=shard_id,
                                                       ShardIteratorType="TRIM_HORIZON")
            iterator = response["ShardIterator"]
            while iterator and not done.is_set():
                response = await client.get_records(ShardIterator=iterator, Limit=args.limit)
                records = response["Records"]
                for record in records:
                    loads(record["Data"])
                if records:
                    phase.first_record()
                    received += len(records)
                    if received >= args.records:
                        done.set()
                else:
                    await asyncio.sleep(args.idle_wait)
                iterator = response.get("NextShardIterator")

        tasks = [asyncio.create_task(read(shard["ShardId"])) for shard in shards]
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        finally:
            result = phase.end(received)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return result


def child_main(args: argparse.Namespace) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-kinesis-"))
    phase = Phase(args.kinesalite_pid, args.dynalite_pid)
    rss_before = peak_rss_kb()
    profiler = cProfile.Profile() if args.profile else None
    if args.variant == "relay":
        coroutine = run_relay(args, phase, workdir)
    elif args.variant == "async-kinesis":
        coroutine = run_async_kinesis(args, phase)
    else:
        coroutine = run_bare(args, phase)
    if profiler is not None:
        profiler.enable()
    result = asyncio.run(coroutine)
    if profiler is not None:
        profiler.disable()
        print_profile(profiler, result, args.profile_top)
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
            print(f"profile data written to {args.profile_out} (python -m pstats {args.profile_out})")
    result |= {"variant": args.variant, "limit": args.limit, "rss_before_kb": rss_before,
               "peak_rss_kb": peak_rss_kb()}
    print("RESULT " + json.dumps(result), flush=True)


def print_profile(profiler: cProfile.Profile, result: dict[str, Any], top: int) -> None:
    print(f"\ncProfile of the relay variant: {result['records']:,} records in {result['seconds']:.2f}s "
          f"({result['records'] / result['seconds']:,.0f} records/s with profiling overhead; the profile "
          f"covers start to stop, including the drain and lease release)\n")
    print_pstats(profiler, top)


# --- the parent ------------------------------------------------------------------------------
def run_child(variant: str, limit: int, args: argparse.Namespace, env: dict[str, Any],
              profile: bool = False) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--limit", str(limit),
               "--records", str(args.records), "--stream", env["stream"],
               "--kinesis-endpoint", env["kinesis_endpoint"], "--dynamodb-endpoint", env["dynamodb_endpoint"],
               "--kinesalite-pid", str(env["kinesalite_pid"]), "--dynalite-pid", str(env["dynalite_pid"]),
               "--workdir", env["workdir"], "--checkpoint-interval", str(args.checkpoint_interval),
               "--idle-wait", str(args.idle_wait), "--timeout", str(args.timeout),
               "--ak-fetch-rate", str(args.ak_fetch_rate), "--ak-decoder", args.ak_decoder,
               "--relay-pace", str(args.relay_pace)]
    if env["consumer_cpu"] is not None:
        command += ["--cpu", str(env["consumer_cpu"])]
    if profile:
        command += ["--profile", "--profile-top", str(args.profile_top)]
        if args.profile_out:
            command += ["--profile-out", str(Path(args.profile_out).resolve())]
    return run_variant(command, f"{variant} variant (Limit {limit})", echo=profile)


async def preload(args: argparse.Namespace, endpoint: str, stream: str, kinesalite_pid: int) -> dict[str, Any]:
    from aiobotocore.session import get_session

    from segment_relay.testing.exports import StreamSpec, generate
    from segment_relay.testing.kinesis import create_stream, put_records

    spec = StreamSpec(seed=args.seed, records=args.records, profiles=args.profiles or max(1, args.records // 5))
    started = time.perf_counter()
    records = list(generate(spec))
    generated_s = time.perf_counter() - started
    size = sum(len(record) for record in records)
    async with get_session().create_client("kinesis", endpoint_url=endpoint, region_name="us-east-1") as client:
        await create_stream(client, stream, args.shards)
        cpu_before = cpu_seconds(kinesalite_pid)
        started = time.perf_counter()
        put = await put_records(client, stream, records, in_flight=4)
        seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(kinesalite_pid)
        shards = (await client.list_shards(StreamName=stream))["Shards"]
    return {"records": put, "bytes": size, "seconds": seconds, "generated_s": generated_s,
            "profiles": spec.profiles, "shards": len(shards),
            "kinesalite_cpu_s": None if cpu_before is None or cpu_after is None else cpu_after - cpu_before}


def _fmt(value: float | None, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def report(best: dict[str, dict[str, Any] | None], runs: list[dict[str, Any]], args: argparse.Namespace,
           env: dict[str, Any], ak_version: str | None) -> None:
    def rate(variant: str) -> float | None:
        result = best.get(variant)
        return None if result is None else result["records"] / result["seconds"]

    relay_rate, ak_rate, bare_rate = rate("relay"), rate("async-kinesis"), rate("bare")
    print(f"\n{args.records:,} records, {args.shards} shards; best of {args.repeat} per Limit in "
          f"{{{', '.join(map(str, args.limits))}}}; records/s is wall time from the consumer's start to the "
          f"last record read (relay: finished)")
    print(f"{'':<18} {'Limit':>6} {'records/s':>10} {'us/record':>10} {'peak RSS':>9} {'consumer CPU s':>15} "
          f"{'kinesalite CPU s':>17} {'first rec s':>12}")
    for variant in VARIANTS:
        result = best.get(variant)
        if result is None:
            why = "not installed" if variant == "async-kinesis" and ak_version is None else "no result"
            print(f"{LABELS[variant]:<18} {'-':>6} {why:>10}")
            continue
        records_per_s = result["records"] / result["seconds"]
        print(f"{LABELS[variant]:<18} {result['limit']:>6} {records_per_s:>10,.0f} {1e6 / records_per_s:>10.1f} "
              f"{result['peak_rss_kb'] / 1024:>5.0f} MiB {result['cpu_seconds']:>15.2f} "
              f"{_fmt(result['kinesalite_cpu_s'], '.2f'):>17} {_fmt(result['first_record_s'], '.2f'):>12}")

    print(f"\n{'target':<34} {'measured':>10} {'goal':>8} {'result':>7}")

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    vs_ak = None if relay_rate is None or ak_rate is None else relay_rate / ak_rate
    vs_bare = None if relay_rate is None or bare_rate is None else relay_rate / bare_rate
    relay = best.get("relay")
    rss_mb = None if relay is None else relay["peak_rss_kb"] / 1024
    print(f"{'segment-relay / async-kinesis':<34} {_fmt(vs_ak, '.2f', 'n/a') + ('' if vs_ak is None else 'x'):>10} "
          f"{'>= ' + format(TARGET_VS_ASYNC_KINESIS, 'g') + 'x':>8} "
          f"{verdict(None if vs_ak is None else vs_ak >= TARGET_VS_ASYNC_KINESIS):>7}")
    if relay is not None:  # for reference: async-kinesis at the relay's Limit (not a target)
        same = [run for run in runs if run["variant"] == "async-kinesis" and run["limit"] == relay["limit"]]
        if same:
            same_rate = max(run["records"] / run["seconds"] for run in same)
            print(f"{'  (vs async-kinesis at Limit ' + str(relay['limit']) + ')':<34} "
                  f"{format(relay_rate / same_rate, '.2f') + 'x':>10} {'':>8} {'info':>7}")
    print(f"{'segment-relay / bare aiobotocore':<34} {_fmt(vs_bare, '.2f', 'n/a') + ('' if vs_bare is None else 'x'):>10} "
          f"{'>= ' + format(TARGET_VS_BARE, 'g') + 'x':>8} "
          f"{verdict(None if vs_bare is None else vs_bare >= TARGET_VS_BARE):>7}")
    relay_by_limit = {limit: max((run["records"] / run["seconds"] for run in runs
                                  if run["variant"] == "relay" and run["limit"] == limit), default=None)
                      for limit in args.limits}
    small, big = min(args.limits), max(args.limits)
    if small != big and relay_by_limit[small] and relay_by_limit[big]:
        big_vs_small = relay_by_limit[big] / relay_by_limit[small]
        print(f"{f'segment-relay Limit {big} / {small}':<34} {format(big_vs_small, '.2f') + 'x':>10} "
              f"{'>= ' + format(TARGET_BIG_LIMIT, 'g') + 'x':>8} {verdict(big_vs_small >= TARGET_BIG_LIMIT):>7}")
    rss_all = max((run["peak_rss_kb"] for run in runs if run["variant"] == "relay"), default=None)
    if rss_all is not None:
        rss_mb = rss_all / 1024  # the relay's worst peak at any Limit
    print(f"{'segment-relay peak RSS':<34} {_fmt(rss_mb, '.0f', 'n/a') + ' MiB':>10} "
          f"{'< ' + str(TARGET_PEAK_RSS_MB) + ' MB':>8} "
          f"{verdict(None if rss_mb is None else rss_mb * 1.048576 < TARGET_PEAK_RSS_MB):>7}")
    if ak_version is None:
        print(f"\nasync-kinesis is not installed, so that variant was skipped: {INSTALL_HINT}")

    print("\nall runs (wall s at each Limit; * = the one in the table):")
    for variant in VARIANTS:
        for limit in args.limits:
            mine = [run for run in runs if run["variant"] == variant and run["limit"] == limit]
            if not mine:
                continue
            chosen = best.get(variant)
            text = ", ".join(f"{run['seconds']:.2f}{'*' if run is chosen else ''}" for run in mine)
            rates = ", ".join(f"{run['records'] / run['seconds']:,.0f}" for run in mine)
            rss = max(run["peak_rss_kb"] for run in mine) / 1024
            print(f"  {LABELS[variant]:<18} Limit {limit:>5}: {text} s  ({rates} records/s), peak RSS {rss:.0f} MiB")
    if relay is not None:
        dynalite = _fmt(relay.get("dynalite_cpu_s"), ".2f")
        print(f"\nrelay (best run): summary {relay['summary']}; records_read {relay['records_read']:,}; "
              f"RSS {relay['rss_before_kb'] / 1024:.0f} MiB at start -> {relay['peak_rss_kb'] / 1024:.0f} MiB "
              f"peak; dynalite CPU {dynalite} s; graceful stop {relay['stop_s']:.2f} s")
    noted: dict[tuple[str, str], int] = {}
    for run in runs:
        if run.get("stderr_lines"):
            key = (run["variant"], run["stderr_tail"][-1][:200])
            noted[key] = noted.get(key, 0) + 1
    for (variant, line), count in noted.items():
        print(f"note: {count} {LABELS[variant]} run(s) wrote to stderr, last line: {line}")
    if any(variant == "async-kinesis" and "Connection error" in line for variant, line in noted):
        print("      (async-kinesis logs that when it is closed with a GetRecords in flight, after the N-th "
              "record: outside the timing)")


def parent_main(args: argparse.Namespace) -> None:
    from segment_relay.testing.aws import FAKE_AWS_ENV, EmulatorUnavailable, start_dynalite, start_kinesalite

    os.environ.update(FAKE_AWS_ENV)  # inherited by the children
    ak_version = async_kinesis_version()
    if ak_version is None:
        print(f"async-kinesis is not installed: that variant is skipped, the other two still run. "
              f"To include it: {INSTALL_HINT}", flush=True)

    can_pin = hasattr(os, "sched_setaffinity") and {EMULATOR_CPU, CONSUMER_CPU} <= os.sched_getaffinity(0)
    parent_cpus = os.sched_getaffinity(0) if can_pin else set()
    if args.no_pin:
        can_pin = False
    consumer_cpu = CONSUMER_CPU if can_pin else None
    emulators = []
    try:
        try:
            kinesalite = start_kinesalite()
            emulators.append(kinesalite)
            dynalite = start_dynalite()
            emulators.append(dynalite)
        except EmulatorUnavailable as exc:
            raise SystemExit(f"cannot start the AWS emulators: {exc}") from None
        if can_pin:
            threads = pin_process(kinesalite.pid, EMULATOR_CPU) + pin_process(dynalite.pid, EMULATOR_CPU)
            os.sched_setaffinity(0, {CONSUMER_CPU})  # this process too, while it pre-loads
            print(f"pinning: kinesalite (pid {kinesalite.pid}) and dynalite (pid {dynalite.pid}), all {threads} "
                  f"threads, on CPU {EMULATOR_CPU}; each consumer subprocess (and the pre-loading parent) on "
                  f"CPU {CONSUMER_CPU}: emulator and consumer never share a core", flush=True)
        else:
            print("pinning: off (--no-pin, or CPUs 0 and 1 are not both available): emulator and consumer "
                  "compete for the same cores", flush=True)

        stream = f"bench-{uuid.uuid4().hex[:8]}"
        loaded = asyncio.run(preload(args, kinesalite.endpoint, stream, kinesalite.pid))
        print(f"pre-loaded {loaded['records']:,} records ({loaded['bytes'] / loaded['records']:,.0f} B avg, "
              f"{loaded['profiles']:,} profiles, generated in {loaded['generated_s']:.1f}s) into {stream} "
              f"({loaded['shards']} shards): {loaded['records'] / loaded['seconds']:,.0f} records/s, "
              f"{loaded['bytes'] / loaded['seconds'] / 1e6:.1f} MB/s (PutRecords 500/batch, 4 in flight), "
              f"kinesalite CPU {_fmt(loaded['kinesalite_cpu_s'], '.1f')} s; kinesalite RSS now "
              f"{(_rss_kb(kinesalite.pid) or 0) / 1024:.0f} MiB", flush=True)
        if can_pin:
            os.sched_setaffinity(0, parent_cpus)  # the parent only waits from here on

        with tempfile.TemporaryDirectory(prefix="segment-relay-bench-kinesis-") as workdir:
            env = {"stream": stream, "kinesis_endpoint": kinesalite.endpoint, "dynamodb_endpoint": dynalite.endpoint,
                   "kinesalite_pid": kinesalite.pid, "dynalite_pid": dynalite.pid, "workdir": workdir,
                   "consumer_cpu": consumer_cpu}
            if args.profile:
                limit = args.limits[0]
                print(f"\nprofiling the relay variant at Limit {limit} (consumer on CPU {consumer_cpu})", flush=True)
                run_child("relay", limit, args, env, profile=True)
                return

            variants = [v for v in VARIANTS if v in args.variants and (v != "async-kinesis" or ak_version)]
            runs: list[dict[str, Any]] = []
            for repeat in range(args.repeat):
                for variant in variants:
                    for limit in args.limits:
                        result = run_child(variant, limit, args, env)
                        runs.append(result)
                        print(f"  run {repeat + 1}/{args.repeat} {LABELS[variant]:<18} Limit {limit:>5}: "
                              f"{result['records'] / result['seconds']:>8,.0f} records/s "
                              f"({result['seconds']:.2f}s, consumer CPU {result['cpu_seconds']:.2f} s, "
                              f"kinesalite CPU {_fmt(result['kinesalite_cpu_s'], '.2f')} s, "
                              f"first record {_fmt(result['first_record_s'], '.2f')} s, "
                              f"peak RSS {result['peak_rss_kb'] / 1024:.0f} MiB)", flush=True)
        best: dict[str, dict[str, Any] | None] = {}
        for variant in VARIANTS:
            mine = [run for run in runs if run["variant"] == variant]
            chosen = best[variant] = min(mine, key=lambda run: run["seconds"]) if mine else None
            if chosen is not None:  # the worst peak RSS among the runs at the chosen Limit counts
                chosen["peak_rss_kb"] = max(run["peak_rss_kb"] for run in mine if run["limit"] == chosen["limit"])
        print(f"\nsettings: pace {args.pace}; relay state memory, no-op handler, checkpoint every "
              f"{args.checkpoint_interval:g}s, idle_wait_s {args.idle_wait:g}, min_get_records_interval_s "
              f"{args.relay_pace:g}; async-kinesis {ak_version or '(missing)'} with "
              f"{args.ak_decoder} decoding, shard_fetch_rate {args.ak_fetch_rate}, sleep_time_no_records "
              f"{args.idle_wait:g}; bare: one task per shard, orjson.loads; python {sys.version.split()[0]}; "
              f"consumer on CPU {consumer_cpu}, emulators on CPU {EMULATOR_CPU if can_pin else None}; "
              f"peak RSS is the largest over a variant's runs at the Limit shown")
        report(best, runs, args, env, ak_version)
    finally:
        for emulator in reversed(emulators):
            emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--profiles", type=int, default=None, help="default: records / 5")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--limits", type=lambda text: [int(x) for x in text.split(",")], default=[1000, 10000],
                        help="GetRecords Limit values to try for every variant (default 1000,10000); "
                             "--profile uses the first")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant and Limit; the fastest counts")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--checkpoint-interval", type=float, default=1.0, help="relay: seconds between checkpoints")
    parser.add_argument("--idle-wait", type=float, default=0.05,
                        help="seconds to wait after an empty GetRecords (relay idle_wait_s, async-kinesis "
                             "sleep_time_no_records, bare)")
    parser.add_argument("--pace", choices=("none", "aws"), default="none",
                        help="none (default): kinesalite enforces no per-shard limit, so neither consumer is "
                             "paced and the figures are each consumer's own cost, like the bare loop's; aws: both "
                             "held to AWS's 5 GetRecords per second per shard")
    parser.add_argument("--relay-pace", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ak-fetch-rate", type=int, default=None,
                        help="async-kinesis shard_fetch_rate (GetRecords per shard per second; AWS max 5)")
    parser.add_argument("--ak-decoder", choices=("orjson", "json"), default="orjson",
                        help="async-kinesis: orjson in its JsonProcessor, or its own JsonProcessor (stdlib json)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a variant may take")
    parser.add_argument("--no-pin", action="store_true", help="do not pin emulators and consumers to CPUs")
    parser.add_argument("--profile", action="store_true", help="cProfile the relay variant instead")
    parser.add_argument("--profile-top", type=int, default=20, help="entries per --profile listing")
    parser.add_argument("--profile-out", default=None, help="with --profile: also write the pstats data here")
    # internal: one variant in this (child) process
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--kinesis-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--dynamodb-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--kinesalite-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dynalite-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay_pace is None:
        args.relay_pace = 0.2 if args.pace == "aws" else 0.0
    if args.ak_fetch_rate is None:
        args.ak_fetch_rate = 5 if args.pace == "aws" else 1000
    if args.variant:
        child_main(args)
        return
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    parent_main(args)


if __name__ == "__main__":
    main()
