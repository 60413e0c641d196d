"""``bus-guard demo``: the whole loop, live, on one machine.

An embedded nats-server (unless ``--nats`` is given), the gateway with ``policies/``, a few
simulated agents sending a realistic mix, and an executor that verifies every artifact
before it "executes". Ends with a summary; exit code 0 only if every executed action
carried a valid artifact and nothing denied or held was executed.

On a server given with ``--nats`` the demo never touches a deployment's streams, buckets or
ledger: it runs under a prefix of its own, ``bus-guard-demo-<random>`` (its own subjects,
streams ``BUS-GUARD-DEMO-<random>_IN`` ..., buckets ``bus-guard-demo-<random>-jwks`` ...),
and deletes what it created under that prefix when it ends. (A deployment's permissions, as
in compose/auth.conf, do not let its users write there at all: the demo then fails, harmlessly.)
"""

from __future__ import annotations

import collections
import contextlib
import random
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import msgspec
import nats.errors
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli._safe import safe
from bus_guard.cli._watch import format_record
from bus_guard.errors import ApprovalRefused, GatewayError, VerificationError
from bus_guard.intake._approver import approve, reject
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.ledger._records import CheckpointSigner
from bus_guard.pipeline import DecisionRecord
from bus_guard.policy._load import load_policies
from bus_guard.server import NatsServer
from bus_guard.settings import ArtifactMode, IntakeMode, Settings
from bus_guard.signing._keys import generate_key, load_private_key
from bus_guard.signing._signer import Signer
from bus_guard.verify import (
    ARTIFACT_HEADER,
    BATCH_PREFIX,
    ArtifactClaims,
    Verifier,
    verify_message,
)

__all__ = ("DEMO_PREFIX", "run_demo")

# The demo's subject prefix on a server of the user's (random suffix: concurrent demos and
# a deployment's own `guard` prefix never share a stream, bucket or subject).
DEMO_PREFIX: Final = "bus-guard-demo"

_record: Final = msgspec.json.Decoder(DecisionRecord)
_enc: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Sent:
    principal: str
    action: str
    payload: bytes
    content_type: str | None = None


def _intent(who: str, action: str, resource: str, params: dict[str, object], **kw: object) -> Sent:
    body: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "action": action,
        "resource": resource,
        "params": params,
        "ts": time.time(),
        **kw,
    }
    return Sent(who, action, _enc.encode(body))


def _scenario(rng: random.Random) -> Sent:
    """One intent from the mix: mostly legitimate, with every kind of denial in it."""
    acct = f"account:acct-{rng.randint(1, 40)}"
    to = f"account:acct-{rng.randint(41, 80)}"
    pick = rng.random()
    if pick < 0.35:
        amount = round(rng.uniform(5, 900), 2)
        return _intent(
            rng.choice(["agent-7", "agent-9"]),
            "payments.transfer",
            acct,
            {"amount": amount, "currency": rng.choice(["USD", "EUR"]), "to": to},
        )
    if pick < 0.45:
        return _intent(
            "agent-9",
            "payments.transfer",
            acct,
            {"amount": rng.randint(1500, 50000), "currency": "USD", "to": to},
        )
    if pick < 0.52:
        return _intent(
            "agent-7",
            "payments.transfer",
            "account:sanctioned-ru-1",
            {"amount": 50, "currency": "USD", "to": to},
        )
    if pick < 0.57:
        return _intent(
            "agent-9", "payments.transfer", acct, {"amount": 20, "currency": "GBP", "to": to}
        )
    if pick < 0.62:
        return _intent(
            "agent-2", "payments.transfer", acct, {"amount": 20, "currency": "USD", "to": to}
        )
    if pick < 0.75:
        return _intent(
            f"agent-{rng.choice([1, 2, 3])}",
            "tools.search",
            "tool:search",
            {"q": rng.choice(["fx rates", "invoice 42", "weather"])},
        )
    if pick < 0.82:
        good = rng.random() < 0.6
        url = "https://api.example.com/v1/quotes" if good else "http://evil.example.net/x"
        return _intent("agent-3", "tools.http.get", "tool:http", {"url": url})
    if pick < 0.87:
        return _intent("agent-1", "tools.shell", "tool:shell", {"cmd": "rm -rf /"})
    if pick < 0.93:
        return Sent("agent-7", "payments.transfer", b'{"id": "x1", "action": "payments.transfer",')
    # Spoofing: agent-9 claims to be agent-7 in the payload.
    return _intent(
        "agent-9",
        "payments.transfer",
        acct,
        {"amount": 10, "currency": "USD", "to": to},
        principal="agent-7",
    )


