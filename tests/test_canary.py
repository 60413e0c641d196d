"""Canaries: the active set's known answers, run through the gateway's whole path on a
schedule; a wrong answer, or an artifact that does not verify, turns readiness off, is
counted, and raises an alert on the deny subject."""

from __future__ import annotations

import json
from pathlib import Path

import nats
from nats.aio.client import Client

from bus_guard.intake._canary import Canary, open_canary
from bus_guard.intake._control import open_keys
from bus_guard.intake._gateway import Gateway
from bus_guard.intake._policy_source import DirectorySource, PolicyKeeper
from bus_guard.ops import OpsServer
from bus_guard.policy._load import load_policies
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key, jwk_entry, load_private_key
from bus_guard.verify import JWKS_KEY, Jwks, LiveVerifier

from .helpers import Collector, make_signer
from .policykit import POLICIES, policy_dir, wait_for

CANARY_BUNDLE = """\
bundle: canary
version: "1"
rules:
  - id: canary-allowed
    effect: allow
    principals: [guard-canary]
    actions: [guard.canary]
"""

CANARY_CASES = """\
cases:
  - name: the canary is allowed
    subject: guard.in.guard-canary.guard.canary
    intent: {id: c1, action: guard.canary, resource: canary}
    expect: {effect: allow, reason: allowed_by_rule, rules: [canary-allowed]}
  - name: the canary may not pay
    subject: guard.in.guard-canary.payments.transfer
    intent: {id: c2, action: payments.transfer, resource: "account:x",
             params: {amount: 1, currency: USD, to: "account:y"}}
    expect: {effect: deny, reason: no_matching_rule}
"""


def _canary_dir(tmp_path: Path) -> Path:
    directory = policy_dir(tmp_path)
    (directory / "canary.yaml").write_text(CANARY_BUNDLE)
    (directory / "tests" / "canary.yaml").write_text(CANARY_CASES)
    return directory


async def test_canaries_pass_through_the_whole_path_and_never_reach_exec_or_deny(
    nats_url: str, tmp_path: Path
) -> None:
    key, jwks = generate_key(tmp_path / "gw")
    signer = make_signer(key)
    keeper = PolicyKeeper(DirectorySource(_canary_dir(tmp_path)))
    await keeper.load()
    assert len(keeper.active.canaries) == 2
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    nc = await nats.connect(nats_url)
    back = await Collector.on(nc, "guard.canary.test-gw")
    outputs = await Collector.on(nc, "guard.*.guard-canary.>")
    async with (
        open_keys(settings, key_path=key, jwks_path=jwks, signer=signer, ledger_signer=None),
        Gateway(settings, keeper.current, signer) as gateway,
        open_canary(
            settings, gateway, signer, lambda: keeper.active.canaries, interval_s=0.1
        ) as canary,
    ):
        await wait_for(lambda: canary.statistics().rounds >= 3, what="three rounds")
        stats = canary.statistics()
        assert stats.ready and stats.failed == 0 and stats.passed >= 6
        assert gateway.unready == {}
    await back.wait_for(6)
    kinds = {("Guard-Artifact" in (m.headers or {})) for m in back.msgs}
    assert kinds == {True, False}  # an exec output (with its artifact) and a denial
    denials = [m for m in back.msgs if "Guard-Artifact" not in (m.headers or {})]
    denial = json.loads(denials[0].data)
    assert denial["reason"] == "no_matching_rule" and denial["principal"] == "guard-canary"
    assert outputs.msgs == []  # nothing on exec, deny or hold
    await nc.drain()


async def _canary(
    nc: Client, gateway: Gateway, signer: object, keeper: PolicyKeeper, verifier: LiveVerifier
) -> Canary:
    return Canary(
        nc,
        gateway,
        signer,  # type: ignore[arg-type]
        lambda: keeper.active.canaries,
        verifier,
        interval_s=3600,
        timeout_s=2.0,
        scheduled=False,  # rounds are run by the test
    )


