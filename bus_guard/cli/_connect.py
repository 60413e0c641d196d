"""How the command-line tools connect to NATS: the same options on every command that
connects, validated once, and a connection that fails fast and says why in one line.

``--nats`` (default: ``$NATS_URL``, else a local server), ``--creds`` (a JWT credentials
file), ``--nkey`` (an nkey seed file), ``--tls-cert``/``--tls-key`` (a client
certificate), ``--tls-ca`` (the CA that signed the server's certificate). A URL that
cannot be a NATS URL, or a file that cannot be read, is a usage error (exit 2), found
before anything connects; a server that does not answer is a failure (exit 1) within
about ``attempts x (connect timeout + wait)``.

nats-py reports every failed connection attempt to ``error_cb``, whose default logs a
traceback per attempt; these tools report the last one, once, in the error they raise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats
from nats.aio.client import Client

from bus_guard.errors import ConfigError, GatewayError
from bus_guard.intake._auth import auth_kwargs

__all__ = (
    "DEFAULT_NATS_URL",
    "NATS_CONTEXT_ENV",
    "NATS_URL_ENV",
    "TOOL_CONNECT_TIMEOUT_S",
    "TOOL_RECONNECT_ATTEMPTS",
    "TOOL_RECONNECT_WAIT_S",
    "NatsOptions",
    "apply_context",
    "check_urls",
    "connect",
    "context_path",
    "env_url",
)

log = logging.getLogger(__name__)

NATS_URL_ENV: Final = "NATS_URL"
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})
# A tool does one thing and fails fast: a refused connection fails in about 1.5 s, an
# unanswered one in at most TOOL_RECONNECT_ATTEMPTS x (timeout + wait), ~8 s.
TOOL_CONNECT_TIMEOUT_S: Final = 2
TOOL_RECONNECT_ATTEMPTS: Final = 3
TOOL_RECONNECT_WAIT_S: Final = 0.5


def check_urls(urls: str) -> list[str]:
    """The comma-separated *urls*, each checked: ``[scheme://]host[:port]`` with a scheme
    nats-py speaks; :class:`ConfigError` (exit 2) naming the first that is not."""
    out = [u.strip() for u in urls.split(",") if u.strip()]
    if not out:
        raise ConfigError("--nats: no server URL given")
    for url in out:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if parsed.scheme not in _SCHEMES or not parsed.hostname or port == -1:
            raise ConfigError(
                f"--nats {url!r}: not a NATS server URL (nats://host:4222, tls://host:4222; "
                "several: comma-separated)"
            )
    return out


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """The connection options of a command (see the module docstring)."""

    urls: str = DEFAULT_NATS_URL
    creds: str | None = None
    nkey: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> NatsOptions:
        return cls(
            urls=args.nats,
            creds=getattr(args, "creds", None),
            nkey=getattr(args, "nkey", None),
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
            tls_ca=getattr(args, "tls_ca", None),
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """nats-py's ``connect`` arguments for these options (URLs and files checked)."""
        servers = check_urls(self.urls)
        return {
            "servers": servers,
            **auth_kwargs(
                creds=self.creds,
                nkey=self.nkey,
                tls_cert=self.tls_cert,
                tls_key=self.tls_key,
                tls_ca=self.tls_ca,
            ),
        }


async def connect(
    options: NatsOptions | str,
    *,
    name: str,
    creds: str | None = None,
    on_closed: Callable[[], Awaitable[None]] | None = None,
    reconnect_attempts: int = TOOL_RECONNECT_ATTEMPTS,
) -> Client:
    """A connection to *options* (or a URL string, with *creds*); :class:`GatewayError` if
    there is none, :class:`ConfigError` for a malformed URL or an unreadable file.
    *reconnect_attempts* -1: a long-running tool (the witness) reconnects for ever."""
    if isinstance(options, str):
        options = NatsOptions(urls=options, creds=creds)
    kw = options.connect_kwargs()
    last: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        last[:] = [exc]
        log.debug("nats: %r", exc)

    if on_closed is not None:
        kw["closed_cb"] = on_closed
    try:
        return await nats.connect(
            name=name,
            connect_timeout=TOOL_CONNECT_TIMEOUT_S,
            max_reconnect_attempts=reconnect_attempts,
            reconnect_time_wait=TOOL_RECONNECT_WAIT_S,  # seconds; nats-py sleeps for it
            error_cb=on_error,
            **kw,
        )
    except Exception as exc:  # nats-py raises what it met: OSError, its errors, timeouts
        why = f"{exc} ({last[0]})" if last and last[0] is not exc else str(exc)
        why = why or type(exc).__name__
        raise GatewayError(f"cannot connect to {options.urls}: {why}") from None


NATS_CONTEXT_ENV: Final = "NATS_CONTEXT"
# A NATS CLI context's keys -> ours (the CLI writes more: user, password, token, ...; a
# context that needs those is refused rather than half used).
_CONTEXT_FILES: Final = {
    "creds": "creds",
    "nkey": "nkey",
    "cert": "tls_cert",
    "key": "tls_key",
    "ca": "tls_ca",
}
_CONTEXT_UNSUPPORTED: Final = ("user", "password", "token", "jetstream_domain", "inbox_prefix")


def context_path(name: str) -> Path:
    """Where the NATS CLI keeps context *name* (``$XDG_CONFIG_HOME/nats/context``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nats" / "context" / f"{name}.json"


def apply_context(args: Any) -> None:
    """Fill ``args``' connection options that were not given from ``--context`` (or
    ``$NATS_CONTEXT``), then ``$NATS_URL``, then the local default: ``--nats`` >
    ``$NATS_URL`` > the context's url > ``nats://127.0.0.1:4222``; a file option given on
    the command line wins over the context's."""
    name = args.context or os.environ.get(NATS_CONTEXT_ENV) or None
    context: dict[str, Any] = {}
    if name:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name) or name.startswith("."):
            raise ConfigError(f"--context {name!r}: not a context name")
        path = context_path(name)
        try:
            context = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--context {name}: no such context ({path})") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a NATS context: {exc}") from None
        if not isinstance(context, dict):
            raise ConfigError(f"{path}: not a NATS context (a JSON object)")
        unsupported = [k for k in _CONTEXT_UNSUPPORTED if context.get(k)]
        if unsupported:
            raise ConfigError(
                f"{path}: uses {', '.join(unsupported)}, which bus-guard does not read; "
                "use a creds or nkey file"
            )
        for theirs, ours in _CONTEXT_FILES.items():
            if getattr(args, ours, None) is None and context.get(theirs):
                setattr(args, ours, os.path.expanduser(str(context[theirs])))
    if args.nats is None:
        args.nats = os.environ.get(NATS_URL_ENV) or context.get("url") or DEFAULT_NATS_URL


def env_url() -> str:
    """``$NATS_URL`` if set and not empty, else :data:`DEFAULT_NATS_URL`."""
    return os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL
