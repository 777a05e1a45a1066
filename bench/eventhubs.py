"""Event Hubs consumer throughput: segment-relay against a bare azure-eventhub consumer. Run by hand:

    .venv/bin/python bench/eventhubs.py [--events N] [--partitions 4] [--repeat R] [--profile]

In one run: starts the project's Event Hubs emulator in its own process
(segment_relay.testing.eventhubs.process) and Azurite (segment_relay.testing.azure), both stopped
by PID at the end, even on error; pre-loads one hub of ``--partitions`` partitions with N generated
RT-CDP exports (~1.5 KB, seeded, profiles = N/5) through the SDK's producer
(segment_relay.testing.eventhubs.produce.send_exports), before any timer starts. Then the whole hub
is consumed from the start two ways, each in a fresh subprocess (``--variant NAME``) so that its
peak RSS (VmHWM) is its own:

- ``relay``: segment_relay.app.Relay, source eventhubs:HUB, state memory, a no-op handler (validate,
  key, diff, dispatch), the real BlobCheckpointStore on Azurite in a fresh container per run (load
  balancing and ownership through blobs, checkpoints every 1 s), load_balancing_interval_s 1,
  starting_position earliest; stops when ``relay.pipeline.records_finished == N``;
- ``bare``: azure.eventhub.aio.EventHubConsumerClient with no checkpoint store (the SDK's in-memory
  one), ``receive_batch`` from "-1" with a callback that only counts events: the ceiling of the SDK
  on this machine (its pure-Python AMQP client is the limit, not the emulator). It gets the SDK's
  ``EventData`` objects, as every user of the SDK does; the relay reads its events from the AMQP
  messages instead (segment_relay/consumer/sources/eventhubs/received.py, its README section).

Both use max_batch_size 300 and prefetch 300 (the relay's defaults). Each variant is timed from
its start (client creation; for the relay also its start-up checks and the ownership claims in
blobs) until the N-th event is received (bare) or finished (relay); both import the SDK before the
timer (the relay would import it in its start()). The table also shows when every partition was
claimed, when the first event arrived, and the rate from the first event on (start-up left out).
``--bare-checkpoints`` gives the bare consumer the relay's durability: the BlobCheckpointStore on
Azurite (a fresh container per run) and a checkpoint per partition every ``--checkpoint-interval``;
the ratio is then only info, since the target is against the bare consumer without it.
``--bare-work-us N`` makes the bare consumer's callback spend N µs of pure CPU per event: on this
machine 30 µs per event (about what the relay's pipeline costs) brings the bare consumer to
0.85-0.89x of itself, since the SDK's fixed 50 ms polling sleeps hide only part of any consumer's
own work. The variants run ``--repeat`` times, interleaved; the fastest run counts (peak RSS: the largest
over a variant's runs). The relay calls tune_gc() as ``segment-relay run`` does; the bare consumer
keeps Python's defaults. The consumer subprocess is pinned to CPU 1 and the emulator and Azurite
(every thread) to CPU 0, so emulator and consumer never share a core; their CPU seconds during
each phase come from /proc/PID/stat. Exit code 0 whether the targets are met or not.

``--profile`` pre-loads as above, then runs the relay variant and then the bare one under cProfile
(pinned the same way) and prints, for each, its top entries by tottime and by cumulative time and its
self time by area (the SDK, the relay's Event Hubs source, the pipeline, ...), with C functions
charged to their caller: the bare listing is the SDK's own cost per event, the difference is the
relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Shared /proc helpers and the phase timer (bench/ is a namespace package under ROOT). Importing
# bench.kinesis drops bench/ itself from sys.path (see there); nothing here needs it.
from bench.common import peak_rss_kb, print_areas, print_pstats, run_variant, self_time_by_area  # noqa: E402
from bench.kinesis import Phase as _KinesisPhase  # noqa: E402
from bench.kinesis import _fmt, _rss_kb, cpu_seconds, drive_relay, pin_process  # noqa: E402

VARIANTS = ("relay", "bare")
LABELS = {"relay": "segment-relay", "bare": "bare azure-eventhub"}
HUB = "bench"
TARGET_VS_BARE = 0.85  # segment-relay events/s at least this fraction of the bare SDK consumer
TARGET_RELAY_RATE = 8_000  # ... and at least this many events/s
EMULATOR_CPU = 0
CONSUMER_CPU = 1


async def noop(change: Any) -> None:
    """The relay's handler (loaded as ``__main__:noop`` in the child)."""
    return None


