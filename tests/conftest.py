"""Shared fixtures: a real nats-server on a random port, per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_guard.server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
COMPOSE = ROOT / "compose"


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream, started with --port -1 (ready line parsed)."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url
