"""Stream mode end to end on a real nats-server with JetStream: what is stored where, that
nothing is acked before its record and outputs are stored, and that an intent redelivered
after a failure adopts the decision already recorded (one exec message, the same bytes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js.api import StreamConfig

from bus_guard.intake import Gateway
from bus_guard.intake._work import intake_of
from bus_guard.ledger._records import LedgerRecord, encode_record, intent_decision_id
from bus_guard.policy._load import PolicySet
from bus_guard.settings import ArtifactMode
from bus_guard.verify import BATCH_PREFIX, Verifier, verify_message

from .helpers import Collector, intent
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

TRANSFER = "guard.in.agent-7.payments.transfer"


def _transfer(amount: float = 120.5, **kw: object) -> bytes:
    return intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": amount, "currency": "USD", "to": "account:acct-9"},
        **kw,
    )


async def test_every_outcome_is_stored_recorded_and_acked_once(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    allowed = _transfer(id="i-allow")
    denied = intent("tools.shell", "tool:shell", {"cmd": "id"}, id="i-deny")
    held = _transfer(25000, id="i-hold")
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]) as gw:
        for subject, payload in (
            (TRANSFER, allowed),
            ("guard.in.agent-1.tools.shell", denied),
            (TRANSFER, held),
            ("guard.in.agent-7.payments.transfer", b'{"not": "an intent"}'),
        ):
            await js.publish(subject, payload, headers={"traceparent": "00-a-b-01"})
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert (stats.allowed, stats.denied, stats.held) == (1, 2, 1)
    assert stats.acks == 4 and stats.naks == 0 and stats.adopted == 0
    # Work-queue intake: every acked intent is gone from the stream.
    assert await count(js, "GUARD_IN") == 0

    [exec_msg] = await stored(nc, "GUARD_EXEC")
    assert exec_msg.subject == "guard.exec.agent-7.payments.transfer"
    assert exec_msg.data == allowed  # byte for byte
    assert exec_msg.headers["traceparent"] == "00-a-b-01"
    decision_id = intent_decision_id("guard", "agent-7", "i-allow")
    assert exec_msg.headers["Guard-Decision"] == decision_id
    claims = verify_message(
        Verifier(keys[1]),
        subject=exec_msg.subject,
        headers=exec_msg.headers,
        payload=exec_msg.data,
    )
    assert claims.jti == decision_id and claims.intent_id == "i-allow"

    deny_records = records(await stored(nc, "GUARD_DENY"))
    assert sorted(r["reason"] for r in deny_records) == ["denied_by_rule", "malformed"]
    [hold] = records(await stored(nc, "GUARD_HOLD"))
    assert hold["reason"] == "escalated_by_rule" and hold["payload"] == held.decode()

    ledger = {r.decision_id: r for r in await ledger_decisions(nc)}
    assert len(ledger) == 4
    record = ledger[decision_id]
    assert record.effect == "allow" and record.artifact == exec_msg.headers["Guard-Artifact"]
    assert claims.ledger_seq == record.seq > 0  # seq 0 is the chain start
    assert {r.effect for r in ledger.values()} == {"allow", "deny", "hold"}
    await nc.close()


@pytest.mark.parametrize("artifacts", ["per-message", "batched"])
async def test_nothing_is_acked_until_its_output_is_stored_then_it_is_adopted(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, artifacts: ArtifactMode
) -> None:
    """SCENARIOS S2/S3: the exec stream is gone when the decision is made. The record is
    committed, the exec publish fails, the intent is not acked but sent back; once the
    stream exists again, the redelivered intent adopts the recorded decision: exactly one
    exec message, carrying the artifact recorded in the ledger (batched too: the signed
    tree head and the proof are in the record, so adoption re-publishes the same bytes)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    payload = _transfer(id="i-1")
    settings = stream_settings(nats_url, artifacts=artifacts)
    async with stream_gateway(settings, policies, keys[0]) as gw:
        exec_config = (await js.stream_info("GUARD_EXEC")).config
        await js.delete_stream("GUARD_EXEC")
        await js.publish(TRANSFER, payload)
        await eventually(lambda: _naked(gw), what="a nak")
        [record] = await ledger_decisions(nc)  # decided and recorded ...
        assert record.effect == "allow"
        info = await js.consumer_info("GUARD_IN", "bus-guard")
        assert info.num_ack_pending == 1 or info.num_pending == 1  # ... but not acked
        await js.add_stream(exec_config)
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert stats.adopted >= 1 and stats.allowed == 1
    [exec_msg] = await stored(nc, "GUARD_EXEC")
    assert exec_msg.headers["Guard-Artifact"] == record.artifact
    assert record.artifact.startswith(BATCH_PREFIX) == (artifacts == "batched")
    assert exec_msg.data == payload
    verify_message(
        Verifier(keys[1]), subject=exec_msg.subject, headers=exec_msg.headers, payload=payload
    )
    assert len(await ledger_decisions(nc)) == 1  # decided once
    await nc.close()


