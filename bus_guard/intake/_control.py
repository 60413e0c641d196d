"""The gateway's control connection: policies from the bus and the published JWKS travel
on a NATS connection of their own, never on the intake's (a slow bucket read must not
queue behind intents, nor intents behind it)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from nats.aio.client import Client

from bus_guard.errors import GatewayError
from bus_guard.intake._client import GuardClient
from bus_guard.intake._keys_live import KeyKeeper, ensure_jwks_bucket
from bus_guard.ledger._records import CheckpointSigner
from bus_guard.settings import Settings
from bus_guard.signing._signer import Signer

__all__ = ("control_connection", "open_keys")

log = logging.getLogger(__name__)


@asynccontextmanager
async def control_connection(
    settings: Settings, *, purpose: str, url: str | None = None, unreachable: str = ""
) -> AsyncIterator[Client]:
    """A connection to *url* (default: the gateway's servers) with the gateway's
    credentials and reconnect budget, closed when the block ends;
    :class:`~bus_guard.errors.GatewayError` naming *purpose* (and saying *unreachable*)
    when there is none."""
    url = url or settings.nats_url
    last: list[Exception] = []
    started = False

    async def on_error(exc: Exception) -> None:
        last[:] = [exc]
        log.debug("%s: %r", purpose, exc)

    async def on_closed() -> None:
        if started:  # not our own close
            log.error("%s: the connection to %s is closed for good", purpose, url)

    nc = GuardClient()
    try:
        await nc.connect(
            [u.strip() for u in url.split(",") if u.strip()],
            name=f"bus-guard {settings.gateway_id} {purpose}",
            user_credentials=settings.creds_file,
            connect_timeout=max(1, round(settings.connect_timeout_s)),
            reconnect_time_wait=settings.reconnect_wait_s,  # type: ignore[arg-type]
            max_reconnect_attempts=settings.max_reconnect_attempts,
            error_cb=on_error,
            closed_cb=on_closed,
        )
    except Exception as exc:
        why = f"{exc} ({last[0]!r})" if last and last[0] is not exc else repr(exc)
        then = f"; {unreachable}" if unreachable else ""
        raise GatewayError(f"{purpose}: cannot connect to {url}: {why}{then}") from None
    started = True
    try:
        yield nc
    finally:
        started = False
        with anyio.CancelScope(shield=True):
            if not nc.is_closed:
                try:
                    await nc.close()
                except Exception:
                    log.exception("%s: closing the connection", purpose)


@asynccontextmanager
async def open_keys(
    settings: Settings,
    *,
    key_path: Path,
    jwks_path: Path | None,
    signer: Signer,
    ledger_signer: CheckpointSigner | None,
    poll_s: float = 1.0,
) -> AsyncIterator[KeyKeeper]:
    """A started :class:`KeyKeeper` (its JWKS published, if JetStream lets it) on a
    control connection of its own."""
    async with control_connection(settings, purpose="keys") as nc:
        js = nc.jetstream(timeout=max(settings.connect_timeout_s, 2.0))
        bucket = settings.subjects.streams.jwks_bucket
        try:
            kv = await ensure_jwks_bucket(js, bucket, settings.stream.replicas)
        except Exception as exc:  # core mode may run without JetStream
            log.warning("keys: no JWKS bucket %s (%r): the JWKS is not published", bucket, exc)
            kv = None
        keeper = KeyKeeper(
            kv,
            key_path=key_path,
            jwks_path=jwks_path,
            signer=signer,
            ledger_signer=ledger_signer,
            poll_s=poll_s,
        )
        keeper.trusted = await keeper.start()
        yield keeper
