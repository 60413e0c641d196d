"""``bus-guard maturity`` on a known mix: observe mode, then enforce, on a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import nats

from bus_guard.intake._gateway import Gateway
from bus_guard.ledger._maturity import assess
from bus_guard.ledger._records import LedgerRecord
from bus_guard.policy._load import load_policies

from .conftest import POLICIES
from .helpers import intent
from .streamkit import eventually, stream_gateway, stream_settings

_Intent = tuple[str, str, str, dict[str, object]]
_SHELL: _Intent = ("guard.in.agent-1.tools.shell", "tools.shell", "tool:shell", {"cmd": "id"})
_SEARCH: _Intent = ("guard.in.agent-1.tools.search", "tools.search", "tool:search", {"q": "fx"})
_UNKNOWN: _Intent = ("guard.in.agent-5.unknown.thing", "unknown.thing", "r", {})
_HOLD: _Intent = (
    "guard.in.agent-9.payments.transfer",
    "payments.transfer",
    "account:acct-1",
    {"amount": 5000, "currency": "USD"},
)


def _observing(tmp_path: Path) -> Path:
    """The shipped policies in observe mode."""
    copy = tmp_path / "observe"
    shutil.copytree(POLICIES, copy)
    for bundle in ("payments.yaml", "tools.yaml"):
        path = copy / bundle
        path.write_text(path.read_text().replace("mode: enforce", "mode: observe", 1))
    return copy


async def _decide(gateway: Gateway, intents: list[_Intent]) -> None:
    nc = await nats.connect(gateway.settings.nats_url)
    before = sum(n for _, _, n in gateway.decisions().by_reason)
    for subject, action, resource, params in intents:
        await nc.publish(subject, intent(action, resource, params))

    async def decided() -> bool:
        return sum(n for _, _, n in gateway.decisions().by_reason) == before + len(intents)

    await eventually(decided, what="the mix decided")
    await nc.drain()


async def _run_mix(nats_url: str, key: Path, tmp_path: Path) -> None:
    observe = load_policies(_observing(tmp_path))
    assert observe.mode == "observe"
    async with stream_gateway(stream_settings(nats_url), observe, key) as gateway:
        await _decide(gateway, [_SEARCH, _SEARCH, _SHELL, _SHELL, _UNKNOWN])
        gateway.swap_policies(load_policies(POLICIES))  # now enforce
        await _decide(gateway, [_SHELL, _HOLD, _UNKNOWN])


def test_maturity_on_a_known_mix(nats_url: str, keys: tuple[Path, Path], tmp_path: Path) -> None:
    key, jwks = keys
    anyio.run(_run_mix, nats_url, key, tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "bus_guard", "maturity", "--nats", nats_url, "--since", "1h",
         "--jwks", str(jwks), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert (got["decisions"], got["observe"], got["enforce"]) == (8, 5, 3)
    assert got["would_deny"] == {"tools.shell": 2, "unknown.thing": 1}
    assert got["observed_only"] == ["tools.search"]
    assert got["uncovered"] == {"unknown.thing": 2}
    assert (got["holds"], got["holds_resolved"], got["holds_open"]) == (1, 0, 1)
    assert got["artifacts"] == {"per-message": 5}  # the observe-mode allows, would-deny too
    assert got["ledger"] == "verified"
    assert got["stage"] == "partly enforced"
    steps = "\n".join(got["next_steps"])
    assert "only observed; 0 would-deny in 1h: enforce them (tools.search)" in steps
    assert "no rule names (unknown.thing)" in steps
    assert "tools.shell (2)" in steps and "1 hold(s) wait" in steps
    text = subprocess.run(
        [sys.executable, "-m", "bus_guard", "maturity", "--nats", nats_url, "--since", "1h"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert text.returncode == 0
    assert "maturity over the last 1h: partly enforced" in text.stdout
    assert "ledger           not checked" in text.stdout


def test_an_all_enforced_verified_ledger_says_so() -> None:
    records = [
        LedgerRecord(
            kind="decision",
            gateway="g",
            seq=i,
            prev="",
            ts=float(i),
            decision_id=f"D{i}",
            effect="allow",
            reason="allowed_by_rule",
            mode="enforce",
            action="tools.search",
            artifact="eyJ.x.y",
        )
        for i in range(3)
    ]
    a = assess(records, window_s=86400, ledger="verified")
    assert (a.stage, a.enforce, a.observe, a.artifacts) == (
        "enforce, proven",
        3,
        0,
        {"per-message": 3},
    )
    assert a.next_steps[0].startswith("enforced everywhere")
    assert assess([], window_s=60).stage == "none"
