"""Lineage: parents are decision ids looked up in the ledger; depth, root and inherited
labels are computed there, never taken from the agent; denied parents, unknown or held
ones (after the child waited for them) and chains deeper than the cap are
``lineage_violation``; ``bus-guard lineage`` prints trees. Which parent records count
(verified ones) and the waiting: tests/test_lineage_trust.py."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client

from bus_guard.cli._main import main
from bus_guard.cli._safe import safe
from bus_guard.intake._gateway import Gateway
from bus_guard.ledger._records import LedgerRecord, encode_record, intent_decision_id
from bus_guard.policy._load import PolicySet, load_policies
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key
from bus_guard.verify import Verifier, verify_message

from .conftest import POLICIES
from .helpers import HOSTILE, intent, make_signer, terminal_safe
from .streamkit import (
    drained,
    eventually,
    ledger_decisions,
    stored,
    stream_gateway,
    stream_settings,
)

BUNDLE = """
bundle: lineage-test
version: "1"
mode: enforce
rules:
  - id: read
    effect: allow
    actions: [tools.search, tools.http.get]
  - id: review
    effect: escalate
    actions: [tools.review]
  - id: pay-untainted
    effect: allow
    description: no payment that descends from a web fetch
    actions: [payments.transfer]
    when: {field: lineage.labels, not_in: [tools.http.get]}
  - id: depth-cap
    effect: deny
    actions: [">"]
    when: {field: lineage.depth, gt: 2}
"""


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key(tmp_path / "keys")


@pytest.fixture
def policies(tmp_path: Path) -> PolicySet:
    (tmp_path / "lineage.yaml").write_text(BUNDLE)
    return load_policies(tmp_path)


def did(principal: str, intent_id: str) -> str:
    return intent_decision_id("guard", principal, intent_id)


class Agents:
    """Publish intents one at a time, each decided before the next (a child needs its
    parent's record)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def send(
        self,
        principal: str,
        action: str,
        intent_id: str,
        parents: tuple[str, ...] = (),
        *,
        resource: str | None = None,
    ) -> LedgerRecord:
        resource = f"tool:{action}" if resource is None else resource
        await self.js.publish(
            f"guard.in.{principal}.{action}",
            intent(action, resource, {"amount": 1}, id=intent_id, parents=list(parents)),
        )
        await eventually(lambda: drained(self.js), what="intake drained")
        ledger = {r.decision_id: r for r in await ledger_decisions(self.nc)}
        return ledger[did(principal, intent_id)]


