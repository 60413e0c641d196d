"""SCENARIOS S17: a soak on a real 3-node cluster, with periodic S3 and S5 faults.

Slow (``pytest -m slow tests/test_soak.py -s``); not run in CI. The cluster is the shipped
compose/cluster configs as local processes on loopback (tests/test_cluster_faults.py), every
bus_guard stream R3, two gateway processes, a witness following the ledger. Agents publish a
steady load (``BUS_GUARD_SOAK_RATE`` intents a second, 40 by default) for
``BUS_GUARD_SOAK_SECONDS`` (300 by default); every ``BUS_GUARD_SOAK_FAULT_EVERY`` seconds
(35) one fault, in turn:

- S3: a gateway SIGKILLed and restarted at once (the same gateway id);
- S5: the intake stream's leader SIGKILLed and restarted; a node frozen (SIGSTOP) for 4 s;
  the ledger stream's leader SIGKILLed and restarted; a rolling restart of all three nodes.

Sampled every second: the decided count (messages in the exec, deny and hold streams, one per
decision) and the gateways' RSS. For each fault: throughput (decisions a second) in the 10 s
before it, while it lasts (until the cluster is healthy again, or the restarted gateway
ready) and in the 10 s after; how long until everything accepted by the end of the fault was
decided (recovered); the gateways' RSS at its start and end. Then everything is reconciled
exactly (0 lost, double, divergent, unexpected, invalid), ``ledger verify --require-sealed
--witness`` passes, and the figures are printed as one JSON line (``S17 {...}``).

Bounded: the load stops by itself after the soak's length, every wait has a deadline, the
test's timeout is the soak's length plus 15 minutes; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus_guard.intake._jetstream import read
from bus_guard.ledger._records import decode_record
from bus_guard.signing._keys import generate_key

from .conftest import ROOT
from .crashkit import GatewayProcess, reconcile, run_argv
from .streamkit import eventually
from .test_cluster_faults import (
    _MIX,
    _NATS_PY_RECONNECT_LEAK,
    Cluster,
    _drained,
    _leader,
    _wait_healthy,
    cluster,
)

SOAK_S: Final = float(os.environ.get("BUS_GUARD_SOAK_SECONDS", "300"))
RATE: Final = float(os.environ.get("BUS_GUARD_SOAK_RATE", "40"))
FAULT_EVERY_S: Final = float(os.environ.get("BUS_GUARD_SOAK_FAULT_EVERY", "35"))
WINDOW_S: Final = 10.0  # throughput before / after a fault: over this many seconds
FROZEN_S: Final = 4.0
FAULTS: Final = (
    "gateway SIGKILL + restart (S3)",
    "intake leader SIGKILL + restart",
    "node SIGSTOP 4 s",
    "ledger leader SIGKILL + restart",
    "rolling restart",
)
_enc = msgspec.json.Encoder()


@dataclass
class Fault:
    name: str
    start: float
    accepted_at_start: int
    rss_start_mib: list[float]
    end: float = 0.0
    accepted_at_end: int = 0
    recovered_at: float | None = None
    rss_end_mib: list[float] = field(default_factory=list)


@dataclass
class Soak:
    c: Cluster
    gateways: list[GatewayProcess]
    accepted: set[tuple[str, str]] = field(default_factory=set)
    decided: list[tuple[float, int]] = field(default_factory=list)  # (t, decided)
    rss: list[tuple[float, int, int, float]] = field(default_factory=list)  # t, slot, pid, MiB
    faults: list[Fault] = field(default_factory=list)
    # gateway processes that exited by themselves: (slot, exit code, their last lines)
    exits: list[tuple[int, int, list[str]]] = field(default_factory=list)
    stop_load: anyio.Event = field(default_factory=anyio.Event)
    load_done: anyio.Event = field(default_factory=anyio.Event)

    def rss_now(self) -> list[float]:
        return [_rss_mib(g) for g in self.gateways]

    def decided_at(self, t: float) -> int:
        """The last decided count sampled at or before *t*."""
        best = 0
        for when, n in self.decided:
            if when > t:
                break
            best = n
        return best

    def rate(self, t0: float, t1: float) -> float:
        if t1 - t0 < 0.5:
            return 0.0
        return (self.decided_at(t1) - self.decided_at(t0)) / (t1 - t0)


def _rss_mib(g: GatewayProcess) -> float:
    if g.proc is None or g.proc.poll() is not None:
        return 0.0
    try:
        text = Path(f"/proc/{g.proc.pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def _decided(js: JetStreamContext) -> int | None:
    """Decisions made so far: one output each in the exec, deny and hold streams."""
    try:
        total = 0
        for stream in ("GUARD_EXEC", "GUARD_DENY", "GUARD_HOLD"):
            total += (await js.stream_info(stream)).state.messages
    except (nats.errors.Error, TimeoutError):
        return None  # an election: no sample this time
    return total


async def _load(s: Soak) -> None:
    """RATE intents a second until stop_load; each agent on its own connection, each intent
    published until acknowledged (with a Nats-Msg-Id: the intake keeps one)."""
    agents: dict[str, JetStreamContext] = {}
    connections: list[Client] = []
    for principal in sorted({m[0] for m in _MIX}):
        agent = await nats.connect(
            s.c.urls(principal).split(","),
            inbox_prefix=f"_INBOX.{principal}",
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
        )
        connections.append(agent)
        agents[principal] = agent.jetstream(timeout=2)
    try:
        start = time.monotonic()
        i = 0
        while not s.stop_load.is_set():
            principal, action, resource, params = _MIX[i % len(_MIX)]
            intent_id = f"s17-{i}"
            body = {"id": intent_id, "action": action, "resource": resource, "params": params}
            payload = _enc.encode({**body, "ts": time.time()})
            deadline = time.monotonic() + 120
            while True:
                try:
                    await agents[principal].publish(
                        f"guard.in.{principal}.{action}",
                        payload,
                        headers={"Nats-Msg-Id": intent_id},
                    )
                    break
                except (nats.errors.Error, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.1)  # an election: the intake answers again soon
            s.accepted.add((principal, intent_id))
            i += 1
            ahead = start + i / RATE - time.monotonic()
            if ahead > 0:
                await anyio.sleep(ahead)  # pacing the load, not synchronising
    finally:
        for agent in connections:
            await agent.close()
        s.load_done.set()


async def _sample(s: Soak, js: JetStreamContext) -> None:
    while True:
        now = time.monotonic()
        n = await _decided(js)
        if n is not None:
            s.decided.append((now, n))
            for f in s.faults:
                if f.end and f.recovered_at is None and n >= f.accepted_at_end:
                    f.recovered_at = now
        for slot, g in enumerate(s.gateways):
            if g.proc is not None:
                s.rss.append((now, slot, g.proc.pid, _rss_mib(g)))
                code = g.proc.poll()
                if code is not None and not any(e[2] is g.lines for e in s.exits):
                    s.exits.append((slot, code, g.lines))
        await anyio.sleep(max(0.0, now + 1.0 - time.monotonic()))  # the sampling period


async def _inflict(s: Soak, js: JetStreamContext, name: str, n: int) -> None:
    c = s.c
    if name.startswith("gateway"):
        slot = n % len(s.gateways)
        s.gateways[slot].kill()
        s.gateways[slot] = GatewayProcess(s.gateways[slot].argv)
        await anyio.to_thread.run_sync(s.gateways[slot].start, 60.0)
    elif name.startswith(("intake", "ledger")):
        stream = "GUARD_IN" if name.startswith("intake") else "GUARD_LEDGER"
        leader = c.node(await _leader(js, stream))
        leader.stop(signal.SIGKILL)
        leader.start()
        await _wait_healthy(js)
    elif name.startswith("node SIGSTOP"):
        frozen = c.nodes[n % len(c.nodes)]
        frozen.signal(signal.SIGSTOP)
        try:
            await anyio.sleep(FROZEN_S)  # the fault's length
        finally:
            frozen.signal(signal.SIGCONT)
        await _wait_healthy(js)
    else:
        for node in c.nodes:
            node.stop()
            node.start()
            await _wait_healthy(js)


async def _faults(s: Soak, js: JetStreamContext, t0: float) -> None:
    n = 0
    while True:
        at = t0 + FAULT_EVERY_S * (n + 1)
        if at + FAULT_EVERY_S > t0 + SOAK_S:  # room for the fault and the window after it
            return
        await anyio.sleep(max(0.0, at - time.monotonic()))  # the fault schedule
        name = FAULTS[n % len(FAULTS)]
        fault = Fault(name, time.monotonic(), len(s.accepted), s.rss_now())
        s.faults.append(fault)
        await _inflict(s, js, name, n)
        fault.end = time.monotonic()
        fault.accepted_at_end = len(s.accepted)
        n += 1


def _cli(*argv: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus_guard", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout_s,
        check=False,
    )


def _start_witness(
    urls: str, directory: Path, key: Path, jwks: Path, log: Path
) -> subprocess.Popen[str]:
    """``bus-guard witness`` following the ledger (as the auditor), its output in *log*."""
    with log.open("w") as log_file:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bus_guard",
                "witness",
                "--nats",
                urls,
                "--dir",
                str(directory),
                "--key",
                str(key),
                "--jwks",
                str(jwks),
                "--interval",
                "2",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )


def _report(s: Soak, t_end: float) -> dict[str, Any]:
    rows = []
    for i, f in enumerate(s.faults):
        following = s.faults[i + 1].start if i + 1 < len(s.faults) else t_end
        after_end = min(f.end + WINDOW_S, following)
        rows.append(
            {
                "fault": f.name,
                "before_per_s": round(s.rate(f.start - WINDOW_S, f.start), 1),
                "during_per_s": round(s.rate(f.start, f.end), 1),
                "after_per_s": round(s.rate(f.end, after_end), 1),
                "fault_s": round(f.end - f.start, 1),
                "recovered_s": (
                    None if f.recovered_at is None else round(f.recovered_at - f.start, 1)
                ),
                "rss_start_mib": f.rss_start_mib,
                "rss_end_mib": [last_rss(s, k, after_end) for k in range(len(s.gateways))],
            }
        )
    # Per gateway process: RSS after its first 10 s, at its end, and its peak.
    by_pid: dict[int, list[tuple[float, int, float]]] = collections.defaultdict(list)
    for t, slot, pid, mib in s.rss:
        if mib:
            by_pid[pid].append((t, slot, mib))
    processes = []
    for samples in by_pid.values():
        first_t = samples[0][0]
        settled = [x for x in samples if x[0] >= first_t + 10] or samples
        processes.append(
            {
                "slot": samples[0][1],
                "lived_s": round(samples[-1][0] - first_t, 1),
                "rss_start_mib": settled[0][2],
                "rss_end_mib": samples[-1][2],
                "rss_peak_mib": max(x[2] for x in samples),
            }
        )
    return {"faults": rows, "gateway_processes": processes}


def last_rss(s: Soak, slot: int, before: float) -> float:
    """The RSS of the gateway in *slot* last sampled at or before *before* (0: not running)."""
    found = [mib for t, k, _, mib in s.rss if k == slot and t <= before]
    return found[-1] if found else 0.0


@pytest.mark.slow
@_NATS_PY_RECONNECT_LEAK
@pytest.mark.timeout(SOAK_S + 900)
async def test_s17_soak_with_periodic_gateway_and_cluster_faults(tmp_path: Path) -> None:
    key, jwks = generate_key(tmp_path / "gateway")
    witness_key, witness_jwks = generate_key(tmp_path / "witness")
    with cluster(tmp_path / "cluster") as c:
        urls = c.urls("gateway")
        argv = run_argv(
            urls,
            key,
            "gw-s17-x",
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
        )
        gateways = [
            GatewayProcess([a.replace("gw-s17-x", f"gw-s17-{i}") for a in argv]) for i in (1, 2)
        ]
        s = Soak(c, gateways)
        nc = await nats.connect(urls.split(","), reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        js = nc.jetstream(timeout=2)
        witness: subprocess.Popen[str] | None = None
        witness_log = tmp_path / "witness.log"
        try:
            for g in gateways:
                await anyio.to_thread.run_sync(g.start, 60.0)
            await _wait_healthy(js)
            witness = _start_witness(
                c.urls("auditor"), tmp_path / "witnessed", witness_key, jwks, witness_log
            )
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_sample, s, js)
                tg.start_soon(_load, s)
                await _faults(s, js, t0)
                await anyio.sleep(max(0.0, t0 + SOAK_S - time.monotonic()))  # the soak's end
                s.stop_load.set()
                await s.load_done.wait()
                t_end = time.monotonic()
                await eventually(lambda: _drained(js), timeout_s=180, what="intake drained")
                await anyio.sleep(1.5)  # one more sample of the decided count
                tg.cancel_scope.cancel()
            alive = [g.proc is not None and g.proc.poll() is None for g in s.gateways]
            codes = [g.stop(60) for g in s.gateways]
            # the witness reads the sealed chains (final checkpoints), then stops
            await anyio.sleep(5)  # two of its reading periods
            witness.send_signal(signal.SIGTERM)
            witness_code = await anyio.to_thread.run_sync(witness.wait, 60)
        finally:
            for g in s.gateways:
                g.kill()
            if witness is not None and witness.poll() is None:
                witness.kill()
                witness.wait()
        result = await reconcile(nc, s.accepted, jwks)
        decided: collections.Counter[tuple[str, str]] = collections.Counter()
        async for m in read(nc, "GUARD_LEDGER", "guard.ledger.*.d.*"):
            record = decode_record(m.data)
            decided[(record.principal, record.intent_id)] += 1
        unexpected = sum(1 for k in decided if k not in s.accepted)
        verify = await anyio.to_thread.run_sync(
            _cli,
            "ledger",
            "verify",
            "--nats",
            c.urls("auditor"),
            "--jwks",
            str(jwks),
            "--require-sealed",
            "--witness",
            str(tmp_path / "witnessed"),
            "--witness-jwks",
            str(witness_jwks),
        )
        await nc.close()
    gc.collect()  # the reconnect leak, if any, reported within this test
    report = {
        "seconds": SOAK_S,
        "rate_per_s": RATE,
        "accepted": result.accepted,
        "decided": result.decided,
        "lost": result.lost,
        "double": result.double,
        "divergent": result.divergent,
        "unexpected": unexpected,
        "invalid": result.invalid,
        "missing_outputs": result.missing_outputs,
        "ledger_problems": len(result.ledger_problems),
        "ledger_verify_with_witness": verify.returncode,
        "witness_exit": witness_code,
        "warnings": [g.count("WARNING") for g in s.gateways],
        "gateway_exits": [(slot, code) for slot, code, _ in s.exits],
        **_report(s, t_end),
    }
    print("\nS17 " + json.dumps(report))
    witness_out = witness_log.read_text()
    for slot, code, lines in s.exits:
        print(f"gateway {slot + 1} exited by itself ({code}):\n" + "\n".join(lines[-40:]))
    assert s.exits == []
    assert len(s.faults) >= min(len(FAULTS), int(SOAK_S // FAULT_EVERY_S) - 1)
    assert alive == [True, True], "\n".join(line for g in s.gateways for line in g.lines[-15:])
    assert codes == [0, 0]
    assert (result.lost, result.double, result.divergent, result.invalid) == (0, 0, 0, 0)
    assert unexpected == 0
    assert result.missing_outputs == 0
    assert result.ledger_problems == []
    assert result.effects["allow"] == result.execs
    assert witness_code == 0, witness_out[-3000:]
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert all(f.recovered_at is not None for f in s.faults), report["faults"]
