"""Operating a gateway: ``$SRV.PING/INFO/STATS`` (the NATS micro service API), the
Prometheus ``/metrics``, ``/healthz`` and ``/readyz``, all against real nats-servers."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import nats
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from bus_guard.cli._status import gateway_stats
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.ops import OpsServer
from bus_guard.policy._load import PolicySet, load_policies
from bus_guard.server import NatsServer
from bus_guard.settings import Settings
from bus_guard.signing._signer import Signer

from .conftest import POLICIES
from .helpers import Collector, intent
from .streamkit import eventually

# A known mix, by (effect, reason): what the shipped policies decide for each intent.
_MIX: list[tuple[str, bytes, tuple[str, str]]] = [
    *[
        (
            "guard.in.agent-1.tools.shell",
            intent("tools.shell", "tool:shell", {"cmd": "id"}),
            ("deny", "denied_by_rule"),
        )
    ]
    * 4,
    *[
        (
            "guard.in.agent-1.tools.search",
            intent("tools.search", "tool:search", {"q": "fx"}),
            ("allow", "allowed_by_rule"),
        )
    ]
    * 3,
    (
        "guard.in.agent-9.payments.transfer",
        intent("payments.transfer", "account:acct-1", {"amount": 5000, "currency": "USD"}),
        ("hold", "escalated_by_rule"),
    ),
    ("guard.in.agent-7.payments.transfer", b'{"id": "x", "action":', ("deny", "malformed")),
    (
        "guard.in.agent-5.unknown.thing",
        intent("unknown.thing", "r", {}),
        ("deny", "no_matching_rule"),
    ),
]


def _expected() -> collections.Counter[tuple[str, str]]:
    return collections.Counter(want for _, _, want in _MIX)


def _mix() -> list[tuple[str, bytes, tuple[str, str]]]:
    """The mix with fresh intent ids (each call: no replays across publishes)."""
    out = []
    for subject, data, want in _MIX:
        if data.startswith(b'{"id": "x"'):
            out.append((subject, data, want))
            continue
        body = msgspec.json.decode(data)
        out.append((subject, intent(body["action"], body["resource"], body["params"]), want))
    return out


async def _send_mix(nc: Client) -> int:
    """Publish the mix and wait until every output arrived (one per intent, core mode)."""
    outputs = await Collector.on(nc, "guard.*.>")  # exec, deny, hold (not in: nothing else)
    mix = _mix()
    for subject, data, _ in mix:
        await nc.publish(subject, data)
    await round_trip(nc)
    await outputs.wait_for(len(mix))
    return len(mix)


async def _srv(nc: Client, subject: str, *, expect: int, wait_s: float = 5.0) -> list[Any]:
    """Every answer to a $SRV request within *wait_s* (sooner once *expect* answered)."""
    inbox = nc.new_inbox()
    answers = Collector()
    sub = await nc.subscribe(inbox, cb=answers.on_msg)
    await nc.publish(subject, b"", reply=inbox)
    with anyio.move_on_after(wait_s):
        await answers.wait_for(expect, timeout_s=wait_s)
    await sub.unsubscribe()
    # no responders: the server says so with a status message (no data), not an answer
    return [json.loads(m.data) for m in answers.msgs if not (m.headers or {}).get("Status")]


def _by_reason(status: dict[str, Any]) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(
        {
            (effect, reason): n
            for effect, reasons in status["decisions"].items()
            for reason, n in reasons.items()
        }
    )


def _status_data(stats: dict[str, Any]) -> dict[str, Any]:
    (endpoint,) = [e for e in stats["endpoints"] if e["name"] == "status"]
    data: dict[str, Any] = endpoint["data"]
    return data


def _bumped(tmp_path: Path) -> PolicySet:
    """The shipped policies with another version of the payments bundle."""
    copy = tmp_path / "bumped"
    shutil.copytree(POLICIES, copy)
    bundle = copy / "payments.yaml"
    text = bundle.read_text()
    assert 'version: "1.2.0"' in text
    bundle.write_text(text.replace('version: "1.2.0"', 'version: "9.9.9"', 1))
    return load_policies(copy)


async def test_srv_ping_info_stats_answered_by_two_gateways_with_correct_counts(
    nats_url: str, policies: PolicySet, signer: Signer, tmp_path: Path
) -> None:
    ids = ("gw-a", "gw-b")
    gateways = [
        Gateway(Settings(nats_url=nats_url, mode="core", gateway_id=g), policies, signer)
        for g in ids
    ]
    nc = await nats.connect(nats_url)
    async with gateways[0], gateways[1]:
        sent = await _send_mix(nc)
        sent += await _send_mix(nc)  # twice: the queue group spreads them over both

        pings = await _srv(nc, "$SRV.PING.bus-guard", expect=2)
        assert sorted(p["metadata"]["gateway"] for p in pings) == sorted(ids)
        assert {p["type"] for p in pings} == {"io.nats.micro.v1.ping_response"}
        for p in pings:
            assert p["name"] == "bus-guard" and p["metadata"]["policy_digest"] == policies.digest
            assert p["metadata"]["mode"] == "core" and p["metadata"]["kid"] == signer.kid
        # the all-services form reaches them too; another service's name reaches neither
        assert len(await _srv(nc, "$SRV.PING", expect=2)) == 2
        assert await _srv(nc, "$SRV.PING.not-bus-guard", expect=1, wait_s=0.5) == []

        infos = await _srv(nc, "$SRV.INFO.bus-guard", expect=2)
        assert {i["id"] for i in infos} == {p["id"] for p in pings}
        for info in infos:
            assert [e["name"] for e in info["endpoints"]] == ["status"]
            assert info["metadata"]["policy_version"] == policies.version

        want = _expected()
        want = collections.Counter({k: 2 * n for k, n in want.items()})

        async def counts_match() -> bool:
            stats = await gateway_stats(nc, wait_s=5.0, expect=2)
            got = sum((_by_reason(_status_data(s)) for s in stats), collections.Counter())
            return got == want

        await eventually(counts_match)
        stats = await gateway_stats(nc, wait_s=5.0, expect=2)
        assert len(stats) == 2
        data = [_status_data(s) for s in stats]
        assert sorted(d["identity"]["gateway"] for d in data) == sorted(ids)
        assert sum(d["statistics"]["received"] for d in data) == sent
        for d in data:  # each gateway counts what it decided, and no more
            assert sum(_by_reason(d).values()) == d["statistics"]["received"]
            assert d["ready"] is True
            assert d["latency_s"]["count"] == d["statistics"]["received"]
            assert d["statistics"]["internal_errors"] == 0
        # the per-instance form: exactly that gateway
        one = stats[0]
        only = await _srv(nc, f"$SRV.STATS.bus-guard.{one['id']}", expect=2, wait_s=1.0)
        assert [o["id"] for o in only] == [one["id"]]
        # its status endpoint answers the same document
        reply = await nc.request(f"$SRV.STATUS.bus-guard.{one['id']}", b"", timeout=5)
        assert json.loads(reply.data)["identity"] == _status_data(one)["identity"]

        # a policy swap shows in the next PING (the metadata is the gateway's, live)
        swapped = _bumped(tmp_path)
        gateways[0].swap_policies(swapped)
        pings = await _srv(nc, f"$SRV.PING.bus-guard.{gateways[0].service_id}", expect=1)
        assert [p["metadata"]["policy_version"] for p in pings] == [swapped.version]
        assert swapped.version != policies.version
    await nc.drain()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _http(url: str) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(_get, url)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text, parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_parse_and_match_the_decisions(
    nats_url: str, policies: PolicySet, signer: Signer
) -> None:
    gateway = Gateway(Settings(nats_url=nats_url, mode="core", gateway_id="gw-m"), policies, signer)
    nc = await nats.connect(nats_url)
    async with OpsServer(gateway, "127.0.0.1", 0) as ops, gateway:
        base = f"http://127.0.0.1:{ops.port}"
        sent = await _send_mix(nc)
        want = _expected()

        async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            code, text = await _http(f"{base}/metrics")
            assert code == 200
            return _samples(text)

        async def counted() -> bool:
            return (await scraped())[("bus_guard_intents_received_total", ())] == sent

        await eventually(counted)
        samples = await scraped()
        decisions = {
            (dict(labels)["effect"], dict(labels)["reason"]): value
            for (name, labels), value in samples.items()
            if name == "bus_guard_decisions_total"
        }
        assert decisions == {k: float(n) for k, n in want.items()}
        assert samples[("bus_guard_decision_latency_seconds_count", ())] == sent
        assert samples[("bus_guard_decision_latency_seconds_bucket", (("le", "+Inf"),))] == sent
        assert samples[("bus_guard_internal_errors_total", ())] == 0
        assert samples[("bus_guard_ready", ())] == 1
        info = [labels for (name, labels), _ in samples.items() if name == "bus_guard_gateway_info"]
        assert [dict(i)["policy_digest"] for i in info] == [policies.digest]
        # no label whose values agents choose
        assert not any(
            k in ("principal", "action", "resource") for (_, ls) in samples for k, _ in ls
        )
        assert (await _http(f"{base}/healthz")) == (200, "ok\n")
        assert (await _http(f"{base}/readyz")) == (200, "ready\n")
        assert (await _http(f"{base}/nothing"))[0] == 404
    await nc.drain()


async def test_readyz_flips_when_the_server_stops_and_when_the_policy_goes_stale(
    policies: PolicySet, signer: Signer
) -> None:
    server = NatsServer(jetstream=False).start()
    try:
        settings = Settings(
            nats_url=server.url,
            mode="core",
            gateway_id="gw-r",
            reconnect_wait_s=0.2,
            max_reconnect_attempts=100,  # stays reconnecting while the test looks
            policy_max_age_s=2.0,
        )
        gateway = Gateway(settings, policies, signer)
        ops = OpsServer(gateway, "127.0.0.1", 0, policy_max_age_s=settings.policy_max_age_s)
        async with ops:
            base = f"http://127.0.0.1:{ops.port}"
            code, text = await _http(f"{base}/readyz")  # listening before the gateway starts
            assert code == 503 and "not connected" in text
            assert (await _http(f"{base}/healthz"))[0] == 200
            async with gateway:
                assert await _http(f"{base}/readyz") == (200, "ready\n")

                async def stale() -> bool:
                    code, text = await _http(f"{base}/readyz")
                    return code == 503 and "policy stale" in text

                await eventually(stale)
                gateway.swap_policies(load_policies(POLICIES))  # a fresh set: ready again
                assert await _http(f"{base}/readyz") == (200, "ready\n")

                # the keeper's stale set (every intent denied policy_stale): not ready
                from bus_guard.policy._bundle import StaleSet

                gateway.swap_policies(StaleSet(policies, "past its max age"))
                code, text = await _http(f"{base}/readyz")
                assert code == 503 and "policy stale" in text
                gateway.swap_policies(load_policies(POLICIES))
                # a canary with a wrong answer holds readiness off, and lets go
                gateway.hold_readiness("canary", "wrong outcome for guard-canary")
                code, text = await _http(f"{base}/readyz")
                assert code == 503 and "canary: wrong outcome" in text
                gateway.hold_readiness("canary", None)
                assert await _http(f"{base}/readyz") == (200, "ready\n")

                await anyio.to_thread.run_sync(server.stop)

                async def disconnected() -> bool:
                    code, text = await _http(f"{base}/readyz")
                    return code == 503 and "not connected to NATS" in text

                await eventually(disconnected)
                assert (await _http(f"{base}/healthz")) == (200, "ok\n")  # alive, not ready
                metrics = _samples((await _http(f"{base}/metrics"))[1])
                assert metrics[("bus_guard_ready", ())] == 0
    finally:
        server.stop()


def test_run_serves_metrics_and_json_logs_with_fields(tmp_path: Path, nats_url: str) -> None:
    """`bus-guard run --http ... --log-format json` (options after the command): every log
    line is a JSON object with the gateway's fields; denials are logged with theirs,
    allows are not (--log-decisions denied); /metrics counts them."""
    from bus_guard.signing._keys import generate_key

    key, _ = generate_key(tmp_path)
    argv = [
        sys.executable, "-m", "bus_guard", "run", "--nats", nats_url, "--policies",
        str(POLICIES), "--key", str(key), "--mode", "core", "--gateway-id", "gw-log",
        "--http", "127.0.0.1:0", "--log-format", "json", "--log-decisions", "denied",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    port = 0
    for line in proc.stderr:
        lines.append(json.loads(line))  # every line is JSON
        port = lines[-1].get("http_port", port)
        if "ready on" in lines[-1]["msg"]:
            break
    assert port
    try:
        anyio.run(_send_and_scrape, nats_url, port)
        proc.send_signal(15)
        _, rest = proc.communicate(timeout=20)
        assert proc.returncode == 0
        lines += [json.loads(line) for line in rest.splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    policies = load_policies(POLICIES)
    for record in lines:
        assert {"ts", "level", "logger", "msg"} <= set(record)
        assert record["gateway"] == "gw-log" and record["policy_digest"] == policies.digest
    decisions = [r for r in lines if r["logger"] == "bus_guard.decisions"]
    want = [(effect, reason) for _, _, (effect, reason) in _MIX if effect != "allow"]
    assert sorted((d["effect"], d["reason"]) for d in decisions) == sorted(want)
    for d in decisions:
        assert d["decision_id"] and d["decision_id"] in d["msg"]
        assert d["gateway"] == "gw-log" and d["policy_digest"] == policies.digest
    shell = [d for d in decisions if d["reason"] == "denied_by_rule"]
    assert {(d["principal"], d["action"], tuple(d["rules"])) for d in shell} == {
        ("agent-1", "tools.shell", ("no-shell",))
    }


async def _send_and_scrape(nats_url: str, port: int) -> None:
    nc = await nats.connect(nats_url)
    sent = await _send_mix(nc)
    await nc.drain()

    async def counted() -> bool:
        code, text = await _http(f"http://127.0.0.1:{port}/metrics")
        return code == 200 and _samples(text)[("bus_guard_intents_received_total", ())] == sent

    await eventually(counted)


@pytest.fixture
def two_gateways(tmp_path: Path, nats_url: str) -> Any:
    from bus_guard.signing._keys import generate_key

    key, _ = generate_key(tmp_path)
    procs = []
    for gid in ("gw-s1", "gw-s2"):
        argv = [
            sys.executable, "-m", "bus_guard", "run", "--nats", nats_url, "--policies",
            str(POLICIES), "--key", str(key), "--mode", "core", "--gateway-id", gid,
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:
            if "ready on" in line:
                break
        procs.append(proc)
    yield procs
    for proc in procs:
        proc.terminate()
        proc.communicate(timeout=20)


def test_status_shows_every_gateway(nats_url: str, two_gateways: Any) -> None:
    env = {**os.environ, "NATS_URL": nats_url}  # and no --nats
    run = subprocess.run(
        [sys.executable, "-m", "bus_guard", "status", "--json", "--wait", "3"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    docs = [json.loads(line) for line in run.stdout.splitlines()]
    assert sorted(d["identity"]["gateway"] for d in docs) == ["gw-s1", "gw-s2"]
    assert all(d["ready"] and d["service_id"] for d in docs)
    table = subprocess.run(
        [sys.executable, "-m", "bus_guard", "status", "--nats", nats_url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert table.returncode == 0
    assert "gw-s1" in table.stdout and "gw-s2" in table.stdout


def test_status_without_gateways_exits_1(nats_url: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bus_guard", "status", "--nats", nats_url, "--wait", "0.3"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "no gateway answered" in run.stderr


async def test_operators_get_every_gateways_stats_under_the_shipped_permissions(
    tmp_path: Path, policies: PolicySet, signer: Signer
) -> None:
    """compose/auth.conf: gateways (account GUARD) answer $SRV, operators (account OPS) ask
    through the service import; the issue saw no responders there."""
    from .topology import credentials, local_server

    users = credentials()
    with local_server(tmp_path) as server:
        host = server.url.removeprefix("nats://")
        as_gateway = f"nats://gateway:{users['gateway']}@{host}"
        gateways = [
            Gateway(Settings(nats_url=as_gateway, mode="core", gateway_id=g), policies, signer)
            for g in ("gw-t1", "gw-t2")
        ]
        operator = await nats.connect(f"nats://operator:{users['operator']}@{host}")
        async with gateways[0], gateways[1]:
            # The service import passes streamed answers for 2 s (nats-server's default
            # response threshold): on a loaded machine ask again rather than wait longer.
            seen: set[str] = set()

            async def both_answered() -> bool:
                stats = await gateway_stats(operator, wait_s=2.0, expect=2)
                seen.update(_status_data(s)["identity"]["gateway"] for s in stats)
                return seen == {"gw-t1", "gw-t2"}

            await eventually(both_answered, what="both gateways' STATS through OPS")
            pings = await _srv(operator, "$SRV.PING.bus-guard", expect=2)
            assert 1 <= len(pings) <= 2
            assert {p["metadata"]["gateway"] for p in pings} <= {"gw-t1", "gw-t2"}
        await operator.drain()


def test_every_counter_of_the_statistics_is_a_metric() -> None:
    """A counter added to GatewayStatistics shows on /metrics too (or is said to be
    covered otherwise: by effect in bus_guard_decisions_total, or as a gauge)."""
    import dataclasses

    from bus_guard.intake import GatewayStatistics
    from bus_guard.ops._metrics import COUNTERS

    fields = {f.name for f in dataclasses.fields(GatewayStatistics)}
    covered = {"allowed", "denied", "held", "would_deny", "lineage_waiting"}
    assert fields - set(COUNTERS) == covered
    assert set(COUNTERS) <= fields
    names = [name for name, _ in COUNTERS.values()]
    assert len(set(names)) == len(names)
