"""The gateway: one process's connection to NATS and its intake, in either mode.

NATS in → decode → authorize → sign → publish (exec | deny | hold) → (reply | ack).

* ``core``: a queue-group subscription, at-most-once like core NATS (:mod:`bus_guard.intake._core`).
* ``stream`` (the default of ``bus-guard run``): the streams and the consumer are checked or
  created (:mod:`bus_guard.intake._preflight`), then one task pulls from the durable consumer that
  every replica shares and decides each intent exactly once, with a ledger record
  (:mod:`bus_guard.intake._stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Self
from urllib.parse import unquote, urlsplit

import anyio
import msgspec
import nats
import nats.js.errors
from anyio import AsyncContextManagerMixin
from anyio.abc import TaskGroup
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from bus_guard import __version__
from bus_guard.errors import ConfigError, GatewayError
from bus_guard.intake._approvals import Approvals
from bus_guard.intake._auth import auth_kwargs
from bus_guard.intake._client import GuardClient
from bus_guard.intake._core import CoreIntake
from bus_guard.intake._limits import LimitStore
from bus_guard.intake._preflight import ensure
from bus_guard.intake._retain import IntentRetainer, start_retention
from bus_guard.intake._service import GatewayService, status_document
from bus_guard.intake._stream import StreamIntake
from bus_guard.intake._tally import DecisionTally, TallySnapshot
from bus_guard.intake._trace import DecisionSpans
from bus_guard.ledger._records import CheckpointSigner
from bus_guard.pipeline import MAX_HEADER_BYTES, PolicySetLike, Standing
from bus_guard.server import server_version_problem
from bus_guard.settings import Settings
from bus_guard.signing._signer import Signer
from bus_guard.verify import Jwks, load_jwks

__all__ = ("Gateway", "GatewayStatistics", "round_trip")

log = logging.getLogger(__name__)


class UrlCredentials(NamedTuple):
    user: str | None = None
    password: str | None = None
    token: str | None = None


def url_credentials(servers: list[str]) -> UrlCredentials:
    """The user and password (or token) of the first of *servers* that has any, as
    ``nats.connect`` options: nats-py uses a URL's credentials for that URL only, so a
    server discovered from the cluster (or a second URL written without them) would get
    none, be refused ("Authorization Violation"), and a failover would fail."""
    for url in servers:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if parts.username and parts.password is not None:
            return UrlCredentials(unquote(parts.username), unquote(parts.password))
        if parts.username:
            return UrlCredentials(token=unquote(parts.username))
    return UrlCredentials()


# How long a starting stream-mode gateway waits for JetStream to answer its preflight.
_PREFLIGHT_WAIT_S: Final = 15.0

# --log-decisions: off, the denials and holds (would-deny included), all.
_LOG_DECISIONS: Final = {"off": 0, "denied": 1, "all": 2}
_LOG_ALL: Final = 2
decisions_log = logging.getLogger("bus_guard.decisions")


def _log_decision(record: Standing) -> None:
    """One line per decision, its fields as the log record's attributes (JSON logs:
    top-level fields; the text format shows the message)."""
    effect = "would-deny" if record.would_deny else record.effect
    decisions_log.info(
        "%s %s %s %s %s id=%s",
        effect,
        record.reason,
        record.principal or "?",
        record.action or record.subject,
        ",".join(record.rules) or "-",
        record.decision_id,
        extra={
            "decision_id": record.decision_id,
            "effect": record.effect,
            "would_deny": record.would_deny,
            "reason": record.reason,
            "principal": record.principal,
            "action": record.action,
            "resource": record.resource,
            "rules": list(record.rules),
            "intent_id": record.intent_id,
            "gateway": record.gateway,
            "policy_digest": record.policy_digest,
            "policy_version": record.policy_version,
        },
    )


# A slow-consumer flood drops intents by the thousand: the first drop is logged, then at most
# one summary line per this many seconds (every drop is counted in statistics()).
_DROP_LOG_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class GatewayStatistics:
    received: int = 0
    allowed: int = 0
    denied: int = 0
    held: int = 0
    would_deny: int = 0
    internal_errors: int = 0  # handler or signing failures, each recorded as a denial
    publish_failures: int = 0  # outputs that could not be handed to NATS
    replies_sent: int = 0
    replies_refused: int = 0  # reply subjects outside the allowed inbox prefixes
    slow_consumer_drops: int = 0  # intents the server or client dropped: never decided
    reconnects: int = 0
    # stream mode
    batches: int = 0  # pulled batches decided (received / batches: their mean size)
    adopted: int = 0  # redelivered intents that took their recorded decision
    replays: int = 0  # new messages reusing a decided intent id (denied)
    ledger_records: int = 0
    ledger_refusals: int = 0  # commits refused because an id was taken (then resolved)
    ledger_in_doubt: int = 0  # commits without an answer (retried identically)
    acks: int = 0
    naks: int = 0  # intents sent back undecided or with outputs not stored
    duplicate_outputs: int = 0  # outputs stored before (a crash, a lost PubAck): kept once
    late_adoptions: int = 0  # adopted past the retry horizon: exec stream searched first
    undeliverable: int = 0  # outputs refused by the server max_deliveries times: terminated
    artifact_batches: int = 0  # batched artifacts: signed tree heads (one per batch)
    forged_parents: int = 0  # parent records that claimed an allow and did not verify
    lineage_waits: int = 0  # naks of children waiting for a parent not decided yet or held
    lineage_waiting: int = 0  # children waiting now (at most stream.lineage_max_waiting)
    # approvals (stream mode)
    votes: int = 0  # approvers' votes recorded
    votes_refused: int = 0  # votes refused (each recorded as a denial)
    holds_released: int = 0  # holds released at quorum (by this gateway)
    holds_rejected: int = 0
    holds_expired: int = 0
    forged_resolutions: int = 0  # hold resolutions in the ledger that did not verify
    # limits (both modes)
    limit_failures: int = 0  # batches of allows denied: the limit store could not say
    limit_conflicts: int = 0  # compare-and-set writes lost to another gateway (retried)
    limit_cached_denials: int = 0  # limits full in the local cache: denied without I/O
    # retained intents (README, "Replay"): decided, but their bytes not retained (too large
    # for a message with their record, or refused by nats-py: core mode)
    intents_unretained: int = 0


@dataclass(slots=True)
class _Counters:
    received: int = 0
    allowed: int = 0
    denied: int = 0
    held: int = 0
    would_deny: int = 0
    internal_errors: int = 0
    publish_failures: int = 0
    replies_sent: int = 0
    replies_refused: int = 0
    slow_consumer_drops: int = 0
    reconnects: int = 0
    replays: int = 0
    artifact_batches: int = 0


class Gateway(AsyncContextManagerMixin):
    """One gateway process's worth of intake. An async context manager.

    Entering connects, subscribes and confirms the subscription with the server (ready);
    leaving drains: intents already received are decided before the connection closes.
    ``closed`` is set when the connection is gone for good (the reconnect budget ran out).
    """

    def __init__(
        self,
        settings: Settings,
        policies: PolicySetLike,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.time,
        ledger_signer: CheckpointSigner | None = None,
        trusted_keys: Jwks | None = None,
    ) -> None:
        """*ledger_signer* signs the ledger's checkpoints (stream mode); it should hold the
        key of *signer*, so that the same JWKS verifies artifacts and the ledger.
        *trusted_keys* (stream mode): the JWKS whose keys' artifacts make a parent decision's
        ledger record count (default: *signer*'s key alone; see ``bus-guard run --jwks``)."""
        if settings.mode == "stream" and ledger_signer is None:
            raise ConfigError("stream mode needs a ledger_signer for the ledger checkpoints")
        self.settings = settings
        self._policies = policies
        self._signer = signer
        self._clock = clock
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._counters = _Counters()
        self._tally = DecisionTally()
        self._log_decisions = _LOG_DECISIONS[settings.log_decisions]
        self._spans = DecisionSpans() if settings.otel else None
        self._started_at = time.monotonic()
        # When the active policy set became active (monotonic): readiness judges its age.
        self.policies_since = self._started_at
        self._service: GatewayService | None = None
        self._ready = False  # intake confirmed by the server, and not stopping
        self._closing = False  # our own drain/close: a disconnect then is no news
        self._drops_unlogged = 0  # slow-consumer drops not yet in a log line
        self._drops_logged_at = -_DROP_LOG_INTERVAL_S  # monotonic time of the last such line
        self._drops_summary: asyncio.TimerHandle | None = None
        self.closed = anyio.Event()
        self.failure: BaseException | None = None  # why stream intake stopped, if it did
        self._ledger_signer = ledger_signer
        self._trusted_keys = trusted_keys
        self._intake: StreamIntake | None = None
        self._core: CoreIntake | None = None  # batched core mode (its flusher to stop)
        self._core_intake: CoreIntake | None = None
        self._approvals: Approvals | None = None
        self._approvals_done = anyio.Event()
        self._stop = anyio.Event()
        self._loop_done = anyio.Event()
        self._unready: dict[str, str] = {}  # who holds readiness off -> why (canaries)

    # -- lifecycle -------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        """Entering connects, starts the intake and confirms it with the server (ready);
        leaving drains. The task group lives exactly as long as the context, and nothing
        runs in it before the start-up succeeded: a start that fails halfway closes the
        connection and raises its own error."""
        nc = await self._connect()
        started = False
        try:
            await self._start(nc)
            started = True
            self._ready = True
            try:
                async with anyio.create_task_group() as tg:
                    self._spawn(tg)
                    try:
                        yield self
                    finally:
                        self._closing = True  # the handler keeps its connection while draining
                        self._ready = False
                        with anyio.CancelScope(shield=True):
                            await self._stop_service()
                            await self._stop_intake(nc, tg)
            except BaseExceptionGroup as group:
                # Our tasks never raise (they record why they stopped in ``failure``), so a
                # group here holds the caller's own exception: raise it as they raised it.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            self._ready = False
            with anyio.CancelScope(shield=True):
                await self._stop_service()
                await self._close_connection(nc, drain=started)
        log.info("gateway %s stopped: %s", self.settings.gateway_id, self.statistics())

    async def _connect(self) -> Client:
        s = self.settings
        files = auth_kwargs(
            creds=s.creds_file,
            nkey=s.nkey_file,
            tls_cert=s.tls_cert_file,
            tls_key=s.tls_key_file,
            tls_ca=s.tls_ca_file,
        )
        try:
            self._nc = nc = GuardClient()
            servers = [u.strip() for u in s.nats_url.split(",") if u.strip()]
            auth = url_credentials(servers)
            await nc.connect(
                servers,
                name=f"bus-guard {s.gateway_id}",
                # Servers learned from the cluster come without the seed URL's user and
                # password: given as options, they hold for every server (a URL's own win).
                user=auth.user,
                password=auth.password,
                token=auth.token,
                connect_timeout=max(1, round(s.connect_timeout_s)),
                # nats-py annotates an int; it sleeps for whatever it is given
                reconnect_time_wait=s.reconnect_wait_s,  # type: ignore[arg-type]
                max_reconnect_attempts=s.max_reconnect_attempts,
                drain_timeout=max(1, round(s.drain_timeout_s)),
                error_cb=self._on_error,
                closed_cb=self._on_closed,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                **files,
            )
        except Exception as exc:
            raise GatewayError(f"cannot connect to {s.nats_url}: {exc}") from exc
        return self._nc

    async def _start(self, nc: Client) -> None:
        s = self.settings
        _check_max_payload(s, nc.max_payload)
        if s.mode == "stream":
            await self._start_stream(nc)
        else:
            await self._start_core(nc)
        if s.micro_service:
            await self._start_service(nc)
        how = f"consumer {s.queue}, stream mode" if s.mode == "stream" else f"queue {s.queue}"
        log.info("gateway %s ready on %s (%s)", s.gateway_id, s.subjects.wildcard("in"), how)

    def _spawn(self, tg: TaskGroup) -> None:
        """The intake's long-lived tasks: stream mode's loop, batched core mode's flusher
        (intents taken before it starts wait in its batch for it)."""
        stop = self._stop
        if self._intake is not None:
            pull = functools.partial(self._intake.run, stop)
            tg.start_soon(self._run, "stream intake", pull, self._loop_done)
        elif self._core is not None:
            flush = self._core.run_flusher
            tg.start_soon(self._run, "artifact batch flusher", flush, self._loop_done)
        if self._approvals is not None:  # stream mode: votes on holds
            votes = functools.partial(self._approvals.run, stop)
            tg.start_soon(self._run, "approvals", votes, self._approvals_done)

    async def _start_core(self, nc: Client) -> None:
        s = self.settings
        await self._refuse_beside_an_intake_stream(nc)
        core = CoreIntake(
            nc,
            s,
            # The active policies, read once per intent: a C-level getattr, not a lambda's
            # Python frame (callgrind, core mode: ~0.4k instructions less per intent).
            functools.partial(getattr, self, "_policies"),
            self._signer,
            self._clock,
            self._counters,
            self._count,
            LimitStore(
                nc.jetstream(timeout=s.stream.publish_timeout_s),
                s.subjects.streams.limits_bucket,
                timeout_s=s.stream.publish_timeout_s,
                replicas=s.stream.replicas,
            ),
        )
        core.retainer = await self._retention(nc, required=False)
        self._sub = await nc.subscribe(
            s.subjects.wildcard("in"),
            queue=s.queue,
            cb=core.on_intent,
            pending_msgs_limit=s.pending_msgs_limit,
            pending_bytes_limit=s.pending_bytes_limit,
        )
        core.sub = self._sub
        self._core_intake = core
        await round_trip(nc, timeout_s=s.connect_timeout_s)
        if core.batched:
            self._core = core

    async def _retention(self, nc: Client, *, required: bool) -> IntentRetainer | None:
        """The retainer of decided intents (README, "Replay"), its bucket ensured; ``None``
        when retention is off, or (core mode: not *required*) when there is no JetStream
        to keep them in (a warning says so)."""
        s = self.settings
        try:
            js = nc.jetstream(timeout=s.connect_timeout_s)
            return await start_retention(js, s, max_payload=nc.max_payload)
        except nats.errors.Error as exc:
            if required:
                raise GatewayError(
                    f"cannot create the retained-intents bucket: {exc!r} "
                    "(--intent-retention 0 turns retention off)"
                ) from exc
            log.warning(
                "intents are not retained (no JetStream bucket for them: %r); "
                "bus-guard replay and policy impact will not find this gateway's decisions",
                exc,
            )
            return None

    async def _refuse_beside_an_intake_stream(self, nc: Client) -> None:
        """A core-mode gateway must not start where a stream captures the intake: agents'
        requests would be answered by the stream (a PubAck, not a decision) and the intents
        decided again by any stream-mode gateway: twice, under two decision ids."""
        s = self.settings
        intake = s.subjects.wildcard("in")
        try:
            reply = await nc.request(
                "$JS.API.STREAM.NAMES",
                msgspec.json.encode({"subject": intake}),
                timeout=s.connect_timeout_s,
            )
            names = msgspec.json.decode(reply.data).get("streams") or []
        except nats.errors.NoRespondersError:
            return  # no JetStream here: nothing can capture the intake
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError, AttributeError) as exc:
            raise GatewayError(
                f"core mode: cannot tell whether a stream captures {intake} ({exc!r}); "
                "refusing to start rather than decide intents a stream also keeps"
            ) from exc
        if names:
            raise GatewayError(
                f"core mode: stream {', '.join(map(str, names))} captures {intake} on this "
                "server: agents' intents are kept there for stream-mode gateways, and a "
                "core-mode gateway beside it would decide them a second time. Run --mode "
                "stream, or remove the stream if no stream-mode gateway uses it"
            )

    async def _start_stream(self, nc: Client) -> None:
        assert self._ledger_signer is not None
        version = nc.connected_server_version
        problem = server_version_problem(f"{version.major}.{version.minor}.{version.patch}")
        if problem is not None:
            where = nc.connected_url
            at = f"{where.hostname}:{where.port}" if where is not None else "?"
            raise GatewayError(f"{problem} (at {at})")
        js = nc.jetstream(timeout=self.settings.connect_timeout_s)
        # A cluster electing its JetStream leaders answers 503s and timeouts for a few
        # seconds (a rolling restart, a node just killed): try again for a bound, then say
        # what the two usual causes are.
        deadline = time.monotonic() + _PREFLIGHT_WAIT_S
        delay = 0.1
        while True:
            try:
                await ensure(js, self.settings)
                break
            except nats.errors.Error as exc:
                # No responders: this server has no JetStream for us at all (not a leader
                # election, which answers 503s and times out): no use waiting.
                # (nats-py reports no responders to a JetStream API request as a 503
                # without an error code; a JetStream that is electing gives one.)
                no_js = isinstance(exc, nats.errors.NoRespondersError) or (
                    isinstance(exc, nats.js.errors.ServiceUnavailableError) and exc.err_code is None
                )
                waiting = not no_js
                if waiting and time.monotonic() + delay < deadline:
                    log.info("JetStream not answering yet (%r); retrying", exc)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                raise GatewayError(
                    f"stream mode needs JetStream at {self.settings.nats_url}, and it did not "
                    f"answer for {_PREFLIGHT_WAIT_S:g} s (last: {exc!r}): is JetStream enabled "
                    "(nats-server -js) and, on a cluster, does it have a meta leader? (or run "
                    "--mode core)"
                ) from exc
        intake = StreamIntake(
            nc,
            self.settings,
            lambda: self._policies,
            self._signer,
            self._ledger_signer,
            self._clock,
            self._count,
            trusted_keys=self._trusted_keys,
            retainer=await self._retention(nc, required=True),
        )
        await intake.start()
        approvals = Approvals(
            nc,
            self.settings,
            intake.recorder,
            intake.publisher,
            lambda: self._policies,
            self._clock,
        )
        await approvals.start()
        await round_trip(nc, timeout_s=self.settings.connect_timeout_s)
        self._intake = intake
        self._approvals = approvals

    async def _run(self, what: str, run: Callable[[], Awaitable[None]], done: anyio.Event) -> None:
        """One of the intake's long-lived tasks. Whatever stops it (a chain in doubt, a lost
        bus, a bug) stops the gateway: recorded in ``failure``, never a forward or release."""
        try:
            await run()
        except Exception as exc:
            log.exception("%s stopped", what)
            self.failure = exc
            self.closed.set()
        finally:
            done.set()

    def _count(self, record: Standing) -> None:
        """Every decision that stands, in either mode, is counted here once."""
        # Allows first: the common case reads two fields, not three (a replay is a denial:
        # replay is no policy reason, so observe mode never lets one through).
        counters = self._counters
        effect = record.effect
        now = self._clock()
        self._tally.decided(effect, record.reason, now - record.ts)
        if self._spans is not None:
            self._spans.decided(record, now)
        if self._log_decisions and (
            effect != "allow" or record.would_deny or self._log_decisions == _LOG_ALL
        ):
            _log_decision(record)
        if effect == "allow":
            counters.allowed += 1
            counters.would_deny += record.would_deny
            return
        if record.reason == "replay":
            counters.replays += 1
        if effect == "hold":
            counters.held += 1
        else:
            counters.denied += 1

    async def _stop_intake(self, nc: Client, tg: TaskGroup) -> None:
        """Stop taking intents and decide the ones taken (shielded by the caller)."""
        if self._intake is not None:
            await self._stop_stream(nc, tg, self._intake)
        elif self._core is not None:
            await self._stop_core_batches(nc, tg, self._core)
        else:
            await self._drain_intake(nc)

    async def _stop_stream(self, nc: Client, tg: TaskGroup, intake: StreamIntake) -> None:
        """Finish the batch in hand, seal the chain (final checkpoint), stop pulling."""
        self._stop.set()
        with anyio.move_on_after(self.settings.drain_timeout_s):
            await self._loop_done.wait()
            if self._approvals is not None:  # no vote recorded after the final checkpoint
                await self._approvals_done.wait()
                await self._approvals.stop()
        finished = self._loop_done.is_set() and (
            self._approvals is None or self._approvals_done.is_set()
        )
        if not finished:
            log.warning("stream intake did not finish in time; its intents will be redelivered")
            tg.cancel_scope.cancel()
            return
        if self.failure is None and not nc.is_closed:
            try:
                await intake.finish()
            except Exception:
                log.exception("could not write the final checkpoint")

    async def _drain_intake(self, nc: Client) -> None:
        """Core mode: unsubscribe, then let every queued callback run, while the connection
        is still whole: a limited allow's spend is a request, whose answer the connection's
        own drain would no longer deliver (it drains the reply subscription too)."""
        s, sub = self.settings, self._sub
        if sub is None or nc.is_closed:
            return
        try:
            with anyio.move_on_after(s.drain_timeout_s):
                await round_trip(nc)  # see _close_connection: routed intents first
            with anyio.move_on_after(s.drain_timeout_s) as scope:
                # nats-py leaves Subscription.drain unannotated.
                await sub.drain()  # type: ignore[no-untyped-call]
            if scope.cancelled_caught:
                log.warning("intake did not drain in time; undecided intents dropped")
        except Exception:
            log.exception("could not drain the intake subscription")

    async def _stop_core_batches(self, nc: Client, tg: TaskGroup, core: CoreIntake) -> None:
        """Batched core mode: stop taking intents, let the callback decide every intent
        received, then let the flusher sign and publish the last batches, then stop it.
        The connection's own drain afterwards has no subscription left, only publishes."""
        s = self.settings
        await self._drain_intake(nc)
        await core.close()
        with anyio.move_on_after(s.drain_timeout_s):
            await self._loop_done.wait()
        if not self._loop_done.is_set():
            log.warning("the last artifact batch was not published in time")
            tg.cancel_scope.cancel()

    async def _close_connection(self, nc: Client, *, drain: bool) -> None:
        """Drain (decide what was received, flush outputs), or close after a failed start."""
        self._closing = True
        if nc.is_closed:
            return
        if not drain:
            await nc.close()
            return
        try:
            # One round trip first: everything the server routed to us before it is then
            # read into the pending queue, which drain() processes. Without it nats-py's
            # drain was seen to close with routed intents unread.
            with anyio.move_on_after(self.settings.drain_timeout_s):
                await round_trip(nc)
            await nc.drain()
        except nats.errors.ConnectionReconnectingError:
            # Leaving while the server is away: nothing can be drained; nats-py's close()
            # then fails flushing to the lost socket, and there is nothing left to flush.
            log.warning("leaving while reconnecting to NATS: closed without draining")
            with contextlib.suppress(OSError):
                await nc.close()
        except Exception:
            log.exception("drain failed; closing")
            await nc.close()
        self._log_drops()  # now, rather than up to a second later (or never)

    def statistics(self) -> GatewayStatistics:
        counters = dataclasses.asdict(self._counters)
        if self._intake is not None:
            c, r = self._intake.counters, self._intake.recorder
            counters.update(
                batches=c.batches,
                adopted=c.adopted,
                ledger_records=r.records,
                ledger_refusals=r.refusals,
                ledger_in_doubt=r.in_doubt,
                acks=c.acks,
                naks=c.naks,
                duplicate_outputs=c.duplicate_outputs,
                late_adoptions=c.late_adoptions,
                undeliverable=c.undeliverable,
                artifact_batches=r.artifact_batches,
                forged_parents=r.parents.forged,
                lineage_waits=c.lineage_waits,
                lineage_waiting=len(self._intake.waiting),
            )
            counters["received"] = c.received
            counters["internal_errors"] += c.internal_errors
        store = (
            self._intake.limits
            if self._intake is not None
            else self._core_intake.limits
            if self._core_intake is not None
            else None
        )
        if store is not None:
            counters.update(
                limit_failures=store.failures,
                limit_conflicts=store.conflicts,
                limit_cached_denials=store.cached_denials,
            )
        retainer = (
            self._intake.retainer
            if self._intake is not None
            else self._core_intake.retainer
            if self._core_intake is not None
            else None
        )
        if retainer is not None:
            counters["intents_unretained"] = retainer.failures
        if self._approvals is not None:
            a = self._approvals.counters
            counters.update(
                votes=a.votes,
                votes_refused=a.refused,
                holds_released=a.released,
                holds_rejected=a.rejected,
                holds_expired=a.expired,
                forged_resolutions=a.forged,
            )
        return GatewayStatistics(**counters)

    def decisions(self) -> TallySnapshot:
        """The decisions that stood so far, by effect and reason, and their latency."""
        return self._tally.snapshot()

    @property
    def kid(self) -> str:
        """The key id of the signing key (artifacts and checkpoints)."""
        return self._signer.kid

    @property
    def service_id(self) -> str | None:
        """This gateway's id on the micro service API (``$SRV.*.bus-guard.<id>``)."""
        return self._service.id if self._service is not None else None

    @property
    def active_policies(self) -> PolicySetLike:
        """The policy set intents are decided with now (a stale set denies them all)."""
        return self._policies

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def ready(self) -> bool:
        """Taking intents: started (the server confirmed the subscription or consumer),
        not stopping, connected now, and no intake task has failed."""
        return self._ready and self.failure is None and not self.closed.is_set() and self.connected

    def queued(self) -> dict[str, int]:
        """Intents taken from NATS and not yet decided (``intake``: core mode, the
        subscription's pending messages; stream mode, those read ahead), and children
        waiting for a parent (``lineage_waiting``)."""
        intake = 0
        if self._intake is not None:
            intake = self._intake.puller.queued
        elif self._sub is not None:
            intake = self._sub.pending_msgs
        waiting = len(self._intake.waiting) if self._intake is not None else 0
        return {"intake": intake, "lineage_waiting": waiting}

    def identity(self) -> dict[str, str]:
        """Who this gateway is and what it enforces (strings: the micro service metadata)."""
        s, policies = self.settings, self._policies
        return {
            "gateway": s.gateway_id,
            "version": __version__,
            "mode": s.mode,
            "artifacts": s.artifacts,
            "prefix": s.prefix,
            "policy_digest": policies.digest,
            "policy_version": policies.version,
            # a bundle from the bus: its version ends with ";rev=<revision>"
            "policy_revision": policies.version.rpartition(";rev=")[2]
            if ";rev=" in policies.version
            else "",
            "policy_mode": str(policies.mode),
            "kid": self.kid,
        }

    def status(self) -> dict[str, Any]:
        """The status document of ``$SRV.STATS`` (:func:`~bus_guard.intake._service.
        status_document`)."""
        return status_document(
            self.identity(),
            dataclasses.asdict(self.statistics()),
            self.decisions(),
            ready=self.ready,
            queues=self.queued(),
            uptime_s=time.monotonic() - self._started_at,
        )

    @property
    def policies(self) -> PolicySetLike:
        return self._policies

    def swap_policies(self, policies: PolicySetLike) -> None:
        """Replace the active policy set; each message reads the reference once (atomic)."""
        self._policies = policies
        self.policies_since = time.monotonic()
        if self._service is not None:
            self._service.refresh()

    async def _start_service(self, nc: Client) -> None:
        """The micro service; without it (the server refused it, or went away meanwhile)
        the gateway still decides: a warning, not a failed start."""
        service = GatewayService(nc, self)
        try:
            await service.start()
        except Exception as exc:
            log.warning("no micro service ($SRV.PING/INFO/STATS): %s", exc)
            return
        self._service = service

    async def _stop_service(self) -> None:
        service, self._service = self._service, None
        if service is not None and self._nc is not None and not self._nc.is_closed:
            try:
                await service.stop()
            except Exception as exc:  # the intake's drain comes next, whatever this did
                log.warning("could not stop the micro service: %s", exc)

    def hold_readiness(self, holder: str, why: str | None) -> None:
        """*holder* (e.g. the canaries) says the gateway is not ready, and *why*; ``None``:
        it no longer objects. Readiness is the intake's and every holder's."""
        if why is None:
            self._unready.pop(holder, None)
        else:
            self._unready[holder] = why

    @property
    def unready(self) -> dict[str, str]:
        """Why the gateway is not ready, by holder (empty: nothing objects)."""
        return dict(self._unready)

    def trust_keys(self, trusted: Jwks) -> None:
        """Stream mode: verify parent decisions' artifacts with *trusted* from now on (the
        gateways' JWKS changed: a rotation, a revocation); the signing key always counts."""
        own = load_jwks(self._signer.jwks())
        if self._signer.kid not in trusted:
            trusted = trusted.replace(own.entries[0])
        self._trusted_keys = trusted
        if self._intake is not None:
            self._intake.trusted_keys = trusted
            self._intake.parents.trust(trusted)

    # -- connection events -----------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._on_slow_consumer(exc.subject)
        else:
            log.warning("nats error: %s", exc)

    def _on_slow_consumer(self, subject: str) -> None:
        """Count the drop; log the first of a flood, then one summary line a second."""
        self._counters.slow_consumer_drops += 1
        now = time.monotonic()
        if self._drops_unlogged == 0 and now - self._drops_logged_at >= _DROP_LOG_INTERVAL_S:
            self._drops_logged_at = now
            log.warning("slow consumer: intent on %s dropped undecided", subject)
            return
        self._drops_unlogged += 1
        if self._drops_summary is None:
            due = self._drops_logged_at + _DROP_LOG_INTERVAL_S - now
            self._drops_summary = asyncio.get_running_loop().call_later(
                max(0.0, due), self._log_drops
            )

    def _log_drops(self) -> None:
        """The summary line: drops since the last line, if any."""
        if self._drops_summary is not None:
            self._drops_summary.cancel()
            self._drops_summary = None
        if self._drops_unlogged:
            log.warning(
                "slow consumer: %d more intent(s) dropped undecided (%d in all)",
                self._drops_unlogged,
                self._counters.slow_consumer_drops,
            )
            self._drops_unlogged = 0
            self._drops_logged_at = time.monotonic()

    async def _on_closed(self) -> None:
        self.closed.set()

    async def _on_disconnected(self) -> None:
        if self._closing:  # our own drain or close
            log.debug("disconnected from NATS (closing)")
        else:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._counters.reconnects += 1
        if self._intake is not None:
            self._intake.puller.reset()  # the pull request may be gone with the old link
        log.info("reconnected to NATS")


