"""SCENARIOS S5 on a real 3-node cluster: the shipped compose/cluster configs run as local
processes (fixed loopback ports, so a restarted node comes back where clients look for it),
every bus_guard stream R3, two gateway processes sharing the work.

Under a steady load the cluster suffers, in turn: the intake stream's leader SIGKILLed and
restarted; a rolling restart of all three nodes; one node frozen (SIGSTOP) for a few
seconds. Then everything is reconciled exactly: 0 lost, 0 double, 0 divergent, 0
unexpected (decided but never accepted), every exec artifact valid, every decision's output
stored, the ledger audits clean and sealed, and both gateways were alive throughout (they
ride through leader elections) and exit 0 on SIGTERM.

Agents publish with a ``Nats-Msg-Id`` and publish again until acknowledged (the intake's
de-duplication window keeps one), so what the bus accepted is known exactly.
"""

from __future__ import annotations

import collections
import gc
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus_guard.intake._jetstream import read
from bus_guard.intake._work import stored_at
from bus_guard.ledger._records import decode_record
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key

from .crashkit import GatewayProcess, reconcile, run_argv
from .streamkit import drained, eventually
from .topology import CLUSTER_CONFIGS, credentials, render_config, reserve_port

_enc = msgspec.json.Encoder()
_MIX = (
    ("agent-1", "tools.search", "tool:search", {"q": "x"}),
    ("agent-7", "payments.transfer", "account:acct-1", {"amount": 10, "currency": "USD"}),
    ("agent-2", "tools.shell", "tool:shell", {"cmd": "id"}),
)


@dataclass
class Node:
    name: str
    config: Path
    port: int
    server: NatsServer | None = None

    def start(self) -> None:
        self.server = NatsServer(
            config=self.config, jetstream=False, extra_args=("--port", str(self.port))
        ).start()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.server is not None:
            self.server.signal(sig)
            self.server.stop()
            self.server = None

    def signal(self, sig: signal.Signals) -> None:
        assert self.server is not None
        self.server.signal(sig)


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    def urls(self, user: str) -> str:
        password = credentials()[user]
        return ",".join(f"nats://{user}:{password}@127.0.0.1:{n.port}" for n in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


@contextmanager
def cluster(tmp: Path) -> Iterator[Cluster]:
    route_ports = {config.stem: reserve_port() for config in CLUSTER_CONFIGS}
    c = Cluster()
    with ExitStack() as stack:
        for config in CLUSTER_CONFIGS:
            rendered = render_config(
                config,
                tmp / "conf" / config.stem,
                store_dir=tmp / config.stem / "jetstream",
                route_ports=route_ports,
            )
            node = Node(config.stem, rendered, reserve_port())
            node.start()
            stack.callback(node.stop)
            c.nodes.append(node)
        yield c


async def _healthy(js: JetStreamContext, streams: tuple[str, ...]) -> bool:
    """Every stream has a leader and two current replicas."""
    try:
        for name in streams:
            info = await js.stream_info(name)
            if info.cluster is None or not info.cluster.leader:
                return False
            replicas = info.cluster.replicas or []
            if len(replicas) != 2 or not all(r.current for r in replicas):
                return False
    except (nats.errors.Error, TimeoutError):
        return False
    return True


async def _wait_healthy(js: JetStreamContext) -> None:
    streams = ("GUARD_IN", "GUARD_EXEC", "GUARD_DENY", "GUARD_HOLD", "GUARD_LEDGER")
    await eventually(lambda: _healthy(js, streams), timeout_s=60, what="cluster healthy")


async def _publish_all(c: Cluster, count: int, rate: float, first: int = 0) -> set[tuple[str, str]]:
    """*count* intents at *rate* a second, each agent on its own connection (with its own
    credentials), each intent published until acknowledged."""
    agents: dict[str, JetStreamContext] = {}
    connections: list[Client] = []
    for principal in sorted({m[0] for m in _MIX}):
        agent = await nats.connect(
            c.urls(principal).split(","),
            inbox_prefix=f"_INBOX.{principal}",  # the only replies an agent may receive
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
        )
        connections.append(agent)
        agents[principal] = agent.jetstream(timeout=2)
    try:
        accepted: set[tuple[str, str]] = set()
        start = time.monotonic()
        for i in range(count):
            principal, action, resource, params = _MIX[i % len(_MIX)]
            intent_id = f"s5-{first + i}"
            body = {"id": intent_id, "action": action, "resource": resource, "params": params}
            payload = _enc.encode({**body, "ts": time.time()})
            subject = f"guard.in.{principal}.{action}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    await agents[principal].publish(
                        subject, payload, headers={"Nats-Msg-Id": intent_id}
                    )
                    break
                except (nats.errors.Error, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.1)  # an election: the intake answers again soon
            accepted.add((principal, intent_id))
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                await anyio.sleep(ahead)  # pacing the load, not synchronising
    finally:
        for agent in connections:
            await agent.close()
    return accepted


async def _leader(js: JetStreamContext, stream: str) -> str:
    info = await js.stream_info(stream)
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


