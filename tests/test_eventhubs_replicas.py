"""Several replicas sharing one event hub, as separate `segment-relay run` processes.

The emulator runs in its own process (python -m segment_relay.testing.eventhubs), Azurite keeps
the checkpoints and ownership blobs, and the replicas share one sqlite state file.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from azure.storage.blob.aio import BlobServiceClient
from support import ReplicaProcesses, changes_in, every_change_after_kills, wait_for

from segment_relay.testing.azure import Azurite
from segment_relay.testing.eventhubs.process import EmulatorProcess, start_emulator_process
from segment_relay.testing.eventhubs.produce import send_exports
from segment_relay.testing.exports import StreamSpec, expected_changes, generate

HUB = "exports"
LOAD_BALANCING_S = 0.5


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    server = start_emulator_process({HUB: 4})
    try:
        yield server
    finally:
        server.stop()


class Cluster(ReplicaProcesses):
    def __init__(self, tmp_path: Path, emulator: EmulatorProcess, azurite: Azurite, checkpoint_interval_s: float) -> None:
        super().__init__(tmp_path)
        self.emulator = emulator
        self.azurite = azurite
        self.container = f"checkpoints-{uuid.uuid4().hex[:12]}"
        self.checkpoint_interval_s = checkpoint_interval_s
        asyncio.run(self._blobs(create=True))

    def start(self, name: str) -> None:
        config = self.tmp_path / f"{name}.toml"
        config.write_text(f"""
source = "eventhubs:{HUB}"
state = "sqlite:{self.tmp_path / 'state.sqlite'}"
handlers = ["jsonl:{self.output(name)}"]
dead_letter = "{self.tmp_path / f'dl-{name}.jsonl'}"

[pipeline]
checkpoint_interval_s = {self.checkpoint_interval_s}

