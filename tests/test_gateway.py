"""The gateway end to end on a real nats-server: what must arrive, and what must not.

Every test ends with a *sentinel*: a malformed intent, sent last, whose denial can only be
published after everything sent before it was decided (the gateway handles one
subscription's messages in order). Waiting for the sentinel then asserting the exact
counts proves what did NOT arrive, without sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import nats
import pytest
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet

from bus_guard.decision import Decision, Request
from bus_guard.errors import SigningError
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.policy._load import PolicySet
from bus_guard.settings import ReplyInbox, Settings
from bus_guard.signing._keys import load_private_key
from bus_guard.signing._signer import Signer
from bus_guard.verify import ArtifactClaims, JwkEntry, Verifier, verify_message

from .helpers import Collector, intent, outputs, sentinel

TRANSFER = "guard.in.agent-7.payments.transfer"


def _small_transfer(**kw: Any) -> bytes:
    # 12.5: the tests send up to 500 of them from agent-7, whose hourly budget in the
    # example policies is 10,000 (each is also spent: core mode's limit path, drain included).
    return intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": 12.5, "currency": "USD", "to": "account:acct-9"},
        **kw,
    )


async def test_allowed_intent_is_forwarded_once_bytes_unchanged_with_valid_artifact(
    nats_url: str, keys: tuple[Path, Path], signer: Signer, policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    payload = _small_transfer()
    async with Gateway(
        Settings(nats_url=nats_url, mode="core", gateway_id="test-gw"), policies, signer
    ):
        await nc.publish(TRANSFER, payload, headers={"traceparent": "00-abc-def-01"})
        await sentinel(nc, out, 0)
    assert len(out.exec.msgs) == 1
    assert out.deny.msgs == [] and out.hold.msgs == []
    msg = out.exec.msgs[0]
    assert msg.subject == "guard.exec.agent-7.payments.transfer"
    assert msg.data == payload  # byte for byte
    assert msg.headers is not None
    assert msg.headers["traceparent"] == "00-abc-def-01"
    token = msg.headers["Guard-Artifact"]
    assert msg.headers["Guard-Decision"] == msg.headers["Nats-Msg-Id"]

    # The independent JOSE library accepts it with the published JWKS.
    key_set = KeySet.import_key_set(json.loads(keys[1].read_text()))
    with warnings.catch_warnings():  # joserfc flags "EdDSA" as superseded by RFC 9864
        warnings.simplefilter("ignore", SecurityWarning)
        obj = jws.deserialize_compact(token, key_set, algorithms=["EdDSA"])
    assert obj.protected["typ"] == "guard-artifact+jwt"
    claims = json.loads(obj.payload)
    assert claims["jti"] == msg.headers["Guard-Decision"]
    assert claims["aud"] == msg.subject
    assert claims["sub"] == "agent-7"
    assert claims["iss"] == "test-gw"
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    assert claims["payload_sha256"] == digest
    assert claims["policy_digest"] == policies.digest
    assert claims["rules"]
    # ... and so does ours.
    checked = verify_message(
        Verifier(keys[1]), subject=msg.subject, headers=msg.headers, payload=msg.data
    )
    assert checked.intent_id == json.loads(payload)["id"]
    await nc.drain()


@pytest.mark.parametrize(
    ("subject", "payload", "reason"),
    [
        (
            TRANSFER,
            intent(
                "payments.transfer",
                "account:sanctioned-x",
                {"amount": 5, "currency": "USD", "to": "account:a"},
            ),
            "denied_by_rule",
        ),
        (
            TRANSFER,
            intent(
                "payments.transfer",
                "account:acct-1",
                {"amount": 5, "currency": "GBP", "to": "account:a"},
            ),
            "no_matching_rule",
        ),
        (
            "guard.in.agent-1.tools.shell",
            intent("tools.shell", "tool:shell", {"cmd": "id"}),
            "denied_by_rule",
        ),
        (TRANSFER, _small_transfer(principal="agent-9"), "principal_mismatch"),
        (TRANSFER, intent("payments.refund", "account:acct-1", {}), "action_mismatch"),
        (TRANSFER, _small_transfer(ts=1.0), "expired"),
        (TRANSFER, b'{"id": "a", "id": "b"}', "malformed"),
        ("guard.in.agent-7", _small_transfer(), "bad_subject"),
    ],
)
async def test_denied_intent_goes_to_deny_and_never_to_exec(
    nats_url: str,
    signer: Signer,
    policies: PolicySet,
    subject: str,
    payload: bytes,
    reason: str,
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer) as gw:
        await nc.publish(subject, payload)
        await sentinel(nc, out, 1)  # the intent itself is denied first
        stats = gw.statistics()
    assert out.exec.msgs == [] and out.hold.msgs == []
    [record] = out.deny.records()
    assert record["reason"] == reason
    assert record["effect"] == "deny"
    assert record["policy_digest"] == policies.digest
    assert record["payload"] == payload.decode()
    assert record["decision_id"]
    if reason == "denied_by_rule":
        assert record["rules"]
    expected_subject = (
        "guard.deny.~invalid"
        if reason == "bad_subject"
        else subject.replace("guard.in.", "guard.deny.", 1)
    )
    assert out.deny.msgs[0].subject == expected_subject
    assert stats.denied == 2 and stats.allowed == 0  # the intent and the sentinel
    await nc.drain()


async def test_escalated_intent_is_held_with_its_whole_payload(
    nats_url: str, signer: Signer, policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    payload = intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": 25000, "currency": "USD", "to": "account:acct-9"},
    )
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
        await nc.publish(TRANSFER, payload)
        await sentinel(nc, out, 0)
    assert out.exec.msgs == [] and out.deny.msgs == []
    [record] = out.hold.records()
    assert record["effect"] == "hold" and record["reason"] == "escalated_by_rule"
    assert record["payload"] == payload.decode() and not record.get("payload_truncated")
    assert out.hold.msgs[0].subject == "guard.hold.agent-7.payments.transfer"
    await nc.drain()


class _ExplodingPolicies:
    """A policy set whose evaluation raises: the gateway must deny, never forward."""

    def __init__(self, inner: PolicySet) -> None:
        self._inner = inner
        self.digest, self.version, self.mode = inner.digest, inner.version, inner.mode

    def evaluate(self, request: Request) -> Decision:
        raise RuntimeError("boom")

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return self._inner.approver_key(kid)


class _BrokenSigner(Signer):
    def sign(self, claims: ArtifactClaims) -> str:
        raise SigningError("key unreadable")


async def test_evaluation_error_is_a_recorded_denial_and_nothing_is_forwarded(
    nats_url: str, signer: Signer, policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    async with Gateway(
        Settings(nats_url=nats_url, mode="core"), _ExplodingPolicies(policies), signer
    ):
        for _ in range(3):
            await nc.publish(TRANSFER, _small_transfer())
        await sentinel(nc, out, 3)
    assert out.exec.msgs == []
    assert [r["reason"] for r in out.deny.records()] == ["internal_error"] * 3
    await nc.drain()


async def test_signing_failure_is_a_recorded_denial_and_nothing_is_forwarded(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    broken = _BrokenSigner(load_private_key(keys[0]), issuer="gw", ttl_s=60)
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, broken) as gw:
        await nc.publish(TRANSFER, _small_transfer())
        await sentinel(nc, out, 1)
        stats = gw.statistics()
    assert out.exec.msgs == []
    [record] = out.deny.records()
    assert record["reason"] == "internal_error" and "signing failed" in record["message"]
    assert stats.allowed == 0 and stats.internal_errors == 1
    await nc.drain()


async def test_forged_guard_and_nats_headers_never_reach_executors(
    nats_url: str, keys: tuple[Path, Path], signer: Signer, policies: PolicySet
) -> None:
    """SCENARIOS S1: inbound Guard-*/Nats-* headers are stripped, others pass."""
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    forged = {
        "Guard-Artifact": "eyJhbGciOiJub25lIn0.e30.",
        "Guard-Decision": "FORGED",
        "guard-extra": "x",
        "Nats-Msg-Id": "FORGED",
        "Nats-Expected-Stream": "X",
        "traceparent": "00-1-2-01",
        "X-Custom": "kept",
    }
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
        await nc.publish(TRANSFER, _small_transfer(), headers=forged)
        await sentinel(nc, out, 0)
    [msg] = out.exec.msgs
    assert msg.headers is not None
    assert msg.headers["Guard-Decision"] != "FORGED"
    assert msg.headers["Nats-Msg-Id"] == msg.headers["Guard-Decision"]
    assert msg.headers["Guard-Artifact"] != forged["Guard-Artifact"]
    assert "guard-extra" not in {k.lower() for k in msg.headers}
    assert "Nats-Expected-Stream" not in msg.headers
    assert msg.headers["traceparent"] == "00-1-2-01" and msg.headers["X-Custom"] == "kept"
    Verifier(keys[1]).verify(msg.headers["Guard-Artifact"], subject=msg.subject, payload=msg.data)
    await nc.drain()


async def test_requester_gets_the_decision_as_reply(
    nats_url: str, signer: Signer, policies: PolicySet
) -> None:
    # Each agent receives on its own inbox prefix (as compose/auth.conf makes them).
    agent7 = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-7")
    agent1 = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
        allowed = await agent7.request(TRANSFER, _small_transfer(), timeout=5)
        denied = await agent1.request(
            "guard.in.agent-1.tools.shell", intent("tools.shell", "tool:shell", {}), timeout=5
        )
    a, d = json.loads(allowed.data), json.loads(denied.data)
    assert a["effect"] == "allow" and a["reason"] == "allowed_by_rule"
    assert d["effect"] == "deny" and d["reason"] == "denied_by_rule"
    assert "payload" not in a and "payload" not in d
    await agent7.drain()
    await agent1.drain()


@pytest.mark.parametrize("inbox", ["principal", "any"])
async def test_replies_go_only_to_the_requesting_principals_inbox(
    nats_url: str, signer: Signer, policies: PolicySet, inbox: ReplyInbox
) -> None:
    """An agent cannot aim decisions at another agent's inbox (nor at a non-UTF-8 or
    non-inbox subject); ``reply_inbox="any"`` opens every ``_INBOX.`` subject."""
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    victim = await Collector.on(nc, "_INBOX.agent-2.>")
    own = await Collector.on(nc, "_INBOX.agent-1.>")
    settings = Settings(nats_url=nats_url, mode="core", reply_inbox=inbox)
    async with Gateway(settings, policies, signer) as gw:
        denied = intent("tools.shell", "tool:shell", {})
        await nc.publish("guard.in.agent-1.tools.shell", denied, reply="_INBOX.agent-2.x")
        await nc.publish("guard.in.agent-1.tools.shell", denied, reply="_INBOX.agent-1.x")
        await nc.publish("guard.in.agent-1.tools.shell", denied, reply="_INBOX.agent-1.>")
        await sentinel(nc, out, 3)
        stats = gw.statistics()
    assert len(own.msgs) == 1 and json.loads(own.msgs[0].data)["effect"] == "deny"
    if inbox == "principal":
        assert victim.msgs == [] and stats.replies_refused == 2
    else:
        assert len(victim.msgs) == 1 and stats.replies_refused == 1
    await nc.drain()


async def test_reply_subject_pointing_into_outputs_is_refused(
    nats_url: str, signer: Signer, policies: PolicySet
) -> None:
    """SCENARIOS S1: a reply subject aimed at exec (or $JS.API) is never published to."""
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    js_api = await Collector.on(nc, "$JS.API.>")
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer) as gw:
        denied = intent("tools.shell", "tool:shell", {})
        await nc.publish(
            "guard.in.agent-1.tools.shell", denied, reply="guard.exec.agent-1.tools.shell"
        )
        await nc.publish(
            "guard.in.agent-1.tools.shell", denied, reply="$JS.API.STREAM.DELETE.GUARD_LEDGER"
        )
        await sentinel(nc, out, 2)
        stats = gw.statistics()
    assert out.exec.msgs == []
    # (at start, core mode asks which streams capture the intake, and looks up or creates
    # the bucket of retained intents: its own requests)
    startup = ("$JS.API.STREAM.NAMES", b'{"subject":"guard.in.>"}')
    retention = ("$JS.API.STREAM.INFO.KV_guard-intents", "$JS.API.STREAM.CREATE.KV_guard-intents")
    assert [
        m for m in js_api.msgs if (m.subject, m.data) != startup and m.subject not in retention
    ] == []
    assert stats.replies_refused == 2 and stats.replies_sent == 0
    await nc.drain()


async def test_drain_decides_everything_already_received(
    nats_url: str, signer: Signer, policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    n = 500
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer) as gw:
        for _ in range(n):
            await nc.publish(TRANSFER, _small_transfer())
        await round_trip(nc)  # the server has routed all n to the gateway's connection
    # Leaving the context drained the gateway: all n were decided and forwarded.
    assert gw.statistics().received == n
    msgs = await out.exec.wait_for(n)
    assert len(msgs) == n
    await round_trip(nc)
    assert out.deny.msgs == [] and out.hold.msgs == []
    assert len({m.headers["Guard-Decision"] for m in msgs if m.headers}) == n
    await nc.drain()