class Phase(_KinesisPhase):
    """bench/kinesis.py's phase timer, with the Event Hubs emulator and Azurite as the emulators,
    and the moment every partition was claimed (by the load balancer) besides the first event."""

    def __init__(self, emulator_pid: int | None, azurite_pid: int | None) -> None:
        super().__init__(None, None)
        self.pids = {"emulator": emulator_pid, "azurite": azurite_pid}
        self.claimed_s: float | None = None

    def all_claimed(self) -> None:
        if self.claimed_s is None:
            self.claimed_s = time.perf_counter() - self.started

    def end(self, records: int, **extra: Any) -> dict[str, Any]:
        return super().end(records, claimed_s=self.claimed_s, **extra)


# --- the variants (run in the child) --------------------------------------------------------
async def run_relay(args: argparse.Namespace, phase: Phase, workdir: Path) -> dict[str, Any]:
    from segment_relay.app import Relay
    from segment_relay.config import load_config

    config = load_config(
        None, source=f"eventhubs:{args.hub}", state="memory", handlers=[f"{__name__}:noop"],
        dead_letter=str(workdir / f"dead-letter-{os.getpid()}.jsonl"), log_level="WARNING",
        pipeline={"checkpoint_interval_s": args.checkpoint_interval},
        eventhubs={"connection_string": args.connection_string,
                   "checkpoint_connection_string": args.checkpoint_connection_string,
                   "checkpoint_container": args.container,
                   "load_balancing_interval_s": args.load_balancing_interval,
                   "starting_position": "earliest",
                   "max_batch_size": args.batch_size, "prefetch": args.prefetch},
    )
    relay = Relay(config)
    # The source imports the SDK and its blob checkpoint store only in start(); import them here,
    # before the timer, as the bare variant does (a one-off cost of the process, not of consuming).
    import azure.eventhub.aio  # noqa: F401
    import azure.eventhub.extensions.checkpointstoreblobaio  # noqa: F401

    def note_claims() -> None:
        if phase.claimed_s is None and len(relay.source.owned_partitions) >= args.partitions:
            phase.all_claimed()

    return await drive_relay(relay, phase, args.events, args.timeout, "events", note_claims)


