"""Keys live (SCENARIOS S10): the gateway publishes its JWKS to the guard-jwks bucket;
`keys rotate` and `keys revoke` take effect in a running gateway without a restart; an
executor that fetches the JWKS from the bucket accepts everything valid during the overlap
and no artifact of a retired or revoked key after."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from bus_guard.errors import ConfigError, VerificationError
from bus_guard.intake._control import open_keys
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.policy._load import PolicySet
from bus_guard.settings import Settings
from bus_guard.signing._keys import (
    generate_key,
    jwk_entry,
    load_private_key,
    merge_jwks,
    revoke_key,
    rotate_key,
)
from bus_guard.verify import (
    ARTIFACT_HEADER,
    JWKS_KEY,
    Jwks,
    LiveVerifier,
    b64url_decode,
    load_jwks,
)

from .helpers import make_signer
from .policykit import Load, wait_for

SWITCH_BOUND_S = 5.0


def _kid(token: str) -> str:
    header = msgspec.json.decode(b64url_decode(token.split(".")[0]))
    return str(header["kid"])


@dataclass(frozen=True, slots=True)
class Executed:
    msg: Msg
    kid: str
    ok: bool
    reason: str
    at: float  # unix time of the verification


async def test_rotate_and_revoke_under_load_with_a_verifier_on_the_bucket(
    nats_url: str, tmp_path: Path, policies: PolicySet
) -> None:
    key_dir = tmp_path / "gw"
    key_path, jwks_path = generate_key(key_dir)
    signer = make_signer(key_path)
    first = signer.kid
    settings = Settings(nats_url=nats_url, mode="core", gateway_id="test-gw")
    nc = await nats.connect(nats_url)
    async with (
        open_keys(
            settings,
            key_path=key_path,
            jwks_path=jwks_path,
            signer=signer,
            ledger_signer=None,
            poll_s=0.1,
        ) as keys,
        Gateway(settings, policies, signer) as gateway,
        keys.running(),
        anyio.create_task_group() as tg,
    ):
        keys.on_trust = gateway.trust_keys
        # The executor: no file, the JWKS from the bucket only.
        live = LiveVerifier(await nc.jetstream().key_value("guard-jwks"), refresh_s=0.2)
        await live.refresh()
        executed: list[Executed] = []

        async def execute(msg: Msg) -> None:
            assert msg.headers is not None
            kid = _kid(msg.headers[ARTIFACT_HEADER])
            try:
                await live.verify_message(
                    subject=msg.subject, headers=msg.headers, payload=msg.data
                )
                executed.append(Executed(msg, kid, True, "", time.time()))
            except VerificationError as exc:
                executed.append(Executed(msg, kid, False, exc.reason, time.time()))

        await nc.subscribe("guard.exec.>", cb=execute)
        await round_trip(nc)
        load = Load(nc)
        tg.start_soon(load.run)
        await wait_for(lambda: len(executed) >= 50, what="artifacts of the first key")

        # Rotation with a 2 s grace: the running gateway signs with the new key.
        rotated_at = time.monotonic()
        rotation = rotate_key(key_dir, grace_s=2.0)
        second = rotation.new_kid
        await wait_for(lambda: any(e.kid == second for e in executed), what="the new key")
        assert next(e for e in executed if e.kid == second).at - time.time() < 1  # (sanity)
        assert time.monotonic() - rotated_at < SWITCH_BOUND_S
        assert signer.kid == second
        # Past the grace, keep going a little: every artifact is the new key's.
        await wait_for(lambda: time.time() > rotation.not_after + 0.5, timeout_s=10)
        count = len(executed)
        await wait_for(lambda: len(executed) >= count + 50, what="more artifacts")

        # Rotate again (long grace), then revoke the second key: refused everywhere soon.
        third = rotate_key(key_dir, grace_s=3600).new_kid
        await wait_for(lambda: signer.kid == third, what="the third key")
        count = len(executed)
        await wait_for(lambda: any(e.kid == third for e in executed[count:]), what="third")
        revoked_at = time.time()
        revoke_key(jwks_path, second)
        await wait_for(
            lambda: keys.statistics().publishes >= 4 and _revoked(keys.trusted, second),
            what="the revocation published",
        )
        # The executor learns it within its refresh interval.
        await wait_for(lambda: _revoked(live.jwks, second), timeout_s=5, what="refreshed")
        count = len(executed)
        await wait_for(lambda: len(executed) >= count + 50, what="more artifacts")
        load.stop()

    assert gateway.statistics().internal_errors == 0
    assert keys.statistics().rotations == 2
    # Valid during the overlap: every artifact the gateway sent verified when it arrived.
    assert executed and all(e.ok for e in executed), [e for e in executed if not e.ok][:3]
    kids = [e.kid for e in executed]
    assert kids[0] == first and kids[-1] == third
    assert kids == sorted(kids, key=[first, second, third].index)  # switched, never back
    # 0 accepts after: the first key's artifacts (still within their 60 s ttl) are refused
    # once its grace is over, the second key's once it is revoked, by the same verifier.
    for e in executed:
        if e.kid == third:
            continue
        try:
            await live.verify_message(
                subject=e.msg.subject, headers=e.msg.headers, payload=e.msg.data
            )
        except VerificationError as exc:
            assert exc.reason == "revoked_kid"
        else:
            raise AssertionError(f"an artifact of {e.kid} was accepted after its key ended")
    assert not any(e.ok and e.kid == second and e.at > revoked_at + 1.5 for e in executed)
    await nc.drain()


def _revoked(jwks: Jwks | None, kid: str) -> bool:
    entry = jwks.entry(kid) if jwks is not None else None
    return entry is not None and entry.revoked_at is not None


async def test_gateways_merge_their_keys_into_one_jwks_and_never_undo_a_revocation(
    nats_url: str, tmp_path: Path
) -> None:
    a_key, a_jwks = generate_key(tmp_path / "a")
    b_key, b_jwks = generate_key(tmp_path / "b")
    a, b = make_signer(a_key, "gw-a"), make_signer(b_key, "gw-b")
    # gw-a's file says its key is revoked (a drill), a minute ago: within the day a refused
    # key stays published (tests/test_keys_prune.py: after it, it is pruned)
    revoked_at = time.time() - 60
    revoke_key(a_jwks, a.kid, now=revoked_at)
    settings = Settings(nats_url=nats_url, mode="core")
    async with (
        open_keys(settings, key_path=a_key, jwks_path=a_jwks, signer=a, ledger_signer=None),
        open_keys(settings, key_path=b_key, jwks_path=b_jwks, signer=b, ledger_signer=None),
    ):
        pass
    # gw-b's keeper starts after gw-a's and knows nothing of the revocation: merged anyway.
    nc = await nats.connect(nats_url)
    entry = await (await nc.jetstream().key_value("guard-jwks")).get(JWKS_KEY)
    jwks = load_jwks(entry.value or b"")
    assert set(jwks) == {a.kid, b.kid}
    assert jwks.entry(a.kid).revoked_at == revoked_at  # type: ignore[union-attr]
    assert jwks.entry(b.kid).revoked_at is None  # type: ignore[union-attr]
    await nc.drain()


def test_merge_keeps_the_earliest_end_of_every_key(tmp_path: Path) -> None:
    key = load_private_key(generate_key(tmp_path)[0])
    plain = Jwks([jwk_entry(key)])
    retired = Jwks([jwk_entry(key, not_after=200.0)])
    revoked = Jwks([jwk_entry(key, revoked_at=100.0, not_after=300.0)])
    for sets in ((plain, retired, revoked), (revoked, plain, retired), (retired, revoked)):
        merged = merge_jwks(*sets)
        entry = merged.entry(jwk_entry(key).kid)
        assert entry is not None and (entry.revoked_at, entry.not_after) == (100.0, 200.0)
    assert merge_jwks(plain, plain).to_dict() == plain.to_dict()


async def test_a_verifier_without_keys_refuses_to_start_and_keeps_its_keys_when_the_bucket_fails(
    tmp_path: Path,
) -> None:
    class Failing:
        def __init__(self) -> None:
            self.value: bytes | None = None

        async def get(self, key: str) -> object:
            if self.value is None:
                raise OSError("bucket down")
            return type("E", (), {"value": self.value, "revision": 1})()

    bucket = Failing()
    live = LiveVerifier(bucket, refresh_s=0.01, clock=time.monotonic)
    with pytest.raises(ConfigError, match="no JWKS"):
        await live.refresh()
    key = load_private_key(generate_key(tmp_path)[0])
    bucket.value = Jwks([jwk_entry(key)]).to_json()
    assert await live.refresh() is True
    bucket.value = None  # down again: the keys last read stay
    assert await live.refresh() is False
    assert set(live.jwks) == {jwk_entry(key).kid}
    assert live.statistics().failures == 2
