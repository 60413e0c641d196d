"""Hostile agents (SCENARIOS S18): a raw NATS client, a gateway under attack, and the count.

* :class:`RawClient` speaks the client protocol itself, because nats-py refuses to send what
  a hostile agent sends (an invalid-UTF-8 subject or reply, a header name that is not a
  token, an inline status line, a header block it did not build). It reads ``INFO``, sends
  ``CONNECT`` (headers on), then per message a ``PUB`` / ``HPUB`` line and a ``PING``. The
  server answers a refused message with ``-ERR`` before the ``PONG`` (a permissions
  violation leaves the connection open; a maximum payload or control line violation closes
  it), so every message is classified on its own (:class:`Answer`).
* :func:`arena`: a nats-server (the shipped ``compose/`` config with its accounts, or one
  account without auth) and ``bus-guard run`` as a child process, in either intake mode.
* :func:`run_attack`: sends the cases, while a victim agent publishes steadily, and counts
  what came out: every terminal outcome (exec / deny / hold message) identified by the
  SHA-256 of the payload it decides, the victim's latencies, the gateway's RSS.
  :meth:`Report.problems` lists every broken promise.

Stream mode refuses some messages the core server accepts (JetStream: headers over 64 KiB,
``Nats-Expected-*`` mismatches, rollups). Those refusals come back only as a PubAck, so in
stream mode every case without a reply of its own is sent with one, to the attacker's inbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

import bus_guard
from bus_guard.errors import VerificationError
from bus_guard.intake._gateway import round_trip
from bus_guard.intake._jetstream import read
from bus_guard.pipeline import content_type
from bus_guard.policy._load import PolicySet
from bus_guard.server import NatsServer
from bus_guard.verify import Verifier, payload_digest, verify_message

from .crashkit import GatewayProcess
from .helpers import intent
from .topology import SINGLE_CONFIG, credentials, render_config

__all__ = (
    "DENIED",
    "MALFORMED",
    "NOT_FORWARDED",
    "ORACLE",
    "OUTCOME_TIMEOUT_S",
    "POLICY",
    "RSS_GROWTH_MAX_MIB",
    "RSS_MAX_MIB",
    "VICTIM_BOUND_S",
    "VICTIM_INTERVAL_S",
    "VICTIM_MIN_INTENTS",
    "Answer",
    "Arena",
    "Case",
    "Delivery",
    "Expect",
    "Mode",
    "Outcome",
    "Raw",
    "RawClient",
    "Report",
    "arena",
    "header_block",
    "refused",
    "run_attack",
)

Mode = Literal["core", "stream"]

# The bounds the suite holds the gateway to.
VICTIM_BOUND_S: Final = 2.0  # each of the victim's intents decided within this, during attacks
VICTIM_MIN_INTENTS: Final = 5  # the victim publishes at least this many per attack
VICTIM_INTERVAL_S: Final = 0.05  # its pace (a rate, not a synchronisation)
OUTCOME_TIMEOUT_S: Final = 10.0  # every accepted input decided within this after the last
# Stream mode: a child of parents that are not in the ledger waits this long for them, then
# it is denied (the gateway's --lineage-wait; well within OUTCOME_TIMEOUT_S).
LINEAGE_WAIT_S: Final = 2.0
RSS_MAX_MIB: Final = 200  # the gateway's resident set at the end of an attack ...
RSS_GROWTH_MAX_MIB: Final = 64  # ... and its growth during it

CREDENTIALS: Final = credentials()
_MAX_PAYLOAD_RE: Final = re.compile(r"^(\s*max_payload\s*[:=]\s*).*$", re.MULTILINE)

CRLF: Final = b"\r\n"
_IO_TIMEOUT_S: Final = 10.0


def header_block(pairs: list[tuple[bytes, bytes]] | None = None, *, status: bytes = b"") -> bytes:
    """A NATS header block, byte for byte: ``NATS/1.0[ <status>]``, ``<name>: <value>`` lines,
    an empty line (each ending in CRLF). Nothing is checked or escaped: that is the point.
    """
    head = b"NATS/1.0" + (b" " + status if status else b"") + CRLF
    return head + b"".join(name + b": " + value + CRLF for name, value in pairs or ()) + CRLF


@dataclass(frozen=True, slots=True)
class Raw:
    """One message as it goes on the wire: ``headers`` is the whole header block."""

    subject: bytes
    payload: bytes
    headers: bytes | None = None
    reply: bytes | None = None

    def line(self) -> bytes:
        reply = b" " + self.reply if self.reply is not None else b""
        if self.headers is None:
            return b"PUB " + self.subject + reply + b" %d\r\n" % len(self.payload)
        total = len(self.headers) + len(self.payload)
        return b"HPUB " + self.subject + reply + b" %d %d\r\n" % (len(self.headers), total)

    def wire(self) -> bytes:
        return self.line() + (self.headers or b"") + self.payload + CRLF

    @property
    def size(self) -> int:
        """What the server compares with its ``max_payload``: headers and payload."""
        return len(self.headers or b"") + len(self.payload)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the server said about one message, up to the ``PONG`` that followed it."""

    errors: tuple[str, ...] = ()
    closed: bool = False  # the server closed the connection instead of answering the PING

    @property
    def refused(self) -> bool:
        return bool(self.errors) or self.closed


