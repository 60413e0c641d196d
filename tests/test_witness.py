"""Witnessed checkpoints (issue 13): what the audit alone cannot see, a witness can.

Two gateways write a real ledger (checkpoints every 50 records); a witness follows it and
countersigns every sound chain start and checkpoint into its own directory. Then the
tampering an admin with stream rights can do, each of which the audit alone passes:
the ledger rebuilt without its tail, one gateway's chain dropped, a witnessed checkpoint
replaced; and the witness's own log tampered with. Nothing tampered: no finding.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.errors import ConfigError
from bus_guard.intake._jetstream import read
from bus_guard.ledger._audit import audit
from bus_guard.ledger._records import CHECKPOINT, LedgerRecord, Stored, decode_record
from bus_guard.ledger._witness import (
    REGISTERED,
    Witness,
    check_against_witness,
    load_witnessed,
)
from bus_guard.policy._load import PolicySet
from bus_guard.signing import public_jwk
from bus_guard.signing._keys import generate_key
from bus_guard.verify import Jwks, load_jwks

from .helpers import intent
from .streamkit import drained, eventually, stream_gateway, stream_settings

SEARCH = "guard.in.agent-1.tools.search"
CHAIN_SUBJECT = "guard.ledger.gw-t.c"  # a gateway's chain starts and checkpoints


async def _ledger(nats_url: str, key: Path, policies: PolicySet) -> list[Stored]:
    """Two gateways' chains, each with checkpoints, sealed."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for gateway in ("gw-a", "gw-b"):
        async with stream_gateway(stream_settings(nats_url, gateway), policies, key):
            for i in range(120):
                body = intent("tools.search", "tool:search", {"q": f"{gateway}-{i}"})
                await js.publish("guard.in.agent-1.tools.search", body)
            await eventually(lambda: drained(js), what="intake drained")
    ledger = [m async for m in read(nc, "GUARD_LEDGER", "guard.ledger.>")]
    await nc.close()
    return ledger


def _renumbered(messages: list[Stored]) -> list[Stored]:
    """As a re-created stream would hold them: stream seqs from 1, no gaps."""
    return [Stored(i, m.subject, m.data, m.headers) for i, m in enumerate(messages, 1)]


def _witness_jwks(key: Ed25519PrivateKey) -> Jwks:
    return load_jwks({"keys": [public_jwk(key)]})


@pytest.fixture
async def witnessed(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, tmp_path: Path
) -> tuple[list[Stored], Path, Jwks]:
    ledger = await _ledger(nats_url, keys[0], policies)
    witness_key = Ed25519PrivateKey.generate()
    witness = Witness(tmp_path / "witness", witness_key, load_jwks(keys[1]))
    for stored in ledger:
        witness.feed(stored)
    assert witness.refused == []
    assert witness.countersigned >= 6  # per gateway: chain start, checkpoints, final
    assert set(witness.heads) == {"gw-a", "gw-b"}
    return ledger, tmp_path / "witness", _witness_jwks(witness_key)


async def test_an_untouched_ledger_matches_its_witness(
    witnessed: tuple[list[Stored], Path, Jwks],
) -> None:
    ledger, directory, jwks = witnessed
    heads = load_witnessed(directory, jwks)
    assert check_against_witness(ledger, heads) == []


async def test_a_ledger_rebuilt_without_its_tail_passes_the_audit_but_not_the_witness(
    witnessed: tuple[list[Stored], Path, Jwks], keys: tuple[Path, Path]
) -> None:
    ledger, directory, jwks = witnessed
    # gw-b's chain cut after its first checkpoint, then re-created: internally consistent
    records = [decode_record(m.data) for m in ledger]
    first_b = next(i for i, r in enumerate(records) if r.gateway == "gw-b" and r.kind == CHECKPOINT)
    kept = [m for i, m in enumerate(ledger) if records[i].gateway == "gw-a" or i <= first_b]
    rebuilt = _renumbered(kept)
    assert audit(rebuilt, prefix="guard", jwks=load_jwks(keys[1])).ok
    found = check_against_witness(rebuilt, load_witnessed(directory, jwks))
    assert found and all(line.startswith("gateway gw-b seq ") for line in found)
    assert any("missing from the ledger" in line for line in found)


async def test_a_dropped_chain_is_found(
    witnessed: tuple[list[Stored], Path, Jwks], keys: tuple[Path, Path]
) -> None:
    ledger, directory, jwks = witnessed
    rebuilt = _renumbered([m for m in ledger if decode_record(m.data).gateway != "gw-a"])
    assert audit(rebuilt, prefix="guard", jwks=load_jwks(keys[1])).ok
    [line] = check_against_witness(rebuilt, load_witnessed(directory, jwks))
    assert "gateway gw-a: its chain is gone" in line


