"""SCENARIOS S15: in stream mode the gateway refuses to start, saying why, on streams or a
consumer that would lose intents, decide them twice, or let the ledger be edited."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, StreamConfig

from bus_guard.errors import ConfigError
from bus_guard.intake._preflight import check_consumer, check_stream, wanted_stream
from bus_guard.policy._load import load_policies
from bus_guard.signing._keys import generate_key
from bus_guard.subjects import ROLES, Role

from .conftest import POLICIES
from .crashkit import run_argv
from .streamkit import stream_gateway, stream_settings

SETTINGS = stream_settings("nats://unused", retry_horizon_s=120, duplicate_window_s=600)


@pytest.mark.parametrize("role", ROLES)
def test_what_bus_guard_creates_passes_its_own_preflight(role: Role) -> None:
    assert check_stream(role, wanted_stream(role, SETTINGS), SETTINGS) == []


@pytest.mark.parametrize(
    ("role", "change", "expect"),
    [
        ("intake", {"discard": DiscardPolicy.OLD}, "discard=old"),
        ("intake", {"max_age": 3600.0}, "max_age"),
        ("intake", {"allow_rollup_hdrs": True}, "allow_rollup_hdrs"),
        ("intake", {"allow_msg_ttl": True}, "allow_msg_ttl"),
        ("intake", {"subjects": ["guard.in.agent-1.>"]}, "do not include"),
        ("exec", {"duplicate_window": 30.0}, "shorter than the retry horizon"),
        ("deny", {"duplicate_window": 30.0}, "shorter than the retry horizon"),
        ("ledger", {"duplicate_window": 30.0}, "shorter than the retry horizon"),
        ("ledger", {"deny_delete": False}, "deny_delete=false"),
        ("ledger", {"deny_purge": False}, "deny_purge=false"),
        ("ledger", {"max_age": 86400.0}, "could vanish"),
        ("ledger", {"discard": DiscardPolicy.OLD, "max_msgs": 1000}, "discard=old with limits"),
        ("ledger", {"allow_atomic": False}, "allow_atomic=false"),
        ("hold", {"num_replicas": 1}, None),  # fine: the minimum is 1 here
    ],
)
def test_each_unsafe_setting_is_refused(
    role: Role, change: dict[str, Any], expect: str | None
) -> None:
    problems = check_stream(role, replace(wanted_stream(role, SETTINGS), **change), SETTINGS)
    if expect is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expect in problems[0], problems


def test_replicas_below_the_minimum_are_refused_on_every_stream() -> None:
    strict = stream_settings("nats://unused", min_replicas=3, replicas=3)
    for role in ("intake", "exec", "deny", "hold", "ledger"):
        r1 = replace(wanted_stream(role, strict), num_replicas=1)
        assert check_stream(role, r1, strict) == ["1 replica(s), fewer than the required 3"]


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        (ConsumerConfig(ack_policy=AckPolicy.NONE), "ack_policy"),
        (ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=5), "max_deliver=5"),
        (ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_subject="x"), "push consumer"),
        (ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, filter_subject="guard.in.a.>"), "filter"),
    ],
)
def test_unsafe_consumers_are_refused(config: ConsumerConfig, expect: str) -> None:
    [problem] = check_consumer(config, SETTINGS)
    assert expect in problem


async def test_the_gateway_refuses_existing_unsafe_streams_and_names_them(
    nats_url: str, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url)
    await js.add_stream(replace(wanted_stream("intake", settings), discard=DiscardPolicy.OLD))
    await js.add_stream(replace(wanted_stream("exec", settings), duplicate_window=10.0))
    await js.add_stream(
        StreamConfig(name="GUARD_LEDGER", subjects=["guard.ledger.>"], duplicate_window=600)
    )
    key, _ = generate_key(tmp_path)
    with pytest.raises(ConfigError) as refused:
        async with stream_gateway(settings, load_policies(POLICIES), key):
            pytest.fail("started on unsafe streams")
    text = str(refused.value)
    assert "refused to start (preflight)" in text
    for expected in (
        "stream GUARD_IN: discard=old",
        "stream GUARD_EXEC: de-dup window 10s",
        "stream GUARD_LEDGER: deny_delete=false",
        "stream GUARD_LEDGER: deny_purge=false",
        "stream GUARD_LEDGER: allow_atomic=false",
    ):
        assert expected in text
    # Nothing was decided: no consumer was created, the intake is untouched.
    assert await js.consumers_info("GUARD_IN") == []
    await nc.close()


async def test_bus_guard_run_exits_2_with_the_reason(nats_url: str, tmp_path: Path) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        replace(wanted_stream("intake", stream_settings(nats_url)), allow_rollup_hdrs=True)
    )
    await nc.close()
    key, _ = generate_key(tmp_path)
    proc = await asyncio.to_thread(
        subprocess.run,
        run_argv(nats_url, key, "gw-pre"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "stream GUARD_IN: allow_rollup_hdrs" in proc.stderr


def test_settings_refuse_a_dedup_window_shorter_than_the_retry_horizon() -> None:
    with pytest.raises(ConfigError, match="duplicate_window_s must cover retry_horizon_s"):
        stream_settings("nats://unused", retry_horizon_s=300, duplicate_window_s=60)


@pytest.mark.parametrize(
    ("version", "ok"),
    [("2.15.1", True), ("v2.12.0", True), ("3.0.0", True), ("2.11.11", False), ("2.10.26", False)],
)
def test_stream_mode_names_the_nats_server_version_it_needs(version: str, ok: bool) -> None:
    from bus_guard.server import MIN_SERVER_VERSION, server_version_problem

    problem = server_version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert problem is not None and MIN_SERVER_VERSION in problem and version in problem


def test_the_packaged_nats_server_meets_the_floor() -> None:
    import subprocess

    from bus_guard.server import find_nats_server, server_version_problem

    out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True)
    assert server_version_problem(out.stdout.split()[-1]) is None, out.stdout
