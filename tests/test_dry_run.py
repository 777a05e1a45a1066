"""`segment-relay run --dry-run`, run as the command it is: the changes and totals of a real run,
and nothing written anywhere (store, checkpoint, dead letter, handlers)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiobotocore.session import get_session
from azure.storage.blob.aio import BlobServiceClient
from support import run_until_finished, wait_for

from segment_relay.app import Relay
from segment_relay.config import load_config
from segment_relay.consumer.state import SqliteStore
from segment_relay.dry_run import DryRunStore
from segment_relay.testing.aws import Emulator
from segment_relay.testing.azure import Azurite
from segment_relay.testing.eventhubs.produce import send_exports
from segment_relay.testing.eventhubs.server import EventHubsEmulator
from segment_relay.testing.exports import StreamSpec, expected_changes, generate, write_jsonl
from segment_relay.testing.kinesis import create_stream, put_records

TESTS = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "segment_relay.cli"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH", "")]))
    return subprocess.run([*CLI, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stderr.strip().splitlines()[-1])["summary"]  # type: ignore[no-any-return]


def changes(lines: str) -> dict[str, list[dict[str, object]]]:
    """The changes of a JSON-lines output, per profile in order: profiles are handled
    concurrently, so only each profile's own order is fixed."""
    per_profile: dict[str, list[dict[str, object]]] = {}
    for line in lines.splitlines():
        if line.strip():
            change = json.loads(line)
            per_profile.setdefault(change["profile_key"], []).append(change)
    return per_profile


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def stream(tmp_path: Path) -> Path:
    path = tmp_path / "exports.jsonl"
    write_jsonl(StreamSpec(seed=11, profiles=200, records=3000, invalid_rate=0.02), path)
    return path


def test_a_dry_run_reports_what_a_real_run_does_and_writes_nothing(stream: Path, tmp_path: Path) -> None:
    state, checkpoint, dead = tmp_path / "state.db", tmp_path / "checkpoint.json", tmp_path / "dead.jsonl"
    dry = cli("run", "--dry-run", "--source", f"file:{stream}", "--state", f"sqlite:{state}",
              "--checkpoint-file", str(checkpoint), "--dead-letter", str(dead), "--handler", "jsonl:handled.jsonl",
              cwd=tmp_path)
    dry_summary = summary(dry)
    assert dry_summary.pop("dry_run") is True
    # Nothing written: no store created, no checkpoint, no dead letter, no configured handler called.
    assert not state.exists() and not checkpoint.exists() and not dead.exists()
    assert not (tmp_path / "handled.jsonl").exists()

    real = cli("run", "--source", f"file:{stream}", "--state", f"sqlite:{state}", "--checkpoint-file",
               str(checkpoint), "--dead-letter", str(dead), "--handler", "jsonl:handled.jsonl", cwd=tmp_path)
    assert summary(real) == dry_summary
    assert dry_summary["enters"] and dry_summary["exits"] and dry_summary["invalid"]
    assert changes(dry.stdout) == changes((tmp_path / "handled.jsonl").read_text())  # change by change


def test_a_dry_run_starts_from_the_stored_state_and_checkpoint_and_leaves_them_as_they_were(
        stream: Path, tmp_path: Path) -> None:
    lines = stream.read_bytes().splitlines(keepends=True)
    first_half = tmp_path / "first.jsonl"
    first_half.write_bytes(b"".join(lines[:1500]))
    growing = tmp_path / "growing.jsonl"  # the same file a real run read half of, now complete
    growing.write_bytes(b"".join(lines[:1500]))
    state, checkpoint = tmp_path / "state.db", tmp_path / "checkpoint.json"
    common = ["--state", f"sqlite:{state}", "--checkpoint-file", str(checkpoint),
              "--dead-letter", str(tmp_path / "dead.jsonl")]
    summary(cli("run", "--source", f"file:{growing}", *common, "--handler", "jsonl:first.out", cwd=tmp_path))
    growing.write_bytes(b"".join(lines))
    before = (digest(state), digest(checkpoint))

    dry = cli("run", "--dry-run", "--source", f"file:{growing}", *common, cwd=tmp_path)
    dry_summary = summary(dry)
    assert (digest(state), digest(checkpoint)) == before
    assert dry_summary["records"] == len(lines) - 1500  # from the checkpoint on

    real = cli("run", "--source", f"file:{growing}", *common, "--handler", "jsonl:second.out", cwd=tmp_path)
    assert summary(real) == {key: value for key, value in dry_summary.items() if key != "dry_run"}
    assert changes(dry.stdout) == changes((tmp_path / "second.out").read_text())


