"""redis-server (the Debian package) as a throwaway Redis for tests.

Started on a free port bound to 127.0.0.1 with no persistence (``--save "" --appendonly no``) in a
temporary directory, waited for until it answers PING, and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .aws import free_port


class RedisUnavailable(RuntimeError):
    """redis-server is missing: ``apt-get install redis-server`` (CI installs it in .ci/run)."""


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: tempfile.TemporaryDirectory[str] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.directory.cleanup()


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
    deadline = time.monotonic() + timeout_s
    while not _pong(port):
        if process.poll() is not None:
            output = _read_log(Path(directory.name) / "redis.log")
            server.stop()
            raise RedisUnavailable(f"redis-server exited at start (code {process.returncode}): {output[-2000:]}")
        if time.monotonic() > deadline:
            server.stop()
            raise RedisUnavailable(f"redis-server did not answer PING on 127.0.0.1:{port} within {timeout_s:g} s")
        time.sleep(0.02)
    return server


@contextlib.contextmanager
def running_redis(server: RedisServer) -> Iterator[RedisServer]:
    try:
        yield server
    finally:
        server.stop()
