"""One typed settings object, built once at the edge (the CLI) and passed down."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Literal

from .authorize import Checks
from .errors import ConfigError

__all__ = ("IntakeMode", "Settings")

IntakeMode = Literal["core", "stream"]

_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _default_gateway_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to know, with units in the names."""

    nats_url: str = "nats://127.0.0.1:4222"
    prefix: str = "guard"
    queue: str = "bus-guard"
    mode: IntakeMode = "core"
    gateway_id: str = field(default_factory=_default_gateway_id)
    creds_file: str | None = None
    max_payload_bytes: int = 65536
    max_nesting_depth: int = 8
    deny_payload_bytes: int = 4096  # how much of a denied payload the deny record keeps
    artifact_ttl_s: float = 60.0
    checks: Checks = field(default_factory=Checks)
    pending_msgs_limit: int = 65536
    pending_bytes_limit: int = 64 * 1024 * 1024
    drain_timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 1.0
    max_reconnect_attempts: int = 10  # x reconnect_wait_s = the reconnect budget

    def __post_init__(self) -> None:
        if not all(_TOKEN_RE.fullmatch(t) for t in self.prefix.split(".")):
            raise ConfigError(f"prefix {self.prefix!r}: must be dot-separated [A-Za-z0-9_-] tokens")
        if self.mode not in ("core", "stream"):
            raise ConfigError(f"mode {self.mode!r}: must be 'core' or 'stream'")
        if self.mode == "stream":
            raise ConfigError("mode 'stream' is not available yet: use --mode core")
        for name in ("max_payload_bytes", "max_nesting_depth", "pending_msgs_limit"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.artifact_ttl_s <= 0 or self.drain_timeout_s <= 0:
            raise ConfigError("artifact_ttl_s and drain_timeout_s must be positive")
