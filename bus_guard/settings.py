"""One typed settings object, built once at the edge (the CLI) and passed down."""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from bus_guard.errors import ConfigError
from bus_guard.subjects import DEFAULT_PREFIX, Subjects

__all__ = (
    "MAX_BUNDLE_BYTES",
    "MAX_NESTING_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "ArtifactMode",
    "Checks",
    "IntakeMode",
    "LogDecisions",
    "PolicySourceSettings",
    "ReplyInbox",
    "Settings",
    "StreamSettings",
)

IntakeMode = Literal["core", "stream"]
# Decoding bounds, also the embedding API's defaults (bus_guard.decide).
MAX_PAYLOAD_BYTES: Final = 65536
MAX_NESTING_DEPTH: Final = 8
ArtifactMode = Literal["per-message", "batched"]
# Where core mode sends a decision to an intent's reply subject: only to the requesting
# principal's own inbox (`_INBOX.<principal>.`, or the server's cross-account `_R_.` alias),
# or to any `_INBOX.` subject (a single-account bus whose agents keep nats-py's default).
ReplyInbox = Literal["principal", "any"]
LogDecisions = Literal["off", "denied", "all"]

# As bus_guard.signing._batch.MAX_BATCH (not imported: settings stays free of the signing code).
_MAX_BATCH = 1 << 20

