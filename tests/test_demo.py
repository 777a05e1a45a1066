"""`segment-relay demo`, as `make demo` runs it: every source, a small stream, the verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest


@pytest.mark.parametrize("source", ["eventhubs", "kinesis", "file"])
def test_the_demo_ends_with_the_relay_equal_to_the_truth(source: str, tmp_path: Path) -> None:
    if source == "kinesis":
        pytest.importorskip("aiobotocore")
    run = subprocess.run(
        [sys.executable, "-m", "segment_relay.cli", "demo", "--source", source, "--records", "1500",
         "--profiles", "200", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "nothing lost, nothing doubled" in run.stderr
    assert "differs" not in run.stderr
    changes = [orjson.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert changes and all(c["change"] in ("enter", "exit") for c in changes)  # the log handler's lines
    if source != "file":
        assert "provision apply" in run.stderr and "metrics: http://127.0.0.1:" in run.stderr
        assert (tmp_path / "destination.toml").exists()
        from segment_relay.testing.platform.server import DEFAULT_CLIENT_SECRET

        written = (tmp_path / "destination.toml").read_text()
        assert DEFAULT_CLIENT_SECRET not in written and "demo-sas-key" not in written  # secrets stay in the environment
