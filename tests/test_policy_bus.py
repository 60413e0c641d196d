"""Signed policy bundles on the bus (SCENARIOS S2, S11): `policy push` → every gateway
switches within a bound, under load; every decision names a set that was active; bundles
that are unsigned, signed by an unknown key, older (rollback), for another deployment,
broken, failing their test cases or too large never decide anything."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client

from bus_guard.cli._arguments import parser
from bus_guard.cli._main import main
from bus_guard.cli._push import cmd_push
from bus_guard.errors import GatewayError
from bus_guard.intake._policy_bus import pointer_key
from bus_guard.intake._policy_source import open_keeper
from bus_guard.policy._bundle import (
    Manifest,
    compile_directory,
    content_digest,
    content_of,
    encode_content,
    sign_manifest,
)
from bus_guard.settings import PolicySourceSettings, Settings
from bus_guard.signing._keys import generate_key, kid_for, load_private_key
from bus_guard.verify import Verifier

from .helpers import intent
from .policykit import Decisions, Load, break_search, bump_version, policy_dir, wait_for
from .streamkit import stream_gateway, stream_settings

SWITCH_BOUND_S = 5.0  # push → every gateway deciding with the new set, under load


async def _push(nats_url: str, directory: Path, key: Path, *extra: str) -> str:
    out = io.StringIO()
    args = parser().parse_args(
        ["policy", "push", str(directory), "--nats", nats_url, "--key", str(key), *extra]
    )
    assert await cmd_push(args, out) == 0, out.getvalue()
    return out.getvalue()


class Bus:
    """Direct access to the stores, for what `policy push` would never write."""

    def __init__(self, nc: Client) -> None:
        self.js = nc.jetstream()

    async def pointer(self, deployment: str = "guard") -> bytes:
        kv = await self.js.key_value("guard-policy")
        return (await kv.get(pointer_key(deployment))).value or b""

    async def history(self, deployment: str = "guard") -> list[bytes]:
        kv = await self.js.key_value("guard-policy")
        return [e.value or b"" for e in await kv.history(pointer_key(deployment))]

    async def set_pointer(self, token: bytes, deployment: str = "guard") -> None:
        kv = await self.js.key_value("guard-policy")
        await kv.put(pointer_key(deployment), token)

    async def store(self, data: bytes) -> str:
        store = await self.js.object_store("guard-policy-sets")
        digest = content_digest(data)
        await store.put(digest.replace(":", "-"), data)
        return digest


def _manifest(**kw: Any) -> Manifest:
    fields: dict[str, Any] = {
        "kind": "policy",
        "deployment": "guard",
        "revision": 1,
        "digest": "sha256:" + "0" * 64,
        "version": "x@1",
        "content": "sha256:" + "0" * 64,
        "size": 0,
        "issued_at": time.time(),
    }
    return Manifest(**{**fields, **kw})


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


async def _signed_bundle(
    bus: Bus, key: Ed25519PrivateKey, directory: Path, revision: int, **kw: Any
) -> bytes:
    """A manifest for *directory*'s content as it is (even if it fails its tests), signed."""
    from bus_guard.policy._bundle import compile_content

    content = content_of(_files(directory))
    data = encode_content(content)
    digest = await bus.store(data)
    try:
        policy_digest = compile_content(content).digest
    except Exception:  # a broken or failing set: the manifest names what it would be
        from bus_guard.policy._load import load_policy_sources

        try:
            policy_digest = load_policy_sources(content.policies, files=content.files).digest
        except Exception:
            policy_digest = "sha256:" + "1" * 64
    manifest = _manifest(
        revision=revision, digest=policy_digest, content=digest, size=len(data), **kw
    )
    return sign_manifest(key, kid_for(key), manifest)


