"""Re-evaluation (README, "Replay" and "Impact analysis"): every decision's intent bytes are
retained and every activated policy set archived by digest, so ``bus-guard replay`` decides
a recorded decision again under the set that made it (lineage, limits and holds included)
and ``bus-guard policy impact`` says what a candidate set would change, exactly."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from bus_guard.cli._main import main
from bus_guard.decision import approval_decision_id, resolution_decision_id
from bus_guard.intake._archive import archive_name, archiving
from bus_guard.intake._gateway import Gateway
from bus_guard.intake._policy_bus import read_statuses
from bus_guard.intake._policy_source import DirectorySource, Layers, PolicyKeeper, open_policies
from bus_guard.intake._retain import IntentRetainer
from bus_guard.ledger._intents import intents_bucket, read_retained
from bus_guard.ledger._records import LedgerRecord, intent_decision_id
from bus_guard.policy._evaluator import PolicySet
from bus_guard.settings import PolicySourceSettings, Settings
from bus_guard.signing._keys import generate_key
from bus_guard.signing._signer import Signer
from bus_guard.verify import payload_digest

from .helpers import intent, make_signer
from .policykit import wait_for
from .streamkit import count, drained, eventually, ledger_decisions, stream_gateway, stream_settings
from .test_approvals import _Approving as Approving
from .test_approvals import _hold as held
from .test_approvals import _people as people
from .test_approvals import _settled as settled
from .test_constitution import _ask as ask
from .test_constitution import _constitution_dir as constitution_dir
from .test_constitution import _keys as constitution_keys_of
from .test_constitution import _ordinary_dir as ordinary_dir
from .test_constitution import _push as push

BUNDLE = """
bundle: replay-test
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
  - id: lookups
    effect: allow
    actions: [tools.lookup]
    limits:
      - {name: lookup-rate, count: 2, window: 1h}
"""
INTENTS = f"KV_{intents_bucket('guard')}"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key(tmp_path / "keys")


def policy_dir(tmp_path: Path, text: str = BUNDLE, name: str = "policies") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "replay.yaml").write_text(text)
    return directory


def did(principal: str, intent_id: str) -> str:
    return intent_decision_id("guard", principal, intent_id)


@asynccontextmanager
async def gateway_on(
    nc: Client, settings: Settings, directory: Path, key: Path
) -> AsyncIterator[PolicyKeeper]:
    """A gateway deciding with the directory's set (reloaded on demand), archiving every
    set it activates; leaving it, everything queued for the archive is written."""
    keeper = PolicyKeeper(DirectorySource(directory), poll_s=3600)
    await keeper.load()
    gateway: Gateway
    if settings.mode == "stream":
        gateway = stream_gateway(settings, keeper.active.policies, key)
    else:
        gateway = Gateway(settings, keeper.current, make_signer(key, settings.gateway_id))
    async with (
        gateway,
        keeper.running(gateway.swap_policies),
        archiving(nc, settings, Layers(keeper, None)),
    ):
        yield keeper


class Agents:
    """Stream mode: publish intents one at a time, each decided before the next."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def send(
        self, principal: str, action: str, intent_id: str, parents: tuple[str, ...] = ()
    ) -> LedgerRecord:
        body = intent(action, f"tool:{action}", {"amount": 1}, id=intent_id, parents=list(parents))
        await self.js.publish(f"guard.in.{principal}.{action}", body)
        await eventually(lambda: drained(self.js), what="intake drained")
        ledger = {r.decision_id: r for r in await ledger_decisions(self.nc)}
        return ledger[did(principal, intent_id)]


async def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(main, list(argv), out=out)
    return code, out.getvalue()


async def replay(nats_url: str, decision_id: str) -> tuple[int, dict[str, Any]]:
    code, text = await run_cli("replay", decision_id, "--nats", nats_url, "--json")
    assert code in (0, 1), text
    doc: dict[str, Any] = json.loads(text)
    return code, doc


