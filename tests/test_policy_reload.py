"""Hot reload from a directory (SCENARIOS S11): on a file change and on SIGHUP, compiled and
tested off the hot path, swapped in one step; a set that does not compile or fails its
test cases never becomes active; the running set stays, the refusal is counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import nats
import pytest

from bus_guard.errors import PolicyError
from bus_guard.intake._gateway import Gateway
from bus_guard.intake._policy_source import DirectorySource, PolicyKeeper
from bus_guard.policy._load import load_policies
from bus_guard.settings import PolicySourceSettings, Settings
from bus_guard.signing._signer import Signer
from bus_guard.verify import Verifier

from .helpers import intent
from .policykit import (
    SEARCH,
    SHELL,
    Decisions,
    Load,
    Seen,
    break_search,
    bump_version,
    policy_dir,
    wait_for,
)

SWITCH_BOUND_S = 5.0  # a change on disk is deciding within this, under load


def _digests(seen: list[Seen]) -> list[str]:
    """The digests in decision order, each run of equal ones once."""
    runs: list[str] = []
    for s in seen:
        if not runs or runs[-1] != s.digest:
            runs.append(s.digest)
    return runs


async def test_a_changed_directory_is_active_within_a_bound_under_load_and_bad_sets_never_are(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path], signer: Signer
) -> None:
    directory = policy_dir(tmp_path)
    keeper = PolicyKeeper(DirectorySource(directory), poll_s=0.1)
    await keeper.load()
    first = keeper.active.policies
    nc = await nats.connect(nats_url)
    decisions = await Decisions.on(nc, Verifier(keys[1]))
    load = Load(nc)
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    async with (
        Gateway(settings, keeper.current, signer) as gateway,
        keeper.running(gateway.swap_policies),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(load.run)
        await decisions.wait_until(lambda seen: len(seen) >= 50, what="decisions under A")

        bump_version(directory, "1.3.0")
        changed_at = time.monotonic()
        second = load_policies(directory)
        await decisions.wait_until(
            lambda seen: any(s.digest == second.digest for s in seen), what="the new set"
        )
        switched = next(s.at for s in decisions.seen if s.digest == second.digest)
        assert switched - changed_at < SWITCH_BOUND_S

        # A set that fails its own test cases (search denied): refused, never active.
        break_search(directory)
        await wait_for(lambda: keeper.statistics().refused.get("tests_failed") == 1)
        # A file that does not parse: refused, never active.
        (directory / "zz-broken.yaml").write_text("bundle: [unclosed\n")
        await wait_for(lambda: keeper.statistics().refused.get("broken") == 1)
        count = len(decisions.seen)
        await decisions.wait_until(lambda seen: len(seen) >= count + 100, what="more decisions")
        load.stop()
    sent = load.sent
    await decisions.wait_until(lambda seen: len(seen) == sent, what="every decision")
    await nc.drain()

    stats = keeper.statistics()
    assert stats.digest == second.digest and stats.activations == 1
    assert stats.refusals == 2 and stats.refused == {"tests_failed": 1, "broken": 1}
    assert "search-for-all" in stats.last_refusal or "zz-broken.yaml" in stats.last_refusal
    seen = decisions.seen
    assert len(seen) == sent  # none lost, none twice
    # Every decision names a set that was active: the first, then (from one decision on)
    # the second; never the refused ones (search denied would be a denied_by_rule search).
    assert _digests(seen) == [first.digest, second.digest]
    assert {s.version for s in seen} == {first.version, second.version}
    searches = [s for s in seen if s.subject.startswith("guard.exec.")]
    shells = [s for s in seen if s.subject.startswith("guard.deny.")]
    assert len(searches) == (sent + 1) // 2 and len(shells) == sent // 2
    assert all(s.reason == "denied_by_rule" for s in shells)


async def test_a_set_whose_test_case_fails_refuses_to_start(tmp_path: Path) -> None:
    directory = policy_dir(tmp_path)
    break_search(directory)
    keeper = PolicyKeeper(DirectorySource(directory))
    with pytest.raises(PolicyError) as caught:
        await keeper.load()
    text = str(caught.value)
    assert "tests_failed" in text and "anyone may search, without limits" in text
    assert str(directory) in text


async def test_reload_keeps_the_running_set_when_the_directory_disappears(
    tmp_path: Path,
) -> None:
    directory = policy_dir(tmp_path)
    keeper = PolicyKeeper(DirectorySource(directory))
    await keeper.load()
    before = keeper.current
    for f in directory.glob("*.yaml"):
        f.unlink()
    assert await keeper.reload() is False
    assert keeper.current is before
    assert keeper.statistics().refused == {"broken": 1}
    assert "no policy files" in keeper.statistics().last_refusal


def test_the_source_options_default_to_the_settings() -> None:
    from bus_guard.cli._arguments import parser
    from bus_guard.cli._push import policy_source_settings

    args = parser().parse_args(["run", "--nats", "n", "--policies", "p", "--key", "k"])
    assert policy_source_settings(args) == PolicySourceSettings(directory=Path("p"))
    args = parser().parse_args(
        ["run", "--nats", "n", "--policies", "nats://", "--policy-keys", "j.json", "--key", "k"]
    )
    assert policy_source_settings(args) == PolicySourceSettings(publishers_file=Path("j.json"))


# -- SIGHUP, on the real process ---------------------------------------------------------


def _run(nats_url: str, key: Path, directory: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bus_guard",
            "run",
            "--nats",
            nats_url,
            "--mode",
            "core",
            "--policies",
            str(directory),
            "--key",
            str(key),
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "ready on" in line:
            return proc
    raise AssertionError(f"gateway exited before ready: {proc.wait()}")


async def test_sighup_reloads_the_directory_of_a_running_gateway(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    directory = policy_dir(tmp_path)
    first = load_policies(directory)
    # Polling once an hour: only the signal can make the change active within the test.
    proc = _run(nats_url, keys[0], directory, "--policy-poll", "3600")
    try:
        nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")

        async def digest() -> str:
            reply = await nc.request(SHELL, intent("tools.shell", "h", {}), timeout=10)
            return str(json.loads(reply.data)["policy_digest"])

        assert await digest() == first.digest
        bump_version(directory, "1.4.0")
        second = load_policies(directory)
        assert await digest() == first.digest  # changed on disk, not reloaded yet
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + SWITCH_BOUND_S
        while (now := await digest()) != second.digest:
            assert now == first.digest
            assert time.monotonic() < deadline, "SIGHUP did not reload in time"
            await anyio.sleep(0.05)
        reply = await nc.request(SEARCH, intent("tools.search", "t", {}), timeout=10)
        assert json.loads(reply.data)["effect"] == "allow"
        await nc.drain()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
