"""Approvals end to end (stream mode, real nats-server): holds released at quorum exactly
once, rejections and expiry denied, and every bad vote refused and recorded (SCENARIOS S20).

The policy set here is the shipped one, wrapped so that its holds name approvers with
keys made per test (:class:`_Approving`): these tests are about the gateway's vote
handling; the ``approvers:`` section of the policy language has its own tests.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet
from nats.aio.client import Client

from bus_guard.approval import ApprovalClaims, sign_approval
from bus_guard.cli._main import main
from bus_guard.cli._watch import format_ledger_record
from bus_guard.decision import (
    Decision,
    Effect,
    HoldTerms,
    Request,
    approval_decision_id,
    intent_decision_id,
    resolution_decision_id,
)
from bus_guard.ledger import LedgerRecord
from bus_guard.ledger._audit import audit
from bus_guard.ledger._records import encode_record
from bus_guard.policy._load import PolicySet
from bus_guard.server import NatsServer
from bus_guard.signing._keys import kid_for
from bus_guard.verify import JwkEntry, Verifier, b64url_encode, load_jwks, verify_message

from .helpers import intent
from .streamkit import (
    drained,
    eventually,
    ledger_decisions,
    records,
    stored,
    stream_gateway,
    stream_settings,
)

TRANSFER = "guard.in.agent-7.payments.transfer"


@dataclass
class _Approver:
    name: str
    key: Ed25519PrivateKey

    @property
    def kid(self) -> str:
        return kid_for(self.key.public_key())

    def entry(self, **kw: Any) -> JwkEntry:
        raw = self.key.public_key().public_bytes_raw()
        x = b64url_encode(raw).decode()
        jwks = load_jwks(
            {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, **kw}]}
        )
        [entry] = jwks.entries
        return entry

    def vote(self, hold: LedgerRecord, verdict: str = "approve", **kw: Any) -> bytes:
        claims = ApprovalClaims(
            hold=kw.pop("hold_id", hold.decision_id),
            payload_sha256=kw.pop("payload_sha256", hold.payload_sha256),
            approver=kw.pop("approver", self.name),
            verdict=verdict,  # type: ignore[arg-type]
            iat=time.time(),
            reason=kw.pop("reason", ""),
        )
        return sign_approval(kw.pop("key", self.key), kw.pop("kid", self.kid), claims).encode()


class _Approving:
    """The shipped policies, with hold terms and approvers' keys added."""

    def __init__(
        self,
        inner: PolicySet,
        approvers: list[_Approver],
        *,
        quorum: int,
        ttl_s: float = 3600.0,
        eligible: list[str] | None = None,
        revoked: frozenset[str] = frozenset(),
    ) -> None:
        self.inner = inner
        names = eligible if eligible is not None else [a.name for a in approvers]
        self.terms = HoldTerms(tuple(sorted(names)), quorum, ttl_s)
        self.keys = {
            a.kid: (a.name, a.entry(revoked_at=1) if a.name in revoked else a.entry())
            for a in approvers
        }
        self.digest, self.version, self.mode = inner.digest, inner.version, inner.mode

    def evaluate(self, request: Request) -> Decision:
        decision = self.inner.evaluate(request)
        if decision.effect is Effect.HOLD:
            return msgspec.structs.replace(decision, hold=self.terms)
        return decision

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return self.keys.get(kid)


def _transfer(amount: float, **kw: Any) -> bytes:
    return intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": amount, "currency": "USD", "to": "account:acct-9"},
        **kw,
    )


def _people(*names: str) -> list[_Approver]:
    return [_Approver(n, Ed25519PrivateKey.generate()) for n in names]


async def _hold(nc: Client, intent_id: str = "i-hold") -> LedgerRecord:
    js = nc.jetstream()
    await js.publish(TRANSFER, _transfer(25000, id=intent_id))
    hold_id = intent_decision_id("guard", "agent-7", intent_id)
    found: list[LedgerRecord] = []

    async def recorded() -> bool:
        found[:] = [r for r in await ledger_decisions(nc) if r.decision_id == hold_id]
        return bool(found)

    await eventually(recorded, what="the hold recorded")
    [hold] = found
    assert hold.effect == "hold"
    return hold


async def _send(nc: Client, hold_id: str, body: bytes) -> None:
    await nc.jetstream().publish(f"guard.approve.{hold_id}", body)


