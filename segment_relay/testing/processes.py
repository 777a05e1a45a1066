"""Local servers for tests and benchmarks: started on 127.0.0.1, waited for with a deadline,
stopped by their PID. kinesalite, dynalite, Azurite and redis-server all go through here."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

S = TypeVar("S", bound="LocalServer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """A server process this test session started (and must stop)."""

    def __init__(self, name: str, process: subprocess.Popen[bytes],
                 directory: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.name = name
        self.process = process
        self.directory = directory

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; then close its pipe and remove its directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self.directory is not None:
            self.directory.cleanup()

    def wait_until_ready(self, ready: Callable[[], bool], *, timeout_s: float, error: type[Exception],
                         output: Callable[[], str] | None = None) -> None:
        """Poll ``ready`` until it is true; stop the server and raise ``error`` if it exits or
        the deadline passes (with the tail of ``output``, e.g. its log, when it exited)."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.process.poll() is not None:
                tail = output()[-2000:] if output is not None else ""
                code = self.process.returncode
                self.stop()
                raise error(f"{self.name} exited at start (code {code}): {tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise error(f"{self.name} did not answer within {timeout_s:g} s")
            time.sleep(0.02)


def stderr_of(process: subprocess.Popen[bytes]) -> Callable[[], str]:
    """Read a failed process's stderr pipe (only once it has exited, so it cannot block)."""
    def read() -> str:
        stream: IO[bytes] | None = process.stderr
        return stream.read().decode(errors="replace") if stream is not None else ""
    return read


@contextlib.contextmanager
def running(server: S) -> Iterator[S]:
    """Stop ``server`` when the block ends, however it ends."""
    try:
        yield server
    finally:
        server.stop()


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM: the main loop of a server run as ``python -m ...``."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
