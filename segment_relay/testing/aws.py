"""kinesalite and dynalite (npm, pinned in emulators/) as local Kinesis and DynamoDB.

For tests and benchmarks: each server is started on a free port bound to 127.0.0.1,
waited for until it answers a real API call, and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .processes import LocalServer, free_port, running, stderr_of

__all__ = ["Emulator", "EmulatorUnavailable", "FAKE_AWS_ENV", "fake_aws_env", "free_port", "running",
           "start_dynalite", "start_kinesalite"]

EMULATORS = Path(__file__).resolve().parents[2] / "emulators"

# Credentials and a region must exist for botocore even though the emulators never check them.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class EmulatorUnavailable(RuntimeError):
    """Node or the npm packages are missing: run `make emulators` (needs Node 20 and npm)."""


class Emulator(LocalServer):
    """kinesalite or dynalite, answering at ``endpoint``."""

    def __init__(self, name: str, endpoint: str, process: subprocess.Popen[bytes]) -> None:
        super().__init__(name, process)
        self.endpoint = endpoint


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise EmulatorUnavailable("node is not on PATH: install Node.js 20 to run the AWS emulators")
    if not (EMULATORS / "node_modules" / "kinesalite").is_dir():
        raise EmulatorUnavailable(f"emulators are not installed: run `npm ci` in {EMULATORS} (or `make emulators`)")
    return node


def _ready(endpoint: str, target: str, content_type: str) -> bool:
    request = urllib.request.Request(
        endpoint + "/", data=b"{}", method="POST",
        headers={
            "X-Amz-Target": target,
            "Content-Type": content_type,
            "X-Amz-Date": "20260101T000000Z",
            # A syntactically valid SigV4 header: the emulators parse it but never verify it.
            "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/x/aws4_request, "
                             "SignedHeaders=host, Signature=0",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(name: str, command: list[str], target: str, content_type: str, port: int) -> Emulator:
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        command, cwd=EMULATORS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    emulator = Emulator(name, endpoint, process)
    emulator.wait_until_ready(lambda: _ready(endpoint, target, content_type), timeout_s=30,
                              error=EmulatorUnavailable, output=stderr_of(process))
    return emulator


def start_kinesalite(port: int | None = None) -> Emulator:
    port = port or free_port()
    return _start("kinesalite", [node_executable(), "kinesalite-local.js", str(port)],
                  "Kinesis_20131202.ListStreams", "application/x-amz-json-1.1", port)


def start_dynalite(port: int | None = None) -> Emulator:
    port = port or free_port()
    command = [node_executable(), "node_modules/dynalite/cli.js", "--host", "127.0.0.1", "--port", str(port),
               "--createTableMs", "0", "--deleteTableMs", "0", "--updateTableMs", "0"]
    return _start("dynalite", command, "DynamoDB_20120810.ListTables", "application/x-amz-json-1.0", port)


@contextlib.contextmanager
def fake_aws_env() -> Iterator[None]:
    """Dummy credentials and region in os.environ (restored afterwards)."""
    saved = {key: os.environ.get(key) for key in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
