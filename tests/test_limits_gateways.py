"""Issue 11 end to end: limits spent by real gateway processes on a real nats-server.

* three stream-mode gateways race on one principal at 10x its rate: in every sliding
  window the allowed count is at most the limit, and reaches it;
* three gateways race on one group budget: what is spent never exceeds it;
* a gateway SIGKILLed while deciding and started again: exactly the limit is allowed over
  a window that spans both lives (nothing forgotten, nothing spent twice), and the
  bucket's logs hold exactly the allowed decisions;
* a limit store that cannot answer: 0 allows past a limit (internal_error, counted);
* S13 in small: a flood at 20x its limit loses none of the others' intents.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from bench.flood import max_in_window
from bus_guard.intake import Gateway
from bus_guard.intake._limits import LimitStore
from bus_guard.ledger._records import LedgerRecord
from bus_guard.policy._load import load_policies
from bus_guard.server import NatsServer
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key

from .crashkit import GatewayProcess
from .helpers import make_signer
from .streamkit import drained, eventually, ledger_decisions, stream_gateway, stream_settings

LIMIT, WINDOW_S = 5, 2.0
BUDGET = 100.0

BUNDLE = f"""\
bundle: limits-test
version: "1"
mode: enforce
groups:
  payers: [payer-1, payer-2, payer-3]
schemas:
  payments.transfer: {{amount: number}}
rules:
  - id: racer-search
    effect: allow
    principals: [racer]
    actions: [tools.search]
    limits:
      - {{count: {LIMIT}, window: {WINDOW_S}s}}
  - id: long-search
    effect: allow
    principals: [survivor]
    actions: [tools.search]
    limits:
      - {{count: {LIMIT}, window: 1h}}
  - id: others-search
    effect: allow
    principals: [agent-1, agent-2, agent-3]
    actions: [tools.search]
  - id: payers-transfer
    effect: allow
    principals: ["group:payers"]
    actions: [payments.transfer]
    limits:
      - {{sum: amount, max: {BUDGET:g}, window: 1h, per: group}}
