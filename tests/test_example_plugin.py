"""examples/handler-plugin: pip-installed into this environment, found by the relay through its
entry point, and handed every change of a file-source run of the real command. Also the helper
its tests are built on, segment_relay.testing.pipeline.run_exports."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import orjson
import pytest

from segment_relay import PermanentHandlerError, SegmentChange, on_exit
from segment_relay.consumer.deadletter import MemoryDeadLetter
from segment_relay.handlers.api import FunctionHandler
from segment_relay.testing.exports import DEFAULT_SEGMENTS, StreamSpec, expected_changes, generate, iso_utc, write_jsonl
from segment_relay.testing.pipeline import run_exports

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "handler-plugin"
ENTRY_POINT = "suppression-list"
BIN = Path(sys.executable).parent


def run(args: Sequence[str], *, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEGMENT_RELAY_")}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plugin_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Installs the example into this environment (again, if it is there: pip replaces it) and
    returns the copy it was built from. pip builds in the source tree (build/, *.egg-info), so
    it builds a copy and the example stays clean."""
    source = tmp_path_factory.mktemp("plugin") / "handler-plugin"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    # --no-deps: segment-relay itself is installed already (editable) and must stay as it is.
    result = run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", str(source)], cwd=source, timeout=300)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return source


def test_the_relay_lists_the_installed_plugin(plugin_source: Path, tmp_path: Path) -> None:
    result = run([str(BIN / "segment-relay"), "handlers"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.split()[0] == ENTRY_POINT]
    assert "segment_relay_suppression:SuppressionList" in line and "segment-relay-suppression" in line


def test_a_file_run_hands_every_change_to_the_plugin(plugin_source: Path, tmp_path: Path) -> None:
    exports, database, dead_letter = tmp_path / "exports.jsonl", tmp_path / "suppression.sqlite", tmp_path / "dl.jsonl"
    truth = write_jsonl(StreamSpec(seed=23, profiles=300, records=3000, invalid_rate=0.005), exports)

    result = run([
        str(BIN / "segment-relay"), "run", "--source", f"file:{exports}", "--state", "memory",
        "--handler", f"{ENTRY_POINT}:{database}", "--dead-letter", str(dead_letter), "--log-level", "ERROR",
    ], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    summary = orjson.loads(result.stderr.splitlines()[-1])["summary"]
    assert (summary["enters"], summary["exits"], summary["dead_letters"]) == (truth.enters, truth.exits, truth.dead_letters)
    with closing(sqlite3.connect(database)) as db:
        audit = db.execute("SELECT profile_key, segment_id, change, qualified_at FROM audit").fetchall()
        suppressed = set(db.execute("SELECT profile_key, segment_id FROM suppression WHERE suppressed = 1"))
    # Every change the rules produce reached the handler, once.
    assert sorted(audit) == sorted(truth.changes)
    members: dict[tuple[str, str], bool] = {}
    for profile_key, segment_id, change, _ in truth.changes:  # delivery order: the last change wins
        members[(profile_key, segment_id)] = change == "enter"
    assert suppressed == {pair for pair, member in members.items() if member}


def test_the_plugin_passes_its_own_tests(plugin_source: Path) -> None:
    # Its tests live outside this suite's testpaths; they run against the installed package.
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=plugin_source)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


async def test_run_exports_returns_what_each_handler_handled() -> None:
    records = list(generate(StreamSpec(seed=5, profiles=80, records=600, invalid_rate=0.01)))
    truth = expected_changes(records)
    kept = DEFAULT_SEGMENTS[0][0]

    async def everything(change: SegmentChange) -> None:
        pass

    @on_exit()
    async def exits(change: SegmentChange) -> None:
        pass

    async def refuses(change: SegmentChange) -> None:
        raise PermanentHandlerError("no")

    dead = MemoryDeadLetter()
    seen = await run_exports(
        records,
        [FunctionHandler(everything, name="all"), FunctionHandler(exits, name="exits"),
         FunctionHandler(refuses, name="refuses")],
        dead_letter=dead,
    )

    def shape(changes: list[SegmentChange]) -> list[tuple[str, str, str, str]]:
        return sorted((c.profile_key, c.segment_id, c.change.value, iso_utc(c.qualified_at)) for c in changes)

    assert shape(seen["all"]) == sorted(truth.changes)
    assert shape(seen["exits"]) == sorted(c for c in truth.changes if c[2] == "exit")  # routing applies
    assert seen["refuses"] == []  # dead-lettered, not handled
    kinds = [entry["kind"] for entry in dead.entries]
    assert kinds.count("invalid_record") == truth.invalid and kinds.count("invalid_entry") == truth.invalid_entries and kinds.count("failed_change") == len(truth.changes)

    only = await run_exports(records, [FunctionHandler(everything, name="all")], segments=[kept], concurrency=1)
    assert {c.segment_id for c in only["all"]} == {kept}
    with pytest.raises(ValueError, match="two handlers are named"):
        await run_exports(records, [FunctionHandler(everything, name="x"), FunctionHandler(exits, name="x")])
