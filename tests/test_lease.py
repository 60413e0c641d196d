"""One writer per chain (issue 13): the gateway id's lease, with gateways as real processes.

A second live process with the same ``--gateway-id`` refuses to start (naming the holder)
and the first goes on; a holder frozen past its lease is taken over, and when it thaws it
stops loudly without writing another record: the ledger holds one unforked chain.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client

from bus_guard.intake._jetstream import read
from bus_guard.intake._lease import LeaseValue
from bus_guard.ledger._audit import audit
from bus_guard.signing._keys import generate_key
from bus_guard.verify import load_jwks

from .crashkit import GatewayProcess, run_argv
from .helpers import intent
from .streamkit import drained, eventually

SEARCH = "guard.in.agent-1.tools.search"


async def _registry(nc: Client, gateway_id: str) -> list[LeaseValue]:
    kv = await nc.jetstream().key_value("guard-gateways")
    history = await kv.history(gateway_id)
    return [msgspec.json.decode(e.value, type=LeaseValue) for e in history if e.value]


async def test_a_second_process_with_the_same_gateway_id_is_refused(
    nats_url: str, tmp_path: Path
) -> None:
    key, _ = generate_key(tmp_path)
    argv = run_argv(nats_url, key, "gw-one")
    first = GatewayProcess(argv)
    first.start()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        second = await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60)
        )
        assert second.returncode != 0
        assert "is held by a live gateway" in second.stderr, second.stderr[-2000:]
        assert "another --gateway-id" in second.stderr
        # the first goes on deciding
        await js.publish(SEARCH, intent("tools.search", "tool:search", {"q": "x"}))
        await eventually(lambda: drained(js), what="decided by the first")
        assert first.stop() == 0
        # ended cleanly: the id is free again at once
        third = GatewayProcess(argv)
        third.start()
        assert third.stop() == 0
    finally:
        first.kill()
    states = [(v.state, v.pid) for v in await _registry(nc, "gw-one")]
    assert [s for s, _ in states] == ["live", "ended", "live", "ended"]
    assert states[0][1] != states[2][1]  # two processes, one after the other
    await nc.close()


@pytest.mark.skipif(sys.platform != "linux", reason="SIGSTOP/SIGCONT")
async def test_a_frozen_holder_is_taken_over_and_stops_without_forking_the_chain(
    nats_url: str, tmp_path: Path
) -> None:
    key, jwks = generate_key(tmp_path)
    argv = run_argv(nats_url, key, "gw-freeze", "--lease", "5", "--checkpoint-interval", "0.5")
    frozen = GatewayProcess(argv)
    frozen.start()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    successor = GatewayProcess(argv)
    try:
        await js.publish(SEARCH, intent("tools.search", "tool:search", {"q": "before"}))
        await eventually(lambda: drained(js), what="decided before the freeze")
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        started, refused = time.monotonic(), 0
        while True:  # refused while the frozen one's lease runs, then it takes over
            successor = GatewayProcess(argv)
            try:
                successor.start(timeout_s=60)
                break
            except AssertionError:
                successor.kill()  # exited: reap it and close its pipe
                assert any("is held by a live gateway" in line for line in successor.lines)
                refused += 1
                assert time.monotonic() - started < 30
                await anyio.sleep(0.3)  # a retry's backoff, not a synchronisation
        assert refused >= 1, "\n".join(successor.lines[-30:])  # the lease held at first
        assert successor.count("taking over gateway id gw-freeze") == 1
        assert time.monotonic() - started < 30
        await js.publish(SEARCH, intent("tools.search", "tool:search", {"q": "after"}))
        await eventually(lambda: drained(js), what="decided by the successor")
        frozen.proc.send_signal(signal.SIGCONT)
        code = frozen.proc.wait(30)
        assert code != 0  # it stops, loudly
        assert any("lease" in line for line in frozen.lines[-10:]), frozen.lines[-10:]
        assert successor.stop() == 0
    finally:
        frozen.kill()
        successor.kill()
    ledger = [m async for m in read(nc, "GUARD_LEDGER", "guard.ledger.>")]
    report = audit(ledger, prefix="guard", jwks=load_jwks(jwks))
    assert not report.problems, report.problems
    await nc.close()


async def test_a_renewal_stored_in_doubt_is_adopted_and_another_runs_value_is_not(
    nats_url: str,
) -> None:
    """A renewal that timed out may have been stored: the next renewal finds the key moved.
    To a value of this very run (its epoch): adopted, the lease goes on. To another run's: the
    id was taken over, the lease is lost."""
    from bus_guard.intake._lease import Lease, LeaseLost, ensure_registry

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_registry(js, "guard-gateways", replicas=1)
    kv = await js.key_value("guard-gateways")
    lease = Lease(js, "guard-gateways", "gw-doubt", 15.0, "epoch-1")
    await lease.acquire()
    assert await lease.renew()
    revision = (await kv.get("gw-doubt")).revision
    assert revision is not None

    def moved(epoch: str) -> bytes:
        now = time.time()
        value = LeaseValue(epoch=epoch, host="h", pid=1, started=now, heartbeat=now)
        return msgspec.json.encode(value)

    # as if the last renewal had been stored after its timeout: this run's epoch
    revision = await kv.update("gw-doubt", moved("epoch-1"), last=revision)
    assert await lease.renew()
    assert lease.lost == ""
    assert [v.epoch for v in (await _registry(nc, "gw-doubt"))[-1:]] == ["epoch-1"]
    # another run took the id over: lost, loudly, and for good
    await kv.update("gw-doubt", moved("epoch-2"), last=(await kv.get("gw-doubt")).revision)
    with pytest.raises(LeaseLost, match="taken over"):
        await lease.renew()
    with pytest.raises(LeaseLost):
        lease.check()
    await nc.close()