async def test_depth_root_and_labels_come_from_the_ledger(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        root = await agents.send("agent-1", "tools.search", "root")
        child = await agents.send("agent-7", "payments.transfer", "child", (root.decision_id,))
        grandchild = await agents.send(
            "agent-9", "tools.search", "grandchild", (child.decision_id,)
        )
        too_deep = await agents.send(
            "agent-9", "tools.search", "too-deep", (grandchild.decision_id,)
        )
    assert [r.effect for r in (root, child, grandchild)] == ["allow"] * 3
    assert [r.lineage_depth for r in (root, child, grandchild)] == [0, 1, 2]
    assert {r.lineage_root for r in (root, child, grandchild)} == {"agent-1"}
    assert grandchild.labels == ("payments.transfer", "tools.search")
    # The bundle caps depth with a rule on lineage.depth.
    assert too_deep.effect == "deny" and too_deep.rules == ("depth-cap",)
    # The artifact carries the lineage the ledger computed.
    [msg] = [
        m
        for m in await stored(nc, "GUARD_EXEC")
        if m.headers["Guard-Decision"] == child.decision_id
    ]
    claims = verify_message(
        Verifier(keys[1]), subject=msg.subject, headers=msg.headers, payload=msg.data
    )
    assert (claims.lineage_depth, claims.lineage_root, claims.parents) == (
        1,
        "agent-1",
        (root.decision_id,),
    )
    await nc.close()


async def test_labels_are_inherited_taint(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        fetch = await agents.send("agent-3", "tools.http.get", "fetch")
        search = await agents.send("agent-1", "tools.search", "search", (fetch.decision_id,))
        pay = await agents.send("agent-7", "payments.transfer", "pay", (search.decision_id,))
        clean = await agents.send("agent-1", "tools.search", "clean")
        ok = await agents.send("agent-7", "payments.transfer", "ok", (clean.decision_id,))
    assert pay.effect == "deny" and pay.reason == "no_matching_rule"  # two generations down
    assert "tools.http.get" in pay.labels
    assert ok.effect == "allow" and ok.rules == ("pay-untainted",)
    await nc.close()


@pytest.mark.parametrize(
    ("parent", "expect"),
    [
        ("denied", "was denied (no_matching_rule)"),
        ("held", "is still held after 1 s"),
        ("unknown", "is still unknown after 1 s"),
    ],
)
async def test_a_child_of_a_denied_held_or_unknown_parent_is_a_lineage_violation(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, parent: str, expect: str
) -> None:
    """A denied parent is final at once; a held or unknown one after the child waited
    (``lineage_wait_s``, here 1 s: tests/test_lineage_trust.py has the waiting itself)."""
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    settings = stream_settings(nats_url, lineage_wait_s=1.0, lineage_nak_delay_s=0.2)
    async with stream_gateway(settings, policies, keys[0]):
        if parent == "denied":
            first = await agents.send("agent-1", "tools.shell", "p")  # no rule: denied
            assert first.effect == "deny"
            parent_id = first.decision_id
        elif parent == "held":
            first = await agents.send("agent-1", "tools.review", "p")
            assert first.effect == "hold"
            parent_id = first.decision_id
        else:
            parent_id = did("agent-1", "never-sent")
        child = await agents.send("agent-1", "tools.search", "child", (parent_id,))
    assert child.effect == "deny" and child.reason == "lineage_violation"
    assert expect in child.message and parent_id in child.message
    assert [m.headers["Guard-Decision"] for m in await stored(nc, "GUARD_EXEC")] == []
    await nc.close()


async def test_the_gateway_caps_depth_whatever_the_bundle_says(
    nats_url: str, keys: tuple[Path, Path]
) -> None:
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    settings = stream_settings(nats_url, max_lineage_depth=1)
    async with stream_gateway(settings, load_policies(POLICIES), keys[0]):
        a = await agents.send("agent-1", "tools.search", "a")
        b = await agents.send("agent-1", "tools.search", "b", (a.decision_id,))
        c = await agents.send("agent-1", "tools.search", "c", (b.decision_id,))
    assert (a.effect, b.effect, c.effect) == ("allow", "allow", "deny")
    assert c.reason == "lineage_violation" and "exceeds the limit 1" in c.message
    await nc.close()


async def test_bus_guard_lineage_prints_ancestors_and_descendants(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        a = await agents.send("agent-1", "tools.search", "a")
        b = await agents.send("agent-1", "tools.search", "b", (a.decision_id,))
        c1 = await agents.send("agent-7", "payments.transfer", "c1", (b.decision_id,))
        c2 = await agents.send("agent-1", "tools.shell", "c2", (b.decision_id,))
    await nc.close()
    out = io.StringIO()
    code = await asyncio.to_thread(main, ["lineage", b.decision_id, "--nats", nats_url], out=out)
    text = out.getvalue()
    assert code == 0, text
    ancestors, descendants = text.split("descendants (caused):")
    assert a.decision_id in ancestors and c1.decision_id not in ancestors
    assert c1.decision_id in descendants and c2.decision_id in descendants
    assert a.decision_id not in descendants
    assert "└── " in descendants and "deny" in descendants and "no_matching_rule" in descendants
    out = io.StringIO()
    assert await asyncio.to_thread(main, ["lineage", "NOPE", "--nats", nats_url], out=out) == 1


async def test_bus_guard_lineage_escapes_what_the_ledger_holds(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """The gateway refuses resources that are not printable ASCII, but a ledger can hold
    records written by others (an older gateway, an admin): the tree printer escapes."""
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        a = await agents.send("agent-1", "tools.search", "a")
    child = msgspec.structs.replace(
        a, decision_id="B" * 26, resource=HOSTILE, parents=(a.decision_id,), seq=a.seq + 100
    )
    await nc.jetstream().publish(
        f"guard.ledger.gw-other.d.{child.decision_id}", encode_record(child)
    )
    await nc.close()
    out = io.StringIO()
    code = await asyncio.to_thread(main, ["lineage", a.decision_id, "--nats", nats_url], out=out)
    lines = terminal_safe(out.getvalue(), 5)
    assert code == 0
    assert lines[1].startswith(f"  {a.decision_id}  allow")
    assert lines[4].startswith(f"  └── {child.decision_id}  allow") and safe(HOSTILE) in lines[4]


async def test_core_mode_cannot_check_parents_so_it_denies_them(
    nats_url: str, keys: tuple[Path, Path]
) -> None:
    from .helpers import Collector

    nc = await nats.connect(nats_url)
    denies = await Collector.on(nc, "guard.deny.>")
    signer = make_signer(keys[0], issuer="gw")
    async with Gateway(Settings(nats_url=nats_url, mode="core"), load_policies(POLICIES), signer):
        await nc.publish(
            "guard.in.agent-1.tools.search",
            intent("tools.search", "tool:search", {}, parents=["0" * 26]),
        )
        await denies.wait_for(1)
    [record] = denies.records()
    assert record["reason"] == "lineage_violation" and "core mode" in record["message"]
    await nc.close()
