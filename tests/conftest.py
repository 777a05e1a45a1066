"""Shared fixtures: the AWS emulators, Redis and Azurite, started once per test session and stopped by PID;
the Adobe platform fake on a thread of its own, for tests that run the CLI in this process."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from segment_relay.testing.aws import Emulator, fake_aws_env, running, start_dynalite, start_kinesalite
from segment_relay.testing.azure import Azurite, running_azurite, start_azurite
from segment_relay.testing.platform import FakePlatform
from segment_relay.testing.redis import RedisServer, running_redis, start_redis
from segment_relay.testing.s3 import S3Server, start_s3


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    with fake_aws_env():
        yield


@pytest.fixture(scope="session")
def kinesalite(aws_env: None) -> Iterator[Emulator]:
    with running(start_kinesalite()) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def dynalite(aws_env: None) -> Iterator[Emulator]:
    with running(start_dynalite()) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def s3_server(aws_env: None) -> Iterator[S3Server]:
    with running(start_s3()) as server:
        yield server


# --- Redis (the Debian redis-server) and Azurite (npm) -----------------------------------------

@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis(start_redis()) as server:
        yield server


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with running_azurite(start_azurite()) as emulator:
        yield emulator


@pytest.fixture
def container(azurite: Azurite) -> str:
    """A new, empty Blob container on the session's Azurite (for checkpoints): its name."""
    name = f"checkpoints-{uuid.uuid4().hex[:12]}"
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        service.create_container(name)
    return name


@pytest.fixture
async def fake() -> AsyncIterator[FakePlatform]:
    """The platform fake in the test's loop; every exchange of the test is then validated
    against Adobe's specs (when they are on this machine)."""
    from test_platform_fake import SPECS, validate_against_specs

    async with FakePlatform() as platform:
        yield platform
    if SPECS:
        validate_against_specs(platform.requests)


@contextlib.contextmanager
def platform_in_thread(**settings: Any) -> Iterator[FakePlatform]:
    """The platform fake (``FakePlatform(**settings)``) on an event loop in a thread: a test can
    run the CLI (which runs its own loop) in this process and change the fake between commands."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-platform", daemon=True)
    thread.start()
    platform = asyncio.run_coroutine_threadsafe(FakePlatform(**settings).start(), loop).result(30)
    try:
        yield platform
    finally:
        asyncio.run_coroutine_threadsafe(platform.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture
def fake_in_thread() -> Iterator[FakePlatform]:
    with platform_in_thread() as platform:
        yield platform