@dataclass
class _Tally:
    effects: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    executed: set[str] = field(default_factory=set)  # decision ids the executor ran
    not_allowed: set[str] = field(default_factory=set)  # payload digests denied or held
    executed_digests: set[str] = field(default_factory=set)
    bad_artifacts: int = 0
    batched_artifacts: int = 0  # verified artifacts that were batched (a tree head and a proof)
    decided: int = 0
    holds: list[str] = field(default_factory=list)  # hold decision ids, in arrival order
    released: set[str] = field(default_factory=set)  # payload digests released by approvals
    resolutions: collections.Counter[str] = field(default_factory=collections.Counter)
    resolved: anyio.Event = field(default_factory=anyio.Event)  # a resolution arrived

    def resolution(self, what: str) -> None:
        self.resolutions[what] += 1
        self.resolved.set()


def _markup(text: str) -> str:
    return escape(safe(text))


def _executed(claims: ArtifactClaims) -> Text:
    """What the executor ran: the claims of a verified artifact, values escaped."""
    if claims.hold:  # a held intent its approvers released
        return Text.assemble(
            (f"{'RELEASED':<10}", "bold green"),
            " ",
            (f"{safe(claims.sub):<12}", "cyan"),
            f" {safe(claims.action)} {safe(claims.resource)}  ",
            ("artifact ok", "magenta"),
            f" hold={safe(claims.hold)} votes={len(claims.approvals)} ",
            (f"id={safe(claims.jti)}", "dim"),
        )
    return Text.assemble(
        (f"{'EXECUTED':<10}", "bold green"),
        " ",
        (f"{safe(claims.sub):<12}", "cyan"),
        f" {safe(claims.action)} {safe(claims.resource)}  ",
        ("artifact ok", "magenta"),
        f" rules={safe(','.join(claims.rules))} ",
        (f"id={safe(claims.jti)}", "dim"),
    )


def _show(console: Console, line: Text) -> None:
    # soft_wrap: rich would break a long line in two, the second starting with agent text.
    console.print(line, soft_wrap=True)


async def _remove_demo_streams(nc: Client, prefix: str) -> list[str]:
    """Delete every stream (and bucket: KV_ and OBJ_ streams) named under *prefix*; the
    names deleted. Only names this run's own prefix derives, never another's."""
    base = Settings(prefix=prefix).subjects.streams
    stream_base = base.name("intake").removesuffix("_IN") + "_"
    bucket_base = base.jwks_bucket.removesuffix("jwks")
    js = nc.jetstream()
    removed = []
    for info in await js.streams_info():
        name = info.config.name or ""
        if name.startswith((stream_base, f"KV_{bucket_base}", f"OBJ_{bucket_base}")):
            await js.delete_stream(name)
            removed.append(name)
    return removed


@contextlib.asynccontextmanager
async def _bus(nats_url: str | None) -> AsyncIterator[str]:
    if nats_url is not None:
        yield nats_url
        return
    async with NatsServer() as server:
        yield server.url


