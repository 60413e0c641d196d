"""SCENARIOS S8, replay: the same intent id again, inside and beyond the de-dup window, with
the same or different bytes, after a gateway restart; and an artifact re-attached to a new
message at the executor. 0 second executions; the gateway denies ``replay``."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import nats
import pytest

from bus_guard.errors import VerificationError
from bus_guard.ledger._audit import audit
from bus_guard.ledger._records import intent_decision_id
from bus_guard.policy._load import PolicySet
from bus_guard.verify import Verifier, load_jwks, verify_message_once

from .helpers import intent
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

SEARCH = "guard.in.agent-1.tools.search"


def _search(q: str = "x", **kw: object) -> bytes:
    return intent("tools.search", "tool:search", {"q": q}, **kw)


async def test_same_intent_twice_is_executed_once_and_the_second_denied_replay(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    same = _search(id="i-1")
    other = _search("y", id="i-2")
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]) as gw:
        await js.publish(SEARCH, same)
        await js.publish(SEARCH, same)  # stored twice: no Nats-Msg-Id
        await js.publish(SEARCH, _search("changed", id="i-1"))  # same id, different bytes
        await js.publish(SEARCH, other)
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    execs = await stored(nc, "GUARD_EXEC")
    assert sorted(m.data for m in execs) == sorted([same, other])  # one execution each
    denials = records(await stored(nc, "GUARD_DENY"))
    assert [d["reason"] for d in denials] == ["replay", "replay"]
    assert "the same bytes" in denials[0]["message"]
    assert "different bytes" in denials[1]["message"]
    first = intent_decision_id("guard", "agent-1", "i-1")
    assert all(first in d["message"] for d in denials)
    ledger = await ledger_decisions(nc)
    replays = [r for r in ledger if r.reason == "replay"]
    assert len(ledger) == 4 and [r.first_decision for r in replays] == [first, first]
    assert stats.replays == 2 and stats.allowed == 2
    await nc.close()


async def test_replay_beyond_the_dedup_window_and_after_a_restart_is_denied(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """JetStream forgets message ids after the de-dup window (here 0.1 s); the ledger's
    create-only decision records do not, and a new gateway process knows nothing else."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, retry_horizon_s=0.1, duplicate_window_s=0.1)
    payload = _search(id="i-old")
    async with stream_gateway(settings, policies, keys[0]):
        await js.publish(SEARCH, payload)
        await eventually(lambda: drained(js), what="intake drained")
    await anyio.sleep(0.3)  # the scenario itself: time passes beyond the de-dup window
    async with stream_gateway(settings, policies, keys[0]) as gw:
        await js.publish(SEARCH, payload)
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert await count(js, "GUARD_EXEC") == 1
    [denial] = records(await stored(nc, "GUARD_DENY"))
    assert denial["reason"] == "replay" and stats.replays == 1 and stats.allowed == 0
    await nc.close()


