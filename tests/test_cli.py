"""The `segment-relay` command end to end, in subprocesses, as a person or a pod runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from segment_relay.testing.exports import StreamSpec, StreamTruth, write_jsonl

TESTS = Path(__file__).parent
CLI = [sys.executable, "-m", "segment_relay.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_RELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def relay(*args: str, cwd: Path, env: dict[str, str] | None = None, input: bytes | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env or _env(), input=input, capture_output=True,
                          timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def changes_in(path: Path) -> list[tuple[str, str, str, str]]:
    if not path.exists():
        return []
    with open(path, "rb") as handle:
        return [(c["profile_key"], c["segment_id"], c["change"], c["qualified_at"])
                for c in map(json.loads, handle) if c]


@pytest.fixture
def stream(tmp_path: Path) -> tuple[Path, StreamTruth]:
    path = tmp_path / "exports.jsonl"
    truth = write_jsonl(StreamSpec(seed=11, profiles=150, records=1500, invalid_rate=0.01), path)
    return path, truth


def test_run_emits_every_expected_change_once(tmp_path: Path, stream: tuple[Path, StreamTruth]) -> None:
    path, truth = stream
    out = tmp_path / "changes.jsonl"
    result = relay("run", "--source", f"file:{path}", "--state", f"sqlite:{tmp_path / 's.sqlite'}",
                   "--handler", f"jsonl:{out}", "--dead-letter", str(tmp_path / "dl.jsonl"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert Counter(changes_in(out)) == Counter(truth.changes)
    first = json.loads(out.read_bytes().splitlines()[0])
    assert {"change", "segment_id", "profile_key", "qualified_at", "change_id"} <= first.keys()
    summary = json.loads(result.stderr.decode().strip().splitlines()[-1])["summary"]
    assert summary["invalid"] == truth.invalid > 0
    dead = [json.loads(line) for line in (tmp_path / "dl.jsonl").read_bytes().splitlines()]
    assert len(dead) == truth.dead_letters
    assert sum(entry["kind"] == "invalid_entry" for entry in dead) == truth.invalid_entries > 0
    assert all(entry["kind"] in ("invalid_record", "invalid_entry") and entry["reason"] and entry["position"] for entry in dead)


def test_log_handler_writes_change_lines_to_stdout_and_logs_to_stderr(tmp_path: Path) -> None:
    path = tmp_path / "exports.jsonl"
    truth = write_jsonl(StreamSpec(seed=3, profiles=20, records=100), path)
    result = relay("run", "--source", "file:-", "--state", "memory", "--handler", "log",
                   "--dead-letter", str(tmp_path / "dl.jsonl"), cwd=tmp_path, input=path.read_bytes())
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(truth.changes)
    assert all(line["change"] in ("enter", "exit") for line in lines)
    for line in result.stderr.decode().splitlines():
        json.loads(line)  # structured logs, one JSON object per line


def test_validate_reports_each_invalid_line_and_exits_1(tmp_path: Path) -> None:
    sample = json.loads((TESTS.parent.parent / "shared" / "samples" / "export-current-doc.json").read_text()) \
        if (TESTS.parent.parent / "shared" / "samples").exists() else None
    good = json.dumps(sample or {"identityMap": {"ecid": [{"id": "1"}]}, "segmentMembership": {}})
    bad_status = json.dumps({"identityMap": {"ecid": [{"id": "1"}]},
                             "segmentMembership": {"ups": {"s": {"status": "gone", "lastQualificationTime": "2024-01-01T00:00:00Z"}}}})
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, "{not json", good, "", bad_status, "[1]"]) + "\n")
    result = relay("validate", str(path), cwd=tmp_path)
    assert result.returncode == 1
    out = result.stdout.decode().splitlines()
    assert out == [
        "line 2: not_json: " + out[0].split(": ", 2)[2],
        "line 5: unknown_status: segmentMembership.ups.s.status: 'gone' is not one of realized, existing, exited",
        "line 6: not_object: expected a JSON object, got list",
    ]
    assert "5 records, 3 invalid" in result.stderr.decode()
    as_json = relay("validate", "--json", str(path), cwd=tmp_path)
    assert [json.loads(line)["line"] for line in as_json.stdout.splitlines()] == [2, 5, 6]
    clean = tmp_path / "clean.jsonl"
    clean.write_text(good + "\n")
    assert relay("validate", str(clean), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("toml", "env", "args", "expected"),
    [
        ('sorce = "file:x"\n', {}, [], "config field 'sorce': unknown field"),
        ('[pipeline]\nconcurrency = 0\n', {}, [], "config field 'pipeline.concurrency'"),
        ("", {"SEGMENT_RELAY_RETRY__MAX_ATTEMPTS": "many"}, [], "SEGMENT_RELAY_RETRY__MAX_ATTEMPTS"),
        ("", {}, ["--state", "postgres:x"], "config field 'state': use memory, sqlite:PATH or dynamodb:TABLE"),
        ("", {}, ["--source", "kafka:x"], "config field 'source'"),
        ("", {}, ["--handler", "nosuchhandler"], "config field 'handlers': unknown handler 'nosuchhandler'"),
        ("", {}, ["--handler", "no_such_module:fn"], "config field 'handlers'"),
        ("source = [", {}, [], "cannot read config file"),
    ],
)
def test_bad_config_fails_at_start_naming_the_field(
    tmp_path: Path, toml: str, env: dict[str, str], args: list[str], expected: str
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    result = relay("run", "--config", str(config), *args, cwd=tmp_path, env=_env(**env), input=b"")
    assert result.returncode == 2
    assert expected in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_config_file_env_and_flags_combine(tmp_path: Path, stream: tuple[Path, StreamTruth]) -> None:
    path, truth = stream
    keep = sorted({segment for _, segment, _, _ in truth.changes})[:2]
    out = tmp_path / "changes.jsonl"
    config = tmp_path / "relay.toml"
    config.write_text(f'source = "file:{path}"\nstate = "memory"\nhandlers = ["log"]\n'
                      f'dead_letter = "{tmp_path / "dl.jsonl"}"\n')
    env = _env(SEGMENT_RELAY_HANDLERS=f"jsonl:{out}", SEGMENT_RELAY_CONFIG=str(config))
    result = relay("run", "--segments", ",".join(keep), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b""  # the env's handler list replaced the file's "log"
    emitted = changes_in(out)
    assert emitted and {segment for _, segment, _, _ in emitted} <= set(keep)
    assert Counter(emitted) == Counter(c for c in truth.changes if c[1] in keep)


def test_poison_changes_are_dead_lettered_and_the_run_completes(tmp_path: Path) -> None:
    path = tmp_path / "exports.jsonl"
    write_jsonl(StreamSpec(seed=5, profiles=60, records=400), path)
    config = tmp_path / "relay.toml"
    config.write_text("[retry]\nmax_attempts = 2\ninitial_backoff_s = 0.001\n")
    result = relay("run", "-c", str(config), "--source", f"file:{path}", "--state", "memory",
                   "--handler", "cli_targets:fails_on_some", "--dead-letter", str(tmp_path / "dl.jsonl"),
                   "--checkpoint-file", str(tmp_path / "cp.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    dead = [json.loads(line) for line in (tmp_path / "dl.jsonl").read_bytes().splitlines()]
    summary = json.loads(result.stderr.splitlines()[-1])["summary"]
    poison = summary["enters"] + summary["exits"]  # every change, the poison ones included
    assert dead and len(dead) < poison / 4
    assert {d["change"]["change_id"][0] for d in dead} == {"0"}  # exactly the poison ones
    assert {(d["kind"], d["handler"], d["attempts"], d["reason"]) for d in dead} == {
        ("failed_change", "cli_targets:fails_on_some", 2, "handler_failed")
    }
    assert "downstream refuses this one" in dead[0]["detail"]
    assert json.loads((tmp_path / "cp.json").read_bytes())["line"] == 400  # the partition moved on


def test_sigterm_drains_checkpoints_and_a_rerun_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "exports.jsonl"
    truth = write_jsonl(StreamSpec(seed=21, profiles=100, records=1000), path)
    out = tmp_path / "changes.jsonl"
    checkpoint = tmp_path / "checkpoint.json"
    args = ["run", "--source", f"file:{path}", "--state", f"sqlite:{tmp_path / 'state.sqlite'}",
            "--handler", f"jsonl:{out}", "--handler", "cli_targets:slow",
            "--checkpoint-file", str(checkpoint), "--dead-letter", str(tmp_path / "dl.jsonl")]
    # A small in-flight bound, so that "stop reading" leaves most of the file unread.
    env = _env(CLI_TARGETS_DELAY_S="0.003", SEGMENT_RELAY_PIPELINE__CHECKPOINT_INTERVAL_S="0.2",
               SEGMENT_RELAY_PIPELINE__CONCURRENCY="4", SEGMENT_RELAY_PIPELINE__MAX_IN_FLIGHT_RECORDS="20")
    process = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(changes_in(out)) >= 50 or process.poll() is not None, what="first changes")
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr.decode()
    assert "signal received" in stderr.decode()
    stopped_at = json.loads(checkpoint.read_bytes())["line"]
    first_run = changes_in(out)
    assert 0 < stopped_at < 1000
    assert len(first_run) < len(truth.changes)

    rerun = relay(*args, cwd=tmp_path, env=_env(SEGMENT_RELAY_PIPELINE__CHECKPOINT_INTERVAL_S="0.2"))
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert json.loads(checkpoint.read_bytes())["line"] == 1000
    emitted = Counter(changes_in(out))
    expected = Counter(truth.changes)
    assert not expected - emitted, "a change was lost across the restart"
    # Repeats are allowed (at least once) but only for records after the checkpoint: the
    # drained first run checkpointed everything it handled, so there are none here.
    assert emitted == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probes_and_metrics_while_running_then_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [*CLI, "run", "--source", "file:-", "--state", "memory", "--handler", "log", "--metrics-port", str(port),
         "--dead-letter", str(tmp_path / "dl.jsonl")],
        cwd=tmp_path, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    try:
        assert process.stdin is not None
        record = json.dumps({"identityMap": {"ecid": [{"id": "p1"}]}, "segmentMembership": {
            "ups": {"seg-a": {"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"}}}})
        process.stdin.write(record.encode() + b"\n{broken\n")
        process.stdin.flush()
        wait_for(lambda: get("/readyz")[0] == 200, what="readiness")
        assert get("/healthz")[0] == 200
        wait_for(lambda: "segment_relay_records_read_total 2.0" in get("/metrics")[1]
                 and "segment_relay_handler_latency_seconds_bucket" in get("/metrics")[1], what="metrics")
        metrics = get("/metrics")[1]
        assert 'segment_relay_changes_total{change="enter",segment_id="seg-a"} 1.0' in metrics
        assert 'segment_relay_records_invalid_total{reason="not_json"} 1.0' in metrics
        assert "segment_relay_handler_latency_seconds_bucket" in metrics
        # The live relay's registry also carries the runtime, its build, and loop stalls.
        for family in ("# TYPE segment_relay_build_info gauge", "# TYPE segment_relay_event_loop_stalls_total counter",
                       "# TYPE segment_relay_checkpoints_total counter", "# TYPE process_cpu_seconds_total counter",
                       "# TYPE process_resident_memory_bytes gauge", "# TYPE python_gc_collections_total counter"):
            assert family in metrics, family
        assert "segment_relay_record_latency_seconds_count 1.0" in metrics  # the valid record
        assert "segment_relay_change_age_seconds_count 1.0" in metrics  # its enter
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr.decode()
    assert json.loads(stdout.splitlines()[0])["segment_id"] == "seg-a"


def test_stdin_lines_arriving_after_the_loop_closed_leave_no_coroutine_behind() -> None:
    import asyncio
    import gc
    import warnings

    from segment_relay.consumer.sources.file import _hand_over

    loop = asyncio.new_event_loop()
    queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
    loop.close()  # the relay exited while the reader thread still had input
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _hand_over(loop, queue, [b"late line"]) is False
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