async def run_demo(
    *,
    count: int,
    nats_url: str | None,
    policies_dir: Path,
    options: NatsOptions | None = None,
    rate_per_s: float,
    seed: int,
    quiet: bool,
    mode: IntakeMode,
    artifacts: ArtifactMode,
    timeout_s: float = 60.0,
    console: Console | None = None,
) -> int:
    """The demo; ``bus-guard demo``'s options (and their defaults: cli._arguments)."""
    console = console or Console(highlight=False)
    rng = random.Random(seed)
    tally = _Tally()
    with tempfile.TemporaryDirectory(prefix="bus-guard-demo-") as tmp:
        policies_dir, approvers = _with_demo_approvers(policies_dir, Path(tmp))
        policies = load_policies(policies_dir)
        key_path, jwks_path = generate_key(Path(tmp))
        key = load_private_key(key_path)
        verifier = Verifier(jwks_path)
        async with _bus(nats_url) as url:
            console.print(
                f"[bold]bus_guard demo[/] bus={_markup(url)} mode={mode} artifacts={artifacts} "
                f"policies={_markup(policies.version)} "
                f"digest={policies.digest[:19]}… rules={policies.rule_count}"
            )
            if options is None or nats_url is None:
                options = NatsOptions(urls=url)
            # a server of the user's: a prefix of the demo's own (see the module's doc)
            prefix = "guard" if nats_url is None else f"{DEMO_PREFIX}-{secrets.token_hex(4)}"
            if nats_url is not None:
                console.print(
                    f"[dim]on {_markup(url)}: prefix {prefix} (its own streams and buckets, "
                    "deleted at the end; a deployment's are never touched)[/]"
                )
            settings = Settings(
                prefix=prefix,
                nats_url=url,
                gateway_id="demo-gateway",
                mode=mode,
                artifacts=artifacts,
                creds_file=options.creds,
                nkey_file=options.nkey,
                tls_cert_file=options.tls_cert,
                tls_key_file=options.tls_key,
                tls_ca_file=options.tls_ca,
            )
            signer = Signer(key, issuer=settings.gateway_id, ttl_s=settings.artifact_ttl_s)
            all_decided = anyio.Event()

            def decided() -> None:
                tally.decided += 1
                if tally.decided >= count:
                    all_decided.set()

            async def executor(msg: Msg) -> None:
                try:
                    claims = verify_message(
                        verifier, subject=msg.subject, headers=msg.headers, payload=msg.data
                    )
                except VerificationError as exc:
                    tally.bad_artifacts += 1
                    _show(
                        console,
                        Text.assemble(("REFUSED", "bold red"), safe(f" {msg.subject}: {exc}")),
                    )
                else:
                    tally.executed.add(claims.jti)
                    if (msg.headers or {}).get(ARTIFACT_HEADER, "").startswith(BATCH_PREFIX):
                        tally.batched_artifacts += 1
                    tally.executed_digests.add(claims.payload_sha256)
                    if claims.hold:  # a hold released by its approvers, not a new decision
                        tally.released.add(claims.payload_sha256)
                        tally.resolution("released")
                        _show(console, _executed(claims))
                        return
                    tally.effects["allow"] += 1
                    tally.reasons[("allow", "allowed_by_rule")] += 1
                    if not quiet:
                        _show(console, _executed(claims))
                decided()

            async def operator(msg: Msg) -> None:
                record = _record.decode(msg.data)
                if record.hold:  # a hold's denial (rejected, expired) or a refused vote
                    tally.resolution(record.reason)
                    _show(console, format_record(record))
                    return
                if record.effect == "hold":
                    tally.holds.append(record.decision_id)
                tally.effects[record.effect] += 1
                tally.reasons[(record.effect, record.reason)] += 1
                tally.not_allowed.add(record.payload_sha256)
                if not quiet:
                    _show(console, format_record(record))
                decided()

            # Fails fast, in one line, when the server cannot be reached (before the
            # gateway would spend its reconnect budget on it).
            nc = await connect(options, name="bus-guard demo")
            try:
                subjects = settings.subjects
                await nc.subscribe(subjects.wildcard("exec"), cb=executor)
                await nc.subscribe(subjects.wildcard("deny"), cb=operator)
                await nc.subscribe(subjects.wildcard("hold"), cb=operator)
                await round_trip(nc)
                gateway = Gateway(settings, policies, signer, ledger_signer=CheckpointSigner(key))
                async with gateway:
                    started = time.perf_counter()
                    for _ in range(count):
                        sent = _scenario(rng)
                        headers = {"Content-Type": sent.content_type} if sent.content_type else None
                        await nc.publish(
                            subjects.intent(sent.principal, sent.action),
                            sent.payload,
                            headers=headers,
                        )
                        if rate_per_s > 0:
                            await anyio.sleep(1 / rate_per_s)
                    await round_trip(nc)
                    with anyio.move_on_after(timeout_s):
                        await all_decided.wait()
                    elapsed = time.perf_counter() - started
                    if mode == "stream" and approvers:
                        await _approvals(console, nc, tally, approvers, timeout_s, prefix)
                    elif tally.holds:
                        console.print(
                            "[dim]core mode keeps no ledger: its holds cannot be approved "
                            "(run the demo in stream mode to see approvals)[/]"
                        )
                    stats = gateway.statistics()
            finally:
                with anyio.CancelScope(shield=True):
                    if nats_url is not None:
                        try:
                            await _remove_demo_streams(nc, prefix)
                        except (nats.errors.Error, TimeoutError) as exc:
                            console.print(
                                f"[yellow]could not delete the demo's streams ({prefix}_*): "
                                f"{_markup(str(exc) or type(exc).__name__)}[/]"
                            )
                    await nc.drain()
    # Held intents released by their approvers were executed rightly: not a leak.
    leaked = (tally.executed_digests & tally.not_allowed) - tally.released
    _summary(console, tally, count, elapsed, stats.received, leaked)
    ok = tally.decided == count and tally.bad_artifacts == 0 and not leaked
    console.print(
        "[bold green]PASS[/]: every executed action carried a valid artifact; "
        "nothing denied, or held and not approved, was executed"
        if ok
        else "[bold red]FAIL[/]"
    )
    return 0 if ok else 1


