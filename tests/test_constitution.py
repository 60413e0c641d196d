"""The constitution (issue 12, item 4): deny and escalate rules signed by M of N keys,
that no ordinary bundle can override or remove; configured but missing or short of its
quorum, the gateway does not start; every decision says which layer made it."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from bus_guard.cli._arguments import parser
from bus_guard.cli._push import cmd_push, cmd_sign
from bus_guard.errors import BundleRefused, GatewayError
from bus_guard.intake._gateway import Gateway
from bus_guard.intake._policy_bus import pointer_key
from bus_guard.intake._policy_source import open_policies
from bus_guard.pipeline import decide
from bus_guard.policy._bundle import Manifest, compile_directory
from bus_guard.policy._constitution import (
    LayeredSet,
    add_signature,
    read_constitution,
    sign_constitution,
)
from bus_guard.policy._load import load_policies
from bus_guard.settings import PolicySourceSettings, Settings
from bus_guard.signing._keys import generate_key, load_private_key, merge_jwks
from bus_guard.signing._signer import Signer
from bus_guard.verify import Jwks, load_jwks

from .helpers import intent
from .policykit import POLICIES, wait_for

CONSTITUTION = """\
bundle: constitution
version: "1"
approvers:
  members:
    alice: approvers/alice.jwks.json
rules:
  - id: never-a-shell
    effect: deny
    actions: [tools.shell]
  - id: secrets-need-a-human
    effect: escalate
    actions: [tools.search]
    resources: ["secret:*"]
    approval: {approvers: [alice], quorum: 1, ttl: 1h}
"""

CONSTITUTION_CASES = """\
cases:
  - name: no shell, ever
    subject: guard.in.agent-1.tools.shell
    intent: {id: c1, action: tools.shell, resource: "host:x"}
    expect: {effect: deny, reason: denied_by_rule, rules: [never-a-shell]}
  - name: a search of secrets waits for alice
    subject: guard.in.agent-1.tools.search
    intent: {id: c2, action: tools.search, resource: "secret:payroll"}
    expect: {effect: hold, rules: [secrets-need-a-human], approvers: [alice]}
"""

# An ordinary set that tries to give agent-1 a shell.
ORDINARY = """\
bundle: tools
version: "{version}"
rules:
  - id: shell-for-agent-1
    effect: allow
    principals: [agent-1]
    actions: [tools.shell]
  - id: search-for-all
    effect: allow
    actions: [tools.search]
