"""The dead-letter sinks against real parts: a rotated file, stdout, S3 (moto's server, started by
the tests) and Azure Blob storage (Azurite), and the relay writing its dead letters to them."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session
from azure.storage.blob.aio import BlobServiceClient
from support import wait_for

from segment_relay.app import Relay, build_dead_letter
from segment_relay.config import ConfigError, load_config
from segment_relay.consumer.deadletter import JsonlDeadLetter, StdoutDeadLetter
from segment_relay.consumer.deadletter.azblob import BlobObjects
from segment_relay.consumer.deadletter.entries import entry_identity
from segment_relay.consumer.deadletter.objects import ObjectDeadLetter
from segment_relay.consumer.deadletter.s3 import S3Objects
from segment_relay.errors import StartupError
from segment_relay.testing.azure import Azurite
from segment_relay.testing.exports import StreamSpec, write_jsonl
from segment_relay.testing.s3 import S3Server, start_s3

RECORD = b'{"identityMap":{"ecid":[{"id":"p1"}]},"segmentMembership":{"ups":{"s":{"status":"realized","lastQualificationTime":"2026-01-01T00:00:00Z"}}}}'


async def write_invalid(sink: Any, partition: str, positions: range) -> None:
    for position in positions:
        await sink.invalid_record(b"not json %d" % position, reason="not_json", detail="not valid JSON",
                                  partition=partition, position=str(position))


async def s3_bucket(server: S3Server) -> str:
    bucket = f"dl-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", endpoint_url=server.endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=bucket)
    return bucket


async def s3_objects(server: S3Server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    async with get_session().create_client("s3", endpoint_url=server.endpoint, region_name="us-east-1") as s3:
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
        for item in listing.get("Contents", []):
            response = await s3.get_object(Bucket=bucket, Key=item["Key"])
            async with response["Body"] as body:
                found[item["Key"]] = await body.read()
    return found


def entries_in(objects: dict[str, bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for name, data in sorted(objects.items()) if "/_checks/" not in f"/{name}"
            for line in data.splitlines()]


# --- on this host ------------------------------------------------------------------------------------
async def test_the_file_sink_rotates_by_size_and_keeps_every_entry_in_order(tmp_path: Path) -> None:
    sink = JsonlDeadLetter(tmp_path / "dead.jsonl", max_bytes=2048)
    await write_invalid(sink, "0", range(60))
    await sink.close()
    rotated = sink.rotated()
    assert len(rotated) >= 3
    files = [*rotated, tmp_path / "dead.jsonl"]
    assert all(path.stat().st_size <= 2048 for path in files)
    positions = [orjson.loads(line)["position"] for path in files for line in path.read_bytes().splitlines()]
    assert positions == [str(n) for n in range(60)]  # nothing lost, nothing twice, in order


async def test_the_stdout_sink_writes_json_lines() -> None:
    stream = io.BytesIO()
    sink = StdoutDeadLetter(stream)
    await write_invalid(sink, "0", range(3))
    await sink.flush()
    assert [orjson.loads(line)["raw"] for line in stream.getvalue().splitlines()] == [
        "not json 0", "not json 1", "not json 2"]


# --- object storage ----------------------------------------------------------------------------------
async def test_s3_gets_one_object_per_partition_and_flush_named_by_partition_worker_and_range(
    s3_server: S3Server,
) -> None:
    bucket = await s3_bucket(s3_server)
    sink = ObjectDeadLetter(S3Objects(bucket, "relay/dead", endpoint_url=s3_server.endpoint), worker="pod-a")
    await sink.start()
    await write_invalid(sink, "shardId-000000000001", range(10, 15))
    await write_invalid(sink, "shardId-000000000002", range(7, 9))
    assert entries_in(await s3_objects(s3_server, bucket)) == []  # held until the flush
    await sink.flush()
    await write_invalid(sink, "shardId-000000000001", range(15, 17))
    await sink.close()  # flushes
    objects = await s3_objects(s3_server, bucket, "relay/dead/")
    names = sorted(name for name in objects if "/_checks/" not in name)
    assert len(names) == 3 and sink.objects_written == 3
    first = [name for name in names if name.startswith("relay/dead/shardId-000000000001/")]
    assert len(first) == 2 and all("-pod-a-" in name for name in first)
    assert any(name.endswith("-10-14.jsonl") for name in first) and any(name.endswith("-15-16.jsonl") for name in first)
    got = sorted((entry["partition"], int(entry["position"])) for entry in entries_in(objects))
    assert got == sorted([("shardId-000000000001", n) for n in range(10, 17)] + [("shardId-000000000002", 7),
                                                                                 ("shardId-000000000002", 8)])
    assert "relay/dead/_checks/pod-a.json" in objects  # the start-up write check


async def test_azure_blob_gets_the_same_objects(azurite: Azurite) -> None:
    container = f"dl-{uuid.uuid4().hex[:12]}"
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        await service.create_container(container)
        sink = ObjectDeadLetter(BlobObjects(container, "dead", connection_string=azurite.connection_string),
                                worker="pod-b")
        await sink.start()
        await write_invalid(sink, "3", range(5))
        await sink.close()
        client = service.get_container_client(container)
        names = [blob.name async for blob in client.list_blobs(name_starts_with="dead/3/")]
        assert len(names) == 1 and names[0].endswith("-0-4.jsonl") and "-pod-b-" in names[0]
        data = await (await client.download_blob(names[0])).readall()
        assert [orjson.loads(line)["position"] for line in data.splitlines()] == ["0", "1", "2", "3", "4"]


async def test_a_missing_bucket_or_container_fails_at_start_with_one_line(s3_server: S3Server, azurite: Azurite) -> None:
    missing = ObjectDeadLetter(S3Objects("no-such-bucket-here", "x", endpoint_url=s3_server.endpoint), worker="w")
    with pytest.raises(StartupError) as s3_error:
        await missing.start()
    assert "does not exist" in str(s3_error.value) and "aws s3 mb s3://no-such-bucket-here" in str(s3_error.value)
    await missing.close()
    blob = ObjectDeadLetter(BlobObjects("no-such-container", connection_string=azurite.connection_string), worker="w")
    with pytest.raises(StartupError) as blob_error:
        await blob.start()
    assert "does not exist" in str(blob_error.value) and "AccountKey" not in str(blob_error.value)
    await blob.close()


async def test_a_sink_that_is_down_holds_its_entries_makes_writers_wait_and_loses_nothing(aws_env: None) -> None:
    server = start_s3()
    try:
        bucket = await s3_bucket(server)
        port = int(server.endpoint.rsplit(":", 1)[1])
        sink = ObjectDeadLetter(S3Objects(bucket, endpoint_url=server.endpoint), worker="w", max_buffer_bytes=4096)
        await sink.start()
        await write_invalid(sink, "0", range(0, 5))
        server.stop()  # S3 goes away with the entries held
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever botocore raises: the checkpoint waits
            await sink.flush()
        with pytest.raises(Exception):  # noqa: B017, PT011 - the buffer is full: the write waits for a flush
            await write_invalid(sink, "0", range(5, 200))
        assert 0 < sink.held_bytes <= 4096  # bounded, and nothing dropped
        server = start_s3(port)  # back (empty: moto keeps objects in memory)
        async with get_session().create_client("s3", endpoint_url=server.endpoint, region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket=bucket)
        await sink.flush()
        taken = len(entries_in(await s3_objects(server, bucket)))  # the write that raised took nothing
        assert taken > 5
        await write_invalid(sink, "0", range(taken, 200))  # the caller retries from there, as the pipeline does
        await sink.close()
        positions = sorted(int(entry["position"]) for entry in entries_in(await s3_objects(server, bucket)))
        assert positions == list(range(200))  # each exactly once
    finally:
        server.stop()


async def test_a_partitions_next_owner_does_not_write_again_what_its_last_owner_wrote_past_the_checkpoint(
    s3_server: S3Server, azurite: Azurite,
) -> None:
    """Owner A flushes entries of positions 10..19 and dies before its checkpoint (still at 9); B
    resumes at 10, meets the same records again (and two new ones, and one rewritten in place):
    only what A did not write is written."""
    bucket = await s3_bucket(s3_server)
    container = f"dl-{uuid.uuid4().hex[:12]}"
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        await service.create_container(container)
    for make in (lambda: S3Objects(bucket, "dl", endpoint_url=s3_server.endpoint),
                 lambda: BlobObjects(container, "dl", connection_string=azurite.connection_string)):
        first = ObjectDeadLetter(make(), worker="pod-a")
        await write_invalid(first, "7", range(10, 20))
        await write_invalid(first, "8", range(0, 3))  # another partition: not this resume's business
        await first.flush()
        await first.store.close()  # dies: no checkpoint past 19
        second = ObjectDeadLetter(make(), worker="pod-b")
        await second.resume("7", "10")
        await write_invalid(second, "7", range(10, 22))
        await second.invalid_record(b"rewritten", reason="not_json", detail="x", partition="7", position="12")
        await second.close()
        assert second.repeats_skipped == 10
        store = make()
        written = [orjson.loads(line) for name in [n async for n in store.names("7/")]
                   for line in (await store.get(name)).splitlines()]
        await store.close()
        assert Counter(entry_identity(entry) for entry in written).most_common(1)[0][1] == 1  # nothing twice
        assert sorted(int(entry["position"]) for entry in written) == sorted([*range(10, 22), 12])  # nothing lost


async def test_a_partition_taken_away_drops_what_it_held_and_a_store_that_cannot_be_read_only_costs_repeats(
    aws_env: None,
) -> None:
    sink = ObjectDeadLetter(S3Objects("x", endpoint_url="http://127.0.0.1:9"), worker="w")  # nothing listens
    await write_invalid(sink, "1", range(5))
    await write_invalid(sink, "2", range(2))
    sink.discard("1")  # its next owner writes these when it reads the records again
    assert sink.held_bytes > 0 and set(sink._held) == {"2"}
    await sink.resume("3", "0")  # cannot list: a warning, and entries may repeat; nothing waits or fails
    await write_invalid(sink, "3", range(1))
    assert set(sink._held) == {"2", "3"}
    await sink.store.close()


class SlowObjects:
    """An object store in memory whose writes wait for the test: the one thing a real server
    cannot be made to do on cue (found by the Kinesis chaos run: entries that arrived while an
    object was being written went with it)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.release = asyncio.Event()
        self.writing = asyncio.Event()
        self.fail = False

    def describe(self) -> str:
        return "memory"

    async def check(self, probe_name: str) -> None:
        pass

    async def put(self, name: str, data: bytes) -> None:
        self.writing.set()
        await self.release.wait()
        if self.fail:
            raise ConnectionError("down")
        self.objects[name] = data

    async def names(self, under: str = "") -> Any:
        for name in sorted(self.objects):
            if name.startswith(under):
                yield name

    async def get(self, name: str) -> bytes:
        return self.objects[name]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("fails", [False, True])
