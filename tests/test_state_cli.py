"""`segment-relay state show|members|stats`, run as the commands they are, against a store a relay
run filled: sqlite, DynamoDB (dynalite) and redis (redis-server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from redis import Redis

TESTS = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "segment_relay.cli"]
REDIS_DB = 11  # this module's own database on the session's redis-server: emptied per test

# 1,500 members of "gold" (more than a redis SCAN page), and three profiles to look at closely.
BULK = 1500


def record(namespace: str, profile: str, at: str = "2026-01-01T00:00:00Z", **segments: str) -> bytes:
    audiences = {segment: {"status": status, "lastQualificationTime": at} for segment, status in segments.items()}
    return orjson.dumps({"identityMap": {namespace: [{"id": profile}]}, "segmentMembership": {"ups": audiences}})


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH", "")]))
    environment.update(env)
    return subprocess.run([*CLI, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["sqlite", "dynamodb", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A store spec and the environment that reaches it, filled by a relay run."""
    env: dict[str, str] = {}
    if request.param == "sqlite":
        spec = f"sqlite:{tmp_path / 'state.db'}"
    elif request.param == "dynamodb":
        dynalite = request.getfixturevalue("dynalite")
        spec, env = f"dynamodb:state-cli-{uuid.uuid4().hex[:12]}", {"AWS_ENDPOINT_URL_DYNAMODB": dynalite.endpoint}
    else:
        redis_server = request.getfixturevalue("redis_server")
        spec = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
        with Redis.from_url(spec) as client:
            client.flushdb()
    lines = [record("ecid", str(n), gold="realized") for n in range(BULK)]
    lines += [
        record("ECID", "visitor", gold="realized", silver="realized"),
        record("ecid", "visitor", at="2026-01-02T00:00:00Z", gold="realized", silver="exited"),
        record("email", "x@example.com", gold="existing"),
        record("crm", "9", gold="exited"),
    ]
    exports = tmp_path / "exports.jsonl"
    exports.write_bytes(b"\n".join(lines) + b"\n")
    run = cli("run", "--source", f"file:{exports}", "--state", spec, "--handler", "jsonl:/dev/null",
              "--dead-letter", str(tmp_path / "dead.jsonl"), cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    yield spec, env


def test_show_prints_a_profiles_memberships(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    spec, env = store
    shown = cli("state", "show", "ECID:visitor", "--state", spec, cwd=tmp_path, env=env)  # any case of namespace
    assert shown.returncode == 0, shown.stderr
    profile = json.loads(shown.stdout)
    assert profile["profile_key"] == "ecid:visitor"
    assert profile["member_of"] == ["gold"]
    assert profile["segments"] == [
        {"namespace": "ups", "segment_id": "gold", "status": "realized", "member": True,
         "qualified_at": "2026-01-02T00:00:00Z"},
        {"namespace": "ups", "segment_id": "silver", "status": "exited", "member": False,
         "qualified_at": "2026-01-02T00:00:00Z"},
    ]


def test_show_of_an_unknown_profile_says_so(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    spec, env = store
    shown = cli("state", "show", "ecid:nobody", "--state", spec, cwd=tmp_path, env=env)
    assert shown.returncode == 1
    assert "no state stored for 'ecid:nobody'" in shown.stderr
    bad = cli("state", "show", "nobody", "--state", spec, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "is not NAMESPACE:ID" in bad.stderr


def test_members_streams_the_current_members_and_counts_them(store: tuple[str, dict[str, str]],
                                                             tmp_path: Path) -> None:
    spec, env = store
    listed = cli("state", "members", "gold", "--state", spec, cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    expected = {f"ecid:{n}" for n in range(BULK)} | {"ecid:visitor", "email:x@example.com"}  # not crm:9 (exited)
    keys = listed.stdout.split()
    assert sorted(keys) == sorted(expected)  # each once
    assert f"{len(expected)} members of ups/gold" in listed.stderr
    counted = cli("state", "members", "gold", "--count", "--state", spec, cwd=tmp_path, env=env)
    assert counted.returncode == 0 and counted.stdout.strip() == str(len(expected))
    nobody = cli("state", "members", "silver", "--state", spec, cwd=tmp_path, env=env)
    assert nobody.returncode == 0 and nobody.stdout == ""


def test_stats_counts_profiles_memberships_and_members(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    spec, env = store
    result = cli("state", "stats", "--state", spec, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["profiles"] == BULK + 3
    assert stats["memberships"] == BULK + 4  # the visitor has two segments
    assert stats["members"] == {"ups/gold": BULK + 2}
    assert "no index by segment" in stats["how"]


def test_a_store_that_is_not_there_is_an_error_and_is_not_created(tmp_path: Path, dynalite: object) -> None:
    missing_file = cli("state", "stats", "--state", f"sqlite:{tmp_path / 'nope.db'}", cwd=tmp_path, env={})
    assert missing_file.returncode == 1 and "no sqlite state file at" in missing_file.stderr
    assert not (tmp_path / "nope.db").exists()
    env = {"AWS_ENDPOINT_URL_DYNAMODB": dynalite.endpoint}  # type: ignore[attr-defined]
    table = f"missing-{uuid.uuid4().hex[:12]}"
    for _ in range(2):  # the first ask must not have created it
        missing_table = cli("state", "stats", "--state", f"dynamodb:{table}", cwd=tmp_path, env=env)
        assert missing_table.returncode == 1
        assert f"DynamoDB table {table!r} does not exist" in missing_table.stderr
    memory = cli("state", "stats", "--state", "memory", cwd=tmp_path, env={})
    assert memory.returncode == 1 and "the memory store lives inside the relay's process" in memory.stderr
    assert "Traceback" not in memory.stderr + missing_table.stderr + missing_file.stderr
