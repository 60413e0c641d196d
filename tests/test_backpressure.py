"""Bounded buffers: a gateway that falls behind drops intents undecided, counts every drop,
and never forwards what it did not decide (core mode is at-most-once, like core NATS)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import nats
import pytest

from bus_guard.decision import Decision, Request
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.policy._load import PolicySet
from bus_guard.settings import Settings
from bus_guard.verify import JwkEntry

from .helpers import Collector, intent, make_signer


class _SlowPolicies:
    """Each evaluation takes 3 ms of CPU-bound time: the gateway falls behind a burst."""

    def __init__(self, inner: PolicySet) -> None:
        self._inner = inner
        self.digest, self.version, self.mode = inner.digest, inner.version, inner.mode

    def evaluate(self, request: Request) -> Decision:
        time.sleep(0.003)  # simulated work inside the decision, not test synchronisation
        return self._inner.evaluate(request)

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return self._inner.approver_key(kid)


async def test_overflow_is_counted_and_nothing_undecided_is_forwarded(
    nats_url: str,
    keys: tuple[Path, Path],
    policies: PolicySet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    signer = make_signer(keys[0], issuer="gw")
    settings = Settings(nats_url=nats_url, mode="core", pending_msgs_limit=20)
    n = 300
    nc = await nats.connect(nats_url)
    execs = await Collector.on(nc, "guard.exec.>")
    denies = await Collector.on(nc, "guard.deny.>")
    caplog.set_level(logging.DEBUG, logger="bus_guard.intake._gateway")
    started = time.monotonic()
    async with Gateway(settings, _SlowPolicies(policies), signer) as gw:
        for i in range(n):
            await nc.publish("guard.in.agent-1.tools.search", intent("tools.search", "t", {"i": i}))
        await round_trip(nc)  # the server has routed all n to the gateway's connection
    elapsed_s = time.monotonic() - started
    # Leaving the context drained: every intent the gateway's connection got was either
    # decided or dropped from its bounded queue, and each drop was counted.
    stats = gw.statistics()
    assert stats.slow_consumer_drops > 0
    assert stats.received + stats.slow_consumer_drops == n
    assert stats.allowed == stats.received  # every intent that was received was decided
    await execs.wait_for(stats.allowed)
    await round_trip(nc)
    # Exactly the decided intents were forwarded: the dropped ones never reached exec.
    assert len(execs.msgs) == stats.allowed and denies.msgs == []
    assert len({m.headers["Guard-Decision"] for m in execs.msgs if m.headers}) == len(execs.msgs)
    # Logged: the first drop, then at most one summary a second (the last one at close),
    # which together account for every drop; no line per dropped intent.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    first, *summaries = [w for w in warnings if w.startswith("slow consumer")]
    assert first == "slow consumer: intent on guard.in.agent-1.tools.search dropped undecided"
    assert len(summaries) <= elapsed_s + 1
    more = [
        re.fullmatch(r"slow consumer: (\d+) more intent\(s\) dropped undecided \(\d+ in all\)", w)
        for w in summaries
    ]
    assert all(more)
    assert 1 + sum(int(m[1]) for m in more if m) == stats.slow_consumer_drops
    # The clean shutdown (our own drain) is no warning; only slow-consumer lines were.
    assert all(w.startswith("slow consumer") for w in warnings)
    assert any(r.getMessage() == "disconnected from NATS (closing)" for r in caplog.records)
    print(f"backpressure: sent={n} decided={stats.received} dropped={stats.slow_consumer_drops}")
    await nc.drain()
