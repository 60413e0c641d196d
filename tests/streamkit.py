"""Helpers for stream-mode tests: a gateway in stream mode, JetStream publishing, reading
the output streams and the ledger back, and waiting for the consumer to drain."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus_guard.intake._gateway import Gateway
from bus_guard.intake._jetstream import Stored, read
from bus_guard.ledger._records import CheckpointSigner, LedgerRecord, decode_record
from bus_guard.policy._load import PolicySet
from bus_guard.settings import ArtifactMode, Settings, StreamSettings
from bus_guard.signing._keys import load_private_key
from bus_guard.signing._signer import Signer

# Fast enough for tests: short ack wait and fetch timeout, frequent checkpoints.
FAST = StreamSettings(
    ack_wait_s=2.0,
    fetch_timeout_s=0.5,
    heartbeat_s=0.2,
    nak_delay_s=0.2,
    publish_timeout_s=2.0,
    checkpoint_interval_s=1.0,
    checkpoint_every=50,
)


def stream_settings(
    url: str, gateway_id: str = "gw-1", *, artifacts: ArtifactMode = "per-message", **stream: Any
) -> Settings:
    return Settings(
        nats_url=url,
        mode="stream",
        gateway_id=gateway_id,
        artifacts=artifacts,
        stream=replace(FAST, **stream),
    )


def stream_gateway(settings: Settings, policies: PolicySet, key: Path, **kw: Any) -> Gateway:
    private = load_private_key(key)
    signer = Signer(private, issuer=settings.gateway_id, ttl_s=60)
    return Gateway(settings, policies, signer, ledger_signer=CheckpointSigner(private), **kw)


async def stored(nc: Client, stream: str, subject: str = ">") -> list[Stored]:
    return [m async for m in read(nc, stream, subject)]


async def ledger_decisions(nc: Client, prefix: str = "guard") -> list[LedgerRecord]:
    msgs = await stored(nc, f"{prefix.upper()}_LEDGER", f"{prefix}.ledger.*.d.*")
    return [decode_record(m.data) for m in msgs]


def records(msgs: list[Stored]) -> list[dict[str, Any]]:
    return [msgspec.json.decode(m.data) for m in msgs]


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Poll a server-side condition (consumer drained, n messages stored) until it holds.

    Waiting on an exact condition, not for a guessed duration: the poll interval only
    bounds how soon after it holds the test notices.
    """
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


async def drained(
    js: JetStreamContext, stream: str = "GUARD_IN", consumer: str = "bus-guard"
) -> bool:
    """Every intent stored so far is acked (the ack floor reached the stream's last
    message: a consumer's pending counts can lag a message stored a moment ago)."""
    last = (await js.stream_info(stream)).state.last_seq
    info = await js.consumer_info(stream, consumer)
    floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
    return floor >= last and not info.num_ack_pending and not info.num_pending


async def count(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


@dataclass
class Published:
    seq: int
    payload: bytes