@pytest.mark.parametrize("artifacts", ["per-message", "batched"])
async def test_an_ack_lost_after_the_outputs_were_stored_publishes_nothing_twice(
    nats_url: str,
    keys: tuple[Path, Path],
    policies: PolicySet,
    monkeypatch: pytest.MonkeyPatch,
    artifacts: ArtifactMode,
) -> None:
    """The crash point "after the exec publish, before the ack": the first acks never leave
    the process (fault injected in the client; the server is real). The intents come back
    after the ack wait, adopt their recorded decisions and publish the same outputs again,
    which JetStream keeps once (de-duplicated by decision id)."""
    dropped: list[str] = []
    real_ack = Msg.ack

    async def lose_first_acks(msg: Msg) -> None:
        if len(dropped) < 3:
            dropped.append(msg.subject)
            return
        await real_ack(msg)

    monkeypatch.setattr(Msg, "ack", lose_first_acks)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    payloads = [_transfer(id=f"i-{i}") for i in range(3)]
    settings = stream_settings(nats_url, ack_wait_s=0.5, artifacts=artifacts)
    async with stream_gateway(settings, policies, keys[0]) as gw:
        for payload in payloads:
            await js.publish(TRANSFER, payload)
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert len(dropped) == 3
    assert stats.adopted == 3 and stats.duplicate_outputs == 3 and stats.allowed == 3
    execs = await stored(nc, "GUARD_EXEC")
    assert sorted(m.data for m in execs) == sorted(payloads)  # once each
    ledger = {r.decision_id: r for r in await ledger_decisions(nc)}
    assert len(ledger) == 3
    for m in execs:
        assert m.headers["Guard-Artifact"] == ledger[m.headers["Guard-Decision"]].artifact
    await nc.close()


