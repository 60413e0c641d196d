"""Stream mode's streams and consumer: what bus_guard creates, and what it refuses to use.

bus_guard creates the streams and the durable consumer it needs when they do not exist.
When they do, it checks them before it takes a single intent (SCENARIOS S15) and refuses to
start, naming every problem, on any setting that would lose an intent, decide one twice or
let the evidence be edited:

intake (``<prefix>.in.>``)
    ``discard: old`` (a full stream drops accepted, undecided intents), a ``max_age``,
    per-message TTLs (``allow_msg_ttl``) or rollups (``allow_rollup_hdrs``: one
    ``Nats-Rollup`` header purges every undecided intent on a subject).
outputs (exec, deny, hold) and the ledger
    a de-dup window shorter than the retry horizon (a retried publish would be stored twice).
the ledger
    deletes or purges allowed (``deny_delete`` / ``deny_purge`` false), any way for records to
    age out (``max_age``, TTLs, rollups, ``discard: old`` with limits), no atomic batches or
    direct gets (bus_guard commits records with one and finds decisions with the other).
every stream
    fewer replicas than the configured minimum; subjects that do not cover its role.
the consumer
    not a pull consumer with explicit acks on the whole intake, or a bounded
    ``max_deliver`` (the server would drop an intent after N deliveries, undecided: bus_guard
    bounds attempts itself and *denies* a poison intent).
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from bus_guard.errors import ConfigError
from bus_guard.intake._lease import ensure_registry
from bus_guard.intake._limits import ensure_bucket
from bus_guard.settings import Settings
from bus_guard.subjects import ROLES, Role, Streams

# ROLES and Streams live in bus_guard.subjects; re-exported for the modules that import
# them from here.
__all__ = ("ROLES", "Streams", "check_consumer", "check_stream", "ensure", "wanted_stream")

log = logging.getLogger(__name__)


def wanted_stream(role: Role, settings: Settings) -> StreamConfig:
    """The configuration bus_guard creates a missing stream with."""
    s = settings.stream
    streams = settings.subjects.streams
    config = StreamConfig(
        name=streams.name(role),
        subjects=[streams.subject(role)],
        storage=StorageType.FILE,
        num_replicas=s.replicas,
        discard=DiscardPolicy.NEW,
        duplicate_window=s.duplicate_window_s,
        allow_direct=True,
    )
    if role == "intake":
        config.retention = RetentionPolicy.WORK_QUEUE
        config.duplicate_window = s.intake_duplicate_window_s
        config.description = "bus_guard: intents, until decided"
    elif role == "approve":
        config.retention = RetentionPolicy.WORK_QUEUE
        config.duplicate_window = s.intake_duplicate_window_s
        config.description = "bus_guard: approvers' votes on holds, until recorded"
    elif role == "ledger":
        config.deny_delete = True
        config.deny_purge = True
        config.allow_atomic = True
        config.description = "bus_guard: hash-chained decision records"
    else:
        config.allow_atomic = True  # a batch's outputs go out in one request
        config.description = f"bus_guard: {role} outputs"
    return config


def check_stream(role: Role, config: StreamConfig, settings: Settings) -> list[str]:
    """Why *config* is unusable for *role* (empty when it is fine). Pure."""
    s = settings.stream
    want = settings.subjects.streams.subject(role)
    problems = []
    replicas = config.num_replicas or 1
    if replicas < s.min_replicas:
        problems.append(f"{replicas} replica(s), fewer than the required {s.min_replicas}")
    if want not in (config.subjects or []):
        problems.append(f"subjects {config.subjects} do not include {want!r}")
    if config.sealed:
        problems.append("sealed: nothing can be stored")
    discards_old = config.discard in (None, DiscardPolicy.OLD)
    ages_out = bool(config.max_age) or bool(config.allow_msg_ttl) or config.allow_rollup_hdrs
    if role in ("intake", "approve"):
        if discards_old:
            problems.append("discard=old: a full stream would drop accepted, undecided intents")
        if config.max_age:
            problems.append(f"max_age={config.max_age:g}s: undecided intents would expire")
        if config.allow_msg_ttl:
            problems.append("allow_msg_ttl: undecided intents could expire")
        if config.allow_rollup_hdrs:
            problems.append("allow_rollup_hdrs: a Nats-Rollup header would purge intents")
        return problems
    window = config.duplicate_window or 120.0  # the server's default when unset
    if window < s.retry_horizon_s:
        problems.append(
            f"de-dup window {window:g}s is shorter than the retry horizon "
            f"{s.retry_horizon_s:g}s: a retried publish could be stored twice"
        )
    if role == "ledger":
        if not config.deny_delete:
            problems.append("deny_delete=false: records could be deleted")
        if not config.deny_purge:
            problems.append("deny_purge=false: the ledger could be purged")
        if ages_out:
            problems.append("max_age, allow_msg_ttl or allow_rollup_hdrs: records could vanish")
        limited = (config.max_msgs or 0) > 0 or (config.max_bytes or 0) > 0
        if discards_old and limited:
            problems.append("discard=old with limits: old records would be dropped")
        if not config.allow_atomic:
            problems.append("allow_atomic=false: bus_guard commits records in atomic batches")
        if not config.allow_direct:
            problems.append("allow_direct=false: bus_guard looks decisions up with direct gets")
    return problems


def check_consumer(config: ConsumerConfig, settings: Settings) -> list[str]:
    """Why an existing intake consumer is unusable (empty when it is fine). Pure."""
    want = settings.subjects.streams.subject("intake")
    problems = []
    if config.deliver_subject:
        problems.append("a push consumer: bus_guard pulls")
    if config.ack_policy != AckPolicy.EXPLICIT:
        problems.append(f"ack_policy={config.ack_policy}: bus_guard acks each intent explicitly")
    if config.max_deliver not in (None, -1, 0):
        problems.append(
            f"max_deliver={config.max_deliver}: the server would drop an intent undecided"
        )
    filters = config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])
    if filters and filters != [want]:
        problems.append(f"filter {filters} is not {want!r}")
    return problems


async def _stream(js: JetStreamContext, role: Role, settings: Settings) -> list[str]:
    name = settings.subjects.streams.name(role)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(wanted_stream(role, settings))
        log.info("created stream %s", name)
        return []
    window = info.config.duplicate_window or 120.0
    if role == "intake" and window > 1.0:
        log.warning(
            "stream %s keeps agents' Nats-Msg-Id for %gs; ids de-duplicate across principals, "
            "so one agent can make another's intent a duplicate: prefer 0.1s (README, "
            "Delivery guarantees)",
            name,
            window,
        )
    return [f"stream {name}: {p}" for p in check_stream(role, info.config, settings)]


async def ensure(js: JetStreamContext, settings: Settings) -> None:
    """Create what is missing, check what exists; :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    for role in ROLES:
        problems += await _stream(js, role, settings)
    s = settings.stream
    streams = settings.subjects.streams
    if not problems:
        try:
            info = await js.consumer_info(streams.intake, settings.queue)
        except NotFoundError:
            await js.add_consumer(
                streams.intake,
                ConsumerConfig(
                    durable_name=settings.queue,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=s.ack_wait_s,
                    max_deliver=-1,
                    max_ack_pending=s.max_ack_pending,
                    filter_subject=streams.subject("intake"),
                    description="bus_guard gateways: every replica pulls from here",
                ),
            )
            log.info("created consumer %s on %s", settings.queue, streams.intake)
        else:
            problems += [
                f"consumer {settings.queue} on {streams.intake}: {p}"
                for p in check_consumer(info.config, settings)
            ]
        votes = f"{settings.queue}-approve"
        try:
            await js.consumer_info(streams.approve, votes)
        except NotFoundError:
            await js.add_consumer(
                streams.approve,
                ConsumerConfig(
                    durable_name=votes,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=s.ack_wait_s,
                    max_deliver=-1,
                    filter_subject=streams.subject("approve"),
                    description="bus_guard gateways: approvers' votes on holds",
                ),
            )
            log.info("created consumer %s on %s", votes, streams.approve)
        await ensure_bucket(js, streams.limits_bucket, replicas=s.replicas)
        await ensure_registry(js, streams.gateways_bucket, replicas=s.replicas)
    if problems:
        raise ConfigError("stream mode refused to start (preflight):\n  " + "\n  ".join(problems))