async def round_trip(nc: Client, *, timeout_s: float = 5.0) -> None:
    """A barrier: when it returns, the server has processed everything sent before it.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still
    in the client's pending buffer, so one PONG does not prove a SUB or PUB arrived. The
    first flush yields to the flusher task (which writes the buffer); the second PING then
    follows everything buffered before the call.
    """
    timeout = max(1, round(timeout_s))
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


# What an output adds to an intent's bytes besides the forwarded headers: the artifact
# headers (a batched artifact with its proof is ~1.5 KB) and the JSON fields of a deny or
# hold record.
_OUTPUT_OVERHEAD_BYTES: Final = 8 * 1024


def _check_max_payload(settings: Settings, server_max_payload: int) -> None:
    """Refuse to start when an accepted intent could not be forwarded or recorded.

    The server counts headers and payload against ``max_payload`` and closes the
    connection of a client that publishes more; nats-py checks only the payload. The
    largest output is an exec message (payload, the inbound headers it forwards, at most
    ``MAX_HEADER_BYTES`` since larger ones are denied, and the artifact headers) or a hold
    record (the whole payload, base64-encoded when it is not UTF-8: 4/3 of its size).
    """
    payload = settings.max_payload_bytes
    worst = max(
        payload + MAX_HEADER_BYTES + _OUTPUT_OVERHEAD_BYTES,
        -(-payload * 4 // 3) + _OUTPUT_OVERHEAD_BYTES,
    )
    if worst > server_max_payload:
        room = server_max_payload - _OUTPUT_OVERHEAD_BYTES
        fits = min(room - MAX_HEADER_BYTES, room * 3 // 4)
        raise ConfigError(
            f"--max-payload {payload} is too large for this server's max_payload "
            f"{server_max_payload}: an output could need {worst} bytes; lower --max-payload "
            f"to at most {fits}"
        )
