"""Batched artifacts in the gateway (``Settings.artifacts == "batched"``), core and stream
mode, on a real nats-server: every allowed intent forwarded once with an artifact that
bus_guard's verifier and an independent JOSE library (the tree head) accept; denials never
reach exec; a signing failure denies every intent of its batch; drain flushes everything.

Core mode tests end with the sentinel of test_gateway (a malformed intent sent last): in
batched mode too, outputs leave in intake order, so its denial proves everything before
it was published.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.errors import SigningError
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.ledger._records import CheckpointSigner
from bus_guard.policy._load import PolicySet
from bus_guard.settings import Settings
from bus_guard.signing._keys import load_private_key
from bus_guard.signing._signer import Signer
from bus_guard.verify import BATCH_PREFIX, TREE_HEAD_TYP, Verifier, verify_message

from .helpers import intent, outputs, sentinel
from .streamkit import (
    count,
    drained,
    eventually,
    ledger_decisions,
    records,
    stored,
    stream_gateway,
    stream_settings,
)
from .test_gateway import TRANSFER, _small_transfer

SHELL = "guard.in.agent-1.tools.shell"
SEARCH = "guard.in.agent-1.tools.search"


def _batched(url: str, **kw: Any) -> Settings:
    kw.setdefault("mode", "core")
    return Settings(nats_url=url, gateway_id="test-gw", artifacts="batched", **kw)


class _HeadlessSigner(Signer):
    """Signs single artifacts, but every tree head fails: batched signing must fail closed."""

    def sign_tree_head(self, *, root: bytes, size: int, now: float) -> str:
        raise SigningError("HSM unavailable")


def _heads(tokens: list[str], jwks: Path) -> dict[str, int]:
    """Every distinct signed tree head among *tokens*, checked by joserfc: head -> size."""
    key_set = KeySet.import_key_set(json.loads(jwks.read_text()))
    sizes = {}
    for head in {t.split("~")[4] for t in tokens}:
        with warnings.catch_warnings():  # joserfc flags "EdDSA" as superseded by RFC 9864
            warnings.simplefilter("ignore", SecurityWarning)
            obj = jws.deserialize_compact(head, key_set, algorithms=["EdDSA"])
        assert obj.protected["typ"] == TREE_HEAD_TYP
        sizes[head] = json.loads(obj.payload)["tree_size"]
    return sizes


def _check_execs(msgs: list[Msg], jwks: Path) -> dict[str, int]:
    verifier = Verifier(jwks)
    tokens = []
    for m in msgs:
        assert m.headers is not None
        token = m.headers["Guard-Artifact"]
        assert token.startswith(BATCH_PREFIX)
        claims = verify_message(verifier, subject=m.subject, headers=m.headers, payload=m.data)
        assert claims.jti == m.headers["Guard-Decision"] == m.headers["Nats-Msg-Id"]
        tokens.append(token)
    assert len({m.headers["Guard-Decision"] for m in msgs if m.headers}) == len(msgs)
    heads = _heads(tokens, jwks)
    # Every leaf of every signed tree was forwarded: no artifact signed and withheld.
    assert sum(heads.values()) == len(msgs)
    return heads


# -- core mode ------------------------------------------------------------------------


async def test_batched_core_forwards_each_allowed_intent_once_in_order(
    nats_url: str, keys: tuple[Path, Path], signer: Signer, policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-7")  # replies: agent-7's
    out = await outputs(nc)
    allowed = [_small_transfer(id=f"a-{i}") for i in range(200)]
    denied = [intent("tools.shell", "tool:shell", {"cmd": "id"}) for _ in range(10)]
    async with Gateway(_batched(nats_url), policies, signer) as gw:
        for i, payload in enumerate(allowed):
            await nc.publish(TRANSFER, payload, headers={"traceparent": f"00-{i}-x-01"})
            if i % 20 == 0:
                await nc.publish(SHELL, denied[i // 20])
        await sentinel(nc, out, 10)  # the 10 denials come first
        reply = await nc.request(TRANSFER, _small_transfer(id="req"), timeout=5)
        stats = gw.statistics()
    assert [m.data for m in out.exec.msgs[:200]] == allowed  # once each, in intake order
    assert json.loads(out.exec.msgs[200].data)["id"] == "req"
    assert len(out.exec.msgs) == 201 and out.hold.msgs == []
    assert all(m.headers and m.headers["traceparent"] for m in out.exec.msgs[:200])
    assert json.loads(reply.data)["effect"] == "allow"
    assert [r["reason"] for r in out.deny.records()] == ["denied_by_rule"] * 10
    assert all(m.data not in denied for m in out.exec.msgs)
    heads = _check_execs(out.exec.msgs, keys[1])
    assert stats.allowed == 201 and stats.denied == 11  # with the sentinel
    assert stats.artifact_batches == len(heads)
    assert stats.artifact_batches < 200  # batched: fewer signatures than artifacts
    await nc.drain()


class _BusyIntake:
    """Stands in for the intake subscription: always another intent waiting."""

    pending_msgs = 1


async def test_batched_core_closes_a_batch_by_age_while_intents_keep_coming(
    nats_url: str,
    keys: tuple[Path, Path],
    signer: Signer,
    policies: PolicySet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch closes batch_delay_ms after its first intent even while the intake never
    goes idle (nats-py runs the callback for every queued message without yielding): with
    a 1 µs window and room for 512, 40 intents sent in one burst make trees of one or two
    leaves, not one tree (closed only when full or idle)."""
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    ids = [f"b-{i}" for i in range(40)]
    settings = _batched(nats_url, batch_max=512, batch_delay_ms=0.001)
    async with Gateway(settings, policies, signer) as gw:
        core = gw._core
        assert core is not None
        monkeypatch.setattr(core, "sub", _BusyIntake())
        for i in ids:  # buffered, then written in one go
            await nc.publish(SEARCH, intent("tools.search", "tool:search", {"q": i}, id=i))
        await out.exec.wait_for(len(ids))
        stats = gw.statistics()
    assert [json.loads(m.data)["id"] for m in out.exec.msgs] == ids  # once each, in order
    heads = _check_execs(out.exec.msgs, keys[1])
    assert max(heads.values()) <= 2, sorted(heads.values())
    assert stats.artifact_batches == len(heads) >= len(ids) // 2
    await nc.drain()