async def _settled(nc: Client) -> bool:
    info = await nc.jetstream().consumer_info("GUARD_APPROVE", "bus-guard-approve")
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def _audited(nc: Client, jwks: Path) -> None:
    """The ledger, votes and resolutions included, verifies whole and sealed."""
    ledger = await stored(nc, "GUARD_LEDGER", "guard.ledger.>")
    report = audit(ledger, prefix="guard", jwks=load_jwks(jwks), require_sealed=True)
    assert report.ok, report.problems


async def _by_id(nc: Client) -> dict[str, LedgerRecord]:
    return {r.decision_id: r for r in await ledger_decisions(nc)}


def _joserfc_claims(jwks_path: Path, token: str) -> dict[str, Any]:
    keyset = KeySet.import_key_set(msgspec.json.decode(jwks_path.read_bytes()))
    with warnings.catch_warnings():  # "EdDSA" is what SPEC §6 fixes (RFC 9864 warns)
        warnings.simplefilter("ignore", SecurityWarning)
        return dict(jwt.decode(token, keyset, algorithms=["EdDSA"]).claims)


@pytest.mark.parametrize("quorum", [1, 2])
async def test_quorum_releases_the_held_bytes_once_with_an_artifact_naming_the_votes(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, quorum: int
) -> None:
    alice, bob = approvers = _people("alice", "bob")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=quorum)
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]) as gw:  # type: ignore[arg-type]
        hold = await _hold(nc)
        assert hold.quorum == quorum and hold.approvers == ("alice", "bob")
        assert hold.expires > hold.ts
        await _send(nc, hold.decision_id, alice.vote(hold, reason="looks fine"))
        await eventually(lambda: _settled(nc), what="vote settled")
        if quorum == 2:
            assert await stored(nc, "GUARD_EXEC") == []  # one vote of two: still held
            await _send(nc, hold.decision_id, bob.vote(hold))
            await eventually(lambda: _settled(nc), what="second vote settled")
        stats = gw.statistics()
    [released] = await stored(nc, "GUARD_EXEC")
    [hold_msg] = records(await stored(nc, "GUARD_HOLD"))
    assert released.data == hold_msg["payload"].encode()  # the held bytes, unchanged
    assert released.subject == "guard.exec.agent-7.payments.transfer"
    ledger = await _by_id(nc)
    votes = [approval_decision_id("guard", hold.decision_id, a.name) for a in approvers[:quorum]]
    resolution = ledger[resolution_decision_id("guard", hold.decision_id)]
    assert (resolution.effect, resolution.reason) == ("allow", "approved")
    assert sorted(resolution.approvals) == sorted(votes)
    assert format_ledger_record(resolution).plain.split()[0] == "RELEASED"
    assert released.headers["Guard-Decision"] == resolution.decision_id
    for vote_id in votes:
        vote = ledger[vote_id]
        assert (vote.effect, vote.parents, vote.hold) == (
            "approve",
            (hold.decision_id,),
            hold.decision_id,
        )
    claims = verify_message(
        Verifier(keys[1]), subject=released.subject, headers=released.headers, payload=released.data
    )
    assert claims.hold == hold.decision_id and sorted(claims.approvals) == sorted(votes)
    independent = _joserfc_claims(keys[1], released.headers["Guard-Artifact"])
    assert independent["hold"] == hold.decision_id and independent["jti"] == resolution.decision_id
    assert stats.votes == quorum and stats.holds_released == 1 and stats.votes_refused == 0
    await _audited(nc, keys[1])
    # `bus-guard lineage` shows the votes and the release under the hold
    out = io.StringIO()
    code = await asyncio.to_thread(main, ["lineage", hold.decision_id, "--nats", nats_url], out=out)
    descendants = out.getvalue().split("descendants (caused):")[1]
    assert code == 0 and resolution.decision_id in descendants
    assert all(vote_id in descendants for vote_id in votes)
    await nc.close()


