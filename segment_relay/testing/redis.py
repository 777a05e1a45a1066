"""redis-server (the Debian package) as a throwaway Redis for tests.

Started on a free port bound to 127.0.0.1 with no persistence (``--save "" --appendonly no``) in a
temporary directory, waited for until it answers PING, and stopped by its PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from .processes import LocalServer, free_port, running


class RedisUnavailable(RuntimeError):
    """redis-server is missing: ``apt-get install redis-server`` (CI installs it in .ci/run)."""


class RedisServer(LocalServer):
    def __init__(self, port: int, process: subprocess.Popen[bytes], directory: tempfile.TemporaryDirectory[str]) -> None:
        super().__init__("redis-server", process, directory)
        self.port = port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def start_redis(port: int | None = None, *, timeout_s: float = 30.0) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server is not on PATH: install it (`apt-get install -y redis-server`)")
    port = port or free_port()
    directory = tempfile.TemporaryDirectory(prefix="segment-relay-redis-")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", directory.name, "--logfile", "redis.log"]
    # The log goes to a file, not a pipe nobody drains (a full pipe would block the server).
    process = subprocess.Popen(command, cwd=directory.name, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    server = RedisServer(port, process, directory)
    server.wait_until_ready(lambda: _pong(port), timeout_s=timeout_s, error=RedisUnavailable,
                            output=lambda: _read_log(Path(directory.name) / "redis.log"))
    return server


running_redis = running  # stops the server when the block ends
