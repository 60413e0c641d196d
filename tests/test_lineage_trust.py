"""Lineage the gateway trusts (SPEC §10): a parent counts only if its ledger record verifies,
and a child whose parent is not decided yet, or held, waits for it (bounded).

Every test runs stream mode on a real nats-server. The attacker is a client allowed to
publish on the ledger subjects (as everyone is on a server without the compose topology):
it writes records of its own. A "restart" is a new gateway process's worth of state: a new
:class:`Gateway`, whose parent cache starts empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client

from bus_guard.decision import resolution_decision_id
from bus_guard.errors import ConfigError
from bus_guard.intake._gateway import Gateway
from bus_guard.intake._work import stored_at
from bus_guard.ledger._records import LedgerRecord, encode_record
from bus_guard.pipeline import Outcome, claims_of
from bus_guard.policy._load import PolicySet, load_policies
from bus_guard.settings import ArtifactMode, Checks, Settings, StreamSettings
from bus_guard.signing._keys import generate_key, kid_for, load_private_key, revoke_key, rotate_key
from bus_guard.signing._signer import Signer
from bus_guard.subjects import Subjects
from bus_guard.verify import Jwks, load_jwks

from .crashkit import GatewayProcess, run_argv
from .helpers import intent
from .streamkit import drained, eventually, ledger_decisions, stored, stream_gateway
from .streamkit import stream_settings as settings_for
from .test_lineage import BUNDLE, Agents, did

replace = msgspec.structs.replace


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key(tmp_path / "keys")


@pytest.fixture
def policies(tmp_path: Path) -> PolicySet:
    (tmp_path / "lineage.yaml").write_text(BUNDLE)
    return load_policies(tmp_path)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A client of the test's own (closed even when the test fails)."""
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def forge(nc: Client, record: LedgerRecord) -> None:
    """Publish *record* on the ledger as its ``gateway`` would: no create-only header, as
    anyone with publish rights on ``guard.ledger.>`` can."""
    subject = f"guard.ledger.{record.gateway}.d.{record.decision_id}"
    await nc.jetstream().publish(subject, encode_record(record))


def artifact_for(record: LedgerRecord, key: Ed25519PrivateKey, issuer: str = "gw-1") -> str:
    """The artifact a gateway signing with *key* would give *record* (what core mode, or
    the approvals engine, signs: the claims bind every field a child inherits)."""
    outcome = Outcome(**{name: getattr(record, name) for name in Outcome.__struct_fields__})
    claims = claims_of(
        outcome, issuer=issuer, ttl_s=60, subjects=Subjects("guard"), ledger_seq=record.seq
    )
    return Signer(key, issuer=issuer).sign(claims)


async def exec_ids(nc: Client) -> list[str]:
    return [m.headers["Guard-Decision"] for m in await stored(nc, "GUARD_EXEC")]


async def until_waited(gateway: Gateway, naks: int) -> None:
    async def waited() -> bool:
        return gateway.statistics().lineage_waits >= naks

    await eventually(waited, what=f"{naks} lineage waits")


# --- A: only verified records count ----------------------------------------------------


FORGERIES = (
    "denied-copied-as-allow",  # a later record: the genuine denial stands
    "allow-without-artifact",
    "artifact-of-another-decision",
    "signed-by-an-unknown-key",
    "genuine-artifact-other-fields",  # labels laundered away
)


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_forged_parent_record_never_counts(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet, forgery: str
) -> None:
    """After a restart (no cache), a child naming a parent whose only allow record is
    forged is denied ``lineage_violation`` at once and never reaches ``guard.exec``."""
    agents = Agents(nc)
    async with stream_gateway(settings_for(nats_url), policies, keys[0]):
        denied = await agents.send("agent-1", "tools.shell", "denied")
        allowed = await agents.send("agent-1", "tools.search", "allowed")
    assert (denied.effect, allowed.effect) == ("deny", "allow")
    # An allow for a decision that never happened, as a copy of a genuine one.
    never = replace(
        allowed,
        gateway="gw-evil",
        seq=0,
        prev="",
        decision_id=did("agent-1", "never"),
        intent_id="never",
    )
    match forgery:
        case "denied-copied-as-allow":
            fake = replace(
                denied,
                gateway="gw-evil",
                effect="allow",
                reason="allowed_by_rule",
                artifact=allowed.artifact,
            )
        case "allow-without-artifact":
            fake = replace(never, artifact="")
        case "artifact-of-another-decision":
            fake = never  # allowed's artifact: its jti is another decision
        case "signed-by-an-unknown-key":
            fake = replace(never, artifact=artifact_for(never, Ed25519PrivateKey.generate()))
        case _:  # a genuine signature over a tainted decision, forged into an untainted one
            tainted = replace(never, labels=("tools.http.get",))
            signed = artifact_for(tainted, load_private_key(keys[0]))
            fake = replace(never, artifact=signed)
    await forge(nc, fake)
    restarted = stream_gateway(settings_for(nats_url), policies, keys[0])
    async with restarted:  # the default 30 s wait: drained in time only if not waiting
        child = await agents.send("agent-2", "tools.search", "child", (fake.decision_id,))
        stats = restarted.statistics()
    assert child.effect == "deny" and child.reason == "lineage_violation"
    if forgery == "denied-copied-as-allow":
        assert f"parent {denied.decision_id} was denied (no_matching_rule)" in child.message
        assert stats.forged_parents == 0  # the first record stands; the copy is not read
    else:
        assert f"parent {fake.decision_id} is not a known decision" in child.message
        assert stats.forged_parents == 1
    assert stats.lineage_waits == 0
    assert await exec_ids(nc) == [allowed.decision_id]