async def test_a_release_forwards_the_headers_the_held_intent_came_with(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """A held msgpack intent is released with its Content-Type (an executor must read the
    bytes as what they are) and its own headers, never an inbound ``Nats-*``/``Guard-*``."""
    [alice] = approvers = _people("alice")
    nc = await nats.connect(nats_url)
    body = msgspec.msgpack.encode(msgspec.json.decode(_transfer(25000, id="i-mp")))
    sent = {
        "Content-Type": "application/msgpack",
        "X-Request-Id": "req-42",
        "Guard-Artifact": "forged",
    }
    wrapped = _Approving(policies, approvers, quorum=1)
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]):  # type: ignore[arg-type]
        await nc.jetstream().publish(TRANSFER, body, headers=sent)
        hold_id = intent_decision_id("guard", "agent-7", "i-mp")

        async def held() -> bool:
            return hold_id in await _by_id(nc)

        await eventually(held, what="the hold recorded")
        hold = (await _by_id(nc))[hold_id]
        assert hold.effect == "hold"
        await _send(nc, hold.decision_id, alice.vote(hold))
        await eventually(lambda: _settled(nc), what="vote settled")
    [released] = await stored(nc, "GUARD_EXEC")
    assert released.data == body
    assert released.headers["Content-Type"] == "application/msgpack"
    assert released.headers["X-Request-Id"] == "req-42"
    assert released.headers["Guard-Artifact"] != "forged"
    claims = verify_message(
        Verifier(keys[1]), subject=released.subject, headers=released.headers, payload=body
    )
    assert claims.hold == hold.decision_id
    await nc.close()


async def test_a_rejection_denies_the_hold_and_later_votes_are_refused(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    alice, bob = approvers = _people("alice", "bob")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=2)
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]) as gw:  # type: ignore[arg-type]
        hold = await _hold(nc)
        await _send(nc, hold.decision_id, alice.vote(hold, "reject", reason="unknown payee"))
        await eventually(lambda: _settled(nc), what="rejection settled")
        await _send(nc, hold.decision_id, bob.vote(hold))
        await eventually(lambda: _settled(nc), what="late vote settled")
        stats = gw.statistics()
    assert await stored(nc, "GUARD_EXEC") == []
    denials = records(await stored(nc, "GUARD_DENY"))
    reasons = sorted(d["reason"] for d in denials)
    assert reasons == ["hold_resolved", "rejected"]
    resolution = (await _by_id(nc))[resolution_decision_id("guard", hold.decision_id)]
    assert (resolution.effect, resolution.reason) == ("deny", "rejected")
    assert format_ledger_record(resolution).plain.split()[0] == "DENIED"
    assert stats.holds_rejected == 1 and stats.votes_refused == 1
    await nc.close()


async def test_an_unresolved_hold_expires_into_a_denial(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    approvers = _people("alice")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=1, ttl_s=0.5)
    settings = stream_settings(nats_url, hold_sweep_s=0.2)
    async with stream_gateway(settings, wrapped, keys[0]) as gw:  # type: ignore[arg-type]
        hold = await _hold(nc)

        async def denied() -> bool:
            return any(d["reason"] == "expired" for d in records(await stored(nc, "GUARD_DENY")))

        await eventually(denied, what="the expiry denial")
        await _send(nc, hold.decision_id, approvers[0].vote(hold))  # too late
        await eventually(lambda: _settled(nc), what="late vote settled")
        stats = gw.statistics()
    assert await stored(nc, "GUARD_EXEC") == []
    resolution = (await _by_id(nc))[resolution_decision_id("guard", hold.decision_id)]
    assert (resolution.effect, resolution.reason) == ("deny", "expired")
    assert sorted(d["reason"] for d in records(await stored(nc, "GUARD_DENY"))) == [
        "expired",
        "hold_resolved",
    ]
    assert stats.holds_expired == 1
    await nc.close()