# nats-py leaves the stream writer of a reconnect attempt unclosed when the node it tried was
# frozen or restarting (the clients here reconnect across every fault): its leak, collected
# here (gc at the test's end) and not reported in whichever test runs next.
_NATS_PY_RECONNECT_LEAK = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@_NATS_PY_RECONNECT_LEAK
@pytest.mark.timeout(300)
async def test_s5_leader_kill_rolling_restart_and_frozen_node(tmp_path: Path) -> None:
    key, jwks = generate_key(tmp_path)
    with cluster(tmp_path / "cluster") as c:
        urls = c.urls("gateway")
        argv = [
            "--replicas",
            "3",
            "--min-replicas",
            "3",
            "--ack-wait",
            "2",
            "--checkpoint-interval",
            "1",
            "--reconnect-wait",
            "0.1",
            "--max-reconnects",
            "-1",
        ]
        gateways = [GatewayProcess(run_argv(urls, key, f"gw-s5-{i}", *argv)) for i in (1, 2)]
        nc = await nats.connect(
            urls.split(","),
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
        )
        js = nc.jetstream(timeout=2)
        faults: list[str] = []
        try:
            for g in gateways:
                await anyio.to_thread.run_sync(g.start, 60.0)
            await _wait_healthy(js)
            done = anyio.Event()
            accepted: set[tuple[str, str]] = set()

            async def load() -> None:
                accepted.update(await _publish_all(c, 1200, 40.0))
                done.set()

            async def inflict() -> None:
                await anyio.sleep(2)  # under load first
                leader = c.node(await _leader(js, "GUARD_IN"))
                leader.stop(signal.SIGKILL)
                faults.append(f"killed intake leader {leader.name}")
                leader.start()
                await _wait_healthy(js)
                for node in c.nodes:  # rolling restart
                    node.stop()
                    node.start()
                    await _wait_healthy(js)
                faults.append("rolling restart")
                frozen = c.nodes[1]
                frozen.signal(signal.SIGSTOP)
                await anyio.sleep(4)  # the fault's length: a node frozen for 4 s
                frozen.signal(signal.SIGCONT)
                await _wait_healthy(js)
                faults.append(f"froze {frozen.name} for 4 s")

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                tg.start_soon(inflict)
            await done.wait()
            await eventually(lambda: _drained(js), timeout_s=90, what="intake drained")
            alive = [g.proc is not None and g.proc.poll() is None for g in gateways]
            codes = [g.stop(60) for g in gateways]
        finally:
            for g in gateways:
                g.kill()
        result = await reconcile(nc, accepted, jwks)
        decided: collections.Counter[tuple[str, str]] = collections.Counter()
        # decided over 250 ms after the intake stored them (held up by a fault, decided
        # once the cluster recovered; the others take a few ms), and the longest wait
        recovered, longest = 0, 0.0
        async for m in read(nc, "GUARD_LEDGER", "guard.ledger.*.d.*"):
            record = decode_record(m.data)
            decided[(record.principal, record.intent_id)] += 1
            if (at := stored_at(record.intake)) > 0:
                waited = record.ts - at
                recovered += waited > 0.25
                longest = max(longest, waited)
        unexpected = sum(1 for key in decided if key not in accepted)
        await nc.close()
    warnings = [g.count("WARNING") for g in gateways]
    gc.collect()  # the reconnect leak, if any, reported within this test (see above)
    print(
        f"\nS5 faults={faults} unexpected={unexpected} recovered={recovered} "
        f"longest_wait_s={longest:.2f} "
        f"warnings={warnings} {result.line()}"
    )
    assert len(faults) == 3
    assert alive == [True, True], "\n".join(line for g in gateways for line in g.lines[-15:])
    assert codes == [0, 0]
    # Elections are retried with backoff, and said now and then: not thousands of lines.
    assert max(warnings) < 100, warnings
    assert result.accepted == 1200
    assert (result.lost, result.double, result.divergent, result.invalid) == (0, 0, 0, 0)
    assert unexpected == 0
    assert result.missing_outputs == 0
    assert result.ledger_problems == []
    assert result.effects["allow"] == result.execs


async def _decisions(nc: Client) -> int:
    return len([m async for m in read(nc, "GUARD_LEDGER", "guard.ledger.*.d.*")])


async def _drained(js: JetStreamContext) -> bool:
    """drained(), and not yet while the cluster is electing (its API times out)."""
    try:
        return await drained(js)
    except (nats.errors.Error, TimeoutError):
        return False


@_NATS_PY_RECONNECT_LEAK
@pytest.mark.timeout(180)
async def test_a_gateway_given_only_the_seed_url_fails_over_to_servers_it_learned(
    tmp_path: Path,
) -> None:
    """Credentials only in the seed URL: the servers the gateway learns from the cluster
    get them too, so when the seed node dies it goes on deciding through the others."""
    key, _ = generate_key(tmp_path)
    with cluster(tmp_path / "cluster") as c:
        seed = c.urls("gateway").split(",")[0]  # nats://gateway:...@127.0.0.1:<nats-1>
        gateway = GatewayProcess(
            run_argv(seed, key, "gw-seed", "--replicas", "3", "--reconnect-wait", "0.1")
        )
        nc = await nats.connect(
            c.urls("gateway").split(",")[1:], reconnect_time_wait=0.1, max_reconnect_attempts=-1
        )
        js = nc.jetstream(timeout=2)
        try:
            await anyio.to_thread.run_sync(gateway.start, 60.0)
            await _wait_healthy(js)
            accepted = await _publish_all(c, 12, 100.0)
            await eventually(lambda: _drained(js), timeout_s=30, what="first intents decided")
            c.nodes[0].stop(signal.SIGKILL)  # the seed: the only URL the gateway was given
            more = await _publish_all(c, 24, 100.0, first=12)
            assert not more & accepted
            await eventually(
                lambda: _drained(js), timeout_s=30, what="decided with the seed node down"
            )
            assert await _decisions(nc) == 24 + 12
            alive = gateway.proc is not None and gateway.proc.poll() is None
            assert alive, "\n".join(gateway.lines[-20:])
            c.nodes[0].start()
        finally:
            gateway.kill()
        await nc.close()
    gc.collect()  # the reconnect leak, if any, reported within this test (see above)
    assert gateway.count("Authorization Violation") == 0
