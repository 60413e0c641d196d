"""Freshness (SCENARIOS S2: policy older than the maximum age): past ``max_age`` every
intent is denied ``policy_stale`` until a fresh set arrives; replicas converge on the
newest set, and `policy status` shows each gateway's digest, revision and freshness."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client

from bus_guard.cli._arguments import parser
from bus_guard.cli._push import cmd_push, cmd_status
from bus_guard.intake._gateway import Gateway
from bus_guard.intake._policy_source import DirectorySource, PolicyKeeper, open_keeper
from bus_guard.settings import PolicySourceSettings, Settings
from bus_guard.signing._keys import generate_key
from bus_guard.signing._signer import Signer

from .helpers import intent
from .policykit import SEARCH, bump_version, policy_dir, wait_for


async def _search(nc: Client) -> dict[str, object]:
    reply = await nc.request(SEARCH, intent("tools.search", "t", {}), timeout=10)
    record: dict[str, object] = json.loads(reply.data)
    return record


async def _until(nc: Client, reason: str, *, timeout_s: float = 10.0) -> dict[str, object]:
    """Search until the decision has *reason*; every one before must be an allow."""
    deadline = time.monotonic() + timeout_s
    while (record := await _search(nc))["reason"] != reason:
        assert record["reason"] == "allowed_by_rule", record
        assert time.monotonic() < deadline, f"no {reason} in time"
    return record


async def test_a_directory_set_past_its_max_age_denies_policy_stale_until_reaffirmed(
    nats_url: str, tmp_path: Path, signer: Signer
) -> None:
    directory = policy_dir(tmp_path)
    keeper = PolicyKeeper(DirectorySource(directory), max_age_s=1.0, poll_s=0.1)
    await keeper.load()
    issued = keeper.active.issued_at
    digest = keeper.active.policies.digest
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    async with (
        Gateway(settings, keeper.current, signer) as gateway,
        keeper.running(gateway.swap_policies),
    ):
        assert (await _search(nc))["effect"] == "allow"
        stale = await _until(nc, "policy_stale")
        went_stale = time.time()
        assert issued + 1.0 <= went_stale < issued + 3.0
        assert stale["effect"] == "deny" and stale["policy_digest"] == digest
        assert "older than the maximum age" in str(stale["message"])
        assert keeper.statistics().stale
        # Stale stays stale: the next ones are denied too (nothing arrived).
        for _ in range(5):
            assert (await _search(nc))["reason"] == "policy_stale"
        keeper.request_reload()  # SIGHUP: the same files, read again: fresh for a second
        deadline = time.monotonic() + 5
        while (record := await _search(nc))["reason"] == "policy_stale":
            assert time.monotonic() < deadline
        assert record["effect"] == "allow" and record["policy_digest"] == digest
        assert not keeper.statistics().stale
    await nc.drain()


async def test_bus_replicas_go_stale_converge_on_a_fresh_push_and_report_their_status(
    nats_url: str, tmp_path: Path, signer: Signer
) -> None:
    publisher, publishers = generate_key(tmp_path / "publisher")
    directory = policy_dir(tmp_path)

    async def push() -> None:
        argv = ["policy", "push", str(directory), "--nats", nats_url, "--key", str(publisher)]
        assert await cmd_push(parser().parse_args(argv), io.StringIO()) == 0

    await push()
    source = PolicySourceSettings(publishers_file=publishers, max_age_s=1.5, poll_s=0.1)
    s1 = Settings(nats_url=nats_url, mode="core", gateway_id="gw-a", queue="qa")
    s2 = Settings(nats_url=nats_url, mode="core", gateway_id="gw-b", queue="qb")
    # Two queue groups: every intent is decided by both replicas (two replies are not
    # possible, so the test asks each keeper's current set through the outputs).
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    async with (
        open_keeper(s1, source) as k1,
        open_keeper(s2, source) as k2,
        Gateway(s1, k1.current, signer) as g1,
        Gateway(s2, k2.current, signer) as g2,
        k1.running(g1.swap_policies),
        k2.running(g2.swap_policies),
    ):
        await wait_for(lambda: k1.stale and k2.stale, timeout_s=10, what="both stale")
        record = await _search(nc)
        assert record["reason"] == "policy_stale" and str(record["policy_version"]).endswith(
            ";rev=1"
        )
        await _statuses_until(nats_url, lambda s: len(s) == 2 and all(x["stale"] for x in s))
        bump_version(directory, "1.5.0")
        await push()
        await wait_for(
            lambda: k1.statistics().revision == 2 and k2.statistics().revision == 2,
            timeout_s=10,
            what="both on revision 2",
        )
        assert not k1.stale and not k2.stale
        record = await _search(nc)
        assert record["effect"] == "allow"
        assert str(record["policy_version"]).endswith("tools@1.5.0;rev=2")
        assert k1.active.policies.digest == k2.active.policies.digest
        statuses = await _statuses_until(
            nats_url, lambda s: all(x["revision"] == 2 and not x["stale"] for x in s)
        )
        assert {s["gateway"] for s in statuses} == {"gw-a", "gw-b"}
        assert {s["digest"] for s in statuses} == {k1.active.policies.digest}
    await nc.drain()


async def _status(nats_url: str) -> list[dict[str, object]]:
    out = io.StringIO()
    args = parser().parse_args(["policy", "status", "--nats", nats_url, "--json"])
    assert await cmd_status(args, out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def _statuses_until(
    nats_url: str, check: Callable[[list[dict[str, object]]], bool]
) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    statuses = await _status(nats_url)
    while not check(statuses):
        assert time.monotonic() < deadline, statuses
        await anyio.sleep(0.05)
        statuses = await _status(nats_url)
    return statuses