async def test_every_bad_vote_is_refused_recorded_and_changes_nothing(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    alice, bob, carol, mallory = _people("alice", "bob", "carol", "mallory")
    nc = await nats.connect(nats_url)
    # carol has a key but is not eligible for these holds; bob's key is revoked
    wrapped = _Approving(
        policies,
        [alice, bob, carol],
        quorum=2,
        eligible=["alice", "bob"],
        revoked=frozenset({"bob"}),
    )
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]) as gw:  # type: ignore[arg-type]
        hold = await _hold(nc)
        other = await _hold(nc, "i-other")
        allowed_id = intent_decision_id("guard", "agent-7", "i-small")
        await nc.jetstream().publish(TRANSFER, _transfer(10, id="i-small"))
        bad: dict[str, tuple[str, bytes]] = {
            "malformed": (hold.decision_id, b"not a token"),
            "bad_signature": (
                hold.decision_id,
                alice.vote(hold, key=Ed25519PrivateKey.generate()),
            ),
            "approver_not_allowed": (hold.decision_id, mallory.vote(hold)),  # unknown key
            "revoked": (hold.decision_id, bob.vote(hold)),
            "ineligible": (hold.decision_id, carol.vote(hold)),
            "impersonation": (hold.decision_id, alice.vote(hold, approver="bob")),
            "other bytes": (
                hold.decision_id,
                alice.vote(hold, payload_sha256=other.payload_sha256),
            ),
            "other hold": (hold.decision_id, alice.vote(hold, hold_id=other.decision_id)),
            "unknown_hold": (
                "01NOSUCHDECISION000000000",
                alice.vote(hold, hold_id="01NOSUCHDECISION000000000"),
            ),
        }
        await eventually(lambda: drained(nc.jetstream()), what="intents decided")
        bad["not a hold"] = (allowed_id, alice.vote(hold, hold_id=allowed_id))
        for hold_id, body in bad.values():
            await _send(nc, hold_id, body)
        await eventually(lambda: _settled(nc), what="bad votes settled")
        # one real vote, then the same approver again: duplicate
        await _send(nc, hold.decision_id, alice.vote(hold))
        await _send(nc, hold.decision_id, alice.vote(hold, reason="again"))
        await eventually(lambda: _settled(nc), what="duplicate settled")
        stats = gw.statistics()
    denials = [d for d in records(await stored(nc, "GUARD_DENY"))]
    got = sorted(d["reason"] for d in denials)
    assert got == sorted(
        [
            "malformed",
            "bad_signature",
            "approver_not_allowed",
            "approver_not_allowed",
            "approver_not_allowed",
            "approver_not_allowed",
            "malformed",
            "malformed",
            "unknown_hold",
            "unknown_hold",
            "duplicate_approval",
        ]
    )
    # exec holds only the small allowed transfer: nothing was released
    [only] = await stored(nc, "GUARD_EXEC")
    assert only.headers["Guard-Decision"] == allowed_id
    ledger = await _by_id(nc)
    assert resolution_decision_id("guard", hold.decision_id) not in ledger  # still open
    refused = [r for r in ledger.values() if r.effect == "deny" and r.reason in set(got)]
    assert len(refused) == len(got)
    # `bus-guard watch` tells the engine's refused votes from resolutions
    assert {format_ledger_record(r).plain.split()[0] for r in refused} == {"REFUSED"}
    assert all(r.parents == (r.hold or r.parents[0],) for r in refused if r.parents)
    assert stats.votes == 1 and stats.votes_refused == len(got) and stats.holds_released == 0
    await _audited(nc, keys[1])
    await nc.close()


async def test_two_gateways_racing_on_one_hold_resolve_it_once(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    approvers = _people("alice", "bob", "carol")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=2)
    async with (
        stream_gateway(stream_settings(nats_url, "gw-1"), wrapped, keys[0]) as gw1,  # type: ignore[arg-type]
        stream_gateway(stream_settings(nats_url, "gw-2"), wrapped, keys[0]) as gw2,  # type: ignore[arg-type]
    ):
        holds = [await _hold(nc, f"i-{i}") for i in range(6)]
        for hold in holds:  # three votes each, all at once: quorum reached on either
            for a in approvers:
                await _send(nc, hold.decision_id, a.vote(hold))
        await eventually(lambda: _settled(nc), what="votes settled")
        s1, s2 = gw1.statistics(), gw2.statistics()
    exec_msgs = await stored(nc, "GUARD_EXEC")
    decisions = sorted(m.headers["Guard-Decision"] for m in exec_msgs)
    assert decisions == sorted(resolution_decision_id("guard", h.decision_id) for h in holds)
    assert s1.holds_released + s2.holds_released == len(holds)
    # a third vote lands before the resolution (counted) or after it (refused)
    assert s1.votes + s2.votes + s1.votes_refused + s2.votes_refused == 3 * len(holds)
    assert s1.votes + s2.votes >= 2 * len(holds)
    await _audited(nc, keys[1])
    await nc.close()