async def run_bare(args: argparse.Namespace, phase: Phase) -> dict[str, Any]:
    from azure.eventhub.aio import EventHubConsumerClient  # before the timer, as for the relay

    received = 0
    claimed: set[str] = set()
    done = asyncio.Event()

    async def on_partition_initialize(context: Any) -> None:
        claimed.add(context.partition_id)
        if len(claimed) >= args.partitions:
            phase.all_claimed()

    work_s = args.bare_work_us / 1e6
    checkpointed: dict[str, float] = {}  # --bare-checkpoints: partition -> when it was last checkpointed

    async def on_event_batch(context: Any, events: list[Any]) -> None:
        nonlocal received
        if events:
            phase.first_record()
            if work_s:  # --bare-work-us: pure CPU per event, as a consumer's own work would cost
                until = time.perf_counter() + len(events) * work_s
                while time.perf_counter() < until:
                    pass
            if args.bare_checkpoints:  # every checkpoint_interval per partition, as the relay does
                now = time.monotonic()
                if now - checkpointed.get(context.partition_id, 0.0) >= args.checkpoint_interval:
                    checkpointed[context.partition_id] = now
                    await context.update_checkpoint(events[-1])
            received += len(events)
            if received >= args.events:
                done.set()

    store = None
    if args.bare_checkpoints:
        from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore

        store = BlobCheckpointStore.from_connection_string(args.checkpoint_connection_string, args.container)
    phase.start()
    client = EventHubConsumerClient.from_connection_string(
        args.connection_string, consumer_group="$default", load_balancing_interval=args.load_balancing_interval,
        checkpoint_store=store)
    receiving = asyncio.create_task(client.receive_batch(
        on_event_batch, starting_position="-1", max_batch_size=args.batch_size, prefetch=args.prefetch,
        on_partition_initialize=on_partition_initialize))
    waiting = asyncio.create_task(done.wait())
    try:
        await asyncio.wait((receiving, waiting), timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done.is_set():
            if receiving.done():
                receiving.result()  # raises what stopped it
                raise SystemExit(f"the bare consumer stopped after {received:,} of {args.events:,} events")
            raise SystemExit(f"the bare consumer timed out after {received:,} of {args.events:,} events")
        result = phase.end(received)
    finally:
        waiting.cancel()
        stopping = time.perf_counter()
        await client.close()  # ends receive_batch
        await asyncio.wait_for(asyncio.gather(receiving, return_exceptions=True), 60)
        if store is not None:
            await store.close()  # its aiohttp session
    result["stop_s"] = time.perf_counter() - stopping
    return result


def child_main(args: argparse.Namespace) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-eventhubs-"))
    phase = Phase(args.emulator_pid, args.azurite_pid)
    rss_before = peak_rss_kb()
    profiler = cProfile.Profile() if args.profile else None
    coroutine = run_relay(args, phase, workdir) if args.variant == "relay" else run_bare(args, phase)
    if profiler is not None:
        profiler.enable()
    result = asyncio.run(coroutine)
    if profiler is not None:
        profiler.disable()
        print_profile(profiler, result, args.profile_top, args.variant)
        if args.profile_out:
            out = args.profile_out if args.variant == "relay" else f"{args.profile_out}.{args.variant}"
            profiler.dump_stats(out)
            print(f"profile data written to {out} (python -m pstats {out})")
    result |= {"variant": args.variant, "rss_before_kb": rss_before, "peak_rss_kb": peak_rss_kb()}
    print("RESULT " + json.dumps(result), flush=True)


# --- the profile ---------------------------------------------------------------------------
AREAS = (  # (substring of the file path, area); the first match wins
    ("segment_relay/consumer/sources/eventhubs/", "relay: Event Hubs source"),
    ("segment_relay/consumer/pipeline", "relay: pipeline"),
    ("segment_relay/", "relay: other (model, diff, store, router, stats)"),
    ("checkpointstoreblob", "SDK: blob checkpoint store"),
    ("azure/eventhub/_pyamqp/", "SDK: AMQP client (_pyamqp)"),
    ("azure/eventhub/", "SDK: azure.eventhub (consumer, load balancer, EventData)"),
    ("azure/", "SDK: azure.core, storage and others"),
    ("aiohttp/", "aiohttp (blob HTTP)"),
    ("asyncio/", "asyncio (event loop, queues, tasks)"),
    ("orjson", "orjson"),
)


def print_profile(profiler: cProfile.Profile, result: dict[str, Any], top: int, variant: str) -> None:
    print(f"\ncProfile of the {variant} variant: {result['records']:,} events in {result['seconds']:.2f}s "
          f"({result['records'] / result['seconds']:,.0f} events/s with profiling overhead; the profile "
          f"covers start to stop, including the drain, the last checkpoints and releasing ownership)\n")
    print_areas(self_time_by_area(profiler, AREAS), "event", result["records"])
    print_pstats(profiler, top)


# --- the parent ------------------------------------------------------------------------------
def run_child(variant: str, args: argparse.Namespace, env: dict[str, Any], container: str | None = None,
              profile: bool = False) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--events", str(args.events),
               "--partitions", str(args.partitions), "--hub", HUB, "--connection-string", env["connection_string"],
               "--checkpoint-connection-string", env["checkpoint_connection_string"],
               "--emulator-pid", str(env["emulator_pid"]), "--azurite-pid", str(env["azurite_pid"]),
               "--workdir", env["workdir"], "--timeout", str(args.timeout),
               "--checkpoint-interval", str(args.checkpoint_interval),
               "--load-balancing-interval", str(args.load_balancing_interval),
               "--batch-size", str(args.batch_size), "--prefetch", str(args.prefetch),
               "--bare-work-us", str(args.bare_work_us)]
    if args.bare_checkpoints:
        command.append("--bare-checkpoints")
    if container is not None:
        command += ["--container", container]
    if env["consumer_cpu"] is not None:
        command += ["--cpu", str(env["consumer_cpu"])]
    if profile:
        command += ["--profile", "--profile-top", str(args.profile_top)]
        if args.profile_out:
            command += ["--profile-out", str(Path(args.profile_out).resolve())]
    return run_variant(command, f"{variant} variant", echo=profile)