async def test_batched_core_signing_failure_denies_the_whole_batch(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    broken = _HeadlessSigner(load_private_key(keys[0]), issuer="test-gw", ttl_s=60)
    async with Gateway(_batched(nats_url), policies, broken) as gw:
        for i in range(30):
            await nc.publish(TRANSFER, _small_transfer(id=f"a-{i}"))
        await nc.publish(SHELL, intent("tools.shell", "tool:shell", {"cmd": "id"}))
        await sentinel(nc, out, 31)
        stats = gw.statistics()
    assert out.exec.msgs == []
    deny_records = out.deny.records()
    assert [r["intent_id"] for r in deny_records[:30]] == [f"a-{i}" for i in range(30)]
    for r in deny_records[:30]:
        assert r["reason"] == "internal_error" and "signing failed" in r["message"]
        assert r["effect"] == "deny"
    assert deny_records[30]["reason"] == "denied_by_rule"
    assert stats.allowed == 0 and stats.internal_errors == 30 and stats.artifact_batches == 0
    await nc.drain()


class _HeldPublisher:
    """The core intake's connection with every publish held until ``release`` is set: the
    flusher stops mid-batch (signed, nothing of it published) and ``held`` says so."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self.held = anyio.Event()
        self.release = anyio.Event()

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None
    ) -> None:
        self.held.set()
        await self.release.wait()
        await self._nc.publish(subject, payload, reply=reply, headers=headers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)


async def test_batched_core_drain_decides_and_flushes_everything_received(
    nats_url: str,
    keys: tuple[Path, Path],
    signer: Signer,
    policies: PolicySet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leaving the context while the flusher is stuck mid-batch (its publishes held) and a
    second batch, decided but unsigned, waits behind it (the last intents may still be
    unread or queued), with a long batch window: the drain decides every intent received,
    and the flusher signs and publishes both batches before the connection closes. The
    publishes are released only when the intake closes, so nothing here is published by
    the flusher's normal course: without the drain's final flush, intents are lost."""
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    ids = [f"d-{i}" for i in range(300)]
    denied = set(ids[5::10])  # denials travel in the same batches, in order

    def payload(i: str) -> bytes:
        if i in denied:
            return intent("tools.shell", "tool:shell", {"cmd": "id"}, id=i)
        return intent("tools.search", "tool:search", {"q": i}, id=i)

    # batch_max above the intent count: the callback never waits for room, so the
    # subscription drains completely while the flusher is held.
    settings = _batched(nats_url, batch_max=512, batch_delay_ms=1000)
    async with Gateway(settings, policies, signer) as gw:
        core = gw._core
        assert core is not None
        held = _HeldPublisher(core.nc)
        monkeypatch.setattr(core, "nc", held)
        close = core.close

        async def close_then_release() -> None:
            await close()
            held.release.set()

        monkeypatch.setattr(core, "close", close_then_release)
        for i in ids[:3]:
            await nc.publish(SEARCH, payload(i))
        await held.held.wait()  # the flusher took a batch, signed it, is publishing it
        for i in ids[3:]:
            await nc.publish(SHELL if i in denied else SEARCH, payload(i))
        await round_trip(nc)  # the server has routed all of them to the gateway
        assert not held.release.is_set()
    # Leaving the context drained the gateway: all were decided, signed and published.
    stats = gw.statistics()
    n, n_allowed = len(ids), len(ids) - len(denied)
    assert stats.received == n, stats
    assert stats.allowed == n_allowed and stats.denied == len(denied), stats
    assert held.release.is_set()  # the held batch was published only once the intake closed
    assert stats.publish_failures == 0 and stats.internal_errors == 0
    assert stats.artifact_batches == 2, stats  # the held batch and the one behind it
    await out.exec.wait_for(n_allowed)
    await out.deny.wait_for(len(denied))
    await round_trip(nc)  # and no more than these
    got = [json.loads(m.data)["id"] for m in out.exec.msgs]
    assert got == [i for i in ids if i not in denied]  # exactly once each, in intake order
    assert [r["intent_id"] for r in out.deny.records()] == [i for i in ids if i in denied]
    assert {r["reason"] for r in out.deny.records()} == {"denied_by_rule"}
    assert out.hold.msgs == []
    heads = _check_execs(out.exec.msgs, keys[1])  # nothing unsigned reached exec
    assert len(heads) == 2 and sum(heads.values()) == n_allowed
    await nc.drain()


# -- stream mode ----------------------------------------------------------------------


async def test_batched_stream_records_and_forwards_each_allowed_intent_once(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    allowed = {f"a-{i}": _small_transfer(id=f"a-{i}") for i in range(150)}
    settings = replace(
        stream_settings(nats_url, artifacts="batched", fetch_batch=100), batch_max=40
    )
    # The backlog is stored before the gateway starts: pulls take it in full batches.
    async with stream_gateway(settings, policies, keys[0]):
        pass  # create the streams and the consumer
    for payload in allowed.values():
        await js.publish(TRANSFER, payload)
    await js.publish(SHELL, intent("tools.shell", "tool:shell", {"cmd": "id"}, id="no"))
    async with stream_gateway(settings, policies, keys[0]) as gw:
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    execs = await stored(nc, "GUARD_EXEC")
    assert sorted(m.data for m in execs) == sorted(allowed.values())  # once each
    ledger = {r.decision_id: r for r in await ledger_decisions(nc)}
    verifier = Verifier(keys[1])
    tokens = []
    for m in execs:
        claims = verify_message(verifier, subject=m.subject, headers=m.headers, payload=m.data)
        record = ledger[claims.jti]
        assert record.effect == "allow" and record.artifact == m.headers["Guard-Artifact"]
        assert claims.ledger_seq == record.seq
        tokens.append(record.artifact)
    heads = _heads(tokens, keys[1])
    assert sum(heads.values()) == 150 and max(heads.values()) <= 40
    assert stats.artifact_batches == len(heads) < 150
    [deny] = records(await stored(nc, "GUARD_DENY"))
    assert deny["reason"] == "denied_by_rule" and deny["intent_id"] == "no"
    assert stats.allowed == 150 and stats.denied == 1 and stats.acks == 151
    await nc.close()


async def test_batched_stream_signing_failure_denies_every_intent_of_the_batch(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, artifacts="batched")
    private = load_private_key(keys[0])
    broken = _HeadlessSigner(private, issuer=settings.gateway_id, ttl_s=60)
    async with Gateway(settings, policies, broken, ledger_signer=CheckpointSigner(private)) as gw:
        for i in range(20):
            await js.publish(TRANSFER, _small_transfer(id=f"a-{i}"))
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert await count(js, "GUARD_EXEC") == 0
    deny_records = records(await stored(nc, "GUARD_DENY"))
    assert sorted(r["intent_id"] for r in deny_records) == sorted(f"a-{i}" for i in range(20))
    assert {(r["reason"], r["message"]) for r in deny_records} == {
        ("internal_error", "signing failed")
    }
    ledger = await ledger_decisions(nc)
    assert len(ledger) == 20
    assert all(r.effect == "deny" and not r.artifact for r in ledger)
    assert stats.allowed == 0 and stats.denied == 20 and stats.acks == 20
    assert stats.artifact_batches == 0
    await nc.close()
