"""SCENARIOS S3 and S4 with gateways as real processes on a real nats-server.

S3: under a load of a few thousand intents, the gateway is SIGKILLed at random moments
(after a fetch, after a ledger commit, after an exec publish, before an ack: wherever the
signal lands), restarted, and finally drained and stopped. Then everything the bus holds is
reconciled exactly: 0 lost, 0 double, 0 divergent, every exec artifact valid, every
recorded decision's output stored, and the ledger audits clean.

S4: three gateways share the consumer with an ack wait shorter than an (injected) slow
evaluation, so intents are redelivered to a second gateway while the first still decides
them: 0 divergent, 0 double.
"""

from __future__ import annotations

import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest

from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key

from .crashkit import GatewayProcess, reconcile, run_argv
from .streamkit import drained, eventually
from .topology import reserve_port

_enc = msgspec.json.Encoder()

# Mostly allowed, with denials (rule, malformed), holds and replays mixed in.
_MIX = (
    ("agent-1", "tools.search", "tool:search", {"q": "x"}),
    ("agent-1", "tools.search", "tool:search", {"q": "y"}),
    ("agent-7", "payments.transfer", "account:acct-1", {"amount": 10, "currency": "USD"}),
    ("agent-7", "payments.transfer", "account:acct-2", {"amount": 5000, "currency": "USD"}),
    ("agent-2", "tools.shell", "tool:shell", {"cmd": "id"}),
)


def _intent(rng: random.Random, i: int) -> tuple[str, str, bytes]:
    principal, action, resource, params = _MIX[rng.randrange(len(_MIX))]
    body: dict[str, Any] = {
        "id": f"s3-{i}-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}",
        "action": action,
        "resource": resource,
        "params": params,
        "ts": time.time(),
    }
    return f"guard.in.{principal}.{action}", body["id"], _enc.encode(body)


async def _crash_run(
    nats_url: str,
    tmp_path: Path,
    *,
    intents: int,
    kills: int,
    seed: int,
    artifacts: str = "per-message",
) -> None:
    rng = random.Random(seed)
    key, jwks = generate_key(tmp_path)
    argv = run_argv(
        nats_url,
        key,
        "gw-s3",
        "--ack-wait",
        "1",
        "--checkpoint-every",
        "200",
        "--checkpoint-interval",
        "1",
        "--artifacts",
        artifacts,
    )
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    gateways = [GatewayProcess(argv)]
    gateways[0].start()
    accepted: set[tuple[str, str]] = set()
    done_publishing = anyio.Event()

    # About 1.2 s per kill and restart: publish at the pace that spans them.
    pace = max(1, round(intents * 0.02 / (kills * 1.2)))

    async def publish() -> None:
        futures = []
        for i in range(intents):
            subject, intent_id, payload = _intent(rng, i)
            futures.append(
                (subject.split(".")[2], intent_id, await js.publish_async(subject, payload))
            )
            if i % pace == pace - 1:
                await anyio.sleep(0.02)  # load, not a burst: spread over the kills
        for principal, intent_id, future in futures:
            await future  # raises if the bus did not accept it: then it is not counted
            accepted.add((principal, intent_id))
        done_publishing.set()

    async def kill_and_restart() -> None:
        for _ in range(kills):
            await anyio.sleep(rng.uniform(0.05, 0.4))
            gateways[-1].kill()
            gateways.append(GatewayProcess(argv))
            await anyio.to_thread.run_sync(gateways[-1].start)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            tg.start_soon(kill_and_restart)
        await done_publishing.wait()
        await eventually(lambda: drained(js), timeout_s=60, what="intake drained")
        assert gateways[-1].stop() == 0
    finally:
        for g in gateways:
            g.kill()
    result = await reconcile(nc, accepted, jwks)
    adopted = sum(g.count("adopted their recorded decisions") for g in gateways)
    deduplicated = sum(g.count("already stored (de-duplicated") for g in gateways)
    print(
        f"\nS3 artifacts={artifacts} seed={seed} kills={kills} batches_adopting={adopted} "
        f"batches_with_deduplicated_outputs={deduplicated} {result.line()}"
    )
    for chain in result.chains:
        print(f"  ledger: {chain}")
    assert result.accepted == intents
    assert (result.lost, result.double, result.divergent, result.invalid) == (0, 0, 0, 0)
    assert result.missing_outputs == 0
    assert result.ledger_problems == []
    assert result.effects["allow"] == result.execs
    # The artifact mode really was the one asked for, on every forwarded message.
    assert result.batched_execs == (result.execs if artifacts == "batched" else 0)
    await nc.close()


@pytest.mark.parametrize(
    ("artifacts", "intents", "kills"),
    [("per-message", 3000, 5), ("batched", 1500, 3)],
)
async def test_s3_sigkill_under_load_loses_nothing_and_decides_once(
    nats_url: str, tmp_path: Path, artifacts: str, intents: int, kills: int
) -> None:
    await _crash_run(nats_url, tmp_path, intents=intents, kills=kills, seed=3, artifacts=artifacts)


