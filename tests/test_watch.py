"""``bus-guard watch`` on a real server: what operators see, and what filters hide."""

from __future__ import annotations

import io
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client
from rich.console import Console

from bus_guard.cli._watch import WatchFilter, watch
from bus_guard.intake._gateway import Gateway
from bus_guard.policy._load import load_policies
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key
from bus_guard.signing._signer import Signer

from .conftest import POLICIES
from .helpers import intent, make_signer


async def _watched(nats_url: str, tmp_path: Path, filters: WatchFilter, count: int) -> str:
    key, _ = generate_key(tmp_path)
    signer = make_signer(key, issuer="gw")
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    ready = anyio.Event()
    nc = await nats.connect(nats_url)
    with anyio.fail_after(10):  # watch returns after `count` records
        await _drive(nats_url, nc, signer, filters, count, console, ready)
    await nc.drain()
    return buf.getvalue()


async def _drive(
    nats_url: str,
    nc: Client,
    signer: Signer,
    filters: WatchFilter,
    count: int,
    console: Console,
    ready: anyio.Event,
) -> None:
    async with (
        Gateway(Settings(nats_url=nats_url, mode="core"), load_policies(POLICIES), signer),
        anyio.create_task_group() as tg,
    ):

        async def run_watch() -> None:
            await watch(nats_url, filters=filters, count=count, console=console, ready=ready)

        tg.start_soon(run_watch)
        await ready.wait()
        await nc.publish("guard.in.agent-1.tools.shell", intent("tools.shell", "tool:sh", {}))
        await nc.publish("guard.in.agent-1.tools.search", intent("tools.search", "t", {}))
        await nc.publish(
            "guard.in.agent-9.payments.transfer",
            intent("payments.transfer", "account:acct-1", {"amount": 5000, "currency": "USD"}),
        )
        await nc.publish("guard.in.agent-2.tools.shell", intent("tools.shell", "tool:sh", {}))


async def test_watch_shows_who_what_why_and_which_rule(nats_url: str, tmp_path: Path) -> None:
    text = await _watched(nats_url, tmp_path, WatchFilter(), count=3)
    # deny and hold are separate subscriptions: their relative order is not guaranteed
    lines = sorted(text.strip().splitlines())
    assert len(lines) == 3
    assert "DENY" in lines[0] and "agent-1" in lines[0] and "tools.shell" in lines[0]
    assert "denied_by_rule" in lines[0] and "no-shell" in lines[0]
    assert "DENY" in lines[1] and "agent-2" in lines[1]
    assert "HOLD" in lines[2] and "agent-9" in lines[2] and "transfer-large" in lines[2]
    assert "tools.search" not in text  # allowed intents are not on the deny/hold streams


async def test_watch_filters_by_principal_and_reason(nats_url: str, tmp_path: Path) -> None:
    text = await _watched(nats_url, tmp_path, WatchFilter(principal="agent-2"), count=1)
    assert "agent-2" in text and "agent-1" not in text and "agent-9" not in text
    text = await _watched(
        nats_url, tmp_path / "b", WatchFilter(reason="escalated_by_rule"), count=1
    )
    assert "HOLD" in text and "agent-9" in text and "DENY" not in text


def test_watch_filters_narrow_on_the_server_through_the_subjects() -> None:
    assert WatchFilter().subjects("guard") == ["guard.deny.*.>", "guard.hold.*.>"]
    assert WatchFilter("agent-2", "payments.*").subjects("a.b") == [
        "a.b.deny.agent-2.payments.*",
        "a.b.hold.agent-2.payments.*",
    ]