async def test_a_dry_run_store_follows_the_stored_merges_and_its_own(tmp_path: Path) -> None:
    stored = SqliteStore(tmp_path / "state.db")
    await stored.open()
    await stored.claim_aliases({"phone:1": "phone:1", "ecid:a": "ecid:a"})
    await stored.redirect_profiles({"phone:1": "ecid:a"})
    await stored.close()
    dry = DryRunStore(f"sqlite:{tmp_path / 'state.db'}")
    await dry.open()
    try:
        await dry.redirect_profiles({"ecid:a": "crmid:0", "email:x": "crmid:0"})  # this run's merges
        assert await dry.survivors_of(["phone:1", "ecid:a", "email:x", "crmid:0"]) == {
            "phone:1": "crmid:0", "ecid:a": "crmid:0", "email:x": "crmid:0"}
    finally:
        await dry.close()
    reopened = SqliteStore(tmp_path / "state.db")
    await reopened.open()
    try:
        assert await reopened.survivors_of(["phone:1", "ecid:a"]) == {"phone:1": "ecid:a"}  # untouched
    finally:
        await reopened.close()


def test_an_event_hub_dry_run_needs_a_consumer_group_of_its_own(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[eventhubs]\nconnection_string = "Endpoint=sb://ns.example/;SharedAccessKeyName=k;SharedAccessKey=v"\n'
                      'checkpoint_path = "checkpoints.db"\n')
    result = cli("run", "--dry-run", "--config", str(config), "--source", "eventhubs:exports", cwd=tmp_path)
    assert result.returncode == 2
    assert "eventhubs.dry_run_consumer_group" in result.stderr and "SharedAccessKey=v" not in result.stderr
    assert "Traceback" not in result.stderr


# --- Kinesis: every shard read without leases -------------------------------------------------------


def _kinesis_config(tmp_path: Path, kinesalite: Emulator, dynalite: Emulator, application: str) -> Path:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'state = "sqlite:{tmp_path / "state.db"}"\n'
        f'dead_letter = "{tmp_path / "dead.jsonl"}"\n'
        f'handlers = ["jsonl:{tmp_path / "handled.jsonl"}"]\n'
        "[pipeline]\ncheckpoint_interval_s = 0.2\n"
        f'[kinesis]\nendpoint_url = "{kinesalite.endpoint}"\ndynamodb_endpoint_url = "{dynalite.endpoint}"\n'
        f'application = "{application}"\nidle_wait_s = 0.05\nlease_duration_s = 2.0\n')
    return config


def _dry_run_until(config: Path, stream: str, cwd: Path, changes_expected: int) -> tuple[str, dict[str, object]]:
    """A dry run on a stream reads until stopped: stop it (SIGINT) once it printed every change.
    ``stream``: a source (``kinesis:NAME``, ``eventhubs:HUB``), or a Kinesis stream's name."""
    out = cwd / "dry-run.out"
    source = stream if ":" in stream else f"kinesis:{stream}"
    with open(out, "wb") as stdout:
        process = subprocess.Popen([*CLI, "run", "--dry-run", "--config", str(config), "--source", source],
                                   cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, env=_env())
        try:
            wait_for(lambda: out.read_bytes().count(b"\n") >= changes_expected or process.poll() is not None,
                     "the dry run's changes")
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, stderr
    return out.read_text(), json.loads(stderr.decode().strip().splitlines()[-1])["summary"]


def _env() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH", "")]))
    return environment


def _as_changes(lines: str) -> Counter[tuple[str, str, str, str]]:
    return Counter((c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])  # type: ignore[misc]
                   for profile in changes(lines).values() for c in profile)


async def _lease_items(dynalite: Emulator, table: str) -> list[dict[str, object]] | None:
    async with get_session().create_client("dynamodb", endpoint_url=dynalite.endpoint) as client:
        try:
            return sorted((await client.scan(TableName=table, ConsistentRead=True))["Items"], key=str)
        except client.exceptions.ResourceNotFoundException:
            return None