"""


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "limits.yaml").write_text(BUNDLE)
    return d


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return generate_key(tmp_path / "keys")[0]


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def _argv(url: str, key: Path, policies: Path, gateway_id: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "bus_guard", "run", "--nats", url, "--policies", str(policies)),
        *("--key", str(key), "--gateway-id", gateway_id, *extra),
    ]


@pytest.fixture
def gateways(
    nats_server: NatsServer, key: Path, policies_dir: Path
) -> Iterator[list[GatewayProcess]]:
    procs = [
        GatewayProcess(_argv(nats_server.url, key, policies_dir, f"gw-{i}", "--batch", "4"))
        for i in range(3)
    ]
    for p in procs:
        p.start()
    yield procs
    for p in procs:
        p.kill()


def _intent(action: str, **params: float) -> bytes:
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "action": action,
            "resource": "r:1",
            "params": params,
            "ts": time.time(),
        }
    ).encode()


async def _decided(nc: Client, n: int, principal: str) -> list[LedgerRecord]:
    js = nc.jetstream()
    mine: list[LedgerRecord] = []

    async def done() -> bool:
        nonlocal mine
        if not await drained(js):
            return False
        mine = [r for r in await ledger_decisions(nc) if r.principal == principal]
        return len(mine) >= n

    await eventually(done, timeout_s=60, what=f"{n} decisions of {principal}")
    return mine


async def test_three_gateways_racing_allow_exactly_the_limit_per_window(
    nc: Client, gateways: list[GatewayProcess]
) -> None:
    js = nc.jetstream()
    n, rate = 80, 10 * LIMIT / WINDOW_S  # 10x the limit, for four windows
    start = time.monotonic()
    for i in range(n):
        while time.monotonic() < start + i / rate:
            await nc.flush()
        await js.publish("guard.in.racer.tools.search", _intent("tools.search"))
    records = await _decided(nc, n, "racer")
    allowed = [r for r in records if r.effect == "allow"]
    denied = [r for r in records if r.effect != "allow"]
    assert {r.reason for r in denied} == {"rate_limited"}
    assert all(r.limits and r.limits[0].used == LIMIT for r in denied)
    at = [r.limits[0].at for r in allowed]
    assert max_in_window(at, WINDOW_S) == LIMIT  # never more, and reached
    assert len({r.gateway for r in records}) >= 2  # they did race
    # Every full window of the flood allowed exactly the limit (the flood never paused).
    assert len(allowed) >= LIMIT * int((n / rate) / WINDOW_S)


async def test_three_gateways_racing_on_a_budget_never_overspend(
    nc: Client, gateways: list[GatewayProcess]
) -> None:
    js = nc.jetstream()
    amounts = [7.0, 13.0, 3.5, 21.0, 9.0, 0.5]
    for i in range(36):
        payer = f"payer-{i % 3 + 1}"
        amount = amounts[i % len(amounts)]
        await js.publish(
            f"guard.in.{payer}.payments.transfer", _intent("payments.transfer", amount=amount)
        )
    records: list[LedgerRecord] = []
    for payer in ("payer-1", "payer-2", "payer-3"):
        records += await _decided(nc, 12, payer)
    allowed = [r for r in records if r.effect == "allow"]
    spent = sum(r.limits[0].amount for r in allowed)
    assert spent <= BUDGET
    assert spent > BUDGET - max(amounts)
    over = [r for r in records if r.effect != "allow"]
    assert over and {r.reason for r in over} == {"budget_exceeded"}
    assert all(r.limits[0].used + r.limits[0].amount > BUDGET for r in over)
    assert {r.limits[0].key for r in records} == {"payers"}  # one budget for the group


async def test_a_gateway_killed_mid_window_forgets_nothing_and_spends_nothing_twice(
    nats_server: NatsServer, nc: Client, key: Path, policies_dir: Path
) -> None:
    js = nc.jetstream()
    argv = _argv(nats_server.url, key, policies_dir, "gw-k", "--batch", "2", "--ack-wait", "3")
    first = GatewayProcess(argv)
    first.start()
    try:
        sub = await nc.subscribe("guard.exec.survivor.>")
        await nc.flush()
        for _ in range(30):
            await js.publish("guard.in.survivor.tools.search", _intent("tools.search"))
        await sub.next_msg(timeout=20)  # deciding: killed with intents in flight
        first.kill()
        second = GatewayProcess(argv)
        second.start()
        try:
            records = await _decided(nc, 30, "survivor")
        finally:
            second.stop()
    finally:
        first.kill()
    allowed = {r.decision_id for r in records if r.effect == "allow"}
    assert len(allowed) == LIMIT  # forgotten: more; spent twice: fewer
    store = LimitStore(nc.jetstream(), "guard-limits")
    [log] = [lg for lg in await store.logs() if lg.rule == "long-search"]
    assert {d for _, _, d in log.entries} == allowed  # every spend has its allow record


async def test_a_limit_store_that_cannot_answer_allows_nothing_past_a_limit(
    tmp_path: Path, key: Path, policies_dir: Path
) -> None:
    # Core mode on a server without JetStream: limits cannot be checked.
    with NatsServer(jetstream=False) as server:
        settings = Settings(nats_url=server.url, mode="core", gateway_id="gw-c")
        policies = load_policies(policies_dir)
        client = await nats.connect(server.url)
        try:
            async with Gateway(settings, policies, make_signer(key)) as gw:
                denies = await client.subscribe("guard.deny.>")
                execs = await client.subscribe("guard.exec.>")
                await client.flush()
                for _ in range(3):
                    await client.publish("guard.in.racer.tools.search", _intent("tools.search"))
                await client.publish("guard.in.agent-1.tools.search", _intent("tools.search"))
                seen = [json.loads((await denies.next_msg(timeout=15)).data) for _ in range(3)]
                unlimited = await execs.next_msg(timeout=15)
                assert b"agent-1" in unlimited.subject.encode()
                assert {(d["reason"], d["principal"]) for d in seen} == {
                    ("internal_error", "racer")
                }
                assert all("limits unavailable" in d["message"] for d in seen)
                assert gw.statistics().limit_failures == 3
                assert execs.pending_msgs == 0
        finally:
            await client.close()


async def test_stream_mode_denies_when_the_bucket_is_gone(
    nc: Client, nats_server: NatsServer, key: Path, policies_dir: Path
) -> None:
    js = nc.jetstream()
    gw = stream_gateway(stream_settings(nats_server.url), load_policies(policies_dir), key)
    async with gw:
        await js.publish("guard.in.racer.tools.search", _intent("tools.search"))
        [first] = await _decided(nc, 1, "racer")
        assert first.effect == "allow"
        await js.delete_stream("KV_guard-limits")
        for _ in range(3):
            await js.publish("guard.in.racer.tools.search", _intent("tools.search"))
        records = await _decided(nc, 4, "racer")
        later = [r for r in records if r.decision_id != first.decision_id]
        assert [r.effect for r in later] == ["deny"] * 3
        assert {r.reason for r in later} == {"internal_error"}
        assert gw.statistics().limit_failures >= 1


async def test_a_flood_at_20x_its_limit_loses_nothing_of_the_others(
    nc: Client, gateways: list[GatewayProcess]
) -> None:
    js = nc.jetstream()
    execs = await nc.subscribe("guard.exec.>")
    per_other, flood = 20, 20 * LIMIT
    for i in range(flood):
        await nc.publish("guard.in.racer.tools.search", _intent("tools.search"))
        if i % (flood // per_other) == 0:
            for other in ("agent-1", "agent-2", "agent-3"):
                await js.publish(f"guard.in.{other}.tools.search", _intent("tools.search"))
    for other in ("agent-1", "agent-2", "agent-3"):
        records = await _decided(nc, per_other, other)
        assert [r.effect for r in records] == ["allow"] * per_other
    racer = await _decided(nc, flood, "racer")
    racer_allowed = [r for r in racer if r.effect == "allow"]
    assert max_in_window([r.limits[0].at for r in racer_allowed], WINDOW_S) <= LIMIT
    # Every exec message was published before its intent was acked (drained): all here.
    expected = 3 * per_other + len(racer_allowed)
    arrived = [(await execs.next_msg(timeout=10)).subject for _ in range(expected)]
    await nc.flush()
    assert execs.pending_msgs == 0
    for other in ("agent-1", "agent-2", "agent-3"):
        assert sum(f".{other}." in s for s in arrived) == per_other
