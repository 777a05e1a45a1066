"""moto's server mode (``moto_server``, pinned in the test extra) as a local S3-compatible server.

For tests: started on a free port bound to 127.0.0.1, waited for until it answers, stopped by its
PID. It keeps objects in memory; its request log goes to a file in its own directory (a pipe
would fill up and stall it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .processes import LocalServer, free_port

__all__ = ["S3Server", "S3Unavailable", "start_s3"]


class S3Unavailable(RuntimeError):
    """moto_server is missing: install the test extra (pip install -e '.[test]')."""


class S3Server(LocalServer):
    """moto_server, answering at ``endpoint``."""

    def __init__(self, endpoint: str, process: subprocess.Popen[bytes], directory: tempfile.TemporaryDirectory[str]
                 ) -> None:
        super().__init__("moto_server", process, directory)
        self.endpoint = endpoint
        self.log = Path(directory.name) / "moto.log"


def _ready(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_s3(port: int | None = None) -> S3Server:
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if executable is None:
        raise S3Unavailable("moto_server is not installed: pip install -e '.[test]'")
    port = port or free_port()
    directory = tempfile.TemporaryDirectory(prefix="segment-relay-s3-")
    log = open(Path(directory.name) / "moto.log", "wb")  # noqa: SIM115 - the child keeps its own copy
    try:
        process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                   start_new_session=True)
    finally:
        log.close()
    server = S3Server(f"http://127.0.0.1:{port}", process, directory)
    server.wait_until_ready(lambda: _ready(server.endpoint), timeout_s=30, error=S3Unavailable,
                            output=lambda: server.log.read_text(errors="replace"))
    return server