async def test_a_replaced_checkpoint_is_found_and_not_countersigned_again(
    witnessed: tuple[list[Stored], Path, Jwks], keys: tuple[Path, Path]
) -> None:
    ledger, directory, jwks = witnessed
    records = [decode_record(m.data) for m in ledger]
    i = next(i for i, r in enumerate(records) if r.kind == CHECKPOINT)
    forged = msgspec.structs.replace(records[i], ts=records[i].ts + 1)
    tampered = list(ledger)
    tampered[i] = Stored(ledger[i].seq, ledger[i].subject, msgspec.json.encode(forged))
    [line] = [
        f for f in check_against_witness(tampered, load_witnessed(directory, jwks)) if "seq" in f
    ][:1]
    assert "holds another record there" in line
    # a witness restarted on the tampered ledger refuses it
    again = Witness(directory, Ed25519PrivateKey.generate(), load_jwks(keys[1]))
    for stored in tampered:
        again.feed(stored)
    assert any("another record than the one witnessed" in r for r in again.refused)


async def test_a_witness_refuses_to_countersign_past_a_gap(
    witnessed: tuple[list[Stored], Path, Jwks], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    ledger, _, _ = witnessed
    records = [decode_record(m.data) for m in ledger]
    gap = next(i for i, r in enumerate(records) if r.kind == "decision")
    fresh = Witness(tmp_path / "fresh", Ed25519PrivateKey.generate(), load_jwks(keys[1]))
    for n, stored in enumerate(ledger):
        if n != gap:
            fresh.feed(stored)
    assert any("not countersigned" in r for r in fresh.refused)
    assert records[gap].gateway not in fresh.heads or fresh.heads[records[gap].gateway].seq < (
        records[gap].seq
    )


async def test_a_tampered_witness_log_does_not_load(
    witnessed: tuple[list[Stored], Path, Jwks],
) -> None:
    _, directory, jwks = witnessed
    log = directory / "witnessed.jsonl"
    lines = log.read_text().splitlines()
    token = json.loads(lines[0])["jws"]
    header, claims, sig = token.split(".")
    lines[0] = json.dumps({"jws": f"{header}.{claims}.{sig[:-4]}AAAA"})
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="does not verify"):
        load_witnessed(directory, jwks)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus_guard", *argv], capture_output=True, text=True, timeout=60
    )


async def test_the_witness_command_and_ledger_verify_with_the_witness(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, tmp_path: Path
) -> None:
    """Through the entry point: `bus-guard witness` countersigns a real ledger; `ledger
    verify --witness` passes on it, and fails once the ledger is deleted and re-created
    without one gateway's chain (which the audit alone passes)."""
    ledger = await _ledger(nats_url, keys[0], policies)
    wkey, wjwks = generate_key(tmp_path / "witness-keys")
    wdir = str(tmp_path / "witness")
    run = functools.partial(anyio.to_thread.run_sync)
    witnessed = await run(
        lambda: _cli(
            "witness",
            "--nats",
            nats_url,
            "--dir",
            wdir,
            "--key",
            str(wkey),
            "--jwks",
            str(keys[1]),
            "--once",
        )
    )
    assert witnessed.returncode == 0, witnessed.stdout + witnessed.stderr
    assert "countersigned gw-a seq 0 (chain_start)" in witnessed.stdout
    assert "registered gw-a run " in witnessed.stdout  # from the gateway registry
    verify = (
        "ledger",
        "verify",
        "--nats",
        nats_url,
        "--jwks",
        str(keys[1]),
        "--witness",
        wdir,
        "--witness-jwks",
        str(wjwks),
    )
    good = await run(lambda: _cli(*verify))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "countersigned chain head(s) present" in good.stdout

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = (await js.stream_info("GUARD_LEDGER")).config
    await js.delete_stream("GUARD_LEDGER")
    await js.add_stream(config)
    for m in ledger:
        if decode_record(m.data).gateway == "gw-b":
            await js.publish(m.subject, m.data)
    await nc.close()
    audit_only = await run(lambda: _cli(*verify[:6]))
    assert audit_only.returncode == 0, audit_only.stdout  # the rebuilt copy audits clean
    bad = await run(lambda: _cli(*verify))
    assert bad.returncode == 1
    assert "gateway gw-a: its chain is gone" in bad.stdout


async def _registry(nats_url: str) -> list[Stored]:
    """The gateway registry's history (the lease bucket), as the witness reads it."""
    nc = await nats.connect(nats_url)
    try:
        return [m async for m in read(nc, "KV_guard-gateways", "$KV.guard-gateways.>")]
    finally:
        await nc.close()