"""


def _constitution_dir(tmp_path: Path, *, extra_rule: str = "", version: str = "1") -> Path:
    directory = tmp_path / f"constitution-{version}-{len(extra_rule)}"
    (directory / "tests").mkdir(parents=True)
    shutil.copytree(POLICIES / "approvers", directory / "approvers")
    text = CONSTITUTION.replace('version: "1"', f'version: "{version}"')
    (directory / "constitution.yaml").write_text(text + extra_rule)
    (directory / "tests" / "constitution.yaml").write_text(CONSTITUTION_CASES)
    return directory


def _ordinary_dir(tmp_path: Path, version: str) -> Path:
    directory = tmp_path / f"ordinary-{version}"
    directory.mkdir()
    (directory / "tools.yaml").write_text(ORDINARY.format(version=version))
    return directory


def _keys(tmp_path: Path, n: int) -> tuple[list[Path], Path]:
    """*n* constitution keys and the JWKS of all of them."""
    paths = [generate_key(tmp_path / f"signer-{i}") for i in range(n)]
    jwks = merge_jwks(*(load_jwks(j) for _, j in paths))
    file = tmp_path / "constitution-keys.json"
    file.write_bytes(jwks.to_json())
    return [k for k, _ in paths], file


async def _cli(command: Any, *argv: str) -> str:
    out = io.StringIO()
    assert await command(parser().parse_args(list(argv)), out) == 0, out.getvalue()
    return out.getvalue()


async def _push(url: str, directory: Path, *keys: Path, kind: str = "policy") -> str:
    argv = ["policy", "push", str(directory), "--nats", url, "--kind", kind]
    for key in keys:
        argv += ["--key", str(key)]
    return await _cli(cmd_push, *argv)


async def _ask(nc: Client, subject: str, resource: str) -> dict[str, Any]:
    action = subject.split(".", 3)[3]
    reply = await nc.request(subject, intent(action, resource, {}), timeout=10)
    record: dict[str, Any] = json.loads(reply.data)
    return record


async def test_the_constitution_overrides_every_ordinary_bundle_and_needs_its_quorum(
    nats_url: str, tmp_path: Path, signer: Signer
) -> None:
    publisher, publishers = generate_key(tmp_path / "publisher")
    signers, constitution_keys = _keys(tmp_path, 3)
    await _push(nats_url, _ordinary_dir(tmp_path, "9"), publisher)
    constitution = _constitution_dir(tmp_path)
    await _push(nats_url, constitution, signers[0], kind="constitution")
    source = PolicySourceSettings(
        publishers_file=publishers,
        constitution_keys_file=constitution_keys,
        constitution_quorum=2,
        poll_s=0.1,
    )
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    # One signature of the two required: the gateway does not start.
    with pytest.raises(GatewayError, match="1 valid signature of distinct constitution keys"):
        async with open_policies(settings, source):
            pass
    await _cli(cmd_sign, "policy", "sign", "--nats", nats_url, "--key", str(signers[1]))

    nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
    async with (
        open_policies(settings, source) as layers,
        Gateway(settings, layers.current, signer) as gateway,
        layers.running(gateway.swap_policies),
    ):
        assert layers.constitution is not None
        first = layers.constitution.active.policies
        assert first.version == "constitution/constitution@1;rev=1"
        shell = await _ask(nc, "guard.in.agent-1.tools.shell", "host:x")
        assert (shell["effect"], shell["rules"]) == ("deny", ["never-a-shell"])
        assert shell["policy_version"] == first.version  # the layer that decided
        secret = await _ask(nc, "guard.in.agent-1.tools.search", "secret:payroll")
        assert (secret["effect"], secret["rules"]) == ("hold", ["secrets-need-a-human"])
        assert secret["policy_version"].startswith("constitution/")
        search = await _ask(nc, "guard.in.agent-1.tools.search", "index:web")
        assert (search["effect"], search["rules"]) == ("allow", ["search-for-all"])
        assert search["policy_version"] == "tools@9;rev=1"

        # A new ordinary revision still allows the shell: still denied.
        await _push(nats_url, _ordinary_dir(tmp_path, "10"), publisher)
        await wait_for(lambda: layers.ordinary.active.revision == 2, what="ordinary rev 2")
        shell = await _ask(nc, "guard.in.agent-1.tools.shell", "host:x")
        assert (shell["effect"], shell["rules"]) == ("deny", ["never-a-shell"])

        # A constitution revision signed by one key only: refused, the first one stays.
        await _push(nats_url, constitution, signers[2], kind="constitution")
        await wait_for(
            lambda: layers.constitution.statistics().refused.get("quorum") == 1,  # type: ignore[union-attr]
            what="the short constitution refused",
        )
        # One that allows (signed by the quorum, bypassing push's own check): refused.
        allowing = _constitution_dir(
            tmp_path,
            extra_rule="  - {id: refunds-ok, effect: allow, actions: [payments.refund]}\n",
        )
        with pytest.raises(AssertionError):  # push refuses it outright
            await _push(nats_url, allowing, signers[0], signers[1], kind="constitution")
        await _force_constitution(nc, allowing, signers[:2], revision=5)
        await wait_for(
            lambda: layers.constitution.statistics().refused.get("broken") == 1,  # type: ignore[union-attr]
            what="the allowing constitution refused",
        )
        assert layers.constitution.active.policies.version == first.version
        refund = await _ask(nc, "guard.in.agent-1.payments.refund", "a")
        assert (refund["effect"], refund["reason"]) == ("deny", "no_matching_rule")
        shell = await _ask(nc, "guard.in.agent-1.tools.shell", "host:x")
        assert (shell["effect"], shell["rules"]) == ("deny", ["never-a-shell"])

        # A new constitution, its signers one after the other: in force at the quorum.
        await _push(
            nats_url, _constitution_dir(tmp_path, version="2"), signers[2], kind="constitution"
        )
        await _cli(cmd_sign, "policy", "sign", "--nats", nats_url, "--key", str(signers[0]))
        await wait_for(
            lambda: (
                layers.constitution.active.policies.version  # type: ignore[union-attr]
                == "constitution/constitution@2;rev=6"
            ),
            what="the second constitution",
        )
        shell = await _ask(nc, "guard.in.agent-1.tools.shell", "host:x")
        assert shell["policy_version"] == "constitution/constitution@2;rev=6"
        assert gateway.statistics().internal_errors == 0
    await nc.drain()


async def _force_constitution(
    nc: Client, directory: Path, signers: list[Path], *, revision: int
) -> None:
    """Store *directory* as a constitution without push's checks (what an attacker with
    the signers' keys, or a buggy publisher, could write)."""
    from bus_guard.policy._bundle import content_digest, encode_content

    compiled = compile_directory(directory)
    data = encode_content(compiled.content)
    digest = content_digest(data)
    js = nc.jetstream()
    store = await js.object_store("guard-policy-sets")
    await store.put(digest.replace(":", "-"), data)
    manifest = Manifest(
        kind="constitution",
        deployment="guard",
        revision=revision,
        digest=compiled.digest,
        version=compiled.policies.version,
        content=digest,
        size=len(data),
        issued_at=time.time(),
    )
    token = sign_constitution(manifest, [load_private_key(k) for k in signers])
    kv = await js.key_value("guard-policy")
    await kv.put(pointer_key("guard", "constitution"), token)