@dataclass(frozen=True, slots=True)
class Delivery:
    """A ``MSG`` / ``HMSG`` the raw client received on one of its subscriptions."""

    subject: bytes
    reply: bytes
    headers: bytes
    payload: bytes


class RawClient:
    """One raw connection; after the server closed it, the next send opens a new one.

    A reader task parses what the server sends: each ``PONG`` answers the oldest ``PING``
    with the ``-ERR`` lines received since the previous ``PONG``; ``MSG`` / ``HMSG`` on the
    *subs* (subscribed on every connection) are kept in :attr:`deliveries`.
    """

    def __init__(
        self,
        port: int,
        user: str | None = None,
        password: str | None = None,
        *,
        subs: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.port, self.user, self.password, self.subs, self.host = port, user, password, subs, host
        self.info: dict[str, Any] = {}
        self.deliveries: list[Delivery] = []
        self.first: dict[bytes, Delivery] = {}  # the first delivery on each subject
        self.connections = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = True  # by the server (or not opened yet)
        self._pongs: collections.deque[asyncio.Future[Answer]] = collections.deque()
        self._errors: list[str] = []
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self._connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    @property
    def max_payload(self) -> int:
        return int(self.info["max_payload"])

    async def _connect(self) -> None:
        async with asyncio.timeout(_IO_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 24)
        line = b""
        try:
            async with asyncio.timeout(_IO_TIMEOUT_S):
                line = await reader.readline()
        finally:
            if not line.startswith(b"INFO "):
                writer.close()
        if not line.startswith(b"INFO "):
            raise AssertionError(f"expected INFO, got {line!r}")
        self.info = json.loads(line[5:])
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "lang": "hostilekit",
            "version": "0",
        }
        if self.user is not None:
            connect |= {"user": self.user, "pass": self.password or ""}
        self._writer, self._closed = writer, False
        self._errors = []
        self._task = asyncio.create_task(self._read(reader))
        subs = b"".join(b"SUB %s %d\r\n" % (s.encode(), i) for i, s in enumerate(self.subs, 1))
        writer.write(b"CONNECT " + json.dumps(connect).encode() + CRLF + subs)
        answer = await self._ping()
        if answer.refused:
            raise AssertionError(f"could not connect as {self.user}: {answer}")
        self.connections += 1

    async def _close(self) -> None:
        writer, task = self._writer, self._task
        self._writer = self._task = None
        self._closed = True
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readuntil(CRLF)
                if line == b"PONG\r\n":
                    errors, self._errors = tuple(self._errors), []
                    if self._pongs:
                        self._pongs.popleft().set_result(Answer(errors))
                elif line == b"PING\r\n":
                    assert self._writer is not None
                    self._writer.write(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    self._errors.append(line[4:].strip().decode(errors="replace"))
                elif line.startswith((b"MSG ", b"HMSG ")):
                    delivery = await self._delivery(reader, line)
                    self.deliveries.append(delivery)
                    self.first.setdefault(delivery.subject, delivery)
                    self._arrived.set()
                # +OK and INFO: nothing to do
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        # the server closed the connection: every PING still waiting is answered "closed"
        self._closed = True
        errors = tuple(self._errors)
        while self._pongs:
            self._pongs.popleft().set_result(Answer(errors, closed=True))

    @staticmethod
    async def _delivery(reader: asyncio.StreamReader, line: bytes) -> Delivery:
        args = line.split()
        # MSG <subject> <sid> [reply] <size> / HMSG <subject> <sid> [reply] <hdr size> <size>
        sizes = 1 if args[0] == b"MSG" else 2
        reply = args[3] if len(args) == 4 + sizes else b""
        total = int(args[-1])
        hlen = int(args[-2]) if sizes == 2 else 0
        body = await reader.readexactly(total + 2)
        return Delivery(args[1], reply, body[:hlen], body[hlen:total])

    async def _ping(self) -> Answer:
        writer = self._writer
        if writer is None or self._closed:
            return Answer(tuple(self._errors), closed=True)
        pong: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the reader task sees the close and answers the PING
        async with asyncio.timeout(_IO_TIMEOUT_S):
            return await pong

    async def send(self, msg: Raw) -> Answer:
        """Publish *msg* and ``PING``; what the server said about it before the ``PONG``."""
        if self._closed:
            await self._close()
            await self._connect()
        assert self._writer is not None
        self._writer.write(msg.wire())
        answer = await self._ping()
        if answer.closed:
            await self._close()
        return answer

    async def round_trip(self) -> Answer:
        """``PING``/``PONG``: everything sent before was processed by the server."""
        return await self._ping()

    async def first_on(self, subject: bytes, timeout_s: float = 5.0) -> Delivery:
        """The first delivery on *subject*, waiting for it at most *timeout_s*."""
        async with asyncio.timeout(timeout_s):
            while subject not in self.first:
                self._arrived.clear()  # no await since the test: nothing slips in between
                await self._arrived.wait()
        return self.first[subject]


# -- the arena: a server and a gateway process ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Arena:
    """A nats-server and ``bus-guard run`` on it, as a child process."""

    mode: Mode
    server: NatsServer
    gateway: GatewayProcess
    accounts: bool  # compose/auth.conf (users, accounts, permissions) or one open account
    policies: PolicySet
    jwks: Path

    def login(self, user: str) -> tuple[str | None, str | None]:
        """User and password for *user* (none on the open single-account server)."""
        return (user, CREDENTIALS[user]) if self.accounts else (None, None)

    async def connect(self, user: str, **options: Any) -> Client:
        name, password = self.login(user)
        if self.accounts and user.startswith("agent-"):
            options.setdefault("inbox_prefix", f"_INBOX.{user}")
        return await nats.connect(
            self.server.url, user=name, password=password, allow_reconnect=False, **options
        )

    @property
    def pid(self) -> int:
        assert self.gateway.proc is not None
        return self.gateway.proc.pid

    def alive(self) -> bool:
        return self.gateway.proc is not None and self.gateway.proc.poll() is None

    def rss_mib(self) -> float:
        """The gateway's resident set (``VmRSS`` in /proc), in MiB; 0 once it is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0.0
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(m[1]) / 1024 if m else 0.0


@contextlib.contextmanager
def arena(
    tmp: Path,
    mode: Mode,
    *,
    policies: Path,
    key: Path,
    jwks: Path,
    accounts: bool = True,
    max_payload: int | None = None,
) -> Iterator[Arena]:
    """A server and a gateway on it: the shipped ``compose/`` config (``accounts``; with its
    ``max_payload`` replaced if given) or one account without auth (with JetStream)."""
    if accounts:
        config = render_config(SINGLE_CONFIG, tmp / "conf", store_dir=tmp / "jetstream")
        if max_payload is not None:
            text, n = _MAX_PAYLOAD_RE.subn(rf"\g<1>{max_payload}", config.read_text())
            assert n == 1, "expected one max_payload line in the shipped config"
            config.write_text(text)
        server = NatsServer(config=config, jetstream=False)
    else:
        assert max_payload is None
        server = NatsServer(store_dir=tmp / "jetstream")
    with server:
        url = server.url
        if accounts:
            url = url.replace("nats://", f"nats://gateway:{CREDENTIALS['gateway']}@")
        gateway = GatewayProcess(
            [
                sys.executable,
                "-m",
                "bus_guard",
                "run",
                "--nats",
                url,
                "--policies",
                str(policies),
                "--key",
                str(key),
                "--mode",
                mode,
                "--gateway-id",
                f"hostile-{mode}",
                "--lineage-wait",
                str(LINEAGE_WAIT_S),
            ]
        )
        gateway.start(timeout_s=30)
        try:
            yield Arena(mode, server, gateway, accounts, bus_guard.load_policies(policies), jwks)
        finally:
            # SIGTERM drains; a gateway stuck in a regex cannot take the signal: then SIGKILL
            with contextlib.suppress(subprocess.TimeoutExpired):
                gateway.stop(timeout_s=5)


# -- cases and what each must come to ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expect:
    """What one input must come to.

    ``refused``: the modes in which the server refuses it (``-ERR``, a closed connection or,
    in stream mode, a PubAck error); then it must have no outcome. Otherwise exactly one:

    * ``policy``: whatever policy says (an exec must be allowed by ``bus_guard.decide`` and
      verify, as always); with ``oracle`` the effect and reason must be ``decide``'s.
    * ``deny``: a denial, with a reason in ``reasons`` (any reason when empty).
    * ``not-exec``: a denial or a hold, never forwarded.

    ``stream``: what it must come to in stream mode instead, where JetStream stores the
    message first and the gateway gets it as stored (e.g. without an inline status line).
    """

    refused: frozenset[Mode] = frozenset()
    outcome: Literal["policy", "deny", "not-exec"] = "policy"
    reasons: frozenset[str] = frozenset()
    oracle: bool = False
    stream: Expect | None = None

    def in_mode(self, mode: Mode) -> Expect:
        return self.stream if mode == "stream" and self.stream is not None else self


POLICY: Final = Expect()
ORACLE: Final = Expect(oracle=True)
MALFORMED: Final = Expect(outcome="deny", reasons=frozenset({"malformed"}))
DENIED: Final = Expect(outcome="deny")
NOT_FORWARDED: Final = Expect(outcome="not-exec")


def refused(modes: str = "core stream") -> Expect:
    return Expect(refused=frozenset(m for m in ("core", "stream") if m in modes.split()))


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    msg: Raw
    expect: Expect = POLICY
    content_type: str | None = None  # what the oracle decodes the payload as

    @property
    def digest(self) -> str:
        return payload_digest(self.msg.payload)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["exec", "deny", "hold"]
    subject: str
    effect: str
    reason: str
    ts: float  # when the gateway decided (the record's ts, the artifact's iat)
    problem: str = ""  # an exec that does not verify or that policy does not allow


def _record_outcome(kind: Literal["deny", "hold"], subject: str, data: bytes) -> Outcome:
    record = json.loads(data)
    return Outcome(kind, subject, record["effect"], record["reason"], float(record["ts"]))


# -- the attack ------------------------------------------------------------------------------


@dataclass
class Report:
    """What one attack did and came to; :meth:`problems` lists every broken promise."""

    label: str
    mode: Mode
    cases: list[Case]
    policies: PolicySet
    answers: dict[str, Answer] = field(default_factory=dict)  # by case name
    acks: dict[str, str] = field(default_factory=dict)  # stream mode: "ok" or the error
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)  # by payload digest
    victim_latencies_s: list[float | None] = field(default_factory=list)
    victim_digests: list[str] = field(default_factory=list)
    warmup_digest: str = ""
    settled: bool = False
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    alive: bool = False
    elapsed_s: float = 0.0
    gateway_errors: int = 0  # log lines at ERROR or with a traceback
    gateway_log: list[str] = field(default_factory=list)  # its last lines, for a failure

    def refused_by_server(self, case: Case) -> bool:
        answer = self.answers.get(case.name)
        refused = answer is not None and answer.refused
        return refused or self.acks.get(case.name, "ok") != "ok"

    def of(self, case: Case) -> list[Outcome]:
        return self.outcomes.get(case.digest, [])

    @property
    def victim_max_s(self) -> float:
        done = [t for t in self.victim_latencies_s if t is not None]
        return max(done, default=float("nan"))

    def line(self) -> str:
        kinds: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        for case in self.cases:
            for o in self.of(case):
                kinds[o.kind] += 1
                reasons[o.reason] += 1
        refused = sum(self.refused_by_server(c) for c in self.cases)
        late = sum(t is None or t > VICTIM_BOUND_S for t in self.victim_latencies_s)
        return (
            f"S18 {self.label} mode={self.mode}: inputs={len(self.cases)} "
            f"server_refusals={refused} outcomes={dict(kinds)} reasons={dict(reasons)} "
            f"victim={len(self.victim_latencies_s)} victim_max_ms={self.victim_max_s * 1000:.1f} "
            f"victim_late={late} rss_mib={self.rss_before_mib:.1f}->{self.rss_after_mib:.1f} "
            f"alive={self.alive} gateway_errors={self.gateway_errors} "
            f"elapsed_s={self.elapsed_s:.1f}"
        )

    def problems(self) -> list[str]:
        out: list[str] = []
        for case in self.cases:
            out += _case_problems(self, case)
        for i, (digest, latency) in enumerate(
            zip(self.victim_digests, self.victim_latencies_s, strict=True)
        ):
            outcomes = self.outcomes.get(digest, [])
            if len(outcomes) != 1 or outcomes[0].kind != "exec":
                out.append(f"victim intent {i}: outcomes {[o.kind for o in outcomes]}")
            if latency is None or latency > VICTIM_BOUND_S:
                shown = "none" if latency is None else f"{latency:.2f}s"
                out.append(f"victim intent {i} decided after {shown} (bound {VICTIM_BOUND_S}s)")
        warmup = self.outcomes.get(self.warmup_digest, [])
        if [o.kind for o in warmup] != ["exec"]:
            out.append(f"the victim's warm-up intent: outcomes {[o.kind for o in warmup]}")
        if len(self.victim_latencies_s) < VICTIM_MIN_INTENTS:
            out.append(f"the victim sent only {len(self.victim_latencies_s)} intents")
        for outcomes in self.outcomes.values():
            out += [f"exec {o.subject}: {o.problem}" for o in outcomes if o.problem]
        if not self.settled:
            out.append(f"not every accepted input was decided within {OUTCOME_TIMEOUT_S}s")
        if not self.alive:
            out.append("the gateway process died")
        if self.rss_after_mib > RSS_MAX_MIB:
            out.append(f"gateway RSS {self.rss_after_mib:.0f} MiB > {RSS_MAX_MIB} MiB")
        if self.rss_after_mib - self.rss_before_mib > RSS_GROWTH_MAX_MIB:
            out.append(
                f"gateway RSS grew {self.rss_before_mib:.0f} -> {self.rss_after_mib:.0f} MiB"
                f" (bound +{RSS_GROWTH_MAX_MIB} MiB)"
            )
        return out

    def check(self) -> None:
        """Assert there is no problem (listing the first ones if there are)."""
        problems = self.problems()
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        log = "\n    ".join(self.gateway_log) if self.gateway_errors or not self.alive else ""
        log = f"\n  the gateway's last log lines:\n    {log}" if log else ""
        assert not problems, f"{self.line()}\n  {shown}{more}{log}"


def _case_problems(report: Report, case: Case) -> list[str]:
    mode, outcomes = report.mode, report.of(case)
    expect = case.expect.in_mode(mode)
    answer = report.answers.get(case.name, Answer())
    said = f"{answer.errors or ''}{' closed' if answer.closed else ''}"
    ack = report.acks.get(case.name, "ok")
    if mode in case.expect.refused:
        if not report.refused_by_server(case):
            return [f"{case.name}: expected a server refusal, the server accepted it"]
        if outcomes:
            return [f"{case.name}: refused by the server ({said}{ack}) but decided {outcomes}"]
        return []
    if report.refused_by_server(case):
        return [f"{case.name}: unexpected server refusal: {said} {ack}"]
    if len(outcomes) != 1:
        kinds = [f"{o.kind}:{o.reason}" for o in outcomes]
        return [f"{case.name}: {len(outcomes)} outcomes, expected exactly one {kinds}"]
    (o,) = outcomes
    got = f"{o.kind} {o.effect}/{o.reason}"
    if expect.outcome == "deny" and (
        o.kind != "deny" or (expect.reasons and o.reason not in expect.reasons)
    ):
        wanted = "/".join(sorted(expect.reasons)) or "any reason"
        return [f"{case.name}: expected a denial ({wanted}), got {got}"]
    if expect.outcome == "not-exec" and o.kind == "exec":
        return [f"{case.name}: forwarded ({got}), must not be"]
    if expect.oracle:
        subject = case.msg.subject.decode()
        want = bus_guard.decide(
            report.policies, subject, case.msg.payload, now=o.ts, content_type=case.content_type
        )
        if (want.effect.value, want.reason.value) != (o.effect, o.reason):
            return [f"{case.name}: {got}, decide() says {want.effect.value}/{want.reason.value}"]
    return []


def _exec_outcome(
    verifier: Verifier,
    policies: PolicySet,
    subject: str,
    headers: Mapping[str, str] | None,
    data: bytes,
) -> Outcome:
    """An exec message as an executor sees it: its artifact must verify, and policy must
    allow what it carries (``bus_guard.decide`` on the intake subject, at the decision time)."""
    try:
        claims = verify_message(verifier, subject=subject, headers=headers, payload=data)
    except VerificationError as exc:
        return Outcome("exec", subject, "allow", "?", time.time(), f"does not verify: {exc}")
    intake = "guard.in." + subject.removeprefix("guard.exec.")
    ctype = content_type(headers)
    decision = bus_guard.decide(policies, intake, data, now=claims.iat, content_type=ctype)
    problem = ""
    if decision.effect.value != "allow":
        problem = f"forwarded, but decide() says {decision.effect.value}/{decision.reason.value}"
    return Outcome("exec", subject, "allow", "allowed_by_rule", float(claims.iat), problem)


class _Observed:
    """Outcomes as they arrive on core subscriptions, by the digest of the decided payload."""

    def __init__(self, verifier: Verifier, policies: PolicySet) -> None:
        self.verifier, self.policies = verifier, policies
        self.by_digest: dict[str, list[Outcome]] = collections.defaultdict(list)
        self.first_at: dict[str, float] = {}  # monotonic arrival of the first outcome
        self._changed = asyncio.Event()

    def _add(self, digest: str, outcome: Outcome) -> None:
        self.by_digest[digest].append(outcome)
        self.first_at.setdefault(digest, time.monotonic())
        self._changed.set()

    async def on_exec(self, msg: Msg) -> None:
        outcome = _exec_outcome(self.verifier, self.policies, msg.subject, msg.headers, msg.data)
        self._add(payload_digest(msg.data), outcome)

    async def on_record(self, msg: Msg) -> None:
        kind: Literal["deny", "hold"] = "hold" if msg.subject.startswith("guard.hold.") else "deny"
        self._add(
            json.loads(msg.data)["payload_sha256"], _record_outcome(kind, msg.subject, msg.data)
        )

    async def until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until *done()* holds (re-tested at each arrival); ``False`` after *timeout_s*."""
        try:
            async with asyncio.timeout(timeout_s):
                while not done():
                    self._changed.clear()  # no await since the test: nothing slips in between
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True


class _Victim:
    """Another agent, publishing allowed intents at a steady pace while the attack runs."""

    def __init__(self, nc: Client, name: str, seen: _Observed, label: str) -> None:
        self.nc, self.name, self.seen, self.label = nc, name, seen, label
        self.digests: list[str] = []
        self.latencies_s: list[float | None] = []

    async def one(self, timeout_s: float, tag: str = "") -> tuple[str, float | None]:
        tag = tag or str(len(self.digests))
        payload = intent(
            "tools.search", "tool:search", {"q": f"victim {tag}"}, id=f"victim-{self.label}-{tag}"
        )
        digest = payload_digest(payload)
        started = time.monotonic()
        await self.nc.publish(f"guard.in.{self.name}.tools.search", payload)
        if await self.seen.until(lambda: digest in self.seen.first_at, timeout_s):
            return digest, self.seen.first_at[digest] - started
        return digest, None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() or len(self.latencies_s) < VICTIM_MIN_INTENTS:
            digest, latency = await self.one(VICTIM_BOUND_S)
            self.digests.append(digest)
            self.latencies_s.append(latency)
            await anyio.sleep(VICTIM_INTERVAL_S)  # the victim's pace, not a synchronisation


async def _pub_ack(raw: RawClient, reply: bytes) -> str:
    """JetStream's answer to a message published with *reply*: ``ok`` or why not stored."""
    try:
        d = await raw.first_on(reply, OUTCOME_TIMEOUT_S)
    except TimeoutError:
        return "no PubAck"
    error = json.loads(d.payload).get("error")
    return "ok" if error is None else f"PubAck error: {error}"


async def _stream_drained(nc: Client) -> bool:
    js = nc.jetstream()
    last = (await js.stream_info("GUARD_IN")).state.last_seq
    info = await js.consumer_info("GUARD_IN", "bus-guard")
    floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
    return floor >= last and not info.num_ack_pending and not info.num_pending


async def _until_drained(nc: Client, timeout_s: float) -> bool:
    """Poll the intake consumer (a server-side condition) until every intent is acked."""
    deadline = time.monotonic() + timeout_s
    while not await _stream_drained(nc):
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.05)
    return True


