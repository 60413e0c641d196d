"""Shared fixtures: a real nats-server on a random port, per test; a fresh signing key,
the shipped policies and a signer over that key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus_guard.policy._load import PolicySet, load_policies
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key
from bus_guard.signing._signer import Signer

from .helpers import make_signer

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


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh Ed25519 key in *tmp_path*: (signing-key.pem, jwks.json)."""
    return generate_key(tmp_path)


@pytest.fixture
def policies() -> PolicySet:
    """The shipped policies (``policies/``), compiled."""
    return load_policies(POLICIES)


@pytest.fixture
def signer(keys: tuple[Path, Path]) -> Signer:
    """A signer over the ``keys`` fixture's key, issuer ``test-gw``."""
    return make_signer(keys[0])