async def test_a_configured_constitution_that_is_missing_refuses_to_start(
    nats_url: str, tmp_path: Path
) -> None:
    publisher, publishers = generate_key(tmp_path / "publisher")
    _, constitution_keys = _keys(tmp_path, 2)
    await _push(nats_url, _ordinary_dir(tmp_path, "1"), publisher)
    source = PolicySourceSettings(
        publishers_file=publishers, constitution_keys_file=constitution_keys, constitution_quorum=2
    )
    with pytest.raises(GatewayError, match=re.escape("pointer.constitution.guard")):
        async with open_policies(Settings(nats_url=nats_url, mode="core"), source):
            pass
    # ... and a directory's policies need it just the same.
    with pytest.raises(GatewayError, match=re.escape("pointer.constitution.guard")):
        async with open_policies(
            Settings(nats_url=nats_url, mode="core"),
            PolicySourceSettings(
                directory=POLICIES,
                constitution_keys_file=constitution_keys,
                constitution_quorum=2,
            ),
        ):
            pass


def _manifest() -> Manifest:
    return Manifest(
        kind="constitution",
        deployment="guard",
        revision=1,
        digest="sha256:" + "0" * 64,
        version="c@1",
        content="sha256:" + "0" * 64,
        size=0,
        issued_at=1.0,
    )


def test_a_quorum_counts_distinct_trusted_keys_whose_signatures_verify(tmp_path: Path) -> None:
    signers, file = _keys(tmp_path, 3)
    keys = [load_private_key(k) for k in signers]
    trusted = load_jwks(file)
    stranger = load_private_key(generate_key(tmp_path / "stranger")[0])

    def read(token: bytes, quorum: int = 2, jwks: Jwks = trusted) -> Manifest:
        return read_constitution(token, jwks, quorum=quorum, now=2.0, deployment="guard")

    assert read(sign_constitution(_manifest(), keys[:2])).revision == 1
    assert read(add_signature(sign_constitution(_manifest(), keys[:1]), keys[2])).revision == 1
    for token, why in (
        (sign_constitution(_manifest(), keys[:1]), "1 valid signature"),
        (sign_constitution(_manifest(), [keys[0], keys[0]]), "1 valid signature"),
        (sign_constitution(_manifest(), [keys[0], stranger]), "not a constitution key"),
    ):
        with pytest.raises(BundleRefused, match=why) as caught:
            read(token)
        assert caught.value.reason == "quorum"
    # A payload changed after signing: no signature counts.
    good = json.loads(sign_constitution(_manifest(), keys[:2]))
    other = json.loads(sign_constitution(msgspec_replace(_manifest(), revision=9), keys[:1]))
    good["payload"] = other["payload"]
    with pytest.raises(BundleRefused, match="0 valid signatures"):
        read(json.dumps(good).encode())
    # A key revoked at 1.5 no longer counts at 2.0.
    from bus_guard.signing._keys import jwk_entry

    revoked = trusted.replace(jwk_entry(keys[1], revoked_at=1.5))
    with pytest.raises(BundleRefused, match="revoked"):
        read(sign_constitution(_manifest(), keys[:2]), jwks=revoked)
    with pytest.raises(BundleRefused) as refused:
        read(b'{"payload": "x", "signatures": []}')
    assert refused.value.reason == "unsigned"


def msgspec_replace(manifest: Manifest, **changes: Any) -> Manifest:
    import msgspec

    return msgspec.structs.replace(manifest, **changes)


def test_layers_decide_in_order_constitution_denials_first(tmp_path: Path) -> None:
    constitution = compile_directory(_constitution_dir(tmp_path)).policies
    ordinary = load_policies(_ordinary_dir(tmp_path, "1"))
    layered = LayeredSet(constitution, ordinary)

    def ask(action: str, resource: str, principal: str = "agent-1") -> tuple[str, tuple[str, ...]]:
        payload = intent(action, resource, {}, ts=1000.0)
        d = decide(layered, f"guard.in.{principal}.{action}", payload, now=1000.0)
        return d.effect.value, d.rules

    assert ask("tools.shell", "h") == ("deny", ("never-a-shell",))
    assert ask("tools.search", "secret:x") == ("hold", ("secrets-need-a-human",))
    assert ask("tools.search", "web") == ("allow", ("search-for-all",))
    assert ask("payments.transfer", "a") == ("deny", ())  # neither allows: default deny
    # An ordinary denial beats a constitution escalation.
    deny_search = tmp_path / "deny-search"
    deny_search.mkdir()
    (deny_search / "d.yaml").write_text(
        'bundle: d\nversion: "1"\nrules:\n  - {id: no-secrets, effect: deny, '
        'actions: [tools.search], resources: ["secret:*"]}\n'
    )
    strict = LayeredSet(constitution, load_policies(deny_search))
    payload = intent("tools.search", "secret:x", {}, ts=1000.0)
    d = decide(strict, "guard.in.agent-1.tools.search", payload, now=1000.0)
    assert (d.effect.value, d.rules) == ("deny", ("no-secrets",))
