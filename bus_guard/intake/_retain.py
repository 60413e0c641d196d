"""Retaining every decided intent's bytes (README, "Replay"): the bucket and the outputs.

The wire format is :mod:`bus_guard.ledger._intents`'. Stream mode stores a batch's
retained intents while it publishes the batch's outputs, concurrently, with one PubAck for
the batch (:func:`retain_batch`), and acks an intent only once it is stored too: every
acked intent is retained. Core mode publishes it after the
outputs without waiting for an answer (at most once, like core mode itself).

The bucket is created, when missing, with ``max_age`` = the retention; an existing one
keeps its own (``nats stream edit KV_<prefix>-intents --max-age`` changes it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from bus_guard.ledger._intents import intents_bucket, retained_output
from bus_guard.ledger._records import LedgerRecord
from bus_guard.pipeline import Outcome, Output, PolicySetLike
from bus_guard.policy._bundle import StaleSet
from bus_guard.policy._constitution import LayeredSet
from bus_guard.settings import Settings

__all__ = ("IntentRetainer", "ensure_intents_bucket", "layers_of")

log = logging.getLogger(__name__)

_STREAM_DESCRIPTION: Final = "bus_guard: retained intents, by decision id (bus-guard replay)"


def layers_of(policies: PolicySetLike) -> tuple[str, str]:
    """The digests of the constitution and of the ordinary set in force in *policies*
    (``("", "")`` without a constitution)."""
    if isinstance(policies, StaleSet):
        policies = policies.stale
    if isinstance(policies, LayeredSet):
        return policies.constitution.digest, policies.ordinary.digest
    return "", ""


def intents_stream_config(settings: Settings) -> StreamConfig:
    """The stream behind the bucket: a key-value bucket (one value per decision id) whose
    values expire after the retention."""
    bucket = intents_bucket(settings.prefix)
    retention = settings.intent_retention_s
    return StreamConfig(
        name=f"KV_{bucket}",
        description=_STREAM_DESCRIPTION,
        subjects=[f"$KV.{bucket}.>"],
        storage=StorageType.FILE,
        num_replicas=settings.stream.replicas,
        max_msgs_per_subject=1,
        max_age=retention,
        discard=DiscardPolicy.NEW,
        duplicate_window=min(settings.stream.duplicate_window_s, retention),
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
    )


async def ensure_intents_bucket(js: JetStreamContext, settings: Settings) -> None:
    """Create the retained-intents bucket if it is missing; raises ``nats.errors.Error``."""
    config = intents_stream_config(settings)
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        log.info(
            "created key-value bucket %s: retained intents for %g s",
            intents_bucket(settings.prefix),
            settings.intent_retention_s,
        )
        return
    if info.config.max_age != config.max_age:
        log.warning(
            "bucket %s keeps intents for %s s, not the configured %g s (it was created so)",
            intents_bucket(settings.prefix),
            info.config.max_age,
            settings.intent_retention_s,
        )


@dataclass
class IntentRetainer:
    """Builds the message that retains a decided intent (see the module docstring)."""

    settings: Settings
    failures: int = 0  # intents not retained: too large, or nats-py refused to send them
    # What one retained message may take (the server's max_payload, less room for the
    # protocol line); set from the connection at start.
    max_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        self.bucket = intents_bucket(self.settings.prefix)

    def retained(
        self,
        record: Outcome | LedgerRecord,
        payload: bytes,
        headers: Mapping[str, str] | None,
        policies: PolicySetLike,
    ) -> Output | None:
        """:meth:`output`, or ``None`` (counted, logged) when it cannot be built or would
        not fit in a message: an intent is never held back by its retention."""
        try:
            out = self.output(record, payload, headers, policies)
        except Exception:  # a bug: the decision stands, its bytes are not retained
            self.failures += 1
            log.exception("the intent of %s cannot be retained", record.decision_id)
            return None
        _, subject, data, fields = out
        size = len(subject) + len(data) + sum(len(k) + len(v) + 4 for k, v in fields.items())
        if size > self.max_bytes:
            self.failures += 1
            log.warning(
                "the intent of %s is not retained: %d bytes with its record, more than %d",
                record.decision_id,
                size,
                self.max_bytes,
            )
            return None
        return out

    def output(
        self,
        record: Outcome | LedgerRecord,
        payload: bytes,
        headers: Mapping[str, str] | None,
        policies: PolicySetLike,
    ) -> Output:
        """The retained intent of *record*; *policies*: the set it was decided with (its
        constitution is named, if it has one)."""
        return retained_output(
            record, payload, headers, bucket=self.bucket, layers=layers_of(policies)
        )


async def retain_batch(
    nc: Client, js: JetStreamContext, outs: Sequence[Output], *, timeout_s: float
) -> bool:
    """Store a batch's retained intents (stream mode); whether all of them are stored.

    All but the last go out as plain publishes, the last as a JetStream publish whose
    PubAck is awaited: the server takes one connection's messages in order, and a stream
    stores what reaches it in order, so the last one's PubAck says every earlier one was
    processed too. One PubAck per batch instead of
    one per intent: a PubAck costs the client ~40 µs, a plain publish a few. No PubAck
    (timeout, no stream): ``False``, and the batch's intents are not acked (they come
    back, adopt their decisions and are retained then, over the same key).
    """
    if not outs:
        return True
    try:
        for _, subject, data, headers in outs[:-1]:
            await nc.publish(subject, data, headers=headers)
        _, subject, data, headers = outs[-1]
        await js.publish(subject, data, timeout=timeout_s, headers=headers)
    except (nats.errors.Error, ValueError, TypeError) as exc:
        log.warning("%d retained intents not stored: %r", len(outs), exc)
        return False
    return True


async def start_retention(
    js: JetStreamContext, settings: Settings, *, max_payload: int
) -> IntentRetainer | None:
    """The retainer, with its bucket ensured; ``None`` when retention is off. Raises
    ``nats.errors.Error`` when the bucket cannot be created."""
    if settings.intent_retention_s <= 0:
        return None
    await ensure_intents_bucket(js, settings)
    return IntentRetainer(settings, max_bytes=max_payload - 512)
