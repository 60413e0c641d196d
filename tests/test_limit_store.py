"""The limit store (issue 11): sliding-window logs spent by compare-and-set.

The pure half (:func:`settle_logs`) is table-checked without a server; the store's
promises (exact across replicas, idempotent by decision id, fail closed) are checked
against a real nats-server with several independent stores racing on one key, as several
gateway processes would.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client

from bus_guard.cli._main import main
from bus_guard.decision import Decision, Effect, LimitSpec, Reason
from bus_guard.intake._limits import (
    MAX_ENTRIES,
    Ask,
    LimitClock,
    Limited,
    LimitLog,
    LimitStore,
    kv_key,
    settle_logs,
)
from bus_guard.intent import Intent, parse_subject
from bus_guard.pipeline import decide
from bus_guard.policy import load_policies
from bus_guard.server import NatsServer

from .conftest import POLICIES

COUNT = LimitSpec("r1", "r1/0", "count", 5, 10.0, "principal")
BUDGET = LimitSpec("r2", "r2/0", "sum", 100, 60.0, "principal", param="amount")


def _logs(*specs_keys: tuple[LimitSpec, str]) -> dict[str, LimitLog]:
    return {
        kv_key(s.name, k): LimitLog(s.name, s.rule, s.kind, s.max, s.window_s, s.per, k)
        for s, k in specs_keys
    }


def _ask(i: int, *group: tuple[LimitSpec, str, float]) -> Ask:
    return Ask(f"D{i}", (tuple(group),))


# -- the pure half ---------------------------------------------------------------------


def test_a_count_allows_exactly_max_per_window() -> None:
    logs = _logs((COUNT, "a"))
    asks = [_ask(i, (COUNT, "a", 1.0)) for i in range(8)]
    fits, dirty = settle_logs(asks, logs, now=1000.0)
    assert [f.ok for f in fits] == [True] * 5 + [False] * 3
    assert fits[5].uses[0].used == 5 and fits[5].uses[0].key == "a"
    assert dirty == {kv_key("r1/0", "a")}
    # Still full 9.9 s later; room again once the first spends leave the window.
    assert not settle_logs([_ask(9, (COUNT, "a", 1.0))], logs, now=1009.9)[0][0].ok
    assert settle_logs([_ask(10, (COUNT, "a", 1.0))], logs, now=1010.01)[0][0].ok


def test_keys_are_separate() -> None:
    logs = _logs((COUNT, "a"), (COUNT, "b"))
    fits, _ = settle_logs(
        [_ask(i, (COUNT, "a" if i < 5 else "b", 1.0)) for i in range(10)], logs, 0.0
    )
    assert all(f.ok for f in fits)


def test_a_budget_sums_amounts_and_refuses_the_one_that_would_exceed() -> None:
    logs = _logs((BUDGET, "a"))
    asks = [_ask(i, (BUDGET, "a", amount)) for i, amount in enumerate([60.0, 30.0, 20.0, 10.0])]
    fits, _ = settle_logs(asks, logs, now=50.0)
    assert [f.ok for f in fits] == [True, True, False, True]
    assert (fits[2].uses[0].used, fits[2].uses[0].amount) == (90.0, 20.0)


def test_the_same_decision_id_spends_once() -> None:
    logs = _logs((COUNT, "a"))
    for _ in range(3):
        fits, _ = settle_logs([_ask(1, (COUNT, "a", 1.0))], logs, now=5.0)
        assert fits[0].ok
    assert len(logs[kv_key("r1/0", "a")].entries) == 1


def test_a_rules_limits_are_spent_together_or_not_at_all() -> None:
    other = LimitSpec("r1", "r1/1", "sum", 10, 10.0, "resource", param="amount")
    logs = _logs((COUNT, "a"), (other, "res"))
    fits, _ = settle_logs([_ask(1, (COUNT, "a", 1.0), (other, "res", 11.0))], logs, 1.0)
    assert not fits[0].ok and fits[0].uses[0].limit == "r1/1"
    assert logs[kv_key("r1/0", "a")].entries == []  # the count was not spent


def test_the_first_rule_with_room_is_spent_and_the_others_are_cleared() -> None:
    full = LimitSpec("a-rule", "a-rule/0", "count", 1, 10.0, "principal")
    logs = _logs((full, "p"), (COUNT, "p"))
    logs[kv_key("a-rule/0", "p")].entries.append((0.5, 1.0, "someone-else"))
    # An earlier attempt left D1 in COUNT's log; now a-rule has no room either way.
    ask = Ask("D1", (((full, "p", 1.0),), ((COUNT, "p", 1.0),)))
    fits, _ = settle_logs([ask], logs, 1.0)
    assert fits[0].ok and fits[0].uses[0].limit == "r1/0"
    logs[kv_key("a-rule/0", "p")].entries.clear()  # a-rule has room again
    fits, _ = settle_logs([ask], logs, 2.0)
    assert fits[0].ok and fits[0].uses[0].limit == "a-rule/0"
    assert logs[kv_key("r1/0", "p")].entries == []  # the other rule's spend taken out


def test_time_never_runs_backwards_for_a_log() -> None:
    logs = _logs((COUNT, "a"))
    settle_logs([_ask(i, (COUNT, "a", 1.0)) for i in range(5)], logs, now=1000.0)
    # A gateway whose clock is an hour behind still sees the window as full.
    assert not settle_logs([_ask(9, (COUNT, "a", 1.0))], logs, now=-2600.0)[0][0].ok


def test_a_long_log_is_merged_conservatively() -> None:
    big = LimitSpec("r", "r/0", "sum", 1e9, 100.0, "principal", param="x")
    logs = _logs((big, "a"))
    settle_logs([_ask(i, (big, "a", 1.0)) for i in range(MAX_ENTRIES + 50)], logs, now=1.0)
    lg = logs[kv_key("r/0", "a")]
    assert len(lg.entries) <= MAX_ENTRIES
    assert lg.used(1.0) == MAX_ENTRIES + 50  # nothing forgotten


def test_kv_keys_are_valid_and_distinct() -> None:
    a, b = kv_key("r/0", "agent.7 x"), kv_key("r/0", "agent.7.x")
    assert a != b
    assert all(c.isalnum() or c in "-_." for c in a)


# -- against a server --------------------------------------------------------------------


@pytest.fixture
async def clients(nats_server: NatsServer) -> AsyncIterator[list[Client]]:
    ncs = [await nats.connect(nats_server.url) for _ in range(3)]
    yield ncs
    for nc in ncs:
        await nc.close()


def _limited(i: int, spec: LimitSpec, amount: float = 1.0) -> Limited:
    subject = parse_subject("guard.in.agent-7.payments.transfer", "guard")
    assert subject is not None
    intent = Intent(
        id=f"i-{i}",
        action="payments.transfer",
        resource="account:a",
        params={"amount": amount},
        ts=0.0,
    )
    decision = Decision(Effect.ALLOW, Reason.ALLOWED_BY_RULE, rules=(spec.rule,), limits=((spec,),))
    return Limited(f"D{i:04d}", decision, subject, intent, None)


class _Policies:
    digest, version, mode = "d", "1", "enforce"


async def test_three_stores_racing_allow_exactly_the_limit(clients: list[Client]) -> None:
    spec = LimitSpec("r", "r/0", "count", 7, 60.0, "principal")
    stores = [LimitStore(nc.jetstream(), "guard-limits") for nc in clients]
    pol = _Policies()

    async def one(store: LimitStore, start: int) -> list[Decision]:
        out: list[Decision] = []
        for n in range(start, start + 30, 3):  # batches of 3, as a gateway's batches
            out += await store.settle([_limited(n + k, spec) for k in range(3)], pol)  # type: ignore[arg-type]
        return out

    results = await asyncio.gather(*(one(s, 1000 * j) for j, s in enumerate(stores)))
    allowed = [d for ds in results for d in ds if d.effect is Effect.ALLOW]
    denied = [d for ds in results for d in ds if d.effect is not Effect.ALLOW]
    assert len(allowed) == 7
    assert {d.reason for d in denied} == {Reason.RATE_LIMITED}
    stored = await stores[0].logs()
    assert len(stored) == 1 and len(stored[0].entries) == 7


async def test_a_budget_race_never_overspends(clients: list[Client]) -> None:
    spec = LimitSpec("r", "r/0", "sum", 100, 60.0, "principal", param="amount")
    stores = [LimitStore(nc.jetstream(), "guard-limits") for nc in clients]
    amounts = [7.0, 13.0, 3.5, 21.0, 9.0]

    async def one(store: LimitStore, j: int) -> list[tuple[float, Decision]]:
        out = []
        for n in range(20):
            amount = amounts[(n + j) % len(amounts)]
            [d] = await store.settle([_limited(j * 100 + n, spec, amount)], _Policies())  # type: ignore[arg-type]
            out.append((amount, d))
        return out

    results = await asyncio.gather(*(one(s, j) for j, s in enumerate(stores)))
    spent = sum(a for r in results for a, d in r if d.effect is Effect.ALLOW)
    assert spent <= 100
    assert spent > 100 - max(amounts)  # and it was used up to what fit
    assert any(d.reason is Reason.BUDGET_EXCEEDED for r in results for _, d in r)
    [stored] = await stores[0].logs()
    assert math.isclose(stored.used(stored.newest()), spent)


async def test_a_redelivered_decision_does_not_spend_twice(clients: list[Client]) -> None:
    spec = LimitSpec("r", "r/0", "count", 2, 60.0, "principal")
    first, restarted = (LimitStore(nc.jetstream(), "guard-limits") for nc in clients[:2])
    [d] = await first.settle([_limited(1, spec)], _Policies())  # type: ignore[arg-type]
    assert d.effect is Effect.ALLOW
    # A fresh store (a restarted gateway) sees the same decision id: allowed, not spent again.
    [again] = await restarted.settle([_limited(1, spec)], _Policies())  # type: ignore[arg-type]
    assert again.effect is Effect.ALLOW
    [second] = await restarted.settle([_limited(2, spec)], _Policies())  # type: ignore[arg-type]
    [third] = await restarted.settle([_limited(3, spec)], _Policies())  # type: ignore[arg-type]
    assert (second.effect, third.reason) == (Effect.ALLOW, Reason.RATE_LIMITED)


async def test_a_store_that_cannot_answer_denies(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        spec = LimitSpec("r", "r/0", "count", 2, 60.0, "principal")
        store = LimitStore(nc.jetstream(), "guard-limits", timeout_s=0.2)
        [ok] = await store.settle([_limited(1, spec)], _Policies())  # type: ignore[arg-type]
        assert ok.effect is Effect.ALLOW
        await nc.jetstream().delete_stream("KV_guard-limits")
        store.ready = True  # as if found at start: the bucket vanished since
        [d] = await store.settle([_limited(2, spec)], _Policies())  # type: ignore[arg-type]
        assert (d.effect, d.reason) == (Effect.DENY, Reason.INTERNAL_ERROR)
        assert "limits unavailable" in d.message and store.failures == 1
    finally:
        await nc.close()


async def _cli(*argv: str) -> tuple[int, str]:
    """``bus-guard ARGV`` as the command line runs it (its own event loop, in a thread)."""
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(functools.partial(main, list(argv), out=out))
    return code, out.getvalue()


async def test_the_limits_command_shows_usage_per_key(
    clients: list[Client], nats_server: NatsServer
) -> None:
    count = LimitSpec("r", "r/0", "count", 3, 60.0, "principal")
    store = LimitStore(clients[0].jetstream(), "guard-limits")
    items = [_limited(i, count) for i in range(2)]
    await store.settle(items, _Policies())  # type: ignore[arg-type]
    code, text = await _cli("limits", "--nats", nats_server.url)
    assert code == 0
    [line] = text.splitlines()
    assert "r/0 (rule r)" in line and "'agent-7'" in line and "2/3 requests" in line
    assert "FULL" not in line
    await store.settle([_limited(9, count)], _Policies())  # type: ignore[arg-type]
    code, text = await _cli("limits", "--nats", nats_server.url, "--json")
    [row] = [json.loads(x) for x in text.splitlines()]
    assert (row["used"], row["max"], row["key"], row["spends"]) == (3, 3, "agent-7", 3)
    assert 0 < row["frees_in_s"] <= 60
    code, text = await _cli("limits", "--nats", nats_server.url, "--principal", "agent-9")
    assert (code, text.strip()) == (0, "no limit has spends in its window now for 'agent-9'")


async def test_the_limits_command_without_a_bucket_lists_nothing(nats_server: NatsServer) -> None:
    code, text = await _cli("limits", "--nats", nats_server.url)
    assert (code, text.strip()) == (0, "no limit has spends in its window now")


def test_a_wall_clock_jump_moves_no_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = LimitClock()
    before = clock()
    logs = _logs((COUNT, "a"))
    settle_logs([_ask(i, (COUNT, "a", 1.0)) for i in range(5)], logs, now=before)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # the host's clock steps
    after = clock()
    assert after - before < 5.0
    # The window is still full: the jump did not reopen it early.
    assert not settle_logs([_ask(9, (COUNT, "a", 1.0))], logs, now=after)[0][0].ok
    assert LimitClock()() - before > 3500  # a clock made after the jump reads it, once


async def test_policy_explain_shows_what_a_limit_has_used_now(
    clients: list[Client], nats_server: NatsServer, tmp_path: Path
) -> None:
    policies = load_policies(POLICIES)
    subject = "guard.in.agent-2.tools.search"
    payload = tmp_path / "intent.json"
    body = {"id": "i-1", "action": "tools.search", "resource": "tool:search", "params": {}}
    payload.write_text(json.dumps({**body, "ts": time.time()}))
    decision = decide(policies, subject, payload.read_bytes())
    [[spec]] = decision.limits  # the shipped agent-2 search rate
    store = LimitStore(clients[0].jetstream(), "guard-limits")

    async def explained() -> str:
        code, text = await _cli(
            "policy", "explain", "--policies", str(POLICIES), "--subject", subject,
            "--payload", str(payload), "--nats", nats_server.url,
        )  # fmt: skip
        assert code == 0
        [line] = [x for x in text.splitlines() if spec.name in x and "key" in x]
        return line

    assert "used now 0 of 5 (room)" in await explained()
    await store.settle([_limited(i, spec) for i in range(3)], _Policies())  # type: ignore[arg-type]
    # _limited's subject is agent-7's: the same limit for agent-2 is untouched.
    assert "used now 0 of 5 (room)" in await explained()
    agent2 = parse_subject(subject, "guard")
    assert agent2 is not None
    items = [it._replace(subject=agent2) for it in (_limited(10 + i, spec) for i in range(5))]
    await store.settle(items, _Policies())  # type: ignore[arg-type]
    assert "used now 5 of 5 (FULL)" in await explained()
