"""The fake platform in its own process (for the demo and CLI tests): started on 127.0.0.1,
waited for until its ready line appears, stopped by its PID. Its log (stderr) goes to a file in a
temporary directory, so a long run can never block on a full pipe."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from ..processes import LocalServer, free_port


class PlatformUnavailable(RuntimeError):
    pass


class PlatformProcess(LocalServer):
    def __init__(self, process: subprocess.Popen[bytes], ready: dict[str, Any],
                 directory: tempfile.TemporaryDirectory[str]) -> None:
        super().__init__("fake-platform", process, directory)
        self.ready = ready
        self.url: str = ready["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.log_path = Path(directory.name) / "platform.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_platform_process(*args: str, port: int | None = None, timeout_s: float = 20.0,
                           env: dict[str, str] | None = None) -> PlatformProcess:
    """``python -m segment_relay.testing.platform --port P [args]``; returns once it listens."""
    port = port or free_port()
    directory = tempfile.TemporaryDirectory(prefix="fake-platform-")
    log_path = Path(directory.name) / "platform.log"
    command = [sys.executable, "-m", "segment_relay.testing.platform", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    line = b""
    try:
        while b"\n" not in line:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                break
            if selector.select(timeout=min(remaining, 0.1)):
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
    finally:
        selector.close()
    if b"\n" not in line:
        tail = log_path.read_text(errors="replace")[-2000:]
        LocalServer("fake-platform", process, directory).stop()
        process.stdout.close()
        raise PlatformUnavailable(f"fake platform did not start within {timeout_s:g} s: {tail}")
    # It prints only the ready line; close our end so nothing can ever block on it.
    process.stdout.close()
    return PlatformProcess(process, orjson.loads(line.split(b"\n", 1)[0]), directory)