async def test_entries_that_arrive_while_an_object_is_written_are_kept_for_the_next_one(fails: bool) -> None:
    store = SlowObjects()
    sink = ObjectDeadLetter(store, worker="w")
    await write_invalid(sink, "0", range(3))
    flushing = asyncio.create_task(sink.flush())
    await store.writing.wait()
    await write_invalid(sink, "0", range(3, 6))  # while the first three are on their way
    store.fail = fails
    store.release.set()
    if fails:
        with pytest.raises(ConnectionError):
            await flushing
        store.fail = False
    else:
        await flushing
    await sink.flush()
    positions = [int(orjson.loads(line)["position"]) for name in sorted(store.objects)
                 for line in store.objects[name].splitlines()]
    assert positions == list(range(6)) and sink.held_bytes == 0


# --- the relay -----------------------------------------------------------------------------------------
async def test_the_relay_writes_its_dead_letters_to_s3_before_it_checkpoints_past_them(
    tmp_path: Path, s3_server: S3Server
) -> None:
    bucket = await s3_bucket(s3_server)
    lines = [RECORD, b"not json", RECORD.replace(b"p1", b"p2"), b"[1]"]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    config = load_config(None, source=f"file:{source}", state="memory", handlers=["log"],
                         checkpoint_file=str(tmp_path / "cp.json"), dead_letter=f"s3://{bucket}/relay",
                         dead_letter_sink={"s3_endpoint_url": s3_server.endpoint, "worker": "test-pod"})
    relay = Relay(config)
    assert isinstance(relay.dead_letter, ObjectDeadLetter)
    await asyncio.wait_for(relay.run(), 60)
    entries = entries_in(await s3_objects(s3_server, bucket, "relay/"))
    assert sorted((e["kind"], e["reason"], e["position"]) for e in entries) == [
        ("invalid_record", "not_json", "2"), ("invalid_record", "not_object", "4")]
    assert orjson.loads((tmp_path / "cp.json").read_bytes())["line"] == 4


