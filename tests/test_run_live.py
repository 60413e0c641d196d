"""`bus-guard run` as a real process with its policies on the bus, its keys published and
its canaries running: a push switches it, SIGTERM drains it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import nats

from bus_guard.cli._arguments import parser
from bus_guard.cli._push import cmd_push
from bus_guard.signing._keys import generate_key
from bus_guard.verify import JWKS_KEY, LiveVerifier

from .helpers import Collector, intent
from .policykit import SEARCH, bump_version, policy_dir


async def test_run_takes_its_policies_from_the_bus_publishes_its_keys_and_runs_canaries(
    nats_url: str, tmp_path: Path
) -> None:
    key, _ = generate_key(tmp_path / "gw")
    publisher, publishers = generate_key(tmp_path / "publisher")
    directory = policy_dir(tmp_path)

    async def push() -> None:
        argv = ["policy", "push", str(directory), "--nats", nats_url, "--key", str(publisher)]
        assert await cmd_push(parser().parse_args(argv), io.StringIO()) == 0

    await push()
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    canaries = await Collector.on(nc, "guard.canary.gw-live")
    proc = _gateway(nats_url, key, publishers)
    try:

        async def version() -> str:
            reply = await nc.request(SEARCH, intent("tools.search", "t", {}), timeout=10)
            record = json.loads(reply.data)
            assert record["effect"] == "allow", record
            return str(record["policy_digest"]) + " " + str(_version_of(record))

        assert (await version()).endswith(";rev=1")
        bump_version(directory, "1.6.0")
        await push()
        deadline = time.monotonic() + 10
        while not (now := await version()).endswith("tools@1.6.0;rev=2"):
            assert now.endswith(";rev=1"), now
            assert time.monotonic() < deadline, "the running gateway did not switch"
            await anyio.sleep(0.05)
        # Its JWKS is in the bucket: an executor verifies with it, no file needed.
        live = LiveVerifier(await nc.jetstream().key_value("guard-jwks"))
        await live.refresh()
        assert len(live.jwks) == 1
        assert (await (await nc.jetstream().key_value("guard-jwks")).get(JWKS_KEY)).value
        # The built-in canary ran (a denial, on its own subject), more than once.
        await canaries.wait_for(2)
        assert json.loads(canaries.msgs[0].data)["principal"] == "guard-canary"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    await nc.drain()


def _version_of(record: dict[str, object]) -> str:
    return str(record["policy_version"])


def _gateway(nats_url: str, key: Path, publishers: Path) -> subprocess.Popen[str]:
    """``bus-guard run`` with its policies from the bus, ready (its log line read)."""
    argv = [sys.executable, "-m", "bus_guard", "run", "--nats", nats_url, "--mode", "core"]
    argv += ["--gateway-id", "gw-live", "--policies", "nats://", "--policy-keys", str(publishers)]
    argv += ["--policy-poll", "0.1", "--canary-interval", "0.2", "--key", str(key)]
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "ready on" in line:
            return proc
    raise AssertionError(f"gateway exited before ready: {proc.wait()}")
