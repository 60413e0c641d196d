"""The compose topology's policy publisher (issue 12): the shipped ``publisher`` user pushes
and signs bundles (the content store and the pointers), and can do nothing else on the bus:
no gateway subject, no other stream, no purge of the archived sets, no consumer."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from bus_guard.cli._main import main
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key

from .policykit import POLICIES
from .test_topology import CREDENTIALS, Bus, guard_nats, pub_violation

__all__ = ("guard_nats",)  # the fixture, imported: a nats-server with the compose config


async def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(main, list(argv), out=out)
    return code, out.getvalue()


async def test_the_publisher_pushes_and_signs_bundles_and_nothing_else(
    guard_nats: NatsServer, tmp_path: Path
) -> None:
    url = guard_nats.url.replace("nats://", f"nats://publisher:{CREDENTIALS['publisher']}@")
    key, _ = generate_key(tmp_path / "publisher")
    signers = [generate_key(tmp_path / f"signer-{i}")[0] for i in range(2)]
    for revision in (1, 2):  # the second numbers itself after the pointer's history
        code, text = await _cli("policy", "push", str(POLICIES), "--nats", url, "--key", str(key))
        assert code == 0 and f"pushed policy revision {revision} of guard" in text, text
    constitution = tmp_path / "constitution"
    constitution.mkdir()
    (constitution / "c.yaml").write_text(
        'bundle: c\nversion: "1"\nrules:\n'
        "  - {id: never-a-shell, effect: deny, actions: [tools.shell]}\n"
    )
    code, text = await _cli(
        "policy", "push", str(constitution), "--kind", "constitution", "--nats", url,
        "--key", str(signers[0]),
    )  # fmt: skip
    assert code == 0, text
    code, text = await _cli("policy", "sign", "--nats", url, "--key", str(signers[1]))
    assert code == 0 and "2 signatures" in text, text

    async with Bus() as bus:
        gateway = await bus.connect(guard_nats.url, "gateway")
        kv = await gateway.nc.jetstream().key_value("guard-policy")
        assert sorted(await kv.keys()) == ["pointer.constitution.guard", "pointer.policy.guard"]
        publisher = await bus.connect(guard_nats.url, "publisher")
        js = publisher.nc.jetstream(timeout=1)
        probe = await publisher.collect("_INBOX.publisher-probe")
        attempts = [
            "guard.exec.agent-7.payments.transfer",
            "guard.ledger.gw-1.d.FORGED",
            "$JS.API.STREAM.PURGE.OBJ_guard-policy-sets",
            "$JS.API.STREAM.DELETE.KV_guard-policy",
            "$JS.API.STREAM.CREATE.GUARD_EXEC",
            "$JS.API.CONSUMER.CREATE.KV_guard-policy",
            "$KV.guard-policy.status.gw-1",  # a gateway's status is the gateway's to write
        ]
        for subject in attempts:
            await publisher.nc.publish(subject, b"{}", reply="_INBOX.publisher-probe")
        assert await publisher.errors() == [pub_violation(s) for s in attempts]
        assert probe.msgs == []
        # What push itself sends is allowed: stream info of the two stores.
        assert (await js.stream_info("OBJ_guard-policy-sets")).state.messages > 0
        assert await gateway.errors() == []