async def test_one_agent_cannot_use_up_another_agents_intent_id(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Decisions are keyed by principal + intent id: the same id from two principals is
    two intents, even with the same Nats-Msg-Id on intake."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        for agent in ("agent-1", "agent-2"):
            await js.publish(f"guard.in.{agent}.tools.search", _search(id="shared-id"))
        await eventually(lambda: drained(js), what="intake drained")
    execs = await stored(nc, "GUARD_EXEC")
    assert sorted(m.subject for m in execs) == [
        "guard.exec.agent-1.tools.search",
        "guard.exec.agent-2.tools.search",
    ]
    assert await count(js, "GUARD_DENY") == 0
    await nc.close()


async def test_executor_consumes_an_artifact_once(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """The executor-side replay guard: an exec message received twice runs once, and an
    artifact re-attached to other bytes or another subject never verifies."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        await js.publish(SEARCH, _search(id="i-exec"))
        await eventually(lambda: drained(js), what="intake drained")
    [msg] = await stored(nc, "GUARD_EXEC")
    executed = await js.create_key_value(bucket="guard-executed", history=1, ttl=3600)
    verifier = Verifier(keys[1])

    async def run(subject: str, payload: bytes) -> str:
        try:
            await verify_message_once(
                verifier, executed, subject=subject, headers=msg.headers, payload=payload
            )
        except VerificationError as exc:
            return exc.reason
        return "executed"

    assert await run(msg.subject, msg.data) == "executed"
    assert await run(msg.subject, msg.data) == "replay"  # the same message again
    assert await run(msg.subject, _search(id="i-new")) == "payload_mismatch"
    assert await run("guard.exec.agent-2.tools.search", msg.data) == "wrong_audience"
    # A second executor process sharing the bucket refuses it too.
    nc2 = await nats.connect(nats_url)
    other = await nc2.jetstream().key_value("guard-executed")
    with pytest.raises(VerificationError, match="replay"):
        await verify_message_once(
            verifier, other, subject=msg.subject, headers=msg.headers, payload=msg.data
        )
    await nc2.close()
    await nc.close()


async def test_a_refusal_midway_through_a_small_batch_keeps_the_chain_whole(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """A batch under ATOMIC_MIN records is committed record by record: when its second
    record's id is taken (a replay a fresh gateway cannot know of), the first is stored,
    found as its own (adopted), the replay denied, the third recorded after them; the
    chain has no gap and each intent one decision."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, gateway_id="gw-a")
    old = _search(id="i-old")
    async with stream_gateway(settings, policies, keys[0]):
        await js.publish(SEARCH, old)
        await eventually(lambda: drained(js), what="intake drained")
    # Three stored before the next gateway starts: they come in one pull, one batch.
    for payload in (_search(id="i-new-1"), old, _search(id="i-new-2")):
        await js.publish(SEARCH, payload)
    async with stream_gateway(
        stream_settings(nats_url, gateway_id="gw-b"), policies, keys[0]
    ) as gw:
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert stats.ledger_refusals >= 1 and stats.replays == 1
    assert (stats.allowed, stats.adopted) == (2, 0)  # the first record counted as decided
    ledger = await ledger_decisions(nc)
    by_intent: dict[str, list[str]] = {}
    for r in ledger:
        by_intent.setdefault(r.intent_id, []).append(r.reason)
    assert by_intent == {
        "i-old": ["allowed_by_rule", "replay"],
        "i-new-1": ["allowed_by_rule"],
        "i-new-2": ["allowed_by_rule"],
    }
    assert await count(js, "GUARD_EXEC") == 3
    msgs = await stored(nc, "GUARD_LEDGER")
    report = audit(msgs, prefix="guard", jwks=load_jwks(keys[1]), require_sealed=True)
    assert report.ok, report.problems
    await nc.close()


async def test_consume_once_refuses_an_intent_core_mode_forwarded_again(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Core mode gives every delivery a fresh decision, and remembers intent ids per
    process: an agent sending the same intent to four gateway lives (or four replicas)
    gets four exec messages with four decision ids. Consume-once keys on the intent
    (principal and intent id), so the executor runs it once; an executor with its own
    namespace keeps its own marker (and runs it once too)."""
    from bus_guard.intake import Gateway
    from bus_guard.settings import Settings
    from bus_guard.signing import Signer, load_private_key

    from .helpers import Collector

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    execs = await Collector.on(nc, "guard.exec.>")
    signer = Signer(load_private_key(keys[0]), issuer="gw", ttl_s=60)
    for n in range(1, 5):
        async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
            await nc.publish(SEARCH, _search(id="same-intent"))
            await execs.wait_for(n)
    assert len({m.headers["Guard-Decision"] for m in execs.msgs if m.headers}) == 4
    executed = await js.create_key_value(bucket="guard-executed", history=1, ttl=3600)
    verifier = Verifier(keys[1])

    async def run(executor: str = "") -> list[str]:
        outcomes = []
        for m in execs.msgs:
            try:
                await verify_message_once(
                    verifier,
                    executed,
                    subject=m.subject,
                    headers=m.headers,
                    payload=m.data,
                    executor=executor,
                )
            except VerificationError as exc:
                outcomes.append(exc.reason)
            else:
                outcomes.append("executed")
        return outcomes

    assert await run() == ["executed", "replay", "replay", "replay"]
    assert await run("payments-executor") == ["executed", "replay", "replay", "replay"]
    await nc.close()


async def test_core_mode_denies_an_intent_id_it_decided_within_the_window(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """The same intent sent four times to one core-mode gateway: one exec, three denials
    with reason ``replay`` (another intent id, or the same id of another principal, is
    new)."""
    from bus_guard.intake import Gateway
    from bus_guard.settings import Settings
    from bus_guard.signing import Signer, load_private_key

    from .helpers import Collector

    nc = await nats.connect(nats_url)
    execs = await Collector.on(nc, "guard.exec.>")
    denies = await Collector.on(nc, "guard.deny.>")
    signer = Signer(load_private_key(keys[0]), issuer="gw", ttl_s=60)
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer) as gw:
        for _ in range(4):
            await nc.publish(SEARCH, _search(id="again"))
        await nc.publish(SEARCH, _search(id="other"))
        await nc.publish("guard.in.agent-2.tools.search", _search(id="again"))
        await execs.wait_for(3)
        await denies.wait_for(3)
        stats = gw.statistics()
    assert sorted(m.subject for m in execs.msgs) == [
        "guard.exec.agent-1.tools.search",
        "guard.exec.agent-1.tools.search",
        "guard.exec.agent-2.tools.search",
    ]
    reasons = [msgspec.json.decode(m.data)["reason"] for m in denies.msgs]
    assert reasons == ["replay"] * 3
    assert stats.replays == 3
    await nc.close()
