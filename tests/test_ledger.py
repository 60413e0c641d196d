"""The ledger is tamper-evident: ``bus-guard ledger verify`` passes an untouched ledger and
fails, naming the first bad record, when records are deleted, modified, reordered,
inserted or cut off, or a checkpoint is forged.

The ledger stream itself refuses deletes and purges (deny_delete / deny_purge), so each
tampering is applied to a copy of a real ledger (what someone with the server's disks, or
an operator who rebuilt the stream, could produce) under another prefix.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js.api import StreamConfig

from bus_guard.cli import _ledger as audit_module
from bus_guard.cli._main import main
from bus_guard.cli._safe import safe
from bus_guard.intake._jetstream import Stored, read
from bus_guard.ledger._audit import audit
from bus_guard.policy._load import load_policies
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key
from bus_guard.verify import load_jwks

from .conftest import POLICIES
from .helpers import HOSTILE, intent, terminal_safe
from .streamkit import drained, eventually, stored, stream_gateway, stream_settings


@dataclass(frozen=True)
class Ledger:
    url: str
    jwks: Path
    msgs: list[Stored]


async def _make_ledger(url: str, key: Path) -> list[Stored]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    policies = load_policies(POLICIES)
    settings = stream_settings(url, checkpoint_every=4)
    for run in range(2):  # two runs: the second chain start pins the first run's end
        async with stream_gateway(settings, policies, key):
            for i in range(6):
                tool = "shell" if i % 3 == 0 else "search"
                await js.publish(
                    f"guard.in.agent-1.tools.{tool}",
                    intent(f"tools.{tool}", f"tool:{tool}", {"i": i}, id=f"r{run}-{i}"),
                )
            await eventually(lambda: drained(js), what="intake drained")
    msgs = await stored(nc, "GUARD_LEDGER")
    await nc.close()
    return msgs


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    key, jwks = generate_key(tmp_path_factory.mktemp("keys"))
    with NatsServer() as server:
        yield Ledger(server.url, jwks, asyncio.run(_make_ledger(server.url, key)))


def _verify(ledger: Ledger, prefix: str, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    argv = ["ledger", "verify", "--nats", ledger.url, "--jwks", str(ledger.jwks)]
    code = main([*argv, "--prefix", prefix, *extra], out=out)
    return code, out.getvalue()


async def _copy(ledger: Ledger, prefix: str, msgs: list[Stored]) -> None:
    """Publish *msgs* in order into a fresh ledger-like stream under *prefix*."""
    nc = await nats.connect(ledger.url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=f"{prefix.upper()}_LEDGER", subjects=[f"{prefix}.ledger.>"], allow_direct=True
        )
    )
    for m in msgs:
        await js.publish(prefix + m.subject.removeprefix("guard"), m.data)
    await nc.close()


def _decisions(msgs: list[Stored]) -> list[int]:
    return [i for i, m in enumerate(msgs) if ".d." in m.subject]


def _edit(m: Stored, **changes: object) -> Stored:
    record = json.loads(m.data)
    record.update(changes)
    return replace(m, data=msgspec.json.encode(record))


def test_the_real_ledger_verifies_and_refuses_deletes(ledger: Ledger) -> None:
    code, text = _verify(ledger, "guard", "--require-sealed")
    assert code == 0, text
    assert "OK" in text and "gw-1: seq 0.." in text and "sealed" in text

    async def try_delete() -> None:
        nc = await nats.connect(ledger.url)
        try:
            with pytest.raises(nats.js.errors.APIError):
                await nc.jetstream().delete_msg("GUARD_LEDGER", 3)
            with pytest.raises(nats.js.errors.APIError):
                await nc.jetstream().purge_stream("GUARD_LEDGER")
        finally:
            await nc.close()

    asyncio.run(try_delete())


Tamper = Callable[[list[Stored]], list[Stored]]


def _delete_one(msgs: list[Stored]) -> list[Stored]:
    i = _decisions(msgs)[3]
    return msgs[:i] + msgs[i + 1 :]


def _modify_one(msgs: list[Stored]) -> list[Stored]:
    i = next(i for i in _decisions(msgs) if json.loads(msgs[i].data)["effect"] == "deny")
    return [*msgs[:i], _edit(msgs[i], effect="allow", reason="allowed_by_rule"), *msgs[i + 1 :]]


def _reorder_two(msgs: list[Stored]) -> list[Stored]:
    i, j = _decisions(msgs)[1:3]
    out = list(msgs)
    out[i], out[j] = out[j], out[i]
    return out


def _insert_one(msgs: list[Stored]) -> list[Stored]:
    i = _decisions(msgs)[2]
    forged = _edit(msgs[i], decision_id="0" * 26, intent_id="forged")
    forged = replace(forged, subject=forged.subject.rsplit(".", 1)[0] + "." + "0" * 26)
    return [*msgs[: i + 1], forged, *msgs[i + 1 :]]


def _cut_before_restart(msgs: list[Stored]) -> list[Stored]:
    restart = [i for i, m in enumerate(msgs) if json.loads(m.data)["kind"] == "chain_start"][1]
    return msgs[: restart - 3] + msgs[restart:]


def _forge_checkpoint(msgs: list[Stored]) -> list[Stored]:
    i = next(i for i, m in enumerate(msgs) if json.loads(m.data)["kind"] == "checkpoint")
    return [*msgs[:i], _edit(msgs[i], ts=1.0), *msgs[i + 1 :]]


@pytest.mark.parametrize(
    ("name", "tamper", "expect"),
    [
        ("deleted", _delete_one, "missing (deleted or truncated)"),
        ("modified", _modify_one, "one of the two was modified"),
        ("reordered", _reorder_two, "reordered"),
        ("inserted", _insert_one, "reordered, replayed or forked"),
        ("cut-before-restart", _cut_before_restart, "missing (deleted or truncated)"),
        ("forged-checkpoint", _forge_checkpoint, "signature does not cover"),
    ],
)
async def test_tampering_is_detected_and_the_first_bad_record_named(
    ledger: Ledger, name: str, tamper: Tamper, expect: str
) -> None:
    prefix = f"t{name.replace('-', '')}"
    await _copy(ledger, prefix, tamper(ledger.msgs))
    code, text = await asyncio.to_thread(_verify, ledger, prefix)
    assert code == 1, text
    first = text.split("the first bad record:")[1].splitlines()[1]
    assert expect in first and "gateway gw-1 seq" in first, text


async def test_an_untouched_copy_verifies(ledger: Ledger) -> None:
    await _copy(ledger, "copy", ledger.msgs)
    code, text = await asyncio.to_thread(_verify, ledger, "copy", "--require-sealed")
    assert code == 0, text


async def test_truncating_the_tail_breaks_the_seal(ledger: Ledger) -> None:
    """Cutting off the end (final checkpoint included) looks like a gateway that is still
    running or crashed: an open chain. Auditing stopped gateways with --require-sealed
    catches it; without, the open tail is reported, and passes (see audit's docstring)."""
    await _copy(ledger, "cut", ledger.msgs[:-3])
    code, text = await asyncio.to_thread(_verify, ledger, "cut", "--require-sealed")
    assert code == 1 and "not sealed by a final checkpoint" in text
    code, text = await asyncio.to_thread(_verify, ledger, "cut")
    assert code == 0 and "open: " in text


async def test_a_message_deleted_from_the_stream_is_named(ledger: Ledger) -> None:
    await _copy(ledger, "gap", ledger.msgs)
    nc = await nats.connect(ledger.url)
    await nc.jetstream().delete_msg("GAP_LEDGER", 5)
    await nc.close()
    code, text = await asyncio.to_thread(_verify, ledger, "gap")
    assert code == 1 and "stream message(s) 5 deleted" in text


def test_audit_is_pure_and_names_stream_positions(ledger: Ledger) -> None:
    report = audit(ledger.msgs, prefix="guard", jwks=load_jwks(ledger.jwks), require_sealed=True)
    assert report.ok and len(report.chains) == 1
    report = audit(_delete_one(ledger.msgs), prefix="guard", jwks=load_jwks(ledger.jwks))
    deleted = ledger.msgs[_decisions(ledger.msgs)[3]]
    # The original stream positions: a gap in the stream, and one in gw-1's chain, both
    # noticed at the message after the deleted one.
    stream_gap, chain_gap = report.problems[:2]
    assert stream_gap.stream_seq == chain_gap.stream_seq == deleted.seq + 1
    assert f"stream message(s) {deleted.seq} deleted" in stream_gap.message
    assert chain_gap.gateway == "gw-1" and "missing" in chain_gap.message


async def test_read_pages_through_batches_and_stops_as_of_the_call(nats_url: str) -> None:
    """read(): batched direct gets filtered on a subject, continued after each batch's last
    sequence, stopping at what was stored when the read began; headers as stored."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="PAGES", subjects=["p.>"], allow_direct=True))
    for i in range(9):
        await js.publish(f"p.{'x' if i % 3 else 'y'}.{i}", b"%d" % i, headers={"H": str(i)})
    got = []
    async for m in read(nc, "PAGES", "p.x.>", batch=2):
        got.append(m)
        if len(got) == 1:  # stored during the read: not part of it
            await js.publish("p.x.late", b"late")
    assert [(m.seq, m.subject, m.data) for m in got] == [
        (i + 1, f"p.x.{i}", b"%d" % i) for i in (1, 2, 4, 5, 7, 8)
    ]
    assert [m.headers for m in got] == [{"H": str(i)} for i in (1, 2, 4, 5, 7, 8)]
    assert [m.seq async for m in read(nc, "PAGES", "p.>", start_seq=8, batch=1)] == [8, 9, 10]
    assert [m async for m in read(nc, "PAGES", "p.z.>")] == []
    assert [m async for m in read(nc, "PAGES", "p.>", start_seq=11)] == []
    await js.add_stream(StreamConfig(name="NODIRECT", subjects=["q.>"]))
    await js.publish("q.1", b"1")
    for stream in ("NODIRECT", "MISSING"):
        with pytest.raises(nats.js.errors.NotFoundError):
            [m async for m in read(nc, stream, ">")]
    await nc.close()


async def test_a_replica_behind_the_leader_is_read_again_not_called_a_deletion(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a replicated ledger a direct get may be answered by a replica a moment behind the
    stream info's last_seq. The first read here stops three records short (as such a
    replica would); verify reads the rest again and passes, where it used to report the
    newest records deleted. A real gap stays reported (the deleted-message test above)."""
    await _copy(ledger, "lag", ledger.msgs)
    reads: list[int] = []

    async def lagging(*args: object, **kw: object) -> AsyncIterator[Stored]:
        reads.append(int(kw.get("start_seq", 1)))  # type: ignore[call-overload]
        behind = len(reads) == 1
        async for message in read(*args, **kw):  # type: ignore[arg-type]
            if behind and message.seq > len(ledger.msgs) - 3:
                return
            yield message

    monkeypatch.setattr(audit_module, "read", lagging)
    code, text = await asyncio.to_thread(_verify, ledger, "lag", "--require-sealed")
    assert code == 0, text
    assert reads == [1, len(ledger.msgs) - 2]  # the rest, from where the first read stopped


async def test_what_the_audit_quotes_is_escaped(ledger: Ledger) -> None:
    msgs = list(ledger.msgs)
    first, second = _decisions(msgs)[1:3]
    msgs[first] = _edit(msgs[first], kind=HOSTILE)
    msgs[second] = _edit(msgs[second], gateway=HOSTILE, message=HOSTILE)
    await _copy(ledger, "hostile", msgs)
    code, text = await asyncio.to_thread(_verify, ledger, "hostile")
    assert code == 1, text
    lines = terminal_safe(text)
    assert sum(safe(HOSTILE) in line for line in lines) == 2, text


def test_a_checkpoint_signed_after_its_keys_revocation_is_refused(tmp_path: Path) -> None:
    """A revoked (compromised) key vouches for nothing from its revocation on; what it
    signed before stays valid."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from bus_guard.ledger._records import CheckpointClaims, CheckpointSigner, LedgerRecord
    from bus_guard.ledger._records import check_signature as check_checkpoint
    from bus_guard.signing._keys import revoke_key

    key_path, jwks_path = generate_key(tmp_path)
    private = load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(private, Ed25519PrivateKey)
    signer = CheckpointSigner(private)

    def checkpoint(ts: float) -> LedgerRecord:
        fields = {"kind": "checkpoint", "gateway": "gw", "seq": 7, "prev": "x", "ts": ts}
        sig = signer.sign(CheckpointClaims(**fields, epoch="e"))  # type: ignore[arg-type]
        return LedgerRecord(**fields, epoch="e", sig=sig)  # type: ignore[arg-type]

    before, after = checkpoint(1_000.0), checkpoint(3_000.0)
    jwks = load_jwks(jwks_path)
    assert check_checkpoint(before, jwks) is None
    assert check_checkpoint(after, jwks) is None
    revoked = revoke_key(jwks_path, signer.kid, now=2_000.0)
    assert check_checkpoint(before, revoked) is None
    why = check_checkpoint(after, revoked)
    assert why is not None and "revocation" in why and signer.kid in why