async def test_a_kinesis_dry_run_reads_every_shard_without_leases_and_writes_nothing(
        kinesalite: Emulator, dynalite: Emulator, tmp_path: Path) -> None:
    stream, application = f"dry-{uuid.uuid4().hex[:8]}", f"app-{uuid.uuid4().hex[:8]}"
    records = list(generate(StreamSpec(seed=23, profiles=120, records=1200, invalid_rate=0.01)))
    truth = expected_changes(records)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream, 4)
        await put_records(client, stream, records, in_flight=1)
    config = _kinesis_config(tmp_path, kinesalite, dynalite, application)

    printed, result = await asyncio.to_thread(_dry_run_until, config, stream, tmp_path, len(truth.changes))
    assert _as_changes(printed) == Counter(truth.changes)
    assert result["dry_run"] is True and result["records"] == len(records) and result["invalid"] == truth.invalid
    assert await _lease_items(dynalite, f"{application}-leases") is None  # no lease table: none created
    assert not (tmp_path / "state.db").exists() and not (tmp_path / "dead.jsonl").exists()
    assert not (tmp_path / "handled.jsonl").exists()


async def test_a_kinesis_dry_run_resumes_at_the_leases_checkpoints_and_leaves_leases_and_state_alone(
        kinesalite: Emulator, dynalite: Emulator, tmp_path: Path) -> None:
    stream, application = f"dry-{uuid.uuid4().hex[:8]}", f"app-{uuid.uuid4().hex[:8]}"
    records = list(generate(StreamSpec(seed=29, profiles=120, records=1600)))
    first, second = records[:800], records[800:]
    config = _kinesis_config(tmp_path, kinesalite, dynalite, application)
    async with get_session().create_client("kinesis", endpoint_url=kinesalite.endpoint) as client:
        await create_stream(client, stream, 4)
        await put_records(client, stream, first, in_flight=1)
        await run_until_finished(Relay(load_config(config, source=f"kinesis:{stream}")), len(first))
        await put_records(client, stream, second, in_flight=1)
    leases_before = await _lease_items(dynalite, f"{application}-leases")
    assert leases_before is not None and len(leases_before) == 4
    state_before = digest(tmp_path / "state.db")
    expected = Counter(expected_changes(records).changes) - Counter(expected_changes(first).changes)

    printed, result = await asyncio.to_thread(_dry_run_until, config, stream, tmp_path, sum(expected.values()))
    assert _as_changes(printed) == expected  # what the next real run would do: the second half's changes
    assert result["records"] == len(second)
    assert await _lease_items(dynalite, f"{application}-leases") == leases_before
    assert digest(tmp_path / "state.db") == state_before


# --- Event Hubs: every partition through a consumer group of the dry run's own ----------------------

HUB = "exports"


async def _checkpoint_blobs(azurite: Azurite, container: str) -> dict[str, dict[str, str]]:
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        return {blob.name: dict(blob.metadata or {})
                async for blob in service.get_container_client(container).list_blobs(include=["metadata"])}


async def test_an_event_hub_dry_run_starts_at_the_checkpoints_and_leaves_them_and_the_state_alone(
        azurite: Azurite, container: str, tmp_path: Path) -> None:
    records = list(generate(StreamSpec(seed=37, profiles=120, records=1600)))
    first, second = records[:800], records[800:]
    async with EventHubsEmulator({HUB: 4}) as emulator:
        config = tmp_path / "relay.toml"
        config.write_text(
            f'state = "sqlite:{tmp_path / "state.db"}"\n'
            f'dead_letter = "{tmp_path / "dead.jsonl"}"\n'
            f'handlers = ["jsonl:{tmp_path / "handled.jsonl"}"]\n'
            "[pipeline]\ncheckpoint_interval_s = 0.2\n"
            f'[eventhubs]\nconnection_string = "{emulator.connection_string(HUB)}"\n'
            f'checkpoint_connection_string = "{azurite.connection_string}"\n'
            f'checkpoint_container = "{container}"\nload_balancing_interval_s = 0.5\n'
            'dry_run_consumer_group = "dry-run"\n')
        await send_exports(emulator.connection_string(HUB), HUB, first)
        await run_until_finished(Relay(load_config(config, source=f"eventhubs:{HUB}")), len(first))
        await send_exports(emulator.connection_string(HUB), HUB, second)
        checkpoints_before = await _checkpoint_blobs(azurite, container)
        assert sum("/checkpoint/" in name for name in checkpoints_before) == 4
        state_before = digest(tmp_path / "state.db")
        expected = Counter(expected_changes(records).changes) - Counter(expected_changes(first).changes)

        printed, result = await asyncio.to_thread(_dry_run_until, config, f"eventhubs:{HUB}", tmp_path,
                                                  sum(expected.values()))
        assert _as_changes(printed) == expected  # what the next real run would do: the second half's changes
        assert result["dry_run"] is True and result["records"] == len(second)
        assert await _checkpoint_blobs(azurite, container) == checkpoints_before  # nor ownership claimed
        assert digest(tmp_path / "state.db") == state_before
