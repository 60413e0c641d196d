"""The approvers' side on a real nats-server with JetStream: ``bus_guard.approve`` /
``reject``, ``bus-guard approve|reject|holds``.

Holds are made by a real stream-mode gateway (the shipped policies escalate transfers
above 1000), which then stops: the votes stay in the approve stream, where the test reads
them back as a gateway would receive them. The gateway's own handling of votes (verify,
count, release) is not exercised here.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client

import bus_guard
from bus_guard.approval import MAX_REASON_CHARS, check_signature, read_approval
from bus_guard.cli._approve import format_hold, span
from bus_guard.cli._main import main
from bus_guard.decision import approval_decision_id, resolution_decision_id
from bus_guard.errors import ApprovalRefused
from bus_guard.intake import OpenHold, open_holds
from bus_guard.ledger._records import LedgerRecord, encode_record
from bus_guard.policy._load import PolicySet
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key, kid_for, load_private_key
from bus_guard.verify import payload_digest

from .helpers import HOSTILE, intent, terminal_safe
from .streamkit import drained, eventually, ledger_decisions, stored, stream_gateway
from .streamkit import stream_settings as settings_for

TRANSFER = "guard.in.agent-7.payments.transfer"


def _transfer(amount: float, principal: str = "agent-7") -> tuple[str, bytes]:
    body = intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": amount, "currency": "USD", "to": "account:acct-9"},
    )
    return f"guard.in.{principal}.payments.transfer", body


@dataclass
class Decided:
    holds: list[LedgerRecord]  # in the order their intents were published
    allow: LedgerRecord
    held_payloads: list[bytes]


async def _decide(nats_url: str, key: Path, policies: PolicySet, *amounts: float) -> Decided:
    """A stream-mode gateway decides one allowed transfer and a held one per amount, and
    stops (its streams stay)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    held = [_transfer(a, "agent-7" if i % 2 == 0 else "agent-9") for i, a in enumerate(amounts)]
    async with stream_gateway(settings_for(nats_url), policies, key):
        await js.publish(*_transfer(120))
        for subject, payload in held:
            await js.publish(subject, payload)  # in order: the gateway decides in order
        await eventually(lambda: drained(js), what="intake drained")
    records = await ledger_decisions(nc)
    await nc.close()
    by_digest = {r.payload_sha256: r for r in records if r.effect == "hold"}
    holds = [by_digest[payload_digest(p)] for _, p in held]
    [allow] = [r for r in records if r.effect == "allow"]
    return Decided(holds, allow, [p for _, p in held])


async def _run(*argv: str) -> tuple[int, str]:
    """``bus-guard ARGV`` as the command line runs it (its own event loop, in a thread)."""
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(functools.partial(main, list(argv), out=out))
    return code, out.getvalue()


async def _votes(nc: Client) -> list[tuple[str, bytes]]:
    return [(m.subject, m.data) for m in await stored(nc, "GUARD_APPROVE")]


async def _record_resolution(nc: Client, hold: LedgerRecord, effect: str, reason: str) -> None:
    """Write a hold's resolution as the gateway does (its contract: a decision record with
    id ``resolution_decision_id(prefix, hold)``, on ``<prefix>.ledger.<gateway>.d.<id>``,
    create-only). The gateway's side is not on this branch; this is its stand-in."""
    rid = resolution_decision_id("guard", hold.decision_id)
    record = LedgerRecord(
        kind="decision",
        gateway="gw-resolver",
        seq=0,
        prev="",
        ts=time.time(),
        decision_id=rid,
        effect=effect,
        reason=reason,
        subject=hold.subject,
        principal=hold.principal,
        action=hold.action,
        resource=hold.resource,
        payload_sha256=hold.payload_sha256,
        parents=(hold.decision_id,),
        hold=hold.decision_id,
    )
    await nc.jetstream().publish(
        f"guard.ledger.gw-resolver.d.{rid}",
        encode_record(record),
        headers={
            "Nats-Msg-Id": rid,
            "Nats-Expected-Last-Subject-Sequence": "0",
            "Nats-Expected-Last-Subject-Sequence-Subject": f"guard.ledger.*.d.{rid}",
        },
    )


# -- the API -------------------------------------------------------------------------------