async def test_the_relay_does_not_start_on_a_dead_letter_bucket_it_cannot_write(
    tmp_path: Path, s3_server: S3Server
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(RECORD + b"\n")
    config = load_config(None, source=f"file:{source}", state="memory", handlers=["log"],
                         dead_letter="s3://missing-bucket-x/relay", dead_letter_sink={"s3_endpoint_url": s3_server.endpoint})
    with pytest.raises(StartupError, match="missing-bucket-x"):
        await asyncio.wait_for(Relay(config).run(), 60)


def test_dead_letter_specs_and_their_settings_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    assert isinstance(build_dead_letter(load_config(None, dead_letter="stdout")), StdoutDeadLetter)
    file_sink = build_dead_letter(load_config(None, dead_letter=f"file:{tmp_path / 'd.jsonl'}",
                                              dead_letter_sink={"max_file_bytes": 4096}))
    assert isinstance(file_sink, JsonlDeadLetter) and file_sink.max_bytes == 4096
    assert isinstance(build_dead_letter(load_config(None, dead_letter=str(tmp_path / "plain.jsonl"))), JsonlDeadLetter)
    for spec, words in (("s3://", "bucket"), ("azblob:///x", "container"), ("ftp://host/x", "s3://BUCKET/PREFIX")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, dead_letter=spec)
    with pytest.raises(ConfigError, match="dead_letter_sink.azblob_connection_string"):
        load_config(None, dead_letter="azblob://dead/relay")
    key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    config = load_config(None, dead_letter="azblob://dead/relay", dead_letter_sink={
        "azblob_connection_string": f"DefaultEndpointsProtocol=http;AccountName=a;AccountKey={key};"
                                    "BlobEndpoint=http://127.0.0.1:1/a;"})
    assert key not in repr(config) and key not in repr(build_dead_letter(config))


def test_a_replica_killed_after_writing_dead_letters_before_its_checkpoint_loses_none_and_its_replacement_writes_none_twice(
    tmp_path: Path, s3_server: S3Server,
) -> None:
    """Real processes: a relay on stdin (which keeps no checkpoint, so its replacement reads from
    where the first one started) writes its dead letters to S3 and is SIGKILLed once they are
    there; a second relay gets the same records."""
    bucket = asyncio.run(s3_bucket(s3_server))
    path = tmp_path / "exports.jsonl"
    truth = write_jsonl(StreamSpec(seed=31, profiles=150, records=1500, invalid_rate=0.05), path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SEGMENT_RELAY_")}
    env.update(SEGMENT_RELAY_DEAD_LETTER_SINK__S3_ENDPOINT_URL=s3_server.endpoint,
               SEGMENT_RELAY_PIPELINE__CHECKPOINT_INTERVAL_S="0.2")
    args = [sys.executable, "-m", "segment_relay.cli", "run", "--source", "file:-", "--state", "memory",
            "--handler", f"jsonl:{tmp_path / 'changes.jsonl'}", "--dead-letter", f"s3://{bucket}/dl"]

    def entries() -> list[dict[str, Any]]:
        return entries_in(asyncio.run(s3_objects(s3_server, bucket, "dl/")))

    first = subprocess.Popen(args, env={**env, "SEGMENT_RELAY_DEAD_LETTER_SINK__WORKER": "pod-1"},
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert first.stdin is not None
        first.stdin.write(path.read_bytes())  # and stdin stays open: the relay waits for more
        first.stdin.flush()
        wait_for(lambda: len(entries()) >= truth.dead_letters, "the first relay's dead letters in S3")
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        first.stdin.close()  # type: ignore[union-attr]
        first.stderr.close()  # type: ignore[union-attr]
    written_first = entries()
    second = subprocess.run(args, env={**env, "SEGMENT_RELAY_DEAD_LETTER_SINK__WORKER": "pod-2"},
                            input=path.read_bytes(), capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    assert b"will not be written again" in second.stderr
    found = entries()
    assert len(found) == len(written_first) == truth.dead_letters  # nothing lost, nothing written twice
    assert Counter(map(entry_identity, found)) == Counter(map(entry_identity, written_first))

