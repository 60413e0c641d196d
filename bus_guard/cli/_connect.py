"""How the one-shot tools (``ledger verify``, ``lineage``, ``approve``, ``reject``,
``holds``) connect to NATS: fail fast, and say why in one line.

nats-py reports every failed connection attempt to ``error_cb``, whose default logs a
traceback per attempt; these tools report the last one, once, in the error they raise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import nats
from nats.aio.client import Client

from bus_guard.cli._arguments import TOOL_RECONNECT_ATTEMPTS, field_default
from bus_guard.errors import ConfigError, GatewayError
from bus_guard.settings import Settings

__all__ = ("connect",)

log = logging.getLogger(__name__)

# Between attempts (nats-py's default is 2 s): with TOOL_RECONNECT_ATTEMPTS, a refused
# connection fails in about 1.5 s, an unanswered one in that plus an attempt's timeout each.
TOOL_RECONNECT_WAIT_S: Final = 0.5


async def connect(urls: str, *, creds: str | None, name: str) -> Client:
    """A connection to the comma-separated *urls*; :class:`GatewayError` if there is none,
    :class:`ConfigError` if the credentials file cannot be read."""
    if creds is not None:
        _check_readable(creds)
    last: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        last[:] = [exc]
        log.debug("nats: %r", exc)

    try:
        return await nats.connect(
            [u.strip() for u in urls.split(",") if u.strip()],
            name=name,
            user_credentials=creds,
            connect_timeout=field_default(Settings, "connect_timeout_s"),
            max_reconnect_attempts=TOOL_RECONNECT_ATTEMPTS,
            reconnect_time_wait=TOOL_RECONNECT_WAIT_S,  # seconds; nats-py sleeps for it
            error_cb=on_error,
        )
    except Exception as exc:  # nats-py raises what it met: OSError, its errors, timeouts
        why = f"{exc} ({last[0]})" if last and last[0] is not exc else str(exc)
        raise GatewayError(f"cannot connect to {urls}: {why}") from None


def _check_readable(creds: str) -> None:
    # nats-py reads the file only while connecting and would call a missing one a failed
    # connection (exit 1); it is a configuration error (exit 2).
    try:
        with Path(creds).open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{creds}: cannot read the credentials file: {exc.strerror}") from None