async def test_a_late_adoption_searches_the_exec_stream_instead_of_trusting_dedup(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ack is lost and the intent comes back only after the retry horizon and the
    de-dup window (0.1 s here) passed: de-duplication can no longer tell that the exec
    message is stored, so the gateway searches the exec stream, finds it, and does not
    publish it again."""
    real_ack = Msg.ack
    lost: list[Msg] = []

    async def lose_first_ack(msg: Msg) -> None:
        if not lost:
            lost.append(msg)
            return
        await real_ack(msg)

    monkeypatch.setattr(Msg, "ack", lose_first_ack)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(
        nats_url, ack_wait_s=0.5, retry_horizon_s=0.1, duplicate_window_s=0.1
    )
    async with stream_gateway(settings, policies, keys[0]) as gw:
        await js.publish(TRANSFER, _transfer(id="late"))
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert await count(js, "GUARD_EXEC") == 1  # once, although de-dup had forgotten it
    assert len(lost) == 1 and stats.adopted == 1 and stats.late_adoptions == 1
    assert stats.duplicate_outputs == 0  # not de-duplicated: not published again at all
    await nc.close()


async def _naked(gw: Gateway) -> bool:
    return gw.statistics().naks > 0


async def test_agent_msg_ids_on_intake_do_not_block_other_agents(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Intake de-dup is stream-wide, so a Nats-Msg-Id one agent chose could block another
    agent's intent. The intake stream keeps ids for 100 ms only (JetStream's minimum)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        info = await js.stream_info("GUARD_IN")
        assert info.config.duplicate_window == pytest.approx(0.1)
    await nc.close()


async def test_restart_continues_the_chain_and_seals_it_at_shutdown(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url)
    for run in range(2):
        async with stream_gateway(settings, policies, keys[0]):
            await js.publish(TRANSFER, _transfer(id=f"i-{run}"))
            await eventually(lambda: drained(js), what="intake drained")
    chain = [json.loads(m.data) for m in await stored(nc, "GUARD_LEDGER")]
    assert [r["seq"] for r in chain] == list(range(len(chain)))
    kinds = [r["kind"] for r in chain]
    assert kinds[0] == "chain_start" and kinds[-1] == "checkpoint" and chain[-1]["final"]
    restart = kinds.index("chain_start", 1)
    assert chain[restart - 1]["final"]  # the first run sealed its chain ...
    assert chain[restart]["epoch"] != chain[0]["epoch"]  # ... and the second continued it
    await nc.close()


async def test_stream_mode_refuses_to_start_without_jetstream(
    keys: tuple[Path, Path], policies: PolicySet
) -> None:
    from bus_guard.errors import GatewayError
    from bus_guard.server import NatsServer

    with NatsServer(jetstream=False) as server, pytest.raises(GatewayError, match="JetStream"):
        async with stream_gateway(stream_settings(server.url), policies, keys[0]):
            pass


async def test_poison_intent_is_denied_after_bounded_deliveries(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """SCENARIOS S14: an intent delivered more than max_deliveries times without a
    decision is denied (internal_error), never dropped undecided."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, max_deliveries=2)
    async with stream_gateway(settings, policies, keys[0]):
        pass  # create the streams and the consumer
    await js.publish(TRANSFER, _transfer(id="poison"))
    sub = await js.pull_subscribe_bind("bus-guard", stream="GUARD_IN")
    for _ in range(2):  # two deliveries that ended without a decision (a crash, say)
        [msg] = await sub.fetch(1, timeout=5)
        await msg.nak()
    await sub.unsubscribe()
    async with stream_gateway(settings, policies, keys[0]) as gw:
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    [record] = records(await stored(nc, "GUARD_DENY"))
    assert record["reason"] == "internal_error" and "poison" in record["message"]
    assert await count(js, "GUARD_EXEC") == 0 and stats.allowed == 0
    await nc.close()


async def test_output_streams_are_created_with_the_configured_dedup_window(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, duplicate_window_s=900)
    async with stream_gateway(settings, policies, keys[0]):
        for name in ("GUARD_EXEC", "GUARD_DENY", "GUARD_HOLD", "GUARD_LEDGER"):
            config: StreamConfig = (await js.stream_info(name)).config
            assert config.duplicate_window == 900
        ledger = (await js.stream_info("GUARD_LEDGER")).config
        assert ledger.deny_delete and ledger.deny_purge and ledger.allow_atomic
    await nc.close()


async def test_stream_mode_on_the_shipped_topology(
    tmp_path: Path, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """compose/'s accounts as they ship: an agent (AGENTS account, no JetStream) gets a
    PubAck from the GUARD intake stream through the service import, the executor (EXEC)
    receives the exec message; the gateway needs nothing beyond its existing rights."""
    from .topology import credentials, local_server

    creds = credentials()

    def as_user(url: str, user: str) -> str:
        return url.replace("nats://", f"nats://{user}:{creds[user]}@")

    with local_server(tmp_path / "nats") as server:
        agent = await nats.connect(as_user(server.url, "agent-1"), inbox_prefix="_INBOX.agent-1")
        executor = await nats.connect(as_user(server.url, "executor"))
        execs = await Collector.on(executor, "guard.exec.>")
        settings = stream_settings(as_user(server.url, "gateway"))
        async with stream_gateway(settings, policies, keys[0]) as gw:
            ack = await agent.jetstream().publish(
                "guard.in.agent-1.tools.search", intent("tools.search", "tool:search", {})
            )
            assert ack.stream == "GUARD_IN"
            [msg] = await execs.wait_for(1)
            stats = gw.statistics()
        assert msg.headers is not None and msg.headers["Guard-Decision"]
        assert stats.allowed == 1 and stats.ledger_records >= 2
        await agent.close()
        await executor.close()


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.GUARD_IN.bus-guard.3.1042.977.1732600000123456789.15",
        "$JS.ACK._.ACCHASH.GUARD_IN.bus-guard.2.77.70.1732600000123456789.0.tok",
        "$JS.ACK.hub.ACCHASH.GUARD_IN.bus-guard.1.5.5.1732600000123456789.9",
    ],
)
def test_intake_of_reads_the_ack_subject_as_nats_py_does(reply: str) -> None:
    # The intake id and delivery count come straight from the ack subject; they must be
    # what nats-py's own metadata parsing gives (v1 and v2 ack subjects).
    msg = Msg(_client=None, subject="guard.in.a.b", reply=reply, data=b"{}")  # type: ignore[arg-type]
    md = msg.metadata
    stamp = reply.split(".")[7 if reply.count(".") == 8 else 9]
    assert intake_of(msg) == (f"{md.stream}/{md.sequence.stream}/{stamp}", md.num_delivered)


