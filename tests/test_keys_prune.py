"""The JWKS bucket prunes keys past their grace (issue 12): a key refused (retired or
revoked) for more than a day leaves the published JWKS, and no gateway brings it back, not
even one whose JWKS file predates the refusal."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import msgspec
import nats

from bus_guard.intake._control import open_keys
from bus_guard.intake._keys_live import PRUNE_AFTER_S, PRUNED_KEY
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key, merge_jwks
from bus_guard.verify import JWKS_KEY, Jwks, load_jwks

from .helpers import make_signer


async def test_keys_refused_past_their_grace_leave_the_jwks_and_never_come_back(
    nats_url: str, tmp_path: Path
) -> None:
    now = time.time()
    a_key, a_jwks = generate_key(tmp_path / "a")
    a = make_signer(a_key, "gw-a")
    (old,) = load_jwks(generate_key(tmp_path / "old")[1]).entries
    (recent,) = load_jwks(generate_key(tmp_path / "recent")[1]).entries
    retired_long_ago = dataclasses.replace(old, not_after=now - PRUNE_AFTER_S - 3600)
    revoked_lately = dataclasses.replace(recent, revoked_at=now - 3600)
    a_jwks.write_bytes(
        merge_jwks(load_jwks(a_jwks), Jwks([retired_long_ago, revoked_lately])).to_json()
    )
    settings = Settings(nats_url=nats_url, mode="core")
    async with open_keys(settings, key_path=a_key, jwks_path=a_jwks, signer=a, ledger_signer=None):
        pass
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().key_value("guard-jwks")

    async def published() -> tuple[set[str], dict[str, float]]:
        jwks = load_jwks((await kv.get(JWKS_KEY)).value or b"")
        tombs = msgspec.json.decode((await kv.get(PRUNED_KEY)).value or b"", type=dict[str, float])
        return set(jwks), tombs

    keys, tombs = await published()
    # Retired more than a day ago: pruned; revoked an hour ago: still there (revoked_kid).
    assert keys == {a.kid, recent.kid}
    assert tombs == {old.kid: retired_long_ago.not_after}

    # gw-b's file predates the rotation: it holds the old key with no end at all.
    b_key, b_jwks = generate_key(tmp_path / "b")
    b = make_signer(b_key, "gw-b")
    b_jwks.write_bytes(merge_jwks(load_jwks(b_jwks), Jwks([old])).to_json())
    async with open_keys(settings, key_path=b_key, jwks_path=b_jwks, signer=b, ledger_signer=None):
        pass
    keys, tombs = await published()
    assert keys == {a.kid, recent.kid, b.kid}  # the old key did not come back
    assert set(tombs) == {old.kid}
    await nc.drain()