async def test_a_wrong_answer_turns_readiness_off_counts_and_alerts_until_it_is_right_again(
    nats_url: str, tmp_path: Path
) -> None:
    key, jwks = generate_key(tmp_path / "gw")
    signer = make_signer(key)
    keeper = PolicyKeeper(DirectorySource(_canary_dir(tmp_path)))
    await keeper.load()
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    nc = await nats.connect(nats_url)
    alerts = await Collector.on(nc, "guard.deny.guard-canary.>")
    async with (
        open_keys(settings, key_path=key, jwks_path=jwks, signer=signer, ledger_signer=None),
        Gateway(settings, keeper.current, signer) as gateway,
    ):
        live = LiveVerifier(await nc.jetstream().key_value("guard-jwks"), refresh_s=0.05)
        canary = await _canary(nc, gateway, signer, keeper, live)
        async with canary.running():
            assert await canary.run_round() is True
            assert gateway.unready == {}
            # The gateway ends up deciding with a set without the canary rule (a fault: the
            # keeper would never activate it, its cases fail): the canary is denied.
            gateway.swap_policies(load_policies(POLICIES))
            assert await canary.run_round() is False
            assert "canary" in gateway.unready
            assert "the canary is allowed" in gateway.unready["canary"]
            snap = OpsServer(gateway, "127.0.0.1", 0).snapshot()  # what /readyz reports
            assert not snap.ready
            assert any(
                r.startswith("canary: canary 'the canary is allowed'") for r in snap.why_not_ready
            )
            stats = canary.statistics()
            assert (stats.failed, stats.ready) == (1, False)
            await alerts.wait_for(1)
            [alert] = alerts.records()
            assert alert["reason"] == "internal_error" and alert["effect"] == "deny"
            assert "not ready" in alert["message"] and "expected allow" in alert["message"]
            assert alert["subject"] == "guard.in.guard-canary.guard.canary"
            # Right again: ready again.
            gateway.swap_policies(keeper.current)
            assert await canary.run_round() is True
            assert gateway.unready == {} and canary.statistics().ready
            assert OpsServer(gateway, "127.0.0.1", 0).snapshot().ready
    assert len(alerts.msgs) == 1
    await nc.drain()


async def test_an_artifact_that_does_not_verify_turns_readiness_off(
    nats_url: str, tmp_path: Path
) -> None:
    key, jwks = generate_key(tmp_path / "gw")
    signer = make_signer(key)
    keeper = PolicyKeeper(DirectorySource(_canary_dir(tmp_path)))
    await keeper.load()
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    nc = await nats.connect(nats_url)
    async with (
        open_keys(settings, key_path=key, jwks_path=jwks, signer=signer, ledger_signer=None),
        Gateway(settings, keeper.current, signer) as gateway,
    ):
        kv = await nc.jetstream().key_value("guard-jwks")
        live = LiveVerifier(kv, refresh_s=0.05)
        canary = await _canary(nc, gateway, signer, keeper, live)
        async with canary.running():
            assert await canary.run_round() is True
            # The published JWKS says the signing key is revoked: its artifacts are refused.
            revoked = Jwks([jwk_entry(load_private_key(key), revoked_at=1.0)])
            await kv.put(JWKS_KEY, revoked.to_json())
            assert await live.refresh() is True  # what its refresh_s would do soon
            assert await canary.run_round() is False
            assert "does not verify" in gateway.unready["canary"]
            assert "revoked_kid" in gateway.unready["canary"]
    await nc.drain()


async def test_without_canary_cases_the_built_in_one_runs(nats_url: str, tmp_path: Path) -> None:
    key, _ = generate_key(tmp_path / "gw")
    signer = make_signer(key)
    keeper = PolicyKeeper(DirectorySource(POLICIES))
    await keeper.load()
    assert keeper.active.canaries == ()
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    nc = await nats.connect(nats_url)
    back = await Collector.on(nc, "guard.canary.test-gw")
    async with Gateway(settings, keeper.current, signer) as gateway:
        canary = Canary(nc, gateway, signer, lambda: (), None, scheduled=False)
        async with canary.running():
            assert await canary.run_round() is True
    [msg] = await back.wait_for(1)
    record = json.loads(msg.data)
    assert record["effect"] == "deny" and record["action"] == "guard.canary"
    await nc.drain()