async def test_a_release_recorded_but_not_published_is_published_once_after_a_restart(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """The resolution is in the ledger, its exec message is not (the exec stream is gone):
    the vote is not acked; a fresh gateway (another process's state) takes the redelivered
    vote, adopts the vote and the resolution, and publishes the release exactly once."""
    [alice] = approvers = _people("alice")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    wrapped = _Approving(policies, approvers, quorum=1)
    async with stream_gateway(stream_settings(nats_url, "gw-1"), wrapped, keys[0]) as gw1:  # type: ignore[arg-type]
        hold = await _hold(nc)
        exec_config = (await js.stream_info("GUARD_EXEC")).config
        await js.delete_stream("GUARD_EXEC")
        await _send(nc, hold.decision_id, alice.vote(hold))
        resolution_id = resolution_decision_id("guard", hold.decision_id)

        async def resolved() -> bool:
            return resolution_id in await _by_id(nc)

        await eventually(resolved, what="the resolution recorded")
        first = gw1.statistics()
    assert first.holds_released == 1
    assert not await _settled(nc)  # the vote was not acked: its release is not stored
    await js.add_stream(exec_config)
    async with stream_gateway(stream_settings(nats_url, "gw-2"), wrapped, keys[0]) as gw2:  # type: ignore[arg-type]
        await eventually(lambda: _settled(nc), timeout_s=30, what="vote settled on gw-2")
        second = gw2.statistics()
    [released] = await stored(nc, "GUARD_EXEC")
    assert released.headers["Guard-Decision"] == resolution_id
    ledger = await _by_id(nc)
    assert ledger[resolution_id].gateway == "gw-1"  # recorded once, by the first gateway
    assert second.votes == 0 and second.holds_released == 0  # adopted, not decided again
    assert released.headers["Guard-Artifact"] == ledger[resolution_id].artifact
    await nc.close()


async def test_the_python_api_votes_by_key_id_and_waits_for_the_gateways_record(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """``bus_guard.approve``/``reject`` with ``wait_s`` against a running gateway: the
    approver claim defaults to the key's kid, which the gateway maps to the policy's id;
    the caller gets the recorded vote and, at quorum, the resolution."""
    from bus_guard import approve, reject

    alice, bob, carol = approvers = _people("alice", "bob", "carol")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=2, eligible=["alice", "bob"])
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]):  # type: ignore[arg-type]
        hold = await _hold(nc)
        # carol's key is an approver's, but not one this hold names: only the gateway
        # knows (the caller signs with a kid), and --wait reports its refusal
        refused = await approve(nc, hold.decision_id, carol.key, wait_s=20)
        assert refused.recorded is not None and refused.resolution is None
        assert (refused.recorded.effect, refused.recorded.reason) == (
            "deny",
            "approver_not_allowed",
        )
        first = await approve(nc, hold.decision_id, alice.key, reason="ok", wait_s=20)
        assert first.claims.approver == alice.kid  # the default: the key's id
        assert first.recorded is not None and first.recorded.effect == "approve"
        assert first.recorded.approver == "alice" and first.resolution is None
        second = await approve(nc, hold.decision_id, bob.key, wait_s=20)
        assert second.recorded is not None and second.recorded.approver == "bob"
        assert second.resolution is not None
        assert (second.resolution.effect, second.resolution.reason) == ("allow", "approved")
        other = await _hold(nc, "i-other")
        rejected = await reject(nc, other.decision_id, bob.key, reason="no", wait_s=20)
        assert rejected.resolution is not None and rejected.resolution.reason == "rejected"
    [released] = await stored(nc, "GUARD_EXEC")
    assert released.headers["Guard-Decision"] == second.resolution.decision_id
    await nc.close()


def _approving_policies(tmp_path: Path) -> tuple[Path, dict[str, Ed25519PrivateKey]]:
    """The shipped policies with fresh approver keys: the shipped approvers' JWKS files are
    public keys whose private halves were thrown away, so each is replaced."""
    from bus_guard.signing._keys import generate_key, load_private_key

    from .conftest import POLICIES

    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    keys: dict[str, Ed25519PrivateKey] = {}
    for jwks in sorted((target / "approvers").glob("*.jwks.json")):
        name = jwks.name.removesuffix(".jwks.json")
        private, public = generate_key(tmp_path / "approver-keys" / name)
        shutil.copyfile(public, jwks)
        keys[name] = load_private_key(private)
    return target, keys