def _with_demo_approvers(
    policies_dir: Path, tmp: Path
) -> tuple[Path, dict[str, Ed25519PrivateKey]]:
    """A copy of *policies_dir* whose approvers (``approvers/<id>.jwks.json``) get keys made
    for this demo, so that it can approve its holds: the shipped approver keys are public
    halves whose private halves do not exist. Without such files: the directory as it is."""
    if not any((policies_dir / "approvers").glob("*.jwks.json")):
        return policies_dir, {}
    copy = tmp / "policies"
    shutil.copytree(policies_dir, copy)
    approvers: dict[str, Ed25519PrivateKey] = {}
    for jwks in sorted((copy / "approvers").glob("*.jwks.json")):
        name = jwks.name.removesuffix(".jwks.json")
        private, public = generate_key(tmp / "approvers" / name)
        shutil.copyfile(public, jwks)
        approvers[name] = load_private_key(private)
    return copy, approvers


async def _approvals(
    console: Console,
    nc: Client,
    tally: _Tally,
    approvers: dict[str, Ed25519PrivateKey],
    timeout_s: float,
    prefix: str,
) -> None:
    """The approvers at work: the first hold approved by every approver (any quorum), the
    second rejected by the first approver; each vote waits for the gateway's record."""
    if not tally.holds:
        return
    console.print("[bold]approvers[/]: votes on the first holds (bus-guard approve / reject)")
    plan: list[tuple[str, str, bool]] = [(tally.holds[0], name, True) for name in approvers]
    if len(tally.holds) > 1:
        plan.append((tally.holds[1], next(iter(approvers)), False))
    expected = 0  # resolutions recorded: their exec / deny messages are on their way
    for hold_id, name, yes in plan:
        vote = approve if yes else reject
        try:
            done = await vote(
                nc,
                hold_id,
                approvers[name],
                approver=name,
                reason="demo",
                prefix=prefix,
                wait_s=timeout_s,
            )
        except (ApprovalRefused, GatewayError) as exc:
            console.print(f"  {_markup(name)}: {_markup(str(exc))}")
            continue
        recorded = done.recorded
        verdict = "APPROVED" if yes else "REJECTED"
        state = "recorded" if recorded is not None else "not recorded in time"
        console.print(
            Text.assemble(
                (f"{verdict:<10}", "bold yellow"),
                f" {safe(name)} on hold {safe(hold_id)}: {state}",
            )
        )
        if done.resolution is not None:
            expected += 1
    # The resolutions' outputs follow their records: wait for them to arrive here.
    with anyio.move_on_after(timeout_s):
        while sum(tally.resolutions.values()) < expected:
            tally.resolved = anyio.Event()
            await tally.resolved.wait()


def _summary(
    console: Console, tally: _Tally, count: int, elapsed: float, received: int, leaked: set[str]
) -> None:
    table = Table(title="bus_guard demo summary")
    table.add_column("effect")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for (effect, reason), n in sorted(tally.reasons.items()):
        table.add_row(Text(safe(effect)), Text(safe(reason)), str(n))
    table.add_section()
    table.add_row("sent", "", str(count))
    table.add_row("received by gateway", "", str(received))
    table.add_row("decided", "", str(tally.decided))
    table.add_row("executed (artifact verified)", "", str(len(tally.executed)))
    table.add_row("  of which batched artifacts", "", str(tally.batched_artifacts))
    table.add_row("refused by executor (bad artifact)", "", str(tally.bad_artifacts))
    for what, n in sorted(tally.resolutions.items()):
        table.add_row(f"holds: {what}", "", str(n))
    table.add_row("denied/held but executed", "", str(len(leaked)))
    table.add_row("elapsed", "", f"{elapsed:.2f}s")
    console.print(table)
