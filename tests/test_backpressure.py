"""Bounded buffers: a gateway that falls behind drops intents undecided, counts every drop,
and never forwards what it did not decide (core mode is at-most-once, like core NATS)."""

from __future__ import annotations

import time
from pathlib import Path

import nats

from bus_guard.artifacts import Signer
from bus_guard.decision import Decision, Request
from bus_guard.gateway import Gateway, round_trip
from bus_guard.keys import generate_key, load_private_key
from bus_guard.policy import PolicySet, load_policies
from bus_guard.settings import Settings
from bus_guard.state import State

from .conftest import POLICIES
from .helpers import Collector, intent


class _SlowPolicies:
    """Each evaluation takes 3 ms of CPU-bound time: the gateway falls behind a burst."""

    def __init__(self, inner: PolicySet) -> None:
        self._inner = inner
        self.digest, self.version, self.mode = inner.digest, inner.version, inner.mode

    def evaluate(self, request: Request, state: State) -> Decision:
        time.sleep(0.003)  # simulated work inside the decision, not test synchronisation
        return self._inner.evaluate(request, state)


async def test_overflow_is_counted_and_nothing_undecided_is_forwarded(
    nats_url: str, tmp_path: Path
) -> None:
    key, _ = generate_key(tmp_path)
    signer = Signer(load_private_key(key), issuer="gw", ttl_s=60)
    settings = Settings(nats_url=nats_url, pending_msgs_limit=20)
    n = 300
    nc = await nats.connect(nats_url)
    execs = await Collector.on(nc, "guard.exec.>")
    denies = await Collector.on(nc, "guard.deny.>")
    async with Gateway(settings, _SlowPolicies(load_policies(POLICIES)), signer) as gw:
        for i in range(n):
            await nc.publish("guard.in.agent-1.tools.search", intent("tools.search", "t", {"i": i}))
        await round_trip(nc)  # the server has routed all n to the gateway's connection
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
    print(f"backpressure: sent={n} decided={stats.received} dropped={stats.slow_consumer_drops}")
    await nc.drain()