async def test_replay_reproduces_allow_deny_hold_limits_and_lineage(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    async with gateway_on(nc, stream_settings(nats_url), policy_dir(tmp_path), keys[0]):
        search = await agents.send("agent-1", "tools.search", "search")
        shell = await agents.send("agent-1", "tools.shell", "shell")  # no rule: denied
        review = await agents.send("agent-1", "tools.review", "review")
        fetch = await agents.send("agent-3", "tools.http.get", "fetch")
        # Lineage decides these two: a payment descending from a web fetch is not allowed
        # (a root payment would be), one descending from a search is.
        tainted = await agents.send("agent-7", "payments.transfer", "tainted", (fetch.decision_id,))
        clean = await agents.send("agent-7", "payments.transfer", "clean", (search.decision_id,))
        lookups = [await agents.send("agent-2", "tools.lookup", f"l{i}") for i in range(3)]
    decided = [search, shell, review, fetch, tainted, clean, *lookups]
    assert [r.effect for r in decided] == [
        "allow", "deny", "hold", "allow", "deny", "allow", "allow", "allow", "deny",
    ]  # fmt: skip
    assert tainted.reason == "no_matching_rule" and "tools.http.get" in tainted.labels
    assert clean.rules == ("pay-untainted",) and clean.lineage_depth == 1
    assert lookups[2].reason == "rate_limited"
    # Every decision's intent is retained, once.
    assert await count(nc.jetstream(), INTENTS) == len(decided)
    await nc.close()

    for record in decided:
        code, doc = await replay(nats_url, record.decision_id)
        assert code == 0 and doc["reproduces"] is True, doc
        assert doc["replayed"] == {
            "effect": record.effect,
            "reason": record.reason,
            "rules": list(record.rules),
            "layer": "policy",
        }
        assert doc["policy_digest"] == record.policy_digest
    # What makes these two what they are: the lineage, rebuilt from the parents' records
    # (without it the tainted payment is a root, allowed by pay-untainted).
    _, doc = await replay(nats_url, tainted.decision_id)
    assert doc["recorded"]["effect"] == "deny" and doc["replayed"]["effect"] == "deny"
    assert any("lineage rebuilt" in note for note in doc["notes"])
    # ... and the recorded use of the limit: 2 of 2 used before the third lookup.
    _, doc = await replay(nats_url, lookups[2].decision_id)
    assert any("lookup-rate 2+1 of 2" in note for note in doc["notes"]), doc
    code, text = await run_cli("replay", tainted.decision_id, "--nats", nats_url)
    assert code == 0 and "REPRODUCES" in text and "deny no_matching_rule" in text


async def test_replay_uses_the_set_that_decided_not_the_current_one(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    directory = policy_dir(tmp_path)
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    async with gateway_on(nc, stream_settings(nats_url), directory, keys[0]) as keeper:
        first_set = keeper.active.policies
        before = await agents.send("agent-1", "tools.search", "before")
        # The directory changes: searches are no longer allowed; reloaded (as on SIGHUP).
        (directory / "replay.yaml").write_text(
            BUNDLE.replace("[tools.search, tools.http.get]", "[tools.http.get]")
        )
        assert await keeper.reload()
        after = await agents.send("agent-1", "tools.search", "after")
    store = await nc.jetstream().object_store("guard-policy-sets")
    for digest in (first_set.digest, after.policy_digest):
        assert (await store.get_info(archive_name(digest))).name == archive_name(digest)
    await nc.close()
    assert (before.effect, after.effect) == ("allow", "deny")
    assert before.policy_digest == first_set.digest != after.policy_digest

    code, doc = await replay(nats_url, before.decision_id)
    assert code == 0 and doc["replayed"]["effect"] == "allow"
    assert doc["policy_digest"] == first_set.digest  # the old set, fetched by its digest
    code, doc = await replay(nats_url, after.decision_id)
    assert code == 0 and doc["replayed"]["reason"] == "no_matching_rule"


async def test_core_mode_retains_and_replays(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="core-gw")
    async with gateway_on(nc, settings, policy_dir(tmp_path), keys[0]):
        replies = [
            json.loads((await nc.request(f"guard.in.agent-1.{a}", intent(a, "r"), timeout=10)).data)
            for a in ("tools.search", "tools.shell", "tools.review")
        ]
        # A core-mode gateway keeps no ledger: a child is denied whatever its parent.
        child = intent("tools.search", "r", parents=[replies[0]["decision_id"]])
        replies.append(
            json.loads((await nc.request("guard.in.agent-1.tools.search", child, timeout=10)).data)
        )
        js = nc.jetstream()
        await eventually(lambda: _has(js, INTENTS, len(replies)), what="intents retained")
    await nc.close()
    assert [r["effect"] for r in replies] == ["allow", "deny", "hold", "deny"]
    assert replies[3]["reason"] == "lineage_violation"
    for reply in replies:
        code, doc = await replay(nats_url, reply["decision_id"])
        assert code == 0 and doc["reproduces"] is True, doc
        assert (doc["replayed"]["effect"], doc["replayed"]["reason"]) == (
            reply["effect"],
            reply["reason"],
        )


async def _has(js: Any, stream: str, n: int) -> bool:
    try:
        return bool(await count(js, stream) >= n)
    except nats.js.errors.NotFoundError:
        return False


async def test_policy_impact_counts_exactly_what_a_candidate_changes(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    directory = policy_dir(tmp_path)
    async with gateway_on(nc, stream_settings(nats_url), directory, keys[0]):
        for i in range(4):
            await agents.send("agent-9", "tools.search", f"nine-{i}")
        for i in range(6):
            await agents.send("agent-1", "tools.search", f"one-{i}")
        await agents.send("agent-1", "tools.shell", "shell")
        await agents.send("agent-1", "tools.review", "review")
    await nc.close()

    # A candidate that denies agent-9's searches: 4 of the 12 recorded decisions change.
    candidate = policy_dir(
        tmp_path,
        BUNDLE
        + "  - {id: no-nine, effect: deny, principals: [agent-9], actions: [tools.search]}\n",
        name="candidate",
    )
    code, text = await run_cli(
        "policy", "impact", str(candidate), "--nats", nats_url, "--since", "1h", "--json",
        "--limit-examples", "2",
    )  # fmt: skip
    assert code == 0, text
    doc = json.loads(text)
    assert (doc["decisions"], doc["changed"], doc["unchanged"]) == (12, 4, 8)
    [change] = doc["changes"]
    assert change["old"] == {"effect": "allow", "reason": "allowed_by_rule"}
    assert change["new"] == {"effect": "deny", "reason": "denied_by_rule"}
    assert change["count"] == 4 and len(change["examples"]) == 2
    assert {e["decision_id"] for e in change["examples"]} <= {
        did("agent-9", f"nine-{i}") for i in range(4)
    }
    assert {e["principal"] for e in change["examples"]} == {"agent-9"}
    unchanged = {(u["effect"], u["reason"]): u["count"] for u in doc["unchanged_by_outcome"]}
    assert unchanged == {
        ("allow", "allowed_by_rule"): 6,
        ("deny", "no_matching_rule"): 1,
        ("hold", "escalated_by_rule"): 1,
    }
    # The identical set changes nothing.
    code, text = await run_cli("policy", "impact", str(directory), "--nats", nats_url, "--json")
    doc = json.loads(text)
    assert code == 0 and (doc["decisions"], doc["changed"], doc["changes"]) == (12, 0, [])
    code, text = await run_cli("policy", "impact", str(candidate), "--nats", nats_url)
    assert code == 0 and "allow/allowed_by_rule -> deny/denied_by_rule: 4" in text
    # A candidate whose own test cases fail is analysed all the same, and says so.
    (candidate / "tests").mkdir()
    (candidate / "tests" / "nine.yaml").write_text(
        "cases:\n  - name: nine searches\n    subject: guard.in.agent-9.tools.search\n"
        "    intent: {id: t1, action: tools.search, resource: r}\n"
        "    expect: {effect: allow}\n"
    )
    code, text = await run_cli("policy", "impact", str(candidate), "--nats", nats_url, "--json")
    doc = json.loads(text)
    assert code == 0 and doc["changed"] == 4 and "nine searches" in doc["candidate"]["tests_failed"]


async def test_unknown_decisions_and_retention_off_are_clear_errors(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    code, text = await run_cli("replay", "01JD2Q5X3M7N8P9R0S1T2V3W4X", "--nats", nats_url)
    assert code == 2 and "intent retention is off" in text
    code, text = await run_cli("policy", "impact", str(policy_dir(tmp_path)), "--nats", nats_url)
    assert code == 2 and "intent retention is off" in text

    nc = await nats.connect(nats_url)
    agents = Agents(nc)
    off = replace(stream_settings(nats_url), intent_retention_s=0)
    async with gateway_on(nc, off, policy_dir(tmp_path, name="p2"), keys[0]):
        kept_not = await agents.send("agent-1", "tools.search", "not-kept")
    js = nc.jetstream()
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info(INTENTS)
    code, text = await run_cli("replay", kept_not.decision_id, "--nats", nats_url)
    assert code == 2 and "intent retention is off" in text

    async with gateway_on(nc, stream_settings(nats_url), policy_dir(tmp_path, name="p3"), keys[0]):
        kept = await agents.send("agent-1", "tools.search", "kept")
    await nc.close()
    code, text = await run_cli("replay", "01JD2Q5X3M7N8P9R0S1T2V3W4X", "--nats", nats_url)
    assert code == 2 and "no such decision" in text
    for not_an_id in ("*", ">", "a.b", ""):  # never a subject wildcard
        code, text = await run_cli("replay", not_an_id, "--nats", nats_url)
        assert code == 2 and "is not a decision id" in text
    code, text = await run_cli("replay", kept_not.decision_id, "--nats", nats_url)
    assert code == 2 and "not retained" in text  # decided while retention was off
    code, text = await run_cli("replay", kept.decision_id, "--nats", nats_url)
    assert code == 0 and "REPRODUCES" in text


async def test_replay_and_impact_under_a_constitution_and_policy_status_shows_it(
    nats_url: str, tmp_path: Path, signer: Signer
) -> None:
    """Bundles from the bus under a constitution: each decision replays with the layers that
    were in force (the layer that decided included); a candidate cannot undo a constitution
    denial in the impact either; ``policy status`` shows both revisions."""
    publisher, publishers = generate_key(tmp_path / "publisher")
    signers, constitution_keys = constitution_keys_of(tmp_path, 2)
    await push(nats_url, ordinary_dir(tmp_path, "9"), publisher)
    await push(nats_url, constitution_dir(tmp_path), signers[0], signers[1], kind="constitution")
    source = PolicySourceSettings(
        publishers_file=publishers,
        constitution_keys_file=constitution_keys,
        constitution_quorum=2,
        poll_s=0.1,
    )
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="layered-gw")
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    asked = []
    async with (
        open_policies(settings, source) as layers,
        Gateway(settings, layers.current, signer) as gateway,
        layers.running(gateway.swap_policies),
        archiving(nc, settings, layers),
    ):
        for subject, resource in (
            ("guard.in.agent-1.tools.shell", "host:x"),  # the constitution denies
            ("guard.in.agent-1.tools.search", "secret:payroll"),  # the constitution holds
            ("guard.in.agent-1.tools.search", "index:web"),  # the ordinary set allows
        ):
            asked.append(await ask(nc, subject, resource))
        js = nc.jetstream()
        await eventually(lambda: _has(js, INTENTS, 3), what="intents retained")
        kv = await js.key_value("guard-policy")
        await eventually(
            lambda: _statuses(kv, {"policy", "constitution"}), what="both statuses reported"
        )
    await nc.close()
    assert [(a["effect"], a["policy_version"][:13]) for a in asked] == [
        ("deny", "constitution/"),
        ("hold", "constitution/"),
        ("allow", "tools@9;rev=1"),
    ]
    for a in asked:
        code, doc = await replay(nats_url, a["decision_id"])
        assert code == 0 and doc["reproduces"] is True, doc
        assert doc["constitution"] != ""
        layer = "constitution" if a["policy_version"].startswith("constitution/") else "policy"
        assert doc["replayed"]["layer"] == layer
    code, text = await run_cli("policy", "status", "--nats", nats_url, "--json")
    [doc] = [json.loads(line) for line in text.splitlines()]
    assert code == 0 and doc["gateway"] == "layered-gw" and doc["revision"] == 1
    assert doc["constitution"]["revision"] == 1 and doc["constitution"]["kind"] == "constitution"
    assert doc["constitution"]["version"].startswith("constitution/")
    code, text = await run_cli("policy", "status", "--nats", nats_url)
    assert code == 0 and "constitution rev 1" in text and "rev 1" in text

    # A candidate that allows searches of secrets only (and still the shell): only the
    # ordinary search changes; the shell stays denied and the secret search held (the
    # constitution, put over the candidate as the gateway would).
    candidate = ordinary_dir(tmp_path, "10")
    text = (candidate / "tools.yaml").read_text()
    only_secrets = '    actions: [tools.search]\n    resources: ["secret:*"]\n'
    text = text.replace("    actions: [tools.search]\n", only_secrets)
    (candidate / "tools.yaml").write_text(text)
    code, text = await run_cli("policy", "impact", str(candidate), "--nats", nats_url, "--json")
    doc = json.loads(text)
    assert code == 0 and (doc["decisions"], doc["changed"]) == (3, 1), doc
    [change] = doc["changes"]
    assert change["old"] == {"effect": "allow", "reason": "allowed_by_rule"}
    assert change["new"] == {"effect": "deny", "reason": "no_matching_rule"}
    assert change["examples"][0]["decision_id"] == asked[2]["decision_id"]


async def _statuses(kv: Any, kinds: set[str]) -> bool:
    return {s.kind for s in await read_statuses(kv)} == kinds


def test_a_retained_intent_reads_back_exactly_and_never_holds_up_its_decision(
    policies: PolicySet,
) -> None:
    record = LedgerRecord(
        kind="decision",
        gateway="gw-1",
        seq=0,
        prev="",
        ts=1.0,
        decision_id="D1",
        effect="allow",
        reason="allowed_by_rule",
        rules=("read",),
        subject="guard.in.agent-1.tools.search",
        payload_sha256=payload_digest(b"\x81\xa2id\xa1x"),
        parents=("P1",),
    )
    retainer = IntentRetainer(Settings(), max_bytes=4096)
    headers = {"Content-Type": "application/msgpack"}
    out = retainer.retained(record, b"\x81\xa2id\xa1x", headers, policies)
    assert out is not None
    role, subject, data, fields = out
    assert (role, subject, data) == ("intent", "$KV.guard-intents.D1", b"\x81\xa2id\xa1x")
    back = read_retained(data, fields)
    assert back.content_type == "application/msgpack" and back.payload == data
    assert (back.decision.decision_id, back.decision.parents) == ("D1", ("P1",))
    assert back.decision.core is False and back.decision.constitution == ""
    with pytest.raises(ValueError, match="do not hash"):
        read_retained(b"other bytes", fields)
    with pytest.raises(ValueError, match="not a retained intent"):
        read_retained(data, {})
    # Too large to fit in a message with its record: not retained, counted; never raises.
    assert retainer.retained(record, b"x" * 5000, None, policies) is None
    assert retainer.failures == 1


async def test_replay_after_a_push_uses_the_revision_that_decided(
    nats_url: str, tmp_path: Path, signer: Signer
) -> None:
    """Bundles from the bus: revision 1 allows a shell, revision 2 does not; each decision
    replays under its own revision, fetched by digest, not the one active at replay."""
    publisher, publishers = generate_key(tmp_path / "publisher")
    await push(nats_url, ordinary_dir(tmp_path, "1"), publisher)
    source = PolicySourceSettings(publishers_file=publishers, poll_s=0.1)
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="bus-gw")
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    async with (
        open_policies(settings, source) as layers,
        Gateway(settings, layers.current, signer) as gateway,
        layers.running(gateway.swap_policies),
        archiving(nc, settings, layers),
    ):
        before = await ask(nc, "guard.in.agent-1.tools.shell", "host:x")
        second = ordinary_dir(tmp_path, "2")
        text = (second / "tools.yaml").read_text()
        (second / "tools.yaml").write_text(text.replace("[tools.shell]", "[tools.none]"))
        await push(nats_url, second, publisher)
        await wait_for(lambda: layers.ordinary.active.revision == 2, what="revision 2")
        after = await ask(nc, "guard.in.agent-1.tools.shell", "host:x")
        js = nc.jetstream()
        await eventually(lambda: _has(js, INTENTS, 2), what="intents retained")
    await nc.close()
    assert (before["effect"], before["policy_version"]) == ("allow", "tools@1;rev=1")
    assert (after["effect"], after["policy_version"]) == ("deny", "tools@2;rev=2")
    for decided in (before, after):
        code, doc = await replay(nats_url, decided["decision_id"])
        assert code == 0 and doc["reproduces"] is True, doc
        assert doc["policy_digest"] == decided["policy_digest"]
        assert doc["replayed"]["effect"] == decided["effect"]


async def test_votes_and_resolutions_are_not_replayed_and_say_so(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """An approver's vote and a hold's resolution are decisions of people, not of a policy
    on an intent: replay names them as such (exit 2) instead of guessing."""
    (alice,) = approvers = people("alice")
    nc = await nats.connect(nats_url)
    wrapped = Approving(policies, approvers, quorum=1)
    async with stream_gateway(stream_settings(nats_url), wrapped, keys[0]):  # type: ignore[arg-type]
        hold = await held(nc)
        await nc.jetstream().publish(f"guard.approve.{hold.decision_id}", alice.vote(hold))
        await eventually(lambda: settled(nc), what="vote settled")
    await nc.close()
    vote = approval_decision_id("guard", hold.decision_id, "alice")
    release = resolution_decision_id("guard", hold.decision_id)
    for decision_id, effect in ((vote, "approve"), (release, "allow")):
        code, text = await run_cli("replay", decision_id, "--nats", nats_url)
        assert code == 2, text
        assert f"a {effect} on hold {hold.decision_id}" in text
        assert "approvals are not re-evaluated" in text
