"""Shared fixtures: the AWS emulators, started once per test session and stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from segment_relay.testing.aws import Emulator, fake_aws_env, running, start_dynalite, start_kinesalite


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
