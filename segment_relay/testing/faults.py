"""Outages of real servers, for tests: a TCP proxy on 127.0.0.1 in front of one (kinesalite,
dynalite, redis-server, the S3 server, ...) that a test can cut and heal.

Cut, the proxy resets every open connection and every new one at once (the client sees
"connection reset" or a closed connection, as from a server that crashed or a network that
dropped it); healed, it passes bytes through again. It runs its own event loop in a thread, so
it serves in-process relays and relay processes alike, and sync and async tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class FaultProxy:
    """``127.0.0.1:port`` forwards to ``target_host:target_port`` unless cut."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.refused = 0  # connections reset while cut (the client's attempts during the outage)
        self.forwarded = 0  # connections passed through
        self._cut = False
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """From now on until ``heal``: every connection, open or new, is reset."""
        self._cut = True
        asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop).result(10)

    def heal(self) -> None:
        self._cut = False

    def stop(self) -> None:
        async def close() -> None:
            await self._reset_all()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _reset_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # the server itself is gone: the client sees what it would
            return
        self.forwarded += 1
        self._open.update((writer, upstream_writer))
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        finally:
            for end in (writer, upstream_writer):
                self._open.discard(end)
                end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self._cut:
                    break
                writer.write(data)
                await writer.drain()
        writer.transport.abort()  # either side gone: the other goes too, as through a real proxy


@contextlib.contextmanager
def fault_proxy(target_port: int) -> Iterator[FaultProxy]:
    proxy = FaultProxy(target_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