_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _default_gateway_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Checks:
    """Bounds the core applies before policy; part of the settings."""

    max_past_skew_s: float = 300.0  # older intents are ``expired``
    max_future_skew_s: float = 30.0  # intents from further ahead are ``clock_skew``


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Stream mode (SPEC §7): the intake consumer, the streams bus_guard creates, preflight.

    The retry horizon is the longest time during which bus_guard may publish an output or a
    ledger record again *relying on JetStream de-duplication* (publish retries, and adopting
    a recorded decision when its intent is redelivered). Every output and ledger stream must
    keep message ids at least that long (preflight refuses shorter windows); older decisions
    are re-published only after their exec stream was searched for the first copy.
    """

    ack_wait_s: float = 30.0  # redelivery of an intent a gateway took but did not ack
    max_ack_pending: int = 1024  # intents in flight over all replicas
    fetch_batch: int = 128  # intents per pull (and at most that many ledger records per commit)
    fetch_timeout_s: float = 1.0  # a pull waits at most this long for the first intent
    heartbeat_s: float = 0.25  # idle heartbeat of a waiting pull
    max_deliveries: int = 10  # poison bound: after this many deliveries, deny undecided intents
    nak_delay_s: float = 1.0  # redelivery delay after an output could not be stored
    publish_timeout_s: float = 5.0  # one ledger commit or output publish
    retry_horizon_s: float = 120.0
    duplicate_window_s: float = 600.0  # of the output and ledger streams bus_guard creates
    intake_duplicate_window_s: float = 0.1  # see README "Delivery guarantees": agents' ids
    replicas: int = 1  # of the streams bus_guard creates
    min_replicas: int = 1  # preflight refuses streams with fewer
    checkpoint_every: int = 1000  # ledger records between signed checkpoints ...
    checkpoint_interval_s: float = 10.0  # ... or seconds, whichever comes first
    lease_s: float = 15.0  # the gateway id's lease (one writer per chain), renewed every third
    max_lineage_depth: int = 32  # deeper chains of decisions are a lineage_violation
    # A child whose parent is not decided yet (not in the ledger) or held waits, nak'd and
    # looked at again every lineage_nak_delay_s, until lineage_wait_s after it was stored;
    # then it is denied lineage_violation. At most lineage_max_waiting intents wait at once
    # per gateway (beyond, they are decided now): a nak'd intent keeps its slot in the
    # consumer's max_ack_pending while it waits, so the others must keep room there.
    lineage_wait_s: float = 30.0
    lineage_nak_delay_s: float = 1.0
    lineage_max_waiting: int = 256
    hold_sweep_s: float = 5.0  # how often unresolved holds past their expiry are denied
    # Fairness (SCENARIOS S13): intents are pulled up to read_ahead ahead of deciding them,
    # queued per principal; while several principals are active, each adds at most
    # fair_quantum intents to a batch (0: strict arrival order, no read-ahead beyond a batch).
    fair_quantum: int = 4
    read_ahead: int = 256

    def problems(self) -> list[str]:
        counts = ("max_ack_pending", "fetch_batch", "max_deliveries", "checkpoint_every")
        out = [f"{name} must be positive" for name in counts if getattr(self, name) <= 0]
        if not 1 <= self.fetch_batch <= 999:
            out.append("fetch_batch must be 1..999 (a ledger commit is at most 1000 records)")
        durations = (
            "ack_wait_s",
            "fetch_timeout_s",
            "heartbeat_s",
            "nak_delay_s",
            "publish_timeout_s",
            "retry_horizon_s",
            "checkpoint_interval_s",
            "lease_s",
            "hold_sweep_s",
        )
        out += [f"{name} must be positive" for name in durations if not getattr(self, name) > 0]
        if self.heartbeat_s * 2 > self.fetch_timeout_s:
            out.append("heartbeat_s must be at most half of fetch_timeout_s")
        if self.duplicate_window_s < self.retry_horizon_s:
            out.append("duplicate_window_s must cover retry_horizon_s")
        if self.intake_duplicate_window_s < 0.1:
            out.append("intake_duplicate_window_s: JetStream's minimum is 0.1")
        if not 1 <= self.replicas <= 5 or self.min_replicas < 1:
            out.append("replicas must be 1..5 and min_replicas at least 1")
        if self.replicas < self.min_replicas:
            out.append("replicas is below min_replicas")
        if self.max_lineage_depth < 0:
            out.append("max_lineage_depth must not be negative")
        if not (math.isfinite(self.lineage_wait_s) and self.lineage_wait_s >= 0):
            out.append("lineage_wait_s must be a finite number >= 0")
        if not (math.isfinite(self.lineage_nak_delay_s) and self.lineage_nak_delay_s > 0):
            out.append("lineage_nak_delay_s must be positive")
        if self.fair_quantum < 0:
            out.append("fair_quantum must not be negative (0: arrival order)")
        if not self.fetch_batch <= self.read_ahead < self.max_ack_pending:
            out.append(
                "read_ahead must be fetch_batch..max_ack_pending - 1 (what a gateway reads "
                "ahead holds ack-pending slots)"
            )
        if not 0 <= self.lineage_max_waiting < self.max_ack_pending:
            out.append(
                "lineage_max_waiting must be 0..max_ack_pending - 1 (waiting intents hold "
                "ack-pending slots; the others need room)"
            )
        return out


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to know, with units in the names."""

    nats_url: str = "nats://127.0.0.1:4222"
    prefix: str = DEFAULT_PREFIX
    queue: str = "bus-guard"
    # As `bus-guard run`: durable JetStream intake, decided once, every decision in the
    # ledger. "core" is the at-most-once queue subscription (no JetStream needed).
    mode: IntakeMode = "stream"
    gateway_id: str = field(default_factory=_default_gateway_id)
    creds_file: str | None = None
    nkey_file: str | None = None  # an nkey seed file (nkey authentication)
    tls_cert_file: str | None = None  # a client certificate (with tls_key_file)
    tls_key_file: str | None = None
    tls_ca_file: str | None = None  # the CA that signed the server's certificate
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_nesting_depth: int = MAX_NESTING_DEPTH
    reply_inbox: ReplyInbox = "principal"
    deny_payload_bytes: int = 4096  # how much of a denied payload the deny record keeps
    artifact_ttl_s: float = 60.0
    checks: Checks = field(default_factory=Checks)
    pending_msgs_limit: int = 65536
    pending_bytes_limit: int = 64 * 1024 * 1024
    drain_timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 1.0
    max_reconnect_attempts: int = 10  # x reconnect_wait_s = the reconnect budget
    stream: StreamSettings = field(default_factory=StreamSettings)
    # SPEC §6: one signature per artifact, or one per Merkle tree of up to batch_max
    # artifacts. Stream mode signs each decided batch (chunks of batch_max); core mode
    # closes a batch when it is full, when no further intent is waiting, or batch_delay_ms
    # after its first intent, whichever comes first.
    artifacts: ArtifactMode = "per-message"
    batch_max: int = 256
    batch_delay_ms: float = 2.0
    # Answer $SRV.PING/INFO/STATS (the NATS micro service API) with identity and counters.
    micro_service: bool = True
    # Readiness: not ready once the active policy set is older than this (None: never).
    # Issue 12 makes such a set deny policy_stale; today it is the health check's alone.
    policy_max_age_s: float | None = None
    # Log each decision that stands (logger bus_guard.decisions, with its fields): none,
    # the denials and holds (would-deny included), or all.
    log_decisions: LogDecisions = "off"
    # A span per decision through the OpenTelemetry API (the otel extra), a child of the
    # agent's span when its intent carries a traceparent.
    otel: bool = False
    # How long every decided intent's bytes are kept, by decision id, in the key-value
    # bucket <prefix>-intents for `bus-guard replay` and `policy impact` (README, "Replay");
    # 0: not kept.
    intent_retention_s: float = 7 * 86400.0
    # Every subject, stream and bucket name under `prefix` (derived, not a setting).
    subjects: Subjects = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not all(_TOKEN_RE.fullmatch(t) for t in self.prefix.split(".")):
            raise ConfigError(f"prefix {self.prefix!r}: must be dot-separated [A-Za-z0-9_-] tokens")
        object.__setattr__(self, "subjects", Subjects(self.prefix))
        if not _TOKEN_RE.fullmatch(self.gateway_id):
            raise ConfigError(f"gateway_id {self.gateway_id!r}: must be 1-64 [A-Za-z0-9_-]")
        if self.reply_inbox not in ("principal", "any"):
            raise ConfigError(f"reply_inbox {self.reply_inbox!r}: must be 'principal' or 'any'")
        if self.mode not in ("core", "stream"):
            raise ConfigError(f"mode {self.mode!r}: must be 'core' or 'stream'")
        if problems := self.stream.problems():
            raise ConfigError("stream settings: " + "; ".join(problems))
        for name in ("max_payload_bytes", "max_nesting_depth", "pending_msgs_limit"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.stream.lineage_wait_s >= self.checks.max_past_skew_s:
            raise ConfigError(
                "stream.lineage_wait_s must be below checks.max_past_skew_s: a child that "
                "waited that long for its parent would be denied expired"
            )
        if self.artifact_ttl_s <= 0 or self.drain_timeout_s <= 0:
            raise ConfigError("artifact_ttl_s and drain_timeout_s must be positive")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file go together")
        if self.policy_max_age_s is not None and not self.policy_max_age_s > 0:
            raise ConfigError("policy_max_age_s must be positive")
        if self.log_decisions not in ("off", "denied", "all"):
            raise ConfigError(f"log_decisions {self.log_decisions!r}: off, denied or all")
        if not (math.isfinite(self.intent_retention_s) and self.intent_retention_s >= 0):
            raise ConfigError("intent_retention_s must be 0 (off) or a positive number")
        if self.artifacts not in ("per-message", "batched"):
            raise ConfigError(f"artifacts {self.artifacts!r}: must be 'per-message' or 'batched'")
        if not (isinstance(self.batch_max, int) and 1 <= self.batch_max <= _MAX_BATCH):
            raise ConfigError(f"batch_max must be within 1..{_MAX_BATCH}, got {self.batch_max!r}")
        if not (math.isfinite(self.batch_delay_ms) and 0 < self.batch_delay_ms <= 1000):
            raise ConfigError(f"batch_delay_ms must be in (0, 1000], got {self.batch_delay_ms!r}")


MAX_BUNDLE_BYTES: Final = 8 << 20  # a policy bundle's content: eight of the largest files


@dataclass(frozen=True, slots=True)
class PolicySourceSettings:
    """Where the gateway's policies come from and how the active set is kept (``bus-guard
    run``'s ``--policies``, ``--policy-*`` and ``--deployment``; README, "Policy reload")."""

    directory: Path | None = None  # None: signed bundles from the bus
    nats_url: str | None = None  # the bus: these servers (None: the gateway's own)
    publishers_file: Path | None = None  # the bus: the JWKS of the trusted publishers
    deployment: str | None = None  # the bus: bundles must name it (None: the prefix)
    max_age_s: float | None = None  # past it, deny policy_stale; None: never stale
    poll_s: float = 1.0  # how often the source is looked at
    max_bundle_bytes: int = MAX_BUNDLE_BYTES
    # how often the active set's canaries run through the gateway's path (0: never)
    canary_interval_s: float = 10.0
    # a constitution (README, "Constitution"): from the bus, signed by at least
    # constitution_quorum of the keys in this JWKS; None: no constitution layer
    constitution_keys_file: Path | None = None
    constitution_quorum: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.canary_interval_s) and self.canary_interval_s >= 0):
            raise ConfigError("the canary interval must be 0 (off) or a number of seconds")
        if (self.constitution_keys_file is None) != (self.constitution_quorum == 0):
            raise ConfigError(
                "a constitution needs both its keys (--constitution-keys FILE) and a quorum "
                "(--constitution-quorum M)"
            )
        if self.constitution_quorum < 0:
            raise ConfigError("the constitution quorum must be positive")
        if self.directory is None and self.publishers_file is None:
            raise ConfigError(
                "policies from the bus need the trusted publishers' keys (--policy-keys FILE)"
            )
        if self.max_age_s is not None and not (
            math.isfinite(self.max_age_s) and self.max_age_s > 0
        ):
            raise ConfigError("the policy maximum age must be a positive number of seconds")
        if not (math.isfinite(self.poll_s) and self.poll_s > 0):
            raise ConfigError("the policy poll interval must be a positive number of seconds")
        if self.max_bundle_bytes <= 0:
            raise ConfigError("the policy bundle size limit must be positive")