async def test_the_shipped_policy_needs_both_treasury_leads(
    nats_url: str, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """The real policy path: `approvers:` and `approval: {quorum: 2}` in YAML; one vote is
    not enough, the second releases; a non-lead's key is refused."""
    from bus_guard import approve
    from bus_guard.policy._load import load_policies

    directory, approver_keys = _approving_policies(tmp_path)
    policies = load_policies(directory)
    nc = await nats.connect(nats_url)
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        hold = await _hold(nc)
        assert (hold.approvers, hold.quorum) == (("alice", "bob"), 2)
        assert hold.rules == ("transfer-large",)
        assert 86390 < hold.expires - hold.ts <= 86400  # ttl: 24h
        first = await approve(nc, hold.decision_id, approver_keys["alice"], wait_s=20)
        assert first.recorded is not None and first.resolution is None
        stranger = Ed25519PrivateKey.generate()
        refused = await approve(nc, hold.decision_id, stranger, wait_s=20)
        assert refused.recorded is not None
        assert refused.recorded.reason == "approver_not_allowed"
        assert await stored(nc, "GUARD_EXEC") == []
        second = await approve(nc, hold.decision_id, approver_keys["bob"], wait_s=20)
        assert second.resolution is not None and second.resolution.reason == "approved"
    [released] = await stored(nc, "GUARD_EXEC")
    assert released.headers["Guard-Decision"] == second.resolution.decision_id
    await nc.close()


async def test_a_gateway_killed_between_approval_and_release_releases_once_after_restart(
    nats_server: NatsServer, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """SCENARIOS S20 with real processes: both votes recorded and the resolution recorded,
    but its exec message not stored (the exec stream is gone), then SIGKILL. After the
    stream is back and a gateway restarts, the redelivered vote adopts what was recorded
    and the held intent is released exactly once."""
    from bus_guard import approve

    from .crashkit import GatewayProcess, run_argv

    directory, approver_keys = _approving_policies(tmp_path)
    url = nats_server.url
    argv = run_argv(url, keys[0], "gw-kill", "--policies", str(directory))
    nc = await nats.connect(url)
    js = nc.jetstream()
    first = GatewayProcess(argv)
    first.start()
    try:
        hold = await _hold(nc)
        exec_config = (await js.stream_info("GUARD_EXEC")).config
        await js.delete_stream("GUARD_EXEC")
        await approve(nc, hold.decision_id, approver_keys["alice"])
        await approve(nc, hold.decision_id, approver_keys["bob"])
        resolution_id = resolution_decision_id("guard", hold.decision_id)

        async def resolved() -> bool:
            return resolution_id in await _by_id(nc)

        await eventually(resolved, what="the release recorded")
    finally:
        first.kill()  # SIGKILL: the last vote is not acked
    assert not await _settled(nc)
    await js.add_stream(exec_config)
    second = GatewayProcess(argv)
    second.start()
    try:
        await eventually(lambda: _settled(nc), timeout_s=60, what="the vote settled after restart")
    finally:
        second.stop()
    [released] = await stored(nc, "GUARD_EXEC")
    assert released.headers["Guard-Decision"] == resolution_id
    ledger = await _by_id(nc)
    assert released.headers["Guard-Artifact"] == ledger[resolution_id].artifact
    [hold_msg] = records(await stored(nc, "GUARD_HOLD"))
    assert released.data == hold_msg["payload"].encode()
    await nc.close()


async def test_a_child_of_a_hold_waits_and_descends_from_its_release(
    nats_url: str, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """A child naming a held decision as its parent waits (not denied for good); once the
    approvers release the hold, the child is decided against the release: allowed, with
    the held intent's lineage. A child of a rejected hold is denied."""
    from bus_guard import approve, reject
    from bus_guard.policy._load import load_policies

    directory, approver_keys = _approving_policies(tmp_path)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, lineage_wait_s=60.0, lineage_nak_delay_s=0.1)
    async with stream_gateway(settings, load_policies(directory), keys[0]) as gw:
        hold = await _hold(nc)
        rejected_hold = await _hold(nc, "i-rejected")
        for parent, child_id in ((hold, "child"), (rejected_hold, "orphan")):
            await js.publish(TRANSFER, _transfer(10, id=child_id, parents=[parent.decision_id]))

        async def waiting() -> bool:
            return gw.statistics().lineage_waits >= 2

        await eventually(waiting, what="both children waiting")
        for name in ("alice", "bob"):
            await approve(nc, hold.decision_id, approver_keys[name], wait_s=20)
        await reject(nc, rejected_hold.decision_id, approver_keys["alice"], wait_s=20)
        await eventually(lambda: drained(js), timeout_s=30, what="children decided")
    ledger = await _by_id(nc)
    child = ledger[intent_decision_id("guard", "agent-7", "child")]
    orphan = ledger[intent_decision_id("guard", "agent-7", "orphan")]
    assert (child.effect, child.parents) == ("allow", (hold.decision_id,))
    assert child.lineage_depth == hold.lineage_depth + 1
    assert (orphan.effect, orphan.reason) == ("deny", "lineage_violation")
    executed = {m.headers["Guard-Decision"] for m in await stored(nc, "GUARD_EXEC")}
    assert executed == {child.decision_id, resolution_decision_id("guard", hold.decision_id)}
    await nc.close()


async def test_a_forged_release_in_the_ledger_is_never_forwarded(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Whoever can write the ledger stores a "release" under the hold's resolution id
    before the approvers vote: the gateway adopts only a resolution that verifies, so the
    held bytes never reach exec with that record's artifact, and it says why."""
    [alice] = approvers = _people("alice")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=1)
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]) as gw:  # type: ignore[arg-type]
        hold = await _hold(nc)
        resolution_id = resolution_decision_id("guard", hold.decision_id)
        forged = msgspec.structs.replace(
            hold,
            gateway="evil",
            decision_id=resolution_id,
            effect="allow",
            reason="approved",
            hold=hold.decision_id,
            artifact="eyJhbGciOiJFZERTQSJ9.e30.AAAA",
        )
        await nc.jetstream().publish(f"guard.ledger.evil.d.{resolution_id}", encode_record(forged))
        await _send(nc, hold.decision_id, alice.vote(hold))
        await eventually(lambda: _settled(nc), what="vote settled")
        stats = gw.statistics()
    assert await stored(nc, "GUARD_EXEC") == []
    assert stats.forged_resolutions == 1 and stats.holds_released == 0
    [refused] = records(await stored(nc, "GUARD_DENY"))
    assert refused["reason"] == "hold_resolved" and "does not verify" in refused["message"]
    await nc.close()


