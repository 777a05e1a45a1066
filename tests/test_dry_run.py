"""`segment-relay run --dry-run`, run as the command it is: the changes and totals of a real run,
and nothing written anywhere (store, checkpoint, dead letter, handlers)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segment_relay.testing.exports import StreamSpec, write_jsonl

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


def test_a_stream_source_cannot_be_dry_run(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[eventhubs]\nconnection_string = "Endpoint=sb://ns.example/;SharedAccessKeyName=k;SharedAccessKey=v"\n'
                      'checkpoint_path = "checkpoints.db"\n')
    for source in ("kinesis:exports", "eventhubs:exports"):
        result = cli("run", "--dry-run", "--config", str(config), "--source", source, cwd=tmp_path)
        assert result.returncode == 2
        assert "would take shard leases or partition ownership from the running replicas" in result.stderr
        assert "Traceback" not in result.stderr
