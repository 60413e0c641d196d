"""SCENARIOS S12 through a real gateway: exactly one denial per bad input, no crash, no exec.

The bad inputs are generated from a seed over every malformed class (random bytes, invalid
UTF-8, duplicate keys, deep nesting, huge integers, NaN/Infinity, wrong types, unknown
fields, over-size blobs, msgpack garbage). After them a valid intent must still be allowed,
which proves the gateway survived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.policy._load import PolicySet
from bus_guard.settings import Settings

from .helpers import intent, make_signer, outputs

SUBJECT = "guard.in.agent-1.tools.search"


def _digest(payload: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()


def bad_inputs(seed: int, n: int) -> list[tuple[bytes, str | None]]:
    rng = random.Random(seed)
    good = json.loads(intent("tools.search", "tool:search", {"q": "x"}))
    out: list[tuple[bytes, str | None]] = []
    makers: list[Callable[[], tuple[bytes, str | None]]] = [
        lambda: (rng.randbytes(rng.randint(0, 300)), None),
        lambda: (b'{"id": "\xff\xfe", "action": "tools.search"}', None),
        lambda: (json.dumps(good).encode()[:-1] + b', "id": "dup"}', None),
        lambda: (
            json.dumps({**good, "params": {"a": json.loads("[" * 40 + "]" * 40)}}).encode(),
            None,
        ),
        lambda: (json.dumps({**good, "params": {"n": 10 ** rng.randint(20, 4000)}}).encode(), None),
        lambda: (json.dumps({**good, "params": {"x": float("nan")}}).encode(), None),
        lambda: (json.dumps({**good, "params": {"x": float("-inf")}}).encode(), None),
        lambda: (json.dumps({**good, "ts": "now"}).encode(), None),
        lambda: (json.dumps({**good, "surprise": 1}).encode(), None),
        lambda: (json.dumps({**good, "params": {"blob": "z" * 70_000}}).encode(), None),
        lambda: (rng.randbytes(rng.randint(1, 200)), "application/msgpack"),
        lambda: (json.dumps(good).encode(), "application/xml"),
        lambda: (b"[" * 100_000, None),
    ]
    for i in range(n):
        payload, ctype = makers[i % len(makers)]()
        out.append((payload, ctype))
    return out


@pytest.mark.parametrize("seed", [1, 2])
async def test_every_bad_input_gets_exactly_one_denial_and_nothing_executes(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, seed: int
) -> None:
    signer = make_signer(keys[0], issuer="fuzz")
    inputs = bad_inputs(seed, 260)
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    execs, denies, holds = out.exec, out.deny, out.hold
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer) as gw:
        for payload, ctype in inputs:
            headers = {"Content-Type": ctype} if ctype else None
            await nc.publish(SUBJECT, payload, headers=headers)
        # Liveness after the storm: a valid intent is still decided and allowed.
        await nc.publish(SUBJECT, intent("tools.search", "tool:search", {"q": "ok"}))
        await execs.wait_for(1, timeout_s=30)
        await round_trip(nc)
        stats = gw.statistics()
    records = denies.records()
    assert len(records) == len(inputs)  # exactly one denial per bad input
    assert all(r["reason"] == "malformed" for r in records), {r["reason"] for r in records}
    # One record per input, matched by the digest of the exact bytes sent.
    sent = sorted(_digest(p) for p, _ in inputs)
    assert sorted(r["payload_sha256"] for r in records) == sent
    assert len(execs.msgs) == 1 and holds.msgs == []
    assert stats.internal_errors == 0 and stats.denied == len(inputs)
    print(f"S12 seed={seed}: bad inputs={len(inputs)} denials={len(records)} exec=0 crashes=0")
    await nc.drain()