async def test_a_hold_that_expired_while_no_gateway_swept_is_denied_after_a_restart(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """The sweep starts at the holds that can still be open (stored within the longest
    ttl), found at start-up: a hold left by a gateway that stopped before its expiry is
    denied by the next gateway's first sweep."""
    approvers = _people("alice")
    nc = await nats.connect(nats_url)
    wrapped = _Approving(policies, approvers, quorum=1, ttl_s=1.0)
    quiet = stream_settings(nats_url, "gw-1", hold_sweep_s=3600.0)  # swept at start only
    async with stream_gateway(quiet, wrapped, keys[0]):  # type: ignore[arg-type]
        hold = await _hold(nc)
    assert resolution_decision_id("guard", hold.decision_id) not in await _by_id(nc)
    sweeping = stream_settings(nats_url, "gw-2", hold_sweep_s=0.2)
    async with stream_gateway(sweeping, wrapped, keys[0]) as gw:  # type: ignore[arg-type]

        async def denied() -> bool:
            return gw.statistics().holds_expired == 1

        await eventually(denied, what="the expired hold denied")
    resolution = (await _by_id(nc))[resolution_decision_id("guard", hold.decision_id)]
    assert (resolution.effect, resolution.reason, resolution.gateway) == ("deny", "expired", "gw-2")
    await nc.close()


async def test_a_hold_without_expiry_does_not_pin_the_sweep(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """A hold stored without an expiry (held under a policy set that gave it no terms)
    never expires: the sweep moves past it instead of reading from it on every round."""
    nc = await nats.connect(nats_url)
    settings = stream_settings(nats_url, hold_sweep_s=0.1)
    async with stream_gateway(settings, policies, keys[0]) as gw:
        record = msgspec.json.encode(
            {
                "decision_id": "NOEXPIRY",
                "effect": "hold",
                "reason": "escalated_by_rule",
                "message": "",
                "subject": TRANSFER,
                "principal": "agent-7",
                "action": "payments.transfer",
            }
        )
        ack = await nc.jetstream().publish("guard.hold.agent-7.payments.transfer", record)
        approvals = gw._approvals
        assert approvals is not None

        async def moved_past() -> bool:
            return approvals._sweep_from > ack.seq

        await eventually(moved_past, what="the sweep moved past the hold")
    await nc.close()