async def test_approve_stores_a_token_the_gateways_reader_accepts(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    decided = await _decide(nats_url, keys[0], policies, 25000)
    [hold] = decided.holds
    approver = Ed25519PrivateKey.generate()
    nc = await nats.connect(nats_url)
    vote = await bus_guard.approve(nc, hold.decision_id, approver, reason="checked")
    [(subject, data)] = await _votes(nc)
    assert subject == f"guard.approve.{hold.decision_id}" == vote.subject
    assert data == vote.token.encode() and (vote.stream, vote.seq) == ("GUARD_APPROVE", 1)
    token = read_approval(data)
    assert check_signature(token, approver.public_key())
    assert not check_signature(token, Ed25519PrivateKey.generate().public_key())
    kid = kid_for(approver.public_key())
    assert token.kid == kid == vote.kid
    claims = token.claims
    assert claims == vote.claims
    assert claims.hold == hold.decision_id and claims.verdict == "approve"
    # bound to the held bytes: the digest of exactly what the agent sent
    assert claims.payload_sha256 == hold.payload_sha256 == payload_digest(decided.held_payloads[0])
    assert claims.approver == kid and claims.reason == "checked"
    assert abs(claims.iat - time.time()) < 60
    await nc.close()


async def test_reject_names_the_approver_given(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    [hold] = (await _decide(nats_url, keys[0], policies, 25000)).holds
    approver = Ed25519PrivateKey.generate()
    who = hold.approvers[0] if hold.approvers else "finance-lead"
    nc = await nats.connect(nats_url)
    vote = await bus_guard.reject(nc, hold.decision_id, approver, approver=who, reason="no")
    [(_, data)] = await _votes(nc)
    claims = read_approval(data).claims
    assert (claims.verdict, claims.approver, claims.reason) == ("reject", who, "no")
    assert vote.recorded is None and vote.hold == hold
    await nc.close()


async def test_what_is_not_an_open_hold_is_refused_and_nothing_is_published(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    decided = await _decide(nats_url, keys[0], policies, 25000, 30000)
    open_, resolved = decided.holds
    key = Ed25519PrivateKey.generate()
    nc = await nats.connect(nats_url)
    with pytest.raises(ApprovalRefused, match="no decision 0000000000 in the ledger") as exc:
        await bus_guard.approve(nc, "0000000000", key)
    assert exc.value.reason == "unknown_hold"
    with pytest.raises(ApprovalRefused, match="is not a hold: it is allow") as exc:
        await bus_guard.approve(nc, decided.allow.decision_id, key)
    assert exc.value.reason == "unknown_hold"
    await _record_resolution(nc, resolved, "deny", "rejected")
    with pytest.raises(ApprovalRefused, match=r"already resolved: denied \(rejected\)") as exc:
        await bus_guard.reject(nc, resolved.decision_id, key)
    assert exc.value.reason == "hold_resolved"
    with pytest.raises(ValueError, match="not a decision id"):
        await bus_guard.approve(nc, "guard.>", key)  # never a subject wildcard
    with pytest.raises(ValueError, match="reason"):
        await bus_guard.approve(nc, open_.decision_id, key, reason="x" * (MAX_REASON_CHARS + 1))
    assert await _votes(nc) == []
    # and the open one can still be voted on
    await bus_guard.approve(nc, open_.decision_id, key)
    assert [s for s, _ in await _votes(nc)] == [f"guard.approve.{open_.decision_id}"]
    await nc.close()


async def test_a_second_vote_by_the_same_approver_is_refused(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    [hold] = (await _decide(nats_url, keys[0], policies, 25000)).holds
    key = Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    nc = await nats.connect(nats_url)
    # The gateway's record of a counted vote (its contract: id approval_decision_id(prefix,
    # hold, approver), parent the hold); the gateway's side is not on this branch.
    vote_id = approval_decision_id("guard", hold.decision_id, kid)
    vote = LedgerRecord(
        kind="decision",
        gateway="gw-voter",
        seq=0,
        prev="",
        ts=time.time(),
        decision_id=vote_id,
        effect="approve",
        reason="approved",
        parents=(hold.decision_id,),
        hold=hold.decision_id,
        approver=kid,
    )
    await nc.jetstream().publish(f"guard.ledger.gw-voter.d.{vote_id}", encode_record(vote))
    with pytest.raises(ApprovalRefused, match=f"already voted on hold {hold.decision_id}"):
        await bus_guard.reject(nc, hold.decision_id, key)
    assert await _votes(nc) == []
    await nc.close()


# -- the command line ------------------------------------------------------------------------


async def test_cli_approve_and_reject(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, tmp_path: Path
) -> None:
    [hold] = (await _decide(nats_url, keys[0], policies, 25000)).holds
    key, _ = generate_key(tmp_path / "alice")
    kid = kid_for(load_private_key(key).public_key())
    base = ("--key", str(key), "--nats", nats_url)
    code, text = await _run("approve", hold.decision_id, *base, "--reason", "ok")
    assert code == 0, text
    assert terminal_safe(text, 1) == [
        f"approve vote on hold {hold.decision_id} by key {kid} stored: GUARD_APPROVE seq 1"
    ]
    who = hold.approvers[0] if hold.approvers else "finance-lead"
    code, text = await _run("reject", hold.decision_id, *base, "--approver", who)
    assert code == 0 and f"by {who} (key {kid}) stored: GUARD_APPROVE seq 2" in text
    nc = await nats.connect(nats_url)
    approved, rejected = (read_approval(data) for _, data in await _votes(nc))
    await nc.close()
    assert (approved.claims.verdict, approved.claims.approver, approved.claims.reason) == (
        "approve",
        kid,
        "ok",
    )
    assert (rejected.claims.verdict, rejected.claims.approver) == ("reject", who)
    public = load_private_key(key).public_key()
    assert check_signature(approved, public) and check_signature(rejected, public)


async def test_cli_refusals_exit_1_with_one_line_and_publish_nothing(
    nats_url: str,
    keys: tuple[Path, Path],
    policies: PolicySet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    decided = await _decide(nats_url, keys[0], policies, 25000)
    key, _ = generate_key(tmp_path / "alice")
    base = ("--key", str(key), "--nats", nats_url)
    capsys.readouterr()
    for decision_id, why in (
        ("0000000000", "no decision 0000000000 in the ledger GUARD_LEDGER"),
        (decided.allow.decision_id, "is not a hold: it is allow (allowed_by_rule)"),
    ):
        code, text = await _run("approve", decision_id, *base)
        assert (code, text) == (1, "")
        (line,) = terminal_safe(capsys.readouterr().err, 1)
        assert line.startswith("bus-guard: ") and why in line
    nc = await nats.connect(nats_url)
    assert await _votes(nc) == []
    # no approve stream: nothing can store the vote
    await nc.jetstream().delete_stream("GUARD_APPROVE")
    code, _ = await _run("approve", decided.holds[0].decision_id, *base)
    (line,) = terminal_safe(capsys.readouterr().err, 1)
    assert code == 1 and f"no stream stores guard.approve.{decided.holds[0].decision_id}" in line
    await nc.close()


async def test_cli_usage_and_configuration_errors_exit_2(
    nats_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, jwks = generate_key(tmp_path / "alice")
    hostile_key = tmp_path / f"key{HOSTILE}.pem"
    nats_ = ("--nats", nats_url)
    cases = [
        (("approve", "D1", "--key", str(tmp_path / "absent.pem")), "signing key not found"),
        (("approve", "D1", "--key", str(hostile_key)), "signing key not found"),
        (("reject", "D1", "--key", str(jwks)), "not a PEM private key"),
        (("approve", "guard.>", "--key", str(key)), "is not a decision id"),
        (("approve", "D1", "--key", str(key), "--reason", "x" * 513), "reason"),
        (("approve", "D1", "--key", str(key), "--approver", "a b"), "approver"),
        (("approve", "D1", "--key", str(key), "--creds", str(tmp_path / "no.creds")), "creds"),
        (("holds", "--principal", "agent 7"), "is not a principal"),
    ]
    for argv, why in cases:
        code, _ = await _run(*argv, *nats_)
        err = capsys.readouterr().err
        lines = terminal_safe(err)
        assert code == 2, (argv, err)
        assert lines[-1].startswith("bus-guard: ") and why in lines[-1], (argv, err)
        assert "Traceback" not in err


def test_cli_without_a_reachable_server_exits_1_promptly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = generate_key(tmp_path)
    with NatsServer(jetstream=False) as server:
        url = server.url  # nothing listens there once it stopped
    for argv in (("approve", "D1", "--key", str(key)), ("holds",)):
        started = time.monotonic()
        code = main([*argv, "--nats", url], out=io.StringIO())
        assert code == 1 and time.monotonic() - started < 10
        err = capsys.readouterr().err
        (line,) = terminal_safe(err, 1)  # one line, no traceback per connect attempt
        assert line.startswith(f"bus-guard: cannot connect to {url}")


async def test_wait_says_when_no_gateway_recorded_the_vote(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, tmp_path: Path
) -> None:
    """--wait with no gateway running: the vote is stored and waits; exit 1, said so. (What
    --wait prints for a vote a gateway recorded needs the gateway's side: not tested here.)"""
    [hold] = (await _decide(nats_url, keys[0], policies, 25000)).holds
    key, _ = generate_key(tmp_path / "alice")
    argv = ("approve", hold.decision_id, "--key", str(key), "--nats", nats_url)
    code, text = await _run(*argv, "--wait", "0.3")
    lines = terminal_safe(text, 2)
    assert code == 1 and "stored: GUARD_APPROVE seq 1" in lines[0]
    assert lines[1].startswith("not recorded by a gateway within 0.3s")


# -- holds ---------------------------------------------------------------------------------


async def test_holds_lists_open_holds_until_resolved(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    decided = await _decide(nats_url, keys[0], policies, 25000, 30000)
    first, second = decided.holds  # agent-7, then agent-9
    code, text = await _run("holds", "--nats", nats_url)
    lines = terminal_safe(text, 2)
    assert code == 0
    for line, hold in zip(lines, (first, second), strict=True):  # oldest first
        assert line.startswith(hold.decision_id)
        assert f"{hold.principal}  payments.transfer account:acct-1" in line
        assert "rules=transfer-large" in line
    assert decided.allow.decision_id not in text

    code, text = await _run("holds", "--nats", nats_url, "--json")
    got = [msgspec.json.decode(line, type=OpenHold) for line in terminal_safe(text, 2)]
    assert [h.decision_id for h in got] == [first.decision_id, second.decision_id]
    assert got[0].payload_sha256 == payload_digest(decided.held_payloads[0])
    assert got[0].principal == "agent-7" and got[0].in_ledger
    assert (got[0].approvers, got[0].quorum, got[0].expires) == (
        first.approvers,
        first.quorum,
        first.expires,
    )

    code, text = await _run("holds", "--nats", nats_url, "--principal", "agent-9")
    assert terminal_safe(text, 1)[0].startswith(second.decision_id)
    code, text = await _run("holds", "--nats", nats_url, "--action", "tools.>")
    assert terminal_safe(text, 1) == ["no open holds from the last 1d"]
    code, text = await _run("holds", "--nats", nats_url, "--limit", "1")
    lines = terminal_safe(text, 2)
    assert lines[0].startswith(first.decision_id) and "more open holds than --limit 1" in lines[1]

    nc = await nats.connect(nats_url)
    await _record_resolution(nc, first, "allow", "approved")
    listed = await open_holds(nc, since=time.time() - 3600, limit=10)
    assert [h.decision_id for h in listed.holds] == [second.decision_id] and not listed.more
    # a window that ends before the holds were made sees none
    assert (await open_holds(nc, since=time.time() + 1, limit=10)).holds == []
    await _record_resolution(nc, second, "deny", "expired")
    await nc.close()
    code, text = await _run("holds", "--nats", nats_url)
    assert (code, terminal_safe(text, 1)) == (0, ["no open holds from the last 1d"])


def test_a_hold_line_shows_votes_and_expiry_escaped() -> None:
    now = 1_000_000.0
    hold = OpenHold(
        decision_id="D1",
        subject="guard.in.agent-7.payments.transfer",
        principal="agent-7",
        action="payments.transfer",
        resource=f"account:{HOSTILE}",
        rules=("transfer-large",),
        ts=now - 750,
        payload_sha256="A" * 43,
        approvers=("alice", "bob", "carol"),
        quorum=2,
        expires=now + 3 * 3600 + 1200,
        approved_by=("alice",),
        rejected_by=("carol",),
    )
    (line,) = terminal_safe(format_hold(hold, now) + "\n", 1)
    assert line.startswith("D1     12m old  agent-7  payments.transfer account:\\x1b[2J")
    assert "approvals 1/2 (alice) rejected by carol  expires in 3h20m" in line
    expired = msgspec.structs.replace(hold, expires=now - 90, approved_by=(), rejected_by=())
    assert format_hold(expired, now).endswith("approvals 0/2  expired 1m ago")
    unknown = msgspec.structs.replace(hold, in_ledger=False, approvers=(), quorum=0)
    assert "not in the ledger (cannot be voted on)" in format_hold(unknown, now)
    assert [span(s) for s in (0, 45, 750, 10800, 12000, 187200)] == [
        "0s",
        "45s",
        "12m",
        "3h",
        "3h20m",
        "2d4h",
    ]
