"""The Event Hubs emulator in its own process, for tests and benchmarks that run relays as
separate processes (or must not share a core's event loop with it)."""

from __future__ import annotations

import socket
import subprocess
import sys

from ..processes import LocalServer, free_port, stderr_of


class EmulatorUnavailable(RuntimeError):
    pass


class EmulatorProcess(LocalServer):
    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        super().__init__("eventhubs-emulator", process)
        self.port = port

    def connection_string(self, hub: str) -> str:
        # Same shape as EventHubsEmulator.connection_string: plain AMQP, no TLS, any key.
        return (f"Endpoint=sb://127.0.0.1:{self.port};SharedAccessKeyName=k;SharedAccessKey=v;"
                f"EntityPath={hub};UseDevelopmentEmulator=true")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_emulator_process(hubs: dict[str, int], *, port: int | None = None, timeout_s: float = 20.0) -> EmulatorProcess:
    """``python -m segment_relay.testing.eventhubs`` on 127.0.0.1, waited for until it accepts connections."""
    port = port or free_port()
    args = [sys.executable, "-m", "segment_relay.testing.eventhubs", "--host", "127.0.0.1", "--port", str(port)]
    for name, partitions in hubs.items():
        args += ["--hub", f"{name}:{partitions}"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = EmulatorProcess(port, process)
    server.wait_until_ready(lambda: _answers(port), timeout_s=timeout_s, error=EmulatorUnavailable,
                            output=stderr_of(process))
    return server
