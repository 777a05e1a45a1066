"""Azurite (npm, pinned in emulators/) as a local Azure Blob Storage, for the Event Hubs checkpoint store.

For tests: azurite-blob is started on a free port bound to 127.0.0.1 with its workspace in a temporary
directory, waited for until it answers HTTP, and stopped by its PID. Flags (see
/work/shared/notes/eventhubs-emulation.md, section 1): ``--disableTelemetry`` (it phones home otherwise),
``--skipApiVersionCheck`` (current azure-storage-blob sends an API version Azurite 3.35 rejects),
``--loose`` and ``--silent``.
"""

from __future__ import annotations

import subprocess
import tempfile
import urllib.error
import urllib.request

from .aws import EMULATORS, EmulatorUnavailable, node_executable
from .processes import LocalServer, free_port, running, stderr_of

ACCOUNT_NAME = "devstoreaccount1"
# The well-known development account key: public, documented by Microsoft, accepted only by Azurite.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONNECTION_STRING_TEMPLATE = (
    "DefaultEndpointsProtocol=http;AccountName=" + ACCOUNT_NAME + ";AccountKey=" + ACCOUNT_KEY
    + ";BlobEndpoint=http://127.0.0.1:{port}/" + ACCOUNT_NAME + ";"
)


def connection_string(port: int) -> str:
    """The connection string of the dev account on an Azurite blob service at 127.0.0.1:``port``."""
    return CONNECTION_STRING_TEMPLATE.format(port=port)


class Azurite(LocalServer):
    def __init__(self, port: int, process: subprocess.Popen[bytes], directory: tempfile.TemporaryDirectory[str]) -> None:
        super().__init__("azurite-blob", process, directory)
        self.port = port

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)


def _answers(port: int) -> bool:
    """Any HTTP answer (even 400/403 to this unsigned request) means the blob service is up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{ACCOUNT_NAME}?comp=list", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def start_azurite(port: int | None = None, *, timeout_s: float = 30.0) -> Azurite:
    node = node_executable()
    main = EMULATORS / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
    if not main.is_file():
        raise EmulatorUnavailable(f"azurite is not installed: run `npm ci` in {EMULATORS} (or `make emulators`)")
    port = port or free_port()
    directory = tempfile.TemporaryDirectory(prefix="segment-relay-azurite-")
    command = [node, str(main), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", directory.name,
               "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent"]
    # --silent keeps the access log out of stderr, so the pipe (read only on failure) never fills.
    process = subprocess.Popen(command, cwd=directory.name, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    azurite = Azurite(port, process, directory)
    azurite.wait_until_ready(lambda: _answers(port), timeout_s=timeout_s, error=EmulatorUnavailable,
                             output=stderr_of(process))
    return azurite


running_azurite = running  # stops the server when the block ends