async def test_a_dropped_chain_is_found_from_the_registry_without_any_checkpoint(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, tmp_path: Path
) -> None:
    """The witness saw both gateways' runs in the registry but countersigned no checkpoint
    of gw-a (its chain was dropped before the witness read the ledger): the rebuilt ledger
    without gw-a audits clean, passes the checkpoints alone, and fails on the registry."""
    ledger = await _ledger(nats_url, keys[0], policies)
    registry = await _registry(nats_url)
    witness_key = Ed25519PrivateKey.generate()
    witness = Witness(tmp_path / "witness", witness_key, load_jwks(keys[1]))
    runs = [
        w
        for m in registry
        if (w := witness.register(m.subject.removeprefix("$KV.guard-gateways."), m.data))
    ]
    # each gateway's run, when seen renewed or ended; the same value again adds nothing
    assert {(w.gateway, w.kind) for w in runs} == {("gw-a", REGISTERED), ("gw-b", REGISTERED)}
    assert any(w.final for w in runs)
    assert [witness.register(m.subject.split(".")[-1], m.data) for m in registry] == [None] * len(
        registry
    )
    rebuilt = _renumbered([m for m in ledger if decode_record(m.data).gateway != "gw-a"])
    for stored in rebuilt:  # what the witness then read of the ledger: gw-b only
        witness.feed(stored)
    assert set(witness.heads) == {"gw-b"}
    assert audit(rebuilt, prefix="guard", jwks=load_jwks(keys[1])).ok

    heads = load_witnessed(tmp_path / "witness", _witness_jwks(witness_key))
    checkpoints_only = [w for w in heads if w.kind != REGISTERED]
    assert check_against_witness(rebuilt, checkpoints_only) == []  # nothing of gw-a to miss
    [line] = check_against_witness(rebuilt, heads)
    assert line.startswith("gateway gw-a: its chain is gone from the ledger (dropped)")
    assert "registered a run of it" in line
    assert check_against_witness(ledger, heads) == []  # the untouched ledger: no finding


async def test_a_registered_run_cut_from_a_chain_is_found(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, tmp_path: Path
) -> None:
    """gw-a ran twice (two runs in the registry); the ledger rebuilt without the second run's
    records, with no checkpoint of it witnessed: the registry names the missing run."""
    await _ledger(nats_url, keys[0], policies)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with stream_gateway(stream_settings(nats_url, "gw-a"), policies, keys[0]):
        await js.publish("guard.in.agent-1.tools.search", intent("tools.search", "tool:search"))
        await eventually(lambda: drained(js), what="intake drained")
    ledger = [m async for m in read(nc, "GUARD_LEDGER", "guard.ledger.>")]
    await nc.close()
    witness_key = Ed25519PrivateKey.generate()
    witness = Witness(tmp_path / "witness", witness_key, load_jwks(keys[1]))
    for m in await _registry(nats_url):
        witness.register(m.subject.removeprefix("$KV.guard-gateways."), m.data)
    records = [decode_record(m.data) for m in ledger]
    runs = [(i, r.epoch) for i, r in enumerate(records) if r.gateway == "gw-a" and r.epoch]
    assert len({epoch for _, epoch in runs}) == 2
    start, last_run = next((i, e) for i, e in runs if e == runs[-1][1])
    # gw-a's chain as it was before its second run: no record of that run
    cut = _renumbered(
        [m for i, m in enumerate(ledger) if records[i].gateway != "gw-a" or i < start]
    )
    assert audit(cut, prefix="guard", jwks=load_jwks(keys[1])).ok
    heads = load_witnessed(tmp_path / "witness", _witness_jwks(witness_key))
    [line] = check_against_witness(cut, heads)
    assert f"(epoch {last_run}, registered) left no record in the ledger" in line


async def test_time_based_checkpoints_bound_the_unsealed_tail_in_seconds(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """With a record count no run reaches, a signed checkpoint still follows the last
    decision within --checkpoint-interval (plus one fetch timeout), while the gateway is
    idle: what a witness cannot see (the tail after its last countersigned checkpoint) is
    bounded in seconds, not only in records."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(
        nats_url, "gw-t", checkpoint_every=100_000, checkpoint_interval_s=1.0
    )

    async def chain() -> list[LedgerRecord]:
        return [decode_record(m.data) async for m in read(nc, "GUARD_LEDGER", CHAIN_SUBJECT)]

    async def checkpointed_after(seq: int) -> bool:
        return any(r.kind == CHECKPOINT and not r.final and r.seq > seq for r in await chain())

    async with stream_gateway(settings, policies, keys[0]):
        for i in range(5):
            await js.publish(SEARCH, intent("tools.search", "tool:search", {"q": f"t-{i}"}))
        await eventually(lambda: drained(js), what="intake drained")
        records = [decode_record(m.data) async for m in read(nc, "GUARD_LEDGER", "guard.ledger.>")]
        last = max((r for r in records if r.kind == "decision"), key=lambda r: r.seq)
        await eventually(lambda: checkpointed_after(last.seq), what="a time-based checkpoint")
    checkpoint = next(r for r in await chain() if r.kind == CHECKPOINT and r.seq > last.seq)
    await nc.close()
    assert not checkpoint.final  # written while running, not at shutdown
    # interval 1 s + fetch timeout 0.5 s, and a loaded machine's slack
    assert checkpoint.ts - last.ts < 1.0 + 0.5 + 3.0