async def test_later_forged_records_neither_break_nor_fool_a_child(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """A forger can always add a record after the genuine one. The first record of a
    decision id is the gateway's (create-only), so: a forged denial of an allowed parent
    does not break its child (allowed), and a web fetch laundered into a search does not
    fool the policy (its child still carries the ``tools.http.get`` taint)."""
    agents = Agents(nc)
    async with stream_gateway(settings_for(nats_url), policies, keys[0]):
        search = await agents.send("agent-1", "tools.search", "search")
        fetch = await agents.send("agent-3", "tools.http.get", "fetch")
    await forge(
        nc, replace(search, gateway="gw-evil", effect="deny", reason="denied_by_rule", artifact="")
    )
    laundered = replace(
        fetch, gateway="gw-evil", action="tools.search", subject="guard.in.agent-3.tools.search"
    )
    await forge(nc, replace(laundered, artifact=artifact_for(laundered, load_private_key(keys[0]))))
    restarted = stream_gateway(settings_for(nats_url), policies, keys[0])
    async with restarted:
        c1 = await agents.send("agent-1", "tools.search", "c1", (search.decision_id,))
        c2 = await agents.send("agent-7", "payments.transfer", "c2", (fetch.decision_id,))
        stats = restarted.statistics()
    assert c1.effect == "allow" and c1.lineage_depth == 1
    assert c2.effect == "deny" and c2.reason == "no_matching_rule"
    assert "tools.http.get" in c2.labels
    assert stats.forged_parents == 0
    assert c2.decision_id not in await exec_ids(nc)


@pytest.mark.parametrize("artifacts", ["per-message", "batched"])
async def test_a_genuine_parent_counts_after_a_restart(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet, artifacts: ArtifactMode
) -> None:
    agents = Agents(nc)
    settings = settings_for(nats_url, artifacts=artifacts)
    async with stream_gateway(settings, policies, keys[0]):
        parent = await agents.send("agent-1", "tools.search", "parent")
    assert parent.artifact.startswith("gb1~") == (artifacts == "batched")
    restarted = stream_gateway(settings, policies, keys[0])
    async with restarted:
        child = await agents.send("agent-2", "tools.search", "child", (parent.decision_id,))
        stats = restarted.statistics()
    assert child.effect == "allow", child.message
    assert (child.lineage_depth, child.lineage_root) == (1, "agent-1")
    assert stats.forged_parents == 0


@pytest.mark.parametrize(
    ("jwks", "counts"),
    [
        ("rotated", True),  # the old key stays in the JWKS for its grace period
        ("revoked-after-it-signed", True),
        ("revoked-before-it-signed", False),
        ("signing-key-only", False),  # no JWKS: the retired key is not trusted
    ],
)
async def test_parents_verify_with_the_trusted_jwks(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet, jwks: str, counts: bool
) -> None:
    key, jwks_path = keys
    agents = Agents(nc)
    async with stream_gateway(settings_for(nats_url), policies, key):
        parent = await agents.send("agent-1", "tools.search", "parent")
    old_kid = kid_for(load_private_key(key))
    rotate_key(key.parent)  # the restarted gateway signs with a new key
    if jwks == "revoked-after-it-signed":
        revoke_key(jwks_path, old_kid, now=parent.ts + 1)
    elif jwks == "revoked-before-it-signed":
        revoke_key(jwks_path, old_kid, now=parent.ts - 1)
    trusted = None if jwks == "signing-key-only" else load_jwks(jwks_path)
    restarted = stream_gateway(settings_for(nats_url), policies, key, trusted_keys=trusted)
    async with restarted:
        child = await agents.send("agent-2", "tools.search", "child", (parent.decision_id,))
        stats = restarted.statistics()
    if counts:
        assert child.effect == "allow", child.message
        assert stats.forged_parents == 0
    else:
        assert child.effect == "deny" and "is not a known decision" in child.message
        assert stats.forged_parents == 1


# --- B: children wait for undecided and held parents ------------------------------------


async def test_a_child_published_before_its_parent_waits_for_it(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    agents = Agents(nc)
    settings = settings_for(nats_url, lineage_wait_s=30.0, lineage_nak_delay_s=0.2)
    parent_id = did("agent-1", "parent")
    gateway = stream_gateway(settings, policies, keys[0])
    async with gateway:
        await nc.jetstream().publish(
            "guard.in.agent-2.tools.search",
            intent("tools.search", "tool:search", id="child", parents=[parent_id]),
        )
        await until_waited(gateway, 2)
        assert await ledger_decisions(nc) == []  # not decided while it waits
        assert gateway.statistics().lineage_waiting == 1
        parent = await agents.send("agent-1", "tools.search", "parent")  # drains the child too
        stats = gateway.statistics()
    child = {r.decision_id: r for r in await ledger_decisions(nc)}[did("agent-2", "child")]
    assert parent.decision_id == parent_id
    assert child.effect == "allow", child.message
    assert (child.lineage_depth, child.parents) == (1, (parent_id,))
    assert child.decision_id in await exec_ids(nc)
    assert stats.lineage_waiting == 0


async def test_a_child_of_a_held_parent_waits_then_is_denied(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    agents = Agents(nc)
    settings = settings_for(nats_url, lineage_wait_s=1.5, lineage_nak_delay_s=0.2)
    gateway = stream_gateway(settings, policies, keys[0])
    async with gateway:
        hold = await agents.send("agent-1", "tools.review", "hold")
        child = await agents.send("agent-2", "tools.search", "child", (hold.decision_id,))
        stats = gateway.statistics()
    assert hold.effect == "hold"
    assert child.effect == "deny" and child.reason == "lineage_violation"
    assert f"parent {hold.decision_id} is still held after 1.5 s" in child.message
    assert child.ts - stored_at(child.intake) >= 1.5  # it waited, the whole time
    assert stats.lineage_waits >= 2 and stats.lineage_waiting == 0
    assert await exec_ids(nc) == []


@pytest.mark.parametrize("release", ["genuine", "forged"])
async def test_a_released_hold_is_the_parent_its_children_see(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet, release: str
) -> None:
    """The approvals engine (played here) resolves a hold with a release record of its own
    id, signed, whose ``hold`` names the hold: a waiting child then descends from the held
    intent. A release that does not verify resolves nothing: the child is denied at once."""
    agents = Agents(nc)
    settings = settings_for(nats_url, lineage_wait_s=30.0, lineage_nak_delay_s=0.2)
    gateway = stream_gateway(settings, policies, keys[0])
    async with gateway:
        hold = await agents.send("agent-1", "tools.review", "hold")
        await nc.jetstream().publish(
            "guard.in.agent-2.tools.search",
            intent("tools.search", "tool:search", id="child", parents=[hold.decision_id]),
        )
        await until_waited(gateway, 1)
        released = replace(
            hold,
            gateway="gw-approvals",
            seq=0,
            prev="",
            decision_id=resolution_decision_id("guard", hold.decision_id),
            effect="allow",
            reason="approved",
            hold=hold.decision_id,
            approvals=("vote-1",),
            approvers=(),
            quorum=0,
            expires=0.0,
        )
        key = load_private_key(keys[0]) if release == "genuine" else Ed25519PrivateKey.generate()
        await forge(nc, replace(released, artifact=artifact_for(released, key)))
        await eventually(lambda: drained(nc.jetstream()), what="intake drained")
        stats = gateway.statistics()
    child = {r.decision_id: r for r in await ledger_decisions(nc)}[did("agent-2", "child")]
    if release == "genuine":
        assert child.effect == "allow", child.message
        assert (child.lineage_depth, child.lineage_root) == (1, "agent-1")
        assert "tools.review" in child.labels  # the held intent's action
        assert stats.forged_parents == 0
    else:
        assert child.effect == "deny" and child.reason == "lineage_violation"
        assert f"parent {hold.decision_id} is hold, not allowed" in child.message
        assert stats.forged_parents == 1


async def test_waiting_children_are_bounded(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """At most ``lineage_max_waiting`` children wait at once; the next one is decided now:
    an agent cannot park unbounded work (each waiting child holds an ack-pending slot)."""
    js = nc.jetstream()
    settings = settings_for(
        nats_url, lineage_wait_s=30.0, lineage_nak_delay_s=0.2, lineage_max_waiting=2
    )
    gateway = stream_gateway(settings, policies, keys[0])
    async with gateway:
        for i in range(3):
            parents = [did("agent-1", f"parent-{i}")]
            await js.publish(
                "guard.in.agent-2.tools.search",
                intent("tools.search", "tool:search", id=f"child-{i}", parents=parents),
            )

        async def one_decided() -> bool:
            return len(await ledger_decisions(nc)) == 1

        await eventually(one_decided, what="the third child decided")
        [third] = await ledger_decisions(nc)
        assert third.intent_id == "child-2" and third.reason == "lineage_violation"
        assert "2 intents wait for parents already" in third.message
        assert gateway.statistics().lineage_waiting == 2
        for i in range(2):
            await js.publish(
                "guard.in.agent-1.tools.search", intent("tools.search", "t", id=f"parent-{i}")
            )
        await eventually(lambda: drained(js), what="intake drained")
    ledger = {r.intent_id: r for r in await ledger_decisions(nc) if r.principal == "agent-2"}
    assert [ledger[f"child-{i}"].effect for i in range(3)] == ["allow", "allow", "deny"]


def test_lineage_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="lineage_max_waiting"):
        Settings(stream=StreamSettings(max_ack_pending=64, lineage_max_waiting=64))
    with pytest.raises(ConfigError, match="lineage_nak_delay_s"):
        Settings(stream=StreamSettings(lineage_nak_delay_s=0))
    with pytest.raises(ConfigError, match="max_past_skew_s"):
        Settings(stream=StreamSettings(lineage_wait_s=60), checks=Checks(max_past_skew_s=60))
    assert Settings(stream=StreamSettings(lineage_wait_s=0, lineage_max_waiting=0))


@pytest.mark.parametrize("jwks", ["next-to-the-key", "--jwks-without-the-old-key"])
async def test_bus_guard_run_verifies_parents_with_its_jwks(
    nats_url: str, nc: Client, keys: tuple[Path, Path], tmp_path: Path, jwks: str
) -> None:
    """``bus-guard run`` trusts the ``jwks.json`` next to ``--key`` (rotated keys included),
    or the ``--jwks`` it is given: a parent signed with a retired key counts only if that
    key is in it."""
    key, jwks_path = keys
    js = nc.jetstream()
    extra: tuple[str, ...] = ()
    if jwks != "next-to-the-key":
        extra = ("--jwks", str(tmp_path / "new-only.json"))
    argv = run_argv(nats_url, key, "gw-cli", "--ack-wait", "2", *extra)

    async def decide(principal: str, intent_id: str, *parents: str) -> LedgerRecord:
        gateway = GatewayProcess(argv)
        await anyio.to_thread.run_sync(gateway.start)
        try:
            await js.publish(
                f"guard.in.{principal}.tools.search",
                intent("tools.search", "t", id=intent_id, parents=list(parents)),
            )
            await eventually(lambda: drained(js), what="intake drained")
        finally:
            assert await anyio.to_thread.run_sync(gateway.stop) == 0
        ledger = {r.decision_id: r for r in await ledger_decisions(nc)}
        return ledger[did(principal, intent_id)]

    if extra:  # the first gateway's own key, until the rotation
        (tmp_path / "new-only.json").write_bytes(jwks_path.read_bytes())
    parent = await decide("agent-1", "parent")
    rotation = rotate_key(key.parent)
    if extra:  # the new key alone: the parent's signature no longer verifies
        entry = load_jwks(jwks_path).entry(rotation.new_kid)
        assert entry is not None
        (tmp_path / "new-only.json").write_bytes(Jwks([entry]).to_json())
    child = await decide("agent-2", "child", parent.decision_id)
    assert parent.effect == "allow"
    if jwks == "next-to-the-key":
        assert child.effect == "allow", child.message
    else:
        assert child.effect == "deny" and "is not a known decision" in child.message