def test_intake_of_refuses_what_is_not_a_jetstream_delivery() -> None:
    with pytest.raises(NotJSMessageError):
        intake_of(Msg(_client=None, subject="guard.in.a.b", reply="_INBOX.x.y", data=b""))  # type: ignore[arg-type]


async def test_a_recorded_allow_without_artifact_is_denied_not_forwarded(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Fail closed on adoption: a ledger record saying "allow" but carrying no artifact
    (another gateway's bug, a hand-written record) forwards nothing; the intent is denied
    internal_error on the deny stream, under the recorded decision id, and acked."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url)
    async with stream_gateway(settings, policies, keys[0]):
        pass  # create the streams and the consumer
    await js.publish(TRANSFER, _transfer(id="no-artifact"))
    sub = await js.pull_subscribe_bind("bus-guard", stream="GUARD_IN")
    [msg] = await sub.fetch(1, timeout=5)
    intake, _ = intake_of(msg)
    await msg.nak()
    await sub.unsubscribe()
    did = intent_decision_id("guard", "agent-7", "no-artifact")
    forged = LedgerRecord(
        kind="decision",
        gateway="other-gw",
        seq=0,
        prev="",
        ts=time.time(),
        decision_id=did,
        effect="allow",
        reason="allowed_by_rule",
        subject=TRANSFER,
        principal="agent-7",
        action="payments.transfer",
        intake=intake,
    )
    await js.publish(f"guard.ledger.other-gw.d.{did}", encode_record(forged))
    async with stream_gateway(settings, policies, keys[0]) as gw:
        await eventually(lambda: drained(js), what="intake drained")
        stats = gw.statistics()
    assert await count(js, "GUARD_EXEC") == 0 and stats.allowed == 0
    [record] = records(await stored(nc, "GUARD_DENY"))
    assert record["decision_id"] == did and record["reason"] == "internal_error"
    assert "no artifact" in record["message"]
    assert stats.internal_errors == 1 and stats.adopted == 1
    await nc.close()
