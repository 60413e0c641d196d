"""``bus-guard demo --nats URL`` on a server where a real gateway keeps its streams (issue 13):
the demo runs under a prefix of its own and deletes what it made; the deployment's streams,
buckets and ledger are exactly as before, and its ledger still verifies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import msgspec
import nats
from nats.js import JetStreamContext

from bus_guard.signing._keys import generate_key

from .conftest import ROOT
from .crashkit import GatewayProcess, run_argv
from .streamkit import drained, eventually

_enc = msgspec.json.Encoder()


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus_guard", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        check=False,
    )


async def _streams(js: JetStreamContext) -> dict[str, tuple[int, int, int]]:
    """Every stream on the server: (messages, first seq, last seq)."""
    return {
        str(info.config.name): (info.state.messages, info.state.first_seq, info.state.last_seq)
        for info in await js.streams_info()
    }


async def test_demo_on_a_deployments_server_leaves_its_streams_and_ledger_untouched(
    nats_url: str, tmp_path: Path
) -> None:
    key, jwks = generate_key(tmp_path)
    gateway = GatewayProcess(run_argv(nats_url, key, "gw-real", "--checkpoint-every", "5"))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await anyio.to_thread.run_sync(gateway.start)
        for i in range(12):
            body = {"id": f"real-{i}", "action": "tools.search", "resource": "tool:search"}
            await js.publish(
                "guard.in.agent-1.tools.search",
                _enc.encode({**body, "params": {"q": "x"}, "ts": time.time()}),
            )
        await eventually(lambda: drained(js), what="the deployment's intents decided")
        assert gateway.stop() == 0  # sealed: its ledger verifies with --require-sealed
    finally:
        gateway.kill()
    before = await _streams(js)
    assert {"GUARD_IN", "GUARD_EXEC", "GUARD_LEDGER", "KV_guard-jwks"} <= set(before)
    assert before["GUARD_EXEC"][0] == 12  # allowed

    demo = await anyio.to_thread.run_sync(
        lambda: _cli("demo", "--nats", nats_url, "--count", "60", "--rate", "0", "--quiet")
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "PASS" in demo.stdout

    after = await _streams(js)
    await nc.close()
    # Every stream of the deployment holds exactly what it held, and the demo's are gone.
    assert after == before
    assert "prefix bus-guard-demo-" in demo.stdout
    verify = await anyio.to_thread.run_sync(
        lambda: _cli(
            "ledger", "verify", "--nats", nats_url, "--jwks", str(jwks), "--require-sealed"
        )
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