async def test_push_switches_every_gateway_under_load_and_refused_bundles_never_decide(
    nats_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    publisher, publishers = generate_key(tmp_path / "publisher")
    stranger, _ = generate_key(tmp_path / "stranger")
    directory = policy_dir(tmp_path)
    await _push(nats_url, directory, publisher)
    source = PolicySourceSettings(publishers_file=publishers, poll_s=0.1)
    nc = await nats.connect(nats_url)
    bus = Bus(nc)
    [rev1] = await bus.history()
    decisions = await Decisions.on(nc, Verifier(keys[1]))
    load = Load(nc)
    s1, s2 = stream_settings(nats_url, "gw-1"), stream_settings(nats_url, "gw-2")
    async with (
        open_keeper(s1, source) as k1,
        open_keeper(s2, source) as k2,
        stream_gateway(s1, k1.current, keys[0]) as g1,  # type: ignore[arg-type]
        stream_gateway(s2, k2.current, keys[0]) as g2,  # type: ignore[arg-type]
        k1.running(g1.swap_policies),
        k2.running(g2.swap_policies),
        anyio.create_task_group() as tg,
    ):
        first = k1.active.policies
        assert first.version.endswith(";rev=1") and k2.active.policies.digest == first.digest
        tg.start_soon(load.run)
        await decisions.wait_until(lambda seen: len(seen) >= 100, what="decisions under rev 1")

        bump_version(directory, "1.3.0")
        pushed_at = time.monotonic()
        await _push(nats_url, directory, publisher)
        second = compile_directory(directory, revision=2).policies
        for gateway in ("gw-1", "gw-2"):
            await decisions.wait_until(
                lambda seen, g=gateway: any(  # type: ignore[misc]
                    s.gateway == g and s.version == second.version for s in seen
                ),
                what=f"{gateway} on revision 2",
            )
            switched = next(
                s.at for s in decisions.seen if s.gateway == gateway and s.version == second.version
            )
            assert switched - pushed_at < SWITCH_BOUND_S

        # Every kind of bad pointer, each after the previous one was refused by both.
        key = load_private_key(publisher)
        ok = await bus.pointer()
        bad: list[tuple[str, bytes]] = [
            ("unknown_key", await _signed_bundle(bus, load_private_key(stranger), directory, 9)),
            ("rollback", rev1),
            ("unsigned", ok.rsplit(b".", 1)[0] + b"."),
            ("wrong_deployment", await _signed_bundle(bus, key, directory, 10, deployment="x")),
        ]
        broken = policy_dir(tmp_path, "broken")
        (broken / "zz.yaml").write_text("bundle: [unclosed\n")
        bad.append(("broken", await _signed_bundle(bus, key, broken, 11)))
        failing = policy_dir(tmp_path, "failing")
        break_search(failing)
        bad.append(("tests_failed", await _signed_bundle(bus, key, failing, 12)))
        for reason, token in bad:
            await bus.set_pointer(token)
            for keeper in (k1, k2):
                await wait_for(
                    lambda k=keeper, r=reason: k.statistics().refused.get(r) == 1,  # type: ignore[misc]
                    what=f"{reason} refused",
                )
        count = len(decisions.seen)
        await decisions.wait_until(lambda seen: len(seen) >= count + 100, what="more decisions")
        load.stop()
    sent = load.sent
    await decisions.wait_until(lambda seen: len(seen) == sent, what="every decision")
    await nc.drain()

    seen = decisions.seen
    assert len(seen) == sent
    assert {s.version for s in seen} == {first.version, second.version}
    assert {s.digest for s in seen} == {first.digest, second.digest}
    for gateway in ("gw-1", "gw-2"):  # each switched once, and never back
        versions = [s.version for s in seen if s.gateway == gateway]
        switch = versions.index(second.version)
        assert set(versions[:switch]) == {first.version}
        assert set(versions[switch:]) == {second.version}
    for keeper in (k1, k2):
        stats = keeper.statistics()
        assert stats.revision == 2 and stats.version == second.version
        assert stats.activations == 1
        assert stats.refused == dict.fromkeys(
            ("unknown_key", "rollback", "unsigned", "wrong_deployment", "broken", "tests_failed"),
            1,
        )
    shells = [s for s in seen if s.subject.startswith("guard.deny.")]
    assert shells and all(s.reason == "denied_by_rule" for s in shells)
    assert len(shells) == sent // 2  # no search was ever denied: the failing set never ran


async def test_a_too_large_bundle_is_refused_and_the_running_set_stays(
    nats_url: str, tmp_path: Path
) -> None:
    publisher, publishers = generate_key(tmp_path / "publisher")
    directory = policy_dir(tmp_path)
    await _push(nats_url, directory, publisher)
    size = len(encode_content(compile_directory(directory).content))
    source = PolicySourceSettings(publishers_file=publishers, max_bundle_bytes=size + 100)
    settings = Settings(nats_url=nats_url, mode="core")
    async with open_keeper(settings, source) as keeper:
        before = keeper.current
        (directory / "padding.yaml").write_text(
            'bundle: padding\nversion: "1"\n# ' + "x" * 400 + "\nrules:\n"
            "  - {id: pad, effect: deny, actions: [pad.pad]}\n"
        )
        await _push(nats_url, directory, publisher)
        assert await keeper.reload() is False
        assert keeper.current is before
        assert keeper.statistics().refused == {"too_large": 1}
        assert "--policy-max-bytes" in keeper.statistics().last_refusal


async def test_at_start_the_newest_signed_revision_wins_over_a_rollback_written_later(
    nats_url: str, tmp_path: Path
) -> None:
    publisher, publishers = generate_key(tmp_path / "publisher")
    directory = policy_dir(tmp_path)
    await _push(nats_url, directory, publisher)
    bump_version(directory, "1.3.0")
    await _push(nats_url, directory, publisher)
    nc = await nats.connect(nats_url)
    bus = Bus(nc)
    rev1, _ = await bus.history()
    await bus.set_pointer(rev1)  # an old, genuinely signed pointer written over the new one
    source = PolicySourceSettings(publishers_file=publishers)
    async with open_keeper(Settings(nats_url=nats_url, mode="core"), source) as keeper:
        assert keeper.active.revision == 2
        assert keeper.active.policies.version.endswith("tools@1.3.0;rev=2")
    # A push numbers after the newest revision the pointer ever held, not after the
    # rollback on top: revision 3 (read with message gets: no consumer needed).
    tools = directory / "tools.yaml"
    tools.write_text(tools.read_text().replace('version: "1.3.0"', 'version: "1.4.0"'))
    assert "pushed policy revision 3 " in await _push(nats_url, directory, publisher)
    async with open_keeper(Settings(nats_url=nats_url, mode="core"), source) as keeper:
        assert keeper.active.revision == 3
    await nc.drain()


async def test_no_bundle_and_no_bus_refuse_to_start_with_a_clear_message(
    nats_url: str, tmp_path: Path
) -> None:
    _, publishers = generate_key(tmp_path / "publisher")
    source = PolicySourceSettings(publishers_file=publishers)
    with pytest.raises(GatewayError, match="push a bundle first"):
        async with open_keeper(Settings(nats_url=nats_url, mode="core"), source):
            pass
    dead = "nats://127.0.0.1:1"
    settings = Settings(nats_url=dead, mode="core", max_reconnect_attempts=1, reconnect_wait_s=0.1)
    with pytest.raises(GatewayError, match=re.escape(f"policy source: cannot connect to {dead}")):
        async with open_keeper(settings, source):
            pass


def test_run_refuses_to_start_when_the_policy_bus_is_unreachable(tmp_path: Path) -> None:
    key, _ = generate_key(tmp_path / "gw")
    _, publishers = generate_key(tmp_path / "publisher")
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        code = main(
            [
                "run",
                "--nats",
                "nats://127.0.0.1:1",
                "--policies",
                "nats://",
                "--policy-keys",
                str(publishers),
                "--key",
                str(key),
                "--max-reconnects",
                "1",
                "--reconnect-wait",
                "0.1",
            ]
        )
    assert code == 1
    assert "policy source: cannot connect to nats://127.0.0.1:1" in err.getvalue()
    assert "refusing to start without policies" in err.getvalue()


async def test_push_refuses_a_set_whose_test_case_fails_and_stores_nothing(
    nats_url: str, tmp_path: Path
) -> None:
    publisher, _ = generate_key(tmp_path / "publisher")
    directory = policy_dir(tmp_path)
    break_search(directory)
    out = io.StringIO()
    args = parser().parse_args(
        ["policy", "push", str(directory), "--nats", nats_url, "--key", str(publisher)]
    )
    assert await cmd_push(args, out) == 1
    assert "not pushed" in out.getvalue() and "anyone may search" in out.getvalue()
    nc = await nats.connect(nats_url)
    with pytest.raises(nats.js.errors.BucketNotFoundError):
        await nc.jetstream().key_value("guard-policy")
    await nc.drain()


def test_every_decision_of_a_revision_names_it() -> None:
    """Single-rule, several-rule and default decisions alike (some are built while the set
    compiles): the revision is part of the set's version from the start."""
    from bus_guard.pipeline import decide
    from bus_guard.policy._bundle import compile_content, read_directory

    from .policykit import POLICIES

    policies = compile_content(read_directory(POLICIES), revision=3).policies
    for subject, action in (
        ("guard.in.agent-1.tools.search", "tools.search"),  # one allow rule
        ("guard.in.agent-1.tools.shell", "tools.shell"),  # one deny rule
        ("guard.in.agent-1.nothing.here", "nothing.here"),  # no rule
    ):
        d = decide(policies, subject, intent(action, "r", {}, ts=1000.0), now=1000.0)
        assert d.policy_version == policies.version and d.policy_version.endswith(";rev=3")