[eventhubs]
connection_string = "{self.emulator.connection_string(HUB)}"
checkpoint_connection_string = "{self.azurite.connection_string}"
checkpoint_container = "{self.container}"
load_balancing_interval_s = {LOAD_BALANCING_S}
""")
        self.spawn(name, ["--config", str(config)])

    async def _blobs(self, create: bool = False) -> dict[str, dict[str, dict[str, str]]]:
        found: dict[str, dict[str, dict[str, str]]] = {"ownership": {}, "checkpoint": {}}
        async with BlobServiceClient.from_connection_string(self.azurite.connection_string) as service:
            if create:
                await service.create_container(self.container)
                return found
            async for blob in service.get_container_client(self.container).list_blobs(include=["metadata"]):
                kind, pid = blob.name.rsplit("/", 2)[-2:]
                found[kind][pid] = dict(blob.metadata or {})
        return found

    def owners(self) -> Counter[str]:
        """Partitions per owner id (the SDK's own uuid per replica), from the ownership blobs."""
        ownership = asyncio.run(self._blobs())["ownership"]
        return Counter(meta["ownerid"] for meta in ownership.values() if meta.get("ownerid"))

    def checkpoints(self) -> dict[str, int]:
        return {pid: int(meta["sequencenumber"]) for pid, meta in asyncio.run(self._blobs())["checkpoint"].items()}

    def summary(self, name: str) -> dict[str, int]:
        """The totals a replica logs when it stops."""
        for line in reversed(self.log(name).splitlines()):
            if '"relay stopped"' in line:
                return json.loads(line)
        raise AssertionError(f"no 'relay stopped' line in {name}'s log:\n{self.log(name)[-3000:]}")

@pytest.fixture
def make_cluster(tmp_path: Path, emulator: EmulatorProcess, azurite: Azurite) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(checkpoint_interval_s: float = 0.2) -> Cluster:
        cluster = Cluster(tmp_path, emulator, azurite, checkpoint_interval_s)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop_all()


def load(emulator: EmulatorProcess, records: list[bytes]) -> None:
    asyncio.run(send_exports(emulator.connection_string(HUB), HUB, records))


def test_two_replicas_split_four_partitions_and_one_takes_all_when_the_other_stops(
    emulator: EmulatorProcess, make_cluster: Callable[..., Cluster]
) -> None:
    records = list(generate(StreamSpec(seed=61, profiles=150, records=2000)))
    first, second = records[:1000], records[1000:]
    load(emulator, first)
    cluster = make_cluster()
    cluster.start("a")
    cluster.start("b")
    wait_for(lambda: sorted(cluster.owners().values()) == [2, 2], "two replicas to own 2 partitions each")
    truth_first = Counter(expected_changes(first).changes)
    wait_for(lambda: not truth_first - changes_in(cluster.outputs), "every change of the first half")
    # Starting together, one replica may claim partitions the other then steals (the SDK's load
    # balancer has no hand-over): what the first finished after its last checkpoint of a stolen
    # partition is read again (README, "What a rebalance repeats"). Once every partition is
    # checkpointed at its end, nothing of the first half can come again.
    ends_first = {pid: n - 1 for pid, n in Counter(partition_of_each(first)).items()}
    wait_for(lambda: cluster.checkpoints() == ends_first, f"every partition checkpointed at {ends_first}",
             seen=lambda: (cluster.checkpoints(), cluster.log("a")[-4000:], cluster.log("b")[-4000:]))
    before = changes_in(cluster.outputs)
    assert set(before) == set(truth_first), "a change was lost or invented"

    cluster.processes["b"].send_signal(signal.SIGTERM)
    assert cluster.processes["b"].wait(timeout=60) == 0, cluster.log("b")
    # Closing released b's ownerships: a claims them at its next load-balancing cycles.
    wait_for(lambda: list(cluster.owners().values()) == [4], "the remaining replica to own all 4",
             timeout_s=30 * LOAD_BALANCING_S + 30)
    load(emulator, second)
    truth = Counter(expected_changes(records).changes)
    wait_for(lambda: not truth - changes_in(cluster.outputs), "every change of the whole hub")
    emitted = changes_in(cluster.outputs)
    assert set(emitted) == set(truth), "a change was lost or invented"
    # The hand-over was graceful: b checkpointed what it finished before releasing its partitions,
    # so nothing was read twice after it: every later change exactly once.
    assert emitted - before == truth - truth_first, (emitted - before) - (truth - truth_first)
    cluster.processes["a"].send_signal(signal.SIGTERM)
    assert cluster.processes["a"].wait(timeout=60) == 0, cluster.log("a")


def test_after_a_kill_a_restart_replays_only_what_followed_the_last_checkpoint(
    emulator: EmulatorProcess, make_cluster: Callable[..., Cluster]
) -> None:
    records = list(generate(StreamSpec(seed=62, profiles=1000, records=20000)))
    load(emulator, records)
    cluster = make_cluster(checkpoint_interval_s=0.5)
    cluster.start("a")
    wait_for(lambda: len(cluster.checkpoints()) == 4, "a checkpoint of every partition")
    cluster.processes["a"].send_signal(signal.SIGKILL)
    cluster.processes["a"].wait(timeout=10)
    at_kill = cluster.checkpoints()
    ends = {pid: n - 1 for pid, n in Counter(partition_of_each(records)).items()}
    not_checkpointed = sum(ends[pid] - seq for pid, seq in at_kill.items())
    assert not_checkpointed > 0  # killed mid-way, with work finished but not yet checkpointed

    cluster.start("b")  # the killed replica's ownerships expire after 6 load-balancing intervals
    truth = Counter(expected_changes(records).changes)
    wait_for(lambda: not truth - changes_in(cluster.outputs), "every change after the restart")
    wait_for(lambda: cluster.checkpoints() == ends, "the final checkpoints")
    cluster.processes["b"].send_signal(signal.SIGTERM)
    assert cluster.processes["b"].wait(timeout=60) == 0, cluster.log("b")
    assert cluster.summary("b")["records"] == not_checkpointed  # not one event before the checkpoints
    assert set(changes_in(cluster.outputs)) == set(truth)


@pytest.mark.parametrize("kills", [6, pytest.param(20, marks=[pytest.mark.long, pytest.mark.timeout(900)])])
def test_repeated_kills_under_load_lose_nothing_and_repeat_a_bounded_part(
    emulator: EmulatorProcess, make_cluster: Callable[..., Cluster], kills: int,
) -> None:
    # Chaos: two replicas, SIGKILLs at random moments while the hub grows, each victim
    # restarted at once (a new SDK owner id: its partitions come back once their ownership
    # expires, 6 load-balancing intervals). Nothing may be lost; repeats are counted and bounded.
    rng = random.Random(20261202 + kills)
    records = list(generate(StreamSpec(seed=63, profiles=300, records=600 * (kills + 2))))
    chunks = [records[index:index + 600] for index in range(0, len(records), 600)]
    load(emulator, chunks[0])
    cluster = make_cluster()
    for name in ("a", "b"):
        cluster.start(name)
    loaded = list(chunks[0])
    for chunk in chunks[1:kills + 1]:
        load(emulator, chunk)
        loaded.extend(chunk)
        so_far = Counter(expected_changes(loaded).changes)
        target = sum(changes_in(cluster.outputs).values()) + rng.randrange(20, 300)
        wait_for(lambda: sum(changes_in(cluster.outputs).values()) >= target  # noqa: B023 - used at once
                 or not so_far - changes_in(cluster.outputs), "a random moment of the work")  # noqa: B023
        victim = rng.choice(("a", "b"))
        cluster.processes[victim].send_signal(signal.SIGKILL)
        cluster.processes[victim].wait(timeout=10)
        cluster.start(victim)
        # Until its signal handlers are in place, a SIGTERM at the end would kill it instead.
        wait_for(lambda: '"relay started"' in cluster.log(victim), "the restarted replica to run")  # noqa: B023
    for chunk in chunks[kills + 1:]:
        load(emulator, chunk)
    truth = Counter(expected_changes(records).changes)
    every_change_after_kills(cluster.outputs, truth, kills, len(chunks), timeout_s=30 * LOAD_BALANCING_S + 90)
    for name in ("a", "b"):
        cluster.processes[name].send_signal(signal.SIGTERM)
    for name in ("a", "b"):
        assert cluster.processes[name].wait(timeout=60) == 0, cluster.log(name)


def partition_of_each(records: list[bytes]) -> list[str]:
    from segment_relay.testing.eventhubs.server import partition_for_key
    from segment_relay.testing.kinesis import partition_key_of

    return [partition_for_key(partition_key_of(record), ["0", "1", "2", "3"]) for record in records]
