"""`segment-relay dead-letter list|show|replay`, run as the command it is, on a file dead letter
and on S3 (moto's server): a relay run leaves a dead letter, a fix comes, the replay re-drives
each entry once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
from aiobotocore.session import get_session

from segment_relay.testing.s3 import S3Server

TESTS = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "segment_relay.cli"]


def record(profile: str, **segments: str) -> bytes:
    audiences = {segment: {"status": status, "lastQualificationTime": "2026-01-01T00:00:00Z"}
                 for segment, status in segments.items()}
    return orjson.dumps({"identityMap": {"ecid": [{"id": profile}]}, "segmentMembership": {"ups": audiences}})


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH", "")]))
    environment.update(env)
    return subprocess.run([*CLI, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


def run_the_relay_into_a_dead_letter(tmp_path: Path, dead_letter: str, *extra: str, **env: str) -> Path:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join([
        record("p1", gold="realized"),
        b"not json at all",
        record("p2", gold="realized", vip="pending"),  # vip: an unknown status, dead-lettered alone
        record("p3", poison="realized"),  # the handler refuses it (until it is fixed)
    ]) + b"\n")
    out = tmp_path / "handled.txt"
    result = cli("run", "--source", f"file:{source}", "--state", f"sqlite:{tmp_path / 'state.sqlite'}",
                 "--handler", "cli_targets:refuses_poison", "--dead-letter", dead_letter, "--log-level", "ERROR",
                 *extra, cwd=tmp_path, CLI_TARGETS_OUT=str(out), CLI_TARGETS_POISON="refuse", **env)
    assert result.returncode == 0, result.stderr
    assert sorted(out.read_text().splitlines()) == ["ecid:p1 gold enter", "ecid:p2 gold enter"]
    return out


def replay_checks(tmp_path: Path, out: Path, *location: str, **env: str) -> None:
    state = ("--config", str(tmp_path / "relay.toml"))
    (tmp_path / "relay.toml").write_text(f'state = "sqlite:{tmp_path / "state.sqlite"}"\n'
                                         'handlers = ["cli_targets:refuses_poison"]\n')
    listed = cli("dead-letter", "list", "--json", *state, *location, cwd=tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted((e["kind"], e["reason"], e["position"]) for e in entries) == [
        ("failed_change", "handler_rejected", "4"), ("invalid_entry", "unknown_status", "3"),
        ("invalid_record", "not_json", "2")]
    assert "3 entries: 1 failed_change, 1 invalid_entry, 1 invalid_record; 0 replayed" in listed.stderr
    failed = next(e for e in entries if e["kind"] == "failed_change")
    shown = cli("dead-letter", "show", failed["id"], *state, *location, cwd=tmp_path, **env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["change"]["segment_id"] == "poison"
    assert cli("dead-letter", "show", "nope#1", *state, *location, cwd=tmp_path, **env).returncode == 1

    dry = cli("dead-letter", "replay", "--dry-run", *state, *location, cwd=tmp_path, **env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"dry_run": True, "records": 2, "now_valid": 0, "invalid_again": 0, "changes": 1,
                                      "failed_again": 0, "already_replayed": 0, "not_replayable": 0,
                                      "handlers": {"cli_targets:refuses_poison": 1}}
    assert sorted(out.read_text().splitlines()) == ["ecid:p1 gold enter", "ecid:p2 gold enter"]  # nothing done

    still = cli("dead-letter", "replay", *state, *location, cwd=tmp_path, CLI_TARGETS_OUT=str(out),
                CLI_TARGETS_POISON="refuse", **env)
    assert still.returncode == 0, still.stderr
    report = json.loads(still.stdout)
    assert (report["failed_again"], report["invalid_again"]) == (1, 2)  # not fixed yet: nothing marked
    # The fix: the handler takes "poison" now (the records stay invalid: Adobe must fix those).
    fixed = cli("dead-letter", "replay", *state, *location, cwd=tmp_path, CLI_TARGETS_OUT=str(out), **env)
    assert fixed.returncode == 0, fixed.stderr
    assert (json.loads(fixed.stdout)["changes"], json.loads(fixed.stdout)["failed_again"]) == (1, 0)
    assert sorted(out.read_text().splitlines()) == ["ecid:p1 gold enter", "ecid:p2 gold enter", "ecid:p3 poison enter"]
    again = cli("dead-letter", "replay", *state, *location, cwd=tmp_path, CLI_TARGETS_OUT=str(out), **env)
    assert json.loads(again.stdout)["changes"] == 0 and json.loads(again.stdout)["already_replayed"] == 1
    assert out.read_text().count("poison") == 1  # re-driven once, however often replay runs
    relisted = cli("dead-letter", "list", "--json", "--kind", "failed_change", *state, *location, cwd=tmp_path, **env)
    assert [json.loads(line)["replayed"] for line in relisted.stdout.splitlines()] == [True]


def test_list_show_and_replay_a_file_dead_letter(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    out = run_the_relay_into_a_dead_letter(tmp_path, str(dead))
    replay_checks(tmp_path, out, "--dead-letter", str(dead))
    assert (tmp_path / "dead.jsonl.replayed").read_text().split() == ["dead.jsonl#3"]  # only the re-driven change


def test_list_show_and_replay_an_s3_dead_letter(tmp_path: Path, s3_server: S3Server) -> None:
    import asyncio

    bucket = f"dl-{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        async with get_session().create_client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket=bucket)

    asyncio.run(create())
    env = {"SEGMENT_RELAY_DEAD_LETTER_SINK__S3_ENDPOINT_URL": s3_server.endpoint}
    out = run_the_relay_into_a_dead_letter(tmp_path, f"s3://{bucket}/relay", **env)
    replay_checks(tmp_path, out, "--dead-letter", f"s3://{bucket}/relay", **env)


def test_a_replayed_record_goes_through_the_same_state_so_nothing_older_re_applies(tmp_path: Path) -> None:
    # Entries an older relay wrote for records this one accepts (a lower-case "z" in a time): one
    # is new, the other older than what the store holds by now.
    def entry(line: bytes, position: int) -> bytes:
        return orjson.dumps({"kind": "invalid_record", "reason": "bad_qualification_time", "detail": "...",
                             "partition": "in.jsonl", "position": str(position), "at": "2026-11-30T00:00:00Z",
                             "raw": line.decode()})

    newer = b'{"identityMap":{"ecid":[{"id":"p1"}]},"segmentMembership":{"ups":{"gold":{"status":"realized","lastQualificationTime":"2026-01-02T00:00:00Z"}}}}'
    source = tmp_path / "in.jsonl"
    source.write_bytes(newer + b"\n")
    out = tmp_path / "handled.txt"
    (tmp_path / "relay.toml").write_text(f'state = "sqlite:{tmp_path / "state.sqlite"}"\n'
                                         'handlers = ["cli_targets:refuses_poison"]\n'
                                         f'dead_letter = "{tmp_path / "dead.jsonl"}"\n')
    ran = cli("run", "--config", str(tmp_path / "relay.toml"), "--source", f"file:{source}", cwd=tmp_path,
              CLI_TARGETS_OUT=str(out))
    assert ran.returncode == 0, ran.stderr
    stale = newer.replace(b"realized", b"exited").replace(b"2026-01-02T00:00:00Z", b"2026-01-01t00:00:00z")
    fresh = newer.replace(b"p1", b"p9").replace(b"2026-01-02T00:00:00Z", b"2026-01-01t00:00:00z")
    (tmp_path / "dead.jsonl").write_bytes(entry(stale, 3) + b"\n" + entry(fresh, 4) + b"\n")

    replayed = cli("dead-letter", "replay", "--config", str(tmp_path / "relay.toml"), cwd=tmp_path,
                   CLI_TARGETS_OUT=str(out))
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert (report["records"], report["invalid_again"]) == (2, 0)
    assert report["summary"]["stale_suppressed"] == 1  # p1's exit is older than its stored entry
    assert out.read_text().splitlines() == ["ecid:p1 gold enter", "ecid:p9 gold enter"]
    assert (tmp_path / "dead.jsonl.replayed").read_text().split() == ["dead.jsonl#1", "dead.jsonl#2"]
    again = cli("dead-letter", "replay", "--config", str(tmp_path / "relay.toml"), cwd=tmp_path,
                CLI_TARGETS_OUT=str(out))
    assert (json.loads(again.stdout)["records"], json.loads(again.stdout)["already_replayed"]) == (0, 2)
    assert out.read_text().count("p9") == 1