@pytest.mark.slow
async def test_s3_long_sigkill_soak(nats_url: str, tmp_path: Path) -> None:
    await _crash_run(nats_url, tmp_path, intents=30000, kills=30, seed=33)


async def test_nats_server_killed_and_restarted_under_load(tmp_path: Path) -> None:
    """The bus itself crashes (SIGKILL) and comes back with its store while the gateway
    decides: commits in doubt are retried identically, pulls are re-issued after the
    reconnect, outputs not stored are sent back; then everything reconciles exactly."""
    key, jwks = generate_key(tmp_path)
    port, store = reserve_port(), tmp_path / "store"
    extra = ("--port", str(port))
    server = NatsServer(store_dir=store, extra_args=extra).start()
    url = server.url
    nc = await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    js = nc.jetstream()
    gateway = GatewayProcess(
        run_argv(
            url,
            key,
            "gw-bus",
            "--ack-wait",
            "1",
            "--reconnect-wait",
            "0.1",
            "--max-reconnects",
            "100",
        )
    )
    gateway.start()
    rng = random.Random(5)
    accepted: set[tuple[str, str]] = set()
    try:
        for i in range(1500):
            subject, intent_id, payload = _intent(rng, i)
            if i == 700:  # mid-load: the server dies and comes back
                server.signal(signal.SIGKILL)
                await anyio.to_thread.run_sync(server.stop)
                server = NatsServer(store_dir=store, extra_args=extra).start()
            try:
                await js.publish(subject, payload, timeout=5)
            except (nats.errors.Error, TimeoutError):
                continue  # not accepted by the bus: not counted
            accepted.add((subject.split(".")[2], intent_id))
        await eventually(lambda: drained(js), timeout_s=60, what="intake drained")
        assert gateway.stop() == 0
        result = await reconcile(nc, accepted, jwks)
    finally:
        gateway.kill()
        await nc.close()
        server.stop()
    reconnects = gateway.count("reconnected to NATS")
    in_doubt = gateway.count("commit in doubt")
    print(f"\nbus restart: reconnects={reconnects} commits_in_doubt={in_doubt} {result.line()}")
    assert reconnects >= 1 and result.accepted > 1400
    assert (result.lost, result.double, result.divergent, result.invalid) == (0, 0, 0, 0)
    assert result.missing_outputs == 0 and result.ledger_problems == []


async def test_s4_redelivery_race_between_three_gateways(nats_url: str, tmp_path: Path) -> None:
    key, jwks = generate_key(tmp_path)
    n = 40
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    gateways = [
        GatewayProcess(
            [
                sys.executable,
                "-m",
                "tests.slow_gateway",
                "--nats",
                nats_url,
                "--key",
                str(key),
                "--gateway-id",
                f"gw-s4-{i}",
                "--slow-s",
                "0.15",  # per intent, 4 per pull: a pull takes longer than the ack wait
                "--ack-wait",
                "0.5",
            ]
        )
        for i in range(3)
    ]
    accepted: set[tuple[str, str]] = set()
    rng = random.Random(4)
    try:
        for g in gateways:
            g.start()
        for i in range(n):
            subject, intent_id, payload = _intent(rng, i)
            await js.publish(subject, payload)
            accepted.add((subject.split(".")[2], intent_id))
        await eventually(lambda: drained(js), timeout_s=60, what="intake drained")
        for g in gateways:
            assert g.stop() == 0
    finally:
        for g in gateways:
            g.kill()
    result = await reconcile(nc, accepted, jwks)
    refused = sum(g.count("ids taken") for g in gateways)
    print(f"\nS4 gateways=3 ack_wait=0.5s pull=0.6s ledger_refusals={refused} {result.line()}")
    info = await js.consumer_info("GUARD_IN", "bus-guard")
    assert (info.num_redelivered or 0) > 0 or refused > 0  # the race really happened
    assert (result.lost, result.double, result.divergent, result.invalid) == (0, 0, 0, 0)
    assert result.missing_outputs == 0 and result.ledger_problems == []
    await nc.close()


def test_s6_stream_mode_exits_nonzero_when_the_bus_is_gone(tmp_path: Path) -> None:
    """Never hangs silently: beyond the reconnect budget the gateway exits 1."""
    key, _ = generate_key(tmp_path)
    server = NatsServer().start()
    gateway = GatewayProcess(
        run_argv(server.url, key, "gw-s6", "--reconnect-wait", "0.2", "--max-reconnects", "3")
    )
    try:
        gateway.start()
        server.stop()
        assert gateway.proc is not None
        assert gateway.proc.wait(timeout=30) == 1
    finally:
        gateway.kill()
        server.stop()
    assert gateway.count("exiting") == 1
