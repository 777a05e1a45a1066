"""Several replicas sharing one stream, as separate `segment-relay run` processes.

kinesalite and dynalite stand in for Kinesis and DynamoDB; replicas share one sqlite state
file (the dynamodb store is covered by its own tests). "Killed without warning" is SIGKILL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from support import ReplicaProcesses, changes_in, every_change_after_kills, wait_for
from test_dead_letter_sinks import entries_in, s3_bucket, s3_objects

from segment_relay.consumer.export import InvalidRecord, parse_export
from segment_relay.consumer.profile_key import ProfileKeyRule
from segment_relay.consumer.state import DynamoDBStore
from segment_relay.testing.aws import Emulator
from segment_relay.testing.exports import StreamSpec, expected_changes, generate
from segment_relay.testing.kinesis import create_stream, put_records
from segment_relay.testing.s3 import S3Server


class Cluster(ReplicaProcesses):
    """Replicas of one application over one stream."""

    def __init__(self, tmp_path: Path, kinesalite: Emulator, dynalite: Emulator, stream: str,
                 lease_duration_s: float, s3: tuple[S3Server, str] | None = None, state: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(tmp_path)
        self.state = state or f"sqlite:{tmp_path / 'state.sqlite'}"
        self.env = env or {}
        self.kinesalite = kinesalite
        self.dynalite = dynalite
        self.stream = stream
        self.application = f"app-{uuid.uuid4().hex[:8]}"
        self.lease_duration_s = lease_duration_s
        self.s3 = s3  # dead letters in this bucket of this server, as the Kinesis overlay has them

    def start(self, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
        env.update({
            "SEGMENT_RELAY_KINESIS__ENDPOINT_URL": self.kinesalite.endpoint,
            "SEGMENT_RELAY_KINESIS__DYNAMODB_ENDPOINT_URL": self.dynalite.endpoint,
            "SEGMENT_RELAY_KINESIS__APPLICATION": self.application,
            "SEGMENT_RELAY_KINESIS__WORKER_ID": name,
            "SEGMENT_RELAY_KINESIS__LEASE_DURATION_S": str(self.lease_duration_s),
            "SEGMENT_RELAY_KINESIS__IDLE_WAIT_S": "0.05",
            "SEGMENT_RELAY_KINESIS__SHARD_SYNC_INTERVAL_S": "0.5",
            "SEGMENT_RELAY_PIPELINE__CHECKPOINT_INTERVAL_S": "0.2",
            **self.env,
        })
        dead_letter = str(self.tmp_path / f"dl-{name}.jsonl")
        if self.s3 is not None:
            server, bucket = self.s3
            dead_letter = f"s3://{bucket}/dl"
            env.update(SEGMENT_RELAY_DEAD_LETTER_SINK__S3_ENDPOINT_URL=server.endpoint,
                       SEGMENT_RELAY_DEAD_LETTER_SINK__WORKER=name)
        self.spawn(name, ["--source", f"kinesis:{self.stream}", "--state", self.state,
                          "--handler", f"jsonl:{self.output(name)}", "--dead-letter", dead_letter], env)

    def owners(self) -> Counter[str | None]:
        async def scan() -> list[dict]:
            async with get_session().create_client("dynamodb", endpoint_url=self.dynalite.endpoint) as client:
                try:
                    return (await client.scan(TableName=f"{self.application}-leases", ConsistentRead=True))["Items"]
                except client.exceptions.ResourceNotFoundException:
                    return []

        items = asyncio.run(scan())
        return Counter(item["leaseOwner"]["S"] if "S" in item.get("leaseOwner", {}) else None for item in items)

@pytest.fixture
def make_cluster(tmp_path: Path, kinesalite: Emulator, dynalite: Emulator) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(stream: str, lease_duration_s: float, s3: tuple[S3Server, str] | None = None,
             state: str | None = None, env: dict[str, str] | None = None) -> Cluster:
        cluster = Cluster(tmp_path, kinesalite, dynalite, stream, lease_duration_s, s3, state, env)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop_all()


def load(kinesalite: Emulator, stream: str, records: list[bytes], *, create_shards: int | None = None) -> None:
    async def run() -> None:
        async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
            if create_shards:
                await create_stream(client, stream, create_shards)
            await put_records(client, stream, records, in_flight=1)

    asyncio.run(run())


def test_replicas_split_the_shards_and_survive_a_kill_without_losing_a_change(
    kinesalite: Emulator, make_cluster: Callable[..., Cluster]
) -> None:
    stream = f"exports-{uuid.uuid4().hex[:8]}"
    records = list(generate(StreamSpec(seed=51, profiles=200, records=3000)))
    first, second = records[:1500], records[1500:]
    load(kinesalite, stream, first, create_shards=4)
    cluster = make_cluster(stream, lease_duration_s=2.0)

    cluster.start("a")
    cluster.start("b")
    wait_for(lambda: sorted(cluster.owners().values()) == [2, 2], "two replicas to own 2 shards each")
    cluster.start("c")
    wait_for(lambda: sorted(cluster.owners().values()) == [1, 1, 2], "three replicas to split 4 shards 2/1/1")
    truth_first = Counter(expected_changes(first).changes)
    wait_for(lambda: not truth_first - changes_in(cluster.outputs), "every change of the first half")

    victim = next(name for name, count in cluster.owners().items() if count == 2)
    assert victim is not None
    cluster.signal(victim, signal.SIGKILL)
    cluster.wait(victim)
    load(kinesalite, stream, second)
    survivors = {"a", "b", "c"} - {victim}
    wait_for(lambda: set(cluster.owners()) == survivors and sum(cluster.owners().values()) == 4,
             "the survivors to take the killed replica's shards", timeout_s=4 * 2.0 + 30)
    truth = Counter(expected_changes(records).changes)
    wait_for(lambda: not truth - changes_in(cluster.outputs), "every change of the whole stream")

    emitted = changes_in(cluster.outputs)
    assert not truth - emitted, "a change was lost"
    assert set(emitted) <= set(truth), "a change was invented"
    for name in survivors:
        cluster.signal(name, signal.SIGTERM)
    for name in survivors:
        assert cluster.wait(name) == 0, cluster.log(name)


def test_sigterm_hands_the_leases_over_at_once_with_no_repeat(
    kinesalite: Emulator, make_cluster: Callable[..., Cluster]
) -> None:
    stream = f"exports-{uuid.uuid4().hex[:8]}"
    records = list(generate(StreamSpec(seed=52, profiles=120, records=1600)))
    first, second = records[:800], records[800:]
    load(kinesalite, stream, first, create_shards=4)
    lease_duration_s = 6.0
    cluster = make_cluster(stream, lease_duration_s=lease_duration_s)
    cluster.start("a")
    wait_for(lambda: cluster.owners().get("a") == 4, "one replica to own every shard")
    truth_first = Counter(expected_changes(first).changes)
    wait_for(lambda: not truth_first - changes_in(cluster.outputs), "the first half")
    cluster.start("b")
    wait_for(lambda: cluster.owners().get("b") == 2, "the new replica to get its share", timeout_s=2 * lease_duration_s + 30)

    cluster.signal("a", signal.SIGTERM)
    assert cluster.wait("a") == 0, cluster.log("a")
    handed_over_in = wait_for(lambda: cluster.owners().get("b") == 4, "b to own every shard")
    # Released leases are free at once; waiting for them to expire would take a lease duration.
    assert handed_over_in < lease_duration_s, handed_over_in
    load(kinesalite, stream, second)
    truth = Counter(expected_changes(records).changes)
    wait_for(lambda: not truth - changes_in(cluster.outputs), "every change of the whole stream")
    # A drained hand-off checkpoints everything it handled: nothing is handled twice.
    assert changes_in(cluster.outputs) == truth
    cluster.signal("b", signal.SIGTERM)
    assert cluster.wait("b") == 0, cluster.log("b")


@pytest.mark.parametrize("mode", ["key", "link"])
def test_two_replicas_starting_together_hand_shards_over_and_repeat_nothing(
    kinesalite: Emulator, make_cluster: Callable[..., Cluster], mode: str
) -> None:
    # The first to scan takes every shard (the other owns none yet, so it is not counted); the
    # other then asks for its share, and the owner finishes and checkpoints each shard before it
    # hands it over: the new owner starts exactly after, so nothing is handled twice. With
    # identity linking (logins and merges in the stream) on the shared sqlite file, claims off:
    # each replica writes its new links with its state, and the hand-off checkpoint commits them.
    stream = f"exports-{uuid.uuid4().hex[:8]}"
    linked = mode == "link"
    spec = StreamSpec(seed=53, profiles=150, records=2000, **({"login_rate": 0.05, "merge_rate": 0.25} if linked else {}))
    records = list(generate(spec))
    load(kinesalite, stream, records, create_shards=4)
    lease_duration_s = 4.0
    cluster = make_cluster(stream, lease_duration_s=lease_duration_s,
                           env={"SEGMENT_RELAY_IDENTITY__MODE": mode})
    cluster.start("a")
    cluster.start("b")
    wait_for(lambda: sorted(cluster.owners().values()) == [2, 2], "two replicas to own 2 shards each",
             timeout_s=4 * lease_duration_s + 30)
    truth = Counter(expected_changes(records, link_namespaces=["*"] if linked else None).changes)
    wait_for(lambda: not truth - changes_in(cluster.outputs), "every change of the stream")
    assert changes_in(cluster.outputs) == truth  # each exactly once
    for name in ("a", "b"):
        cluster.signal(name, signal.SIGTERM)
    for name in ("a", "b"):
        assert cluster.wait(name) == 0, cluster.log(name)
    logs = cluster.log("a") + cluster.log("b")
    assert "stealing the lease" not in logs and '"lease stolen"' not in logs  # handed over, not stolen


def _person(index: int, *, email: bool, silver: str, at: str) -> bytes:
    identities: dict[str, Any] = {"ECID": [{"id": f"e{index}"}]}
    if email:  # the same person, now known by a (primary) email too: another partition key, another shard
        identities["Email"] = [{"id": f"x{index}", "primary": True}]
    return json.dumps({"identityMap": identities, "segmentMembership": {"ups": {
        "gold": {"status": "realized", "lastQualificationTime": "2026-11-01T10:00:00Z"},
        "silver": {"status": silver, "lastQualificationTime": at}}}}).encode()


def test_two_replicas_racing_on_one_persons_exports_on_two_shards_fire_each_change_once(
    kinesalite: Emulator, dynalite: Emulator, make_cluster: Callable[..., Cluster]
) -> None:
    # Adobe's partition key is not documented: here every person's export arrives on both shards
    # at once (the second one also carrying their email), and a replica reads each shard. Both
    # replicas would diff the person at the same moment; the profile claims in the shared
    # DynamoDB store let one go first, and the other then sees its saved state.
    stream, table = f"exports-{uuid.uuid4().hex[:8]}", f"state-{uuid.uuid4().hex[:8]}"
    people = range(250)
    cluster = make_cluster(stream, lease_duration_s=4.0, state=f"dynamodb:{table}",
                           env={"AWS_ENDPOINT_URL_DYNAMODB": dynalite.endpoint, "SEGMENT_RELAY_IDENTITY__MODE": "link"})
    load(kinesalite, stream, [], create_shards=2)
    cluster.start("a")
    cluster.start("b")
    wait_for(lambda: sorted(cluster.owners().values()) == [1, 1], "two replicas to own a shard each", timeout_s=60)
    later = "2026-11-02T10:00:00Z"
    first = [(_person(i, email=False, silver="realized", at="2026-11-01T10:00:00Z"), "0") for i in people]
    second = [(_person(i, email=True, silver="realized", at="2026-11-01T10:00:00Z"), str(2**127 + 1)) for i in people]
    exits = [(_person(i, email=True, silver="exited", at=later), str(2**127 + 1)) for i in people]
    put_to_shards(kinesalite, stream, [r for pair in zip(first, second, strict=True) for r in pair])
    put_to_shards(kinesalite, stream, exits)

    def per_person() -> Counter[tuple[int, str, str]]:
        return Counter((int(key.partition(":")[2][1:]), segment, change)
                       for (key, segment, change, _), count in changes_in(cluster.outputs).items() for _ in range(count))

    truth = Counter({(i, segment, change): 1 for i in people
                     for segment, change in (("gold", "enter"), ("silver", "enter"), ("silver", "exit"))})
    wait_for(lambda: not truth - per_person(), "every person's three changes", seen=lambda: truth - per_person())
    for name in ("a", "b"):
        cluster.signal(name, signal.SIGTERM)
    for name in ("a", "b"):
        assert cluster.wait(name) == 0, cluster.log(name)
    assert per_person() == truth, "a change was fired twice"  # after both stopped: nothing is still coming
    owners = asyncio.run(canonical_profiles(dynalite, table, people))
    assert all(len(keys) == 1 for keys in owners.values()), {i: k for i, k in owners.items() if len(k) != 1}


async def canonical_profiles(dynalite: Emulator, table: str, people: range) -> dict[int, set[str]]:
    store = DynamoDBStore(table, endpoint_url=dynalite.endpoint)
    await store.open()
    try:
        return {i: set((await store.find_profiles([f"ecid:e{i}", f"email:x{i}"])).values()) for i in people}
    finally:
        await store.close()


def put_to_shards(kinesalite: Emulator, stream: str, records: list[tuple[bytes, str]]) -> None:
    """Put ``(data, explicit hash key)`` records in one request each 500, in order."""
    async def run() -> None:
        async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
            for start in range(0, len(records), 500):
                pending = [{"Data": data, "PartitionKey": "p", "ExplicitHashKey": hash_key}
                           for data, hash_key in records[start:start + 500]]
                response = await client.put_records(StreamName=stream, Records=pending)
                assert not response.get("FailedRecordCount"), response

    asyncio.run(run())


@pytest.mark.parametrize("kills", [6, pytest.param(20, marks=[pytest.mark.long, pytest.mark.timeout(900)])])
def test_repeated_kills_under_load_lose_nothing_and_repeat_a_bounded_part(
    kinesalite: Emulator, make_cluster: Callable[..., Cluster], s3_server: S3Server, kills: int,
) -> None:
    # Chaos: three replicas, SIGKILLs at random moments while the stream grows (mid-read,
    # mid-dispatch, mid-checkpoint: wherever they land), each replica restarted at once with its
    # worker id. Nothing may be lost, no change and no dead letter (in S3, as the Kinesis overlay
    # has them: none written twice); what a kill repeats (the victim's work after its last
    # checkpoint) is counted and bounded.
    rng = random.Random(20261201 + kills)
    stream = f"exports-{uuid.uuid4().hex[:8]}"
    records = list(generate(StreamSpec(seed=54, profiles=300, records=750 * (kills + 2), invalid_rate=0.02)))
    chunks = [records[index:index + 750] for index in range(0, len(records), 750)]
    load(kinesalite, stream, chunks[0], create_shards=4)
    bucket = asyncio.run(s3_bucket(s3_server))
    cluster = make_cluster(stream, lease_duration_s=2.0, s3=(s3_server, bucket))
    for name in ("a", "b", "c"):
        cluster.start(name)
    loaded = list(chunks[0])
    for chunk in chunks[1:kills + 1]:
        load(kinesalite, stream, chunk)
        loaded.extend(chunk)
        so_far = Counter(expected_changes(loaded).changes)
        target = sum(changes_in(cluster.outputs).values()) + rng.randrange(20, 400)
        wait_for(lambda: sum(changes_in(cluster.outputs).values()) >= target  # noqa: B023 - used at once
                 or not so_far - changes_in(cluster.outputs), "a random moment of the work")  # noqa: B023
        victim = rng.choice(("a", "b", "c"))
        cluster.signal(victim, signal.SIGKILL)
        cluster.wait(victim)
        cluster.start(victim)
        # Until its signal handlers are in place, a SIGTERM at the end would kill it instead.
        wait_for(lambda: '"relay started"' in cluster.log(victim), "the restarted replica to run")  # noqa: B023
    for chunk in chunks[kills + 1:]:
        load(kinesalite, stream, chunk)
    truth = Counter(expected_changes(records).changes)
    every_change_after_kills(cluster.outputs, truth, kills, len(chunks), timeout_s=120)
    for name in ("a", "b", "c"):
        cluster.signal(name, signal.SIGTERM)
    for name in ("a", "b", "c"):
        assert cluster.wait(name) == 0, cluster.log(name)
    # Read once every replica has stopped: a running one may still hold entries it flushes
    # with its next checkpoint.
    rejected = Counter(record for record in records if _rejected(record))
    assert sum(rejected.values()) == expected_changes(records).invalid > 50
    dead = Counter(entry["raw"].encode() if "raw" in entry else base64.b64decode(entry["raw_base64"])
                   for entry in entries_in(asyncio.run(s3_objects(s3_server, bucket, "dl/")))
                   if entry["kind"] == "invalid_record")
    print(f"{kills} kills: {sum(rejected.values())} invalid records, {sum((dead - rejected).values())} dead-lettered twice")
    assert not rejected - dead, "an invalid record's dead letter was lost"
    assert dead == rejected, "a dead letter was written twice"


def _rejected(record: bytes) -> bool:
    try:
        ProfileKeyRule().key_for(parse_export(record, strict_entries=False).identity_map)
    except InvalidRecord:
        return True
    return False


def test_a_missing_stream_fails_at_start_with_a_message_naming_it(
    kinesalite: Emulator, dynalite: Emulator, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    env["SEGMENT_RELAY_KINESIS__ENDPOINT_URL"] = kinesalite.endpoint
    env["SEGMENT_RELAY_KINESIS__DYNAMODB_ENDPOINT_URL"] = dynalite.endpoint
    result = subprocess.run([*ReplicaProcesses.CLI, "run", "--source", "kinesis:no-such-stream", "--state", "memory"],
                            cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "no-such-stream" in stderr and "not found" in stderr and "region" in stderr
    assert "Traceback" not in stderr


def test_no_region_fails_at_start_saying_how_to_set_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SEGMENT_RELAY_", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"))}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_CONFIG_FILE": "/dev/null"})
    result = subprocess.run([*ReplicaProcesses.CLI, "run", "--source", "kinesis:s", "--state", "memory"],
                            cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert "region" in result.stderr.decode() and "Traceback" not in result.stderr.decode()