async def _stored_outcomes(
    nc: Client, verifier: Verifier, policies: PolicySet
) -> dict[str, list[Outcome]]:
    """Every outcome the output streams hold (stream mode: what executors consume)."""
    out: dict[str, list[Outcome]] = collections.defaultdict(list)
    async for m in read(nc, "GUARD_EXEC", "guard.exec.>"):
        out[payload_digest(m.data)].append(
            _exec_outcome(verifier, policies, m.subject, m.headers, m.data)
        )
    for stream, kind in (("GUARD_DENY", "deny"), ("GUARD_HOLD", "hold")):
        async for m in read(nc, stream, f"guard.{kind}.>"):
            outcome = _record_outcome("hold" if kind == "hold" else "deny", m.subject, m.data)
            out[json.loads(m.data)["payload_sha256"]].append(outcome)
    return out


async def run_attack(
    arena: Arena,
    cases: Sequence[Case],
    *,
    label: str,
    attacker: str = "agent-7",
    victim: str = "agent-9",
) -> Report:
    """Send *cases* from *attacker* (one raw connection, in order) while *victim* publishes
    allowed intents; wait until every input the server accepted is decided; count."""
    started = time.monotonic()
    report = Report(label, arena.mode, list(cases), arena.policies)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    digests = [c.digest for c in cases]
    assert len(set(digests)) == len(digests), "payloads must be unique (a nonce in each)"
    verifier = Verifier(arena.jwks, leeway_s=60)
    seen = _Observed(verifier, arena.policies)
    async with contextlib.AsyncExitStack() as stack:
        if arena.accounts:
            execs = await arena.connect("executor")
            ops = await arena.connect("operator")
            gw = await arena.connect("gateway")
            conns = [execs, ops, gw]
        else:
            execs = ops = gw = await arena.connect("observer")
            conns = [execs]
        for nc in conns:
            stack.push_async_callback(nc.close)
        await execs.subscribe("guard.exec.>", cb=seen.on_exec)
        await ops.subscribe("guard.deny.>", cb=seen.on_record)
        await ops.subscribe("guard.hold.>", cb=seen.on_record)
        for nc in conns:
            await round_trip(nc)
        victim_nc = await arena.connect(victim)
        stack.push_async_callback(victim_nc.close)
        user, password = arena.login(attacker)
        inbox = f"_INBOX.{attacker}.ack" if arena.accounts else "_INBOX.hostile-ack"
        raw = await stack.enter_async_context(
            RawClient(arena.server.port, user, password, subs=(f"{inbox}.>",))
        )

        agent = _Victim(victim_nc, victim, seen, label)
        report.warmup_digest, warm = await agent.one(OUTCOME_TIMEOUT_S, "warm-up")
        assert warm is not None, "the gateway did not decide the victim's warm-up intent"
        report.rss_before_mib = arena.rss_mib()
        stop = asyncio.Event()
        victim_task = asyncio.create_task(agent.run(stop))
        try:
            for i, case in enumerate(cases):
                msg = case.msg
                acked = arena.mode == "stream" and msg.reply is None
                if acked:
                    msg = dataclasses.replace(msg, reply=f"{inbox}.{i}".encode())
                answer = report.answers[case.name] = await raw.send(msg)
                if acked and not answer.refused:
                    # before the next message: one the server answers by closing the
                    # connection would lose a PubAck still on its way
                    report.acks[case.name] = await _pub_ack(raw, msg.reply or b"")

            # One deadline for everything left: a stuck gateway costs the test this, once.
            deadline = time.monotonic() + OUTCOME_TIMEOUT_S

            def left() -> float:
                return max(0.0, deadline - time.monotonic())

            accepted = {c.digest for c in cases if not report.refused_by_server(c)}
            report.settled = await seen.until(lambda: accepted <= seen.by_digest.keys(), left())
            if arena.mode == "core" and report.settled:
                # Barrier: the gateway decides one subscription in order and publishes each
                # intent's outputs before the next, so once these two are decided (one is
                # denied, one forwarded: the operator's and the executor's connection) every
                # output of an earlier input has arrived: the counts are final.
                nonce = f"{label}-{time.time_ns()}"
                sentinels = [
                    Raw(
                        f"guard.in.{attacker}.sentinel".encode(),
                        b'{"sentinel": "%s"}' % nonce.encode(),
                    ),
                    Raw(
                        f"guard.in.{attacker}.tools.search".encode(),
                        intent("tools.search", "tool:search", id=f"sentinel-{nonce}"),
                    ),
                ]
                for sentinel in sentinels:
                    await raw.send(sentinel)
                ends = {payload_digest(s.payload) for s in sentinels}
                report.settled = await seen.until(lambda: ends <= seen.by_digest.keys(), left())
            elif arena.mode == "stream" and report.settled:
                report.settled = await _until_drained(gw, left())
        finally:
            stop.set()
            await victim_task
        report.victim_digests = agent.digests
        report.victim_latencies_s = agent.latencies_s
        everything = {*agent.digests, report.warmup_digest}
        await seen.until(lambda: everything <= seen.by_digest.keys(), left())
        if arena.mode == "core":
            report.outcomes = dict(seen.by_digest)
        else:
            await _until_drained(gw, left())
            report.outcomes = await _stored_outcomes(gw, verifier, arena.policies)
    report.alive = arena.alive()
    report.rss_after_mib = arena.rss_mib()
    report.gateway_errors = sum(
        " ERROR " in line or "Traceback" in line for line in arena.gateway.lines
    )
    report.gateway_log = [line[:300] for line in arena.gateway.lines[-15:]]
    report.elapsed_s = time.monotonic() - started
    print(report.line())
    return report
