"""Core and stream mode publish the same outputs for the same intents: one pipeline.

The same intents go through a core-mode gateway (a queue subscription, no ledger) and a
stream-mode gateway (JetStream intake, ledger) on a real nats-server, both with the same
gateway id and a fixed clock. Every output is compared field by field: subjects, bytes,
forwarded headers, deny/hold records, and the artifact claims. What may differ is what the
ledger adds: the decision id (a fresh ULID in core mode, derived from principal + intent
id in stream mode) and the artifact's ``ledger_seq``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from bus_guard.intake import Gateway, round_trip
from bus_guard.ledger import CheckpointSigner
from bus_guard.policy import PolicySet
from bus_guard.settings import ArtifactMode, Settings
from bus_guard.signing import Signer, load_private_key
from bus_guard.verify import Verifier, verify_message

from .helpers import Collector, intent
from .streamkit import FAST, drained, eventually, stored

NOW = 1_764_150_000.0
GATEWAY = "gw-modes"
# Headers the gateway sets on every output: they name the decision, which differs.
DECISION_HEADERS = frozenset({"Guard-Artifact", "Guard-Decision", "Nats-Msg-Id"})
INBOUND = {"traceparent": "00-abc-def-01", "Guard-Artifact": "forged", "Nats-Expected": "x"}


def _transfer(id_: str, amount: float, **kw: Any) -> bytes:
    params = {"amount": amount, "currency": "USD", "to": "account:acct-9"}
    return intent("payments.transfer", "account:acct-1", params, id=id_, **({"ts": NOW} | kw))


# (subject, payload, content type): one intent per decision path both modes share.
INTENTS: list[tuple[str, bytes, str | None]] = [
    ("guard.in.agent-7.payments.transfer", _transfer("i-allow", 120.5), None),
    (
        "guard.in.agent-7.payments.transfer",
        msgspec.msgpack.encode(
            {
                "id": "i-msgpack",
                "action": "payments.transfer",
                "resource": "account:acct-2",
                "params": {"amount": 3, "currency": "EUR", "to": "account:acct-1"},
                "ts": NOW,
            }
        ),
        "application/msgpack",
    ),
    (
        "guard.in.agent-1.tools.shell",
        intent("tools.shell", "tool:shell", {"cmd": "id"}, id="i-deny", ts=NOW),
        None,
    ),
    ("guard.in.agent-7.payments.transfer", _transfer("i-hold", 25000), None),
    ("guard.in.agent-7.payments.transfer", b'{"not": "an intent"}', None),
    ("guard.in.agent-7.payments.transfer", _transfer("i-spoof", 10, principal="agent-9"), None),
    ("guard.in.agent-7.payments.transfer", _transfer("i-old", 10, ts=NOW - 3600), None),
    ("guard.in.agent-7", b"{}", None),  # not an intent subject: guard.deny.~invalid
]


def _settings(url: str, mode: str, artifacts: ArtifactMode) -> Settings:
    return Settings(
        nats_url=url,
        mode=mode,  # type: ignore[arg-type]
        gateway_id=GATEWAY,
        artifacts=artifacts,
        stream=FAST,
    )


def _gateway(settings: Settings, policies: PolicySet, key: Path) -> Gateway:
    private = load_private_key(key)
    return Gateway(
        settings,
        policies,
        Signer(private, issuer=GATEWAY, ttl_s=60),
        clock=lambda: NOW,
        ledger_signer=CheckpointSigner(private),
    )


def _headers(headers: dict[str, str] | None) -> dict[str, str]:
    # Nats-Batch-*: JetStream's atomic-batch headers, stored with outputs that stream mode
    # published in one batch (storage, not the pipeline: they depend on the pull's size).
    return {
        k: v
        for k, v in (headers or {}).items()
        if k not in DECISION_HEADERS and not k.startswith("Nats-Batch-")
    }


def _claims(verifier: Verifier, subject: str, headers: dict[str, str], data: bytes) -> Any:
    claims = verify_message(verifier, subject=subject, headers=headers, payload=data, now=NOW)
    fields = msgspec.structs.asdict(claims)
    assert fields.pop("jti") == headers["Guard-Decision"] == headers["Nats-Msg-Id"]
    fields.pop("ledger_seq")
    return fields


def _record(data: bytes, headers: dict[str, str] | None) -> dict[str, Any]:
    record: dict[str, Any] = msgspec.json.decode(data)
    assert (headers or {}).get("Nats-Msg-Id") == record.pop("decision_id")
    return record


Output = tuple[str, str, bytes, Any]  # (role, subject, payload key, what is compared)


def _outputs(
    verifier: Verifier, role: str, messages: list[tuple[str, bytes, dict[str, str] | None]]
) -> list[Output]:
    out: list[Output] = []
    for subject, data, headers in messages:
        if role == "exec":
            assert headers is not None
            compared = (data, _headers(headers), _claims(verifier, subject, headers, data))
            out.append((role, subject, data, compared))
        else:
            record = _record(data, headers)
            out.append((role, subject, record["payload_sha256"].encode(), record))
    return sorted(out, key=lambda o: (o[0], o[1], o[2]))


async def _core(url: str, policies: PolicySet, key: Path, art: ArtifactMode) -> list[Output]:
    nc = await nats.connect(url)
    collectors = {
        role: await Collector.on(nc, f"guard.{role}.>") for role in ("exec", "deny", "hold")
    }
    async with _gateway(_settings(url, "core", art), policies, key) as gw:
        for subject, payload, ctype in INTENTS:
            headers = dict(INBOUND) | ({"Content-Type": ctype} if ctype else {})
            await nc.publish(subject, payload, headers=headers)
    # The gateway drained on exit (its outputs reached the server); our own round trip
    # then proves every output routed to us has arrived.
    await round_trip(nc)
    assert gw.statistics().received == len(INTENTS)
    assert sum(len(c.msgs) for c in collectors.values()) == len(INTENTS)
    verifier = Verifier(key.parent / "jwks.json")
    out = [
        o
        for role, c in collectors.items()
        for o in _outputs(verifier, role, [(m.subject, m.data, m.headers) for m in c.msgs])
    ]
    await nc.close()
    return sorted(out, key=lambda o: (o[0], o[1], o[2]))


async def _stream(url: str, policies: PolicySet, key: Path, art: ArtifactMode) -> list[Output]:
    nc: Client = await nats.connect(url)
    js = nc.jetstream()
    async with _gateway(_settings(url, "stream", art), policies, key) as gw:
        for subject, payload, ctype in INTENTS:
            headers = dict(INBOUND) | ({"Content-Type": ctype} if ctype else {})
            await js.publish(subject, payload, headers=headers)
        await eventually(lambda: drained(js), what="intake drained")
    assert gw.statistics().acks == len(INTENTS)
    verifier = Verifier(key.parent / "jwks.json")
    out = []
    for role in ("exec", "deny", "hold"):
        msgs = await stored(nc, f"GUARD_{role.upper()}")
        out += _outputs(verifier, role, [(m.subject, m.data, dict(m.headers)) for m in msgs])
    await nc.close()
    return sorted(out, key=lambda o: (o[0], o[1], o[2]))


@pytest.mark.parametrize("artifacts", ["per-message", "batched"])
async def test_core_and_stream_mode_publish_the_same_outputs(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, artifacts: ArtifactMode
) -> None:
    core = await _core(nats_url, policies, keys[0], artifacts)
    stream = await _stream(nats_url, policies, keys[0], artifacts)
    assert [o[:2] for o in core] == [o[:2] for o in stream]
    # One output per intent, on the subject each path says.
    assert sorted((o[0], o[1]) for o in core) == sorted(
        [
            ("exec", "guard.exec.agent-7.payments.transfer"),
            ("exec", "guard.exec.agent-7.payments.transfer"),
            ("deny", "guard.deny.agent-1.tools.shell"),
            ("hold", "guard.hold.agent-7.payments.transfer"),
            ("deny", "guard.deny.agent-7.payments.transfer"),
            ("deny", "guard.deny.agent-7.payments.transfer"),
            ("deny", "guard.deny.agent-7.payments.transfer"),
            ("deny", "guard.deny.~invalid"),
        ]
    )
    for c, s in zip(core, stream, strict=True):
        assert c == s, f"{c[0]} on {c[1]} differs between core and stream mode"
    # Untrusted inbound headers never reach exec; trace context does.
    for role, _, _, compared in core:
        if role == "exec":
            assert compared[1] == {"traceparent": INBOUND["traceparent"]} | (
                {"Content-Type": "application/msgpack"} if b"i-msgpack" in compared[0] else {}
            )


async def test_core_mode_refuses_to_start_beside_an_intake_stream(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Mode mixing (issue 13): once a stream-mode gateway has created the intake stream, a
    core-mode gateway on the same server refuses to start (the stream would answer agents
    and a stream-mode gateway would decide every intent again), naming the stream; and
    nothing it could have decided is published meanwhile."""
    from bus_guard.errors import GatewayError

    nc = await nats.connect(nats_url)
    async with _gateway(_settings(nats_url, "stream", "per-message"), policies, keys[0]):
        pass  # creates GUARD_IN (and the rest), then stops
    with pytest.raises(GatewayError, match=r"GUARD_IN captures guard\.in\.>"):
        async with _gateway(_settings(nats_url, "core", "per-message"), policies, keys[0]):
            pass
    await nc.close()


async def test_core_mode_starts_where_no_stream_captures_the_intake(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """Streams that do not capture the intake (here the exec stream alone) do not stop it."""
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name="GUARD_EXEC", subjects=["guard.exec.>"])
    async with _gateway(_settings(nats_url, "core", "per-message"), policies, keys[0]) as gw:
        assert gw.statistics().received == 0
    await nc.close()