async def preload(args: argparse.Namespace, connection_string: str, emulator_pid: int) -> dict[str, Any]:
    from segment_relay.testing.eventhubs.produce import send_exports
    from segment_relay.testing.exports import StreamSpec, generate

    spec = StreamSpec(seed=args.seed, records=args.events, profiles=args.profiles or max(1, args.events // 5))
    started = time.perf_counter()
    records = list(generate(spec))
    generated_s = time.perf_counter() - started
    size = sum(len(record) for record in records)
    cpu_before = cpu_seconds(emulator_pid)
    started = time.perf_counter()
    sent = await send_exports(connection_string, HUB, records)
    seconds = time.perf_counter() - started
    cpu_after = cpu_seconds(emulator_pid)
    return {"events": sent, "bytes": size, "seconds": seconds, "generated_s": generated_s, "profiles": spec.profiles,
            "emulator_cpu_s": None if cpu_before is None or cpu_after is None else cpu_after - cpu_before}


async def new_container(connection_string: str) -> str:
    """A fresh, empty checkpoint container: the relay starts with no checkpoints and no owners."""
    from azure.storage.blob.aio import BlobServiceClient

    name = f"bench-{uuid.uuid4().hex[:12]}"
    async with BlobServiceClient.from_connection_string(connection_string) as service:
        await service.create_container(name)
    return name


async def count_blobs(connection_string: str, container: str) -> dict[str, int]:
    """Checkpoint and ownership blobs the relay left (a check that checkpoints were on)."""
    from azure.storage.blob.aio import BlobServiceClient

    counts = {"checkpoint": 0, "ownership": 0}
    async with BlobServiceClient.from_connection_string(connection_string) as service:
        async for blob in service.get_container_client(container).list_blobs():
            for kind in counts:
                if f"/{kind}/" in blob.name:
                    counts[kind] += 1
    return counts


def report(best: dict[str, dict[str, Any] | None], runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def rate(variant: str) -> float | None:
        result = best.get(variant)
        return None if result is None else result["records"] / result["seconds"]

    def steady(result: dict[str, Any]) -> float | None:
        """events/s from the first event to the N-th: start-up (connections, checks, claims) left out."""
        first = result["first_record_s"]
        return None if first is None or result["seconds"] <= first else result["records"] / (result["seconds"] - first)

    relay_rate, bare_rate = rate("relay"), rate("bare")
    print(f"\n{args.events:,} events, {args.partitions} partitions; best of {args.repeat}; events/s is wall time "
          f"from the consumer's start to the last event received (relay: finished)")
    print(f"{'':<20} {'events/s':>9} {'us/event':>9} {'peak RSS':>9} {'consumer CPU s':>15} "
          f"{'emulator CPU s':>15} {'azurite CPU s':>14} {'claimed s':>10} {'first event s':>14} "
          f"{'events/s after 1st':>19}")
    for variant in VARIANTS:
        result = best.get(variant)
        if result is None:
            print(f"{LABELS[variant]:<20} {'no result':>9}")
            continue
        events_per_s = result["records"] / result["seconds"]
        print(f"{LABELS[variant]:<20} {events_per_s:>9,.0f} {1e6 / events_per_s:>9.1f} "
              f"{result['peak_rss_kb'] / 1024:>5.0f} MiB {result['cpu_seconds']:>15.2f} "
              f"{_fmt(result['emulator_cpu_s'], '.2f'):>15} {_fmt(result['azurite_cpu_s'], '.2f'):>14} "
              f"{_fmt(result['claimed_s'], '.2f'):>10} {_fmt(result['first_record_s'], '.2f'):>14} "
              f"{_fmt(steady(result), ',.0f'):>19}")

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    vs_bare = None if relay_rate is None or bare_rate is None else relay_rate / bare_rate
    relay, bare = best.get("relay"), best.get("bare")
    print(f"\n{'target':<36} {'measured':>12} {'goal':>10} {'result':>7}")
    print(f"{'segment-relay / bare azure-eventhub':<36} "
          f"{_fmt(vs_bare, '.2f', 'n/a') + ('' if vs_bare is None else 'x'):>12} "
          f"{'>= ' + format(TARGET_VS_BARE, 'g') + 'x':>10} "
          f"{'info' if args.bare_checkpoints else verdict(None if vs_bare is None else vs_bare >= TARGET_VS_BARE):>7}")
    print(f"{'segment-relay events/s':<36} {_fmt(relay_rate, ',.0f', 'n/a'):>12} "
          f"{'>= ' + format(TARGET_RELAY_RATE, ',d'):>10} "
          f"{verdict(None if relay_rate is None else relay_rate >= TARGET_RELAY_RATE):>7}")
    if relay is not None and bare is not None:
        print(f"{'segment-relay / bare peak RSS':<36} "
              f"{format(relay['peak_rss_kb'] / bare['peak_rss_kb'], '.2f') + 'x':>12} {'':>10} {'info':>7}")
        relay_steady, bare_steady = steady(relay), steady(bare)
        if relay_steady is not None and bare_steady is not None:
            print(f"{'segment-relay / bare after 1st event':<36} {format(relay_steady / bare_steady, '.2f') + 'x':>12} "
                  f"{'':>10} {'info':>7}")
        cpu_per_event = (relay["cpu_seconds"] / relay["records"]) / (bare["cpu_seconds"] / bare["records"])
        print(f"{'segment-relay / bare CPU per event':<36} {format(cpu_per_event, '.2f') + 'x':>12} {'':>10} "
              f"{'info':>7}")

    print("\nall runs (wall s; * = the one in the table):")
    for variant in VARIANTS:
        mine = [run for run in runs if run["variant"] == variant]
        if not mine:
            continue
        chosen = best.get(variant)
        text = ", ".join(f"{run['seconds']:.2f}{'*' if run is chosen else ''}" for run in mine)
        rates = ", ".join(f"{run['records'] / run['seconds']:,.0f}" for run in mine)
        rss = ", ".join(f"{run['peak_rss_kb'] / 1024:.0f}" for run in mine)
        print(f"  {LABELS[variant]:<20}: {text} s  ({rates} events/s), peak RSS {rss} MiB")
    if relay is not None:
        print(f"\nrelay (best run): summary {relay['summary']}; records_read {relay['records_read']:,}; "
              f"RSS {relay['rss_before_kb'] / 1024:.0f} MiB at start -> {relay['peak_rss_kb'] / 1024:.0f} MiB "
              f"peak (largest over runs); blobs left {relay.get('blobs')}; graceful stop {relay['stop_s']:.2f} s")
    if bare is not None:
        print(f"bare (best run): close {bare['stop_s']:.2f} s")
    noted: dict[tuple[str, str], int] = {}
    for run in runs:
        if run.get("stderr_lines"):
            key = (run["variant"], run["stderr_tail"][-1][:200])
            noted[key] = noted.get(key, 0) + 1
    for (variant, line), count in noted.items():
        print(f"note: {count} {LABELS[variant]} run(s) wrote to stderr, last line: {line}")


def parent_main(args: argparse.Namespace) -> None:
    from segment_relay.testing.aws import EmulatorUnavailable
    from segment_relay.testing.azure import start_azurite
    from segment_relay.testing.eventhubs.process import EmulatorUnavailable as EventHubsUnavailable
    from segment_relay.testing.eventhubs.process import start_emulator_process

    can_pin = hasattr(os, "sched_setaffinity") and {EMULATOR_CPU, CONSUMER_CPU} <= os.sched_getaffinity(0)
    parent_cpus = os.sched_getaffinity(0) if can_pin else set()
    if args.no_pin:
        can_pin = False
    consumer_cpu = CONSUMER_CPU if can_pin else None
    servers: list[Any] = []
    try:
        try:
            emulator = start_emulator_process({HUB: args.partitions})
            servers.append(emulator)
            azurite = start_azurite()
            servers.append(azurite)
        except (EmulatorUnavailable, EventHubsUnavailable) as exc:
            raise SystemExit(f"cannot start the emulators: {exc}") from None
        if can_pin:
            threads = pin_process(emulator.pid, EMULATOR_CPU) + pin_process(azurite.pid, EMULATOR_CPU)
            os.sched_setaffinity(0, {CONSUMER_CPU})  # this process too, while it pre-loads
            print(f"pinning: the Event Hubs emulator (pid {emulator.pid}) and Azurite (pid {azurite.pid}), all "
                  f"{threads} threads, on CPU {EMULATOR_CPU}; each consumer subprocess (and the pre-loading "
                  f"parent) on CPU {CONSUMER_CPU}: emulator and consumer never share a core", flush=True)
        else:
            print("pinning: off (--no-pin, or CPUs 0 and 1 are not both available): emulator and consumer "
                  "compete for the same cores", flush=True)

        connection_string = emulator.connection_string(HUB)
        loaded = asyncio.run(preload(args, connection_string, emulator.pid))
        print(f"pre-loaded {loaded['events']:,} events ({loaded['bytes'] / loaded['events']:,.0f} B avg, "
              f"{loaded['profiles']:,} profiles, generated in {loaded['generated_s']:.1f}s) into hub {HUB} "
              f"({args.partitions} partitions): {loaded['events'] / loaded['seconds']:,.0f} events/s, "
              f"{loaded['bytes'] / loaded['seconds'] / 1e6:.1f} MB/s (SDK producer, 1 MB batches, partitions "
              f"in parallel), emulator CPU {_fmt(loaded['emulator_cpu_s'], '.1f')} s; emulator RSS now "
              f"{(_rss_kb(emulator.pid) or 0) / 1024:.0f} MiB", flush=True)
        if loaded["events"] != args.events:
            raise SystemExit(f"pre-loaded {loaded['events']:,} events, expected {args.events:,}")
        if can_pin:
            os.sched_setaffinity(0, parent_cpus)  # the parent only waits from here on

        with tempfile.TemporaryDirectory(prefix="segment-relay-bench-eventhubs-") as workdir:
            env = {"connection_string": connection_string, "checkpoint_connection_string": azurite.connection_string,
                   "emulator_pid": emulator.pid, "azurite_pid": azurite.pid, "workdir": workdir,
                   "consumer_cpu": consumer_cpu}
            if args.profile:
                # The bare consumer too: its areas are the SDK's own cost per event, so the difference
                # between the two listings is what the relay adds.
                container = asyncio.run(new_container(azurite.connection_string))
                print(f"\nprofiling the relay variant (consumer on CPU {consumer_cpu})", flush=True)
                run_child("relay", args, env, container=container, profile=True)
                print(f"\nprofiling the bare variant (consumer on CPU {consumer_cpu})", flush=True)
                run_child("bare", args, env, profile=True)
                return

            runs: list[dict[str, Any]] = []
            for repeat in range(args.repeat):
                for variant in VARIANTS:
                    if variant == "relay" or args.bare_checkpoints:
                        container = asyncio.run(new_container(azurite.connection_string))
                        result = run_child(variant, args, env, container=container)
                        result["blobs"] = asyncio.run(count_blobs(azurite.connection_string, container))
                    else:
                        result = run_child(variant, args, env)
                    runs.append(result)
                    print(f"  run {repeat + 1}/{args.repeat} {LABELS[variant]:<20}: "
                          f"{result['records'] / result['seconds']:>8,.0f} events/s "
                          f"({result['seconds']:.2f}s, consumer CPU {result['cpu_seconds']:.2f} s, "
                          f"emulator CPU {_fmt(result['emulator_cpu_s'], '.2f')} s, "
                          f"azurite CPU {_fmt(result['azurite_cpu_s'], '.2f')} s, "
                          f"peak RSS {result['peak_rss_kb'] / 1024:.0f} MiB)", flush=True)
        best: dict[str, dict[str, Any] | None] = {}
        for variant in VARIANTS:
            mine = [run for run in runs if run["variant"] == variant]
            chosen = best[variant] = min(mine, key=lambda run: run["seconds"]) if mine else None
            if chosen is not None:  # the worst peak RSS among the runs counts
                chosen["peak_rss_kb"] = max(run["peak_rss_kb"] for run in mine)
        import azure.eventhub

        work = f" after {args.bare_work_us:g} us of pure CPU per event" if args.bare_work_us else ""
        bare_store = (f"BlobCheckpointStore on Azurite (fresh container per run), each partition checkpointed "
                      f"every {args.checkpoint_interval:g}s" if args.bare_checkpoints else "in-memory checkpoint store")
        print(f"\nsettings: relay state memory, no-op handler, checkpoint every {args.checkpoint_interval:g}s into "
              f"Azurite (fresh container per run), load_balancing_interval_s {args.load_balancing_interval:g}, "
              f"starting_position earliest; bare: EventHubConsumerClient.receive_batch from -1, {bare_store}, "
              f"a callback that counts{work}; both max_batch_size {args.batch_size}, prefetch "
              f"{args.prefetch}; azure-eventhub {azure.eventhub.__version__}, python {sys.version.split()[0]}; "
              f"consumer on CPU {consumer_cpu}, emulator and Azurite on CPU {EMULATOR_CPU if can_pin else None}")
        report(best, runs, args)
    finally:
        for server in reversed(servers):
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--profiles", type=int, default=None, help="default: events / 5")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest counts")
    parser.add_argument("--batch-size", type=int, default=300, help="max_batch_size of both consumers")
    parser.add_argument("--prefetch", type=int, default=300, help="prefetch of both consumers")
    parser.add_argument("--checkpoint-interval", type=float, default=1.0, help="relay: seconds between checkpoints")
    parser.add_argument("--load-balancing-interval", type=float, default=1.0, help="seconds, both consumers")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a variant may take")
    parser.add_argument("--bare-checkpoints", action="store_true",
                        help="the bare consumer keeps ownership and checkpoints in Blob storage as the relay does "
                             "(BlobCheckpointStore on Azurite, each partition checkpointed every "
                             "--checkpoint-interval): what durable progress costs the SDK itself. The target is "
                             "against the bare consumer without it, so the verdict is then only info")
    parser.add_argument("--bare-work-us", type=float, default=0.0,
                        help="the bare consumer spends this many us of pure CPU per event in its callback: "
                             "how much per-event work the SDK's own polling sleeps hide")
    parser.add_argument("--no-pin", action="store_true", help="do not pin emulators and consumers to CPUs")
    parser.add_argument("--profile", action="store_true", help="cProfile the relay and the bare variant instead")
    parser.add_argument("--profile-top", type=int, default=25, help="entries per --profile listing")
    parser.add_argument("--profile-out", default=None, help="with --profile: also write the pstats data here (the bare one to PATH.bare)")
    # internal: one variant in this (child) process
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--hub", default=HUB, help=argparse.SUPPRESS)
    parser.add_argument("--connection-string", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-connection-string", help=argparse.SUPPRESS)
    parser.add_argument("--container", help=argparse.SUPPRESS)
    parser.add_argument("--emulator-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--azurite-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child_main(args)
        return
    if args.events < 1 or args.partitions < 1 or args.repeat < 1:
        parser.error("--events, --partitions and --repeat must be at least 1")
    parent_main(args)


if __name__ == "__main__":
    main()
