"""SCENARIOS S9 (forgery) and S10 (key rotation) against bus_guard.verify.

S9: every mutation of a genuine (token, payload, subject) triple must be rejected with a
VerificationError: 0 accepted, 0 exceptions of any other type. The CI run does a few
thousand hypothesis examples and a seeded loop of 20,000 mutations; ``pytest -m slow``
runs 1,000,000 and prints the counts by reason.

S10: during a rotation's grace period both keys verify; from ``not_after`` (or an
emergency ``revoked_at``) on, the old kid is refused as ``revoked_kid``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_guard.errors import VerificationError
from bus_guard.signing._keys import generate_key, load_private_key, revoke_key, rotate_key
from bus_guard.signing._signer import Signer, payload_digest
from bus_guard.verify import (
    ARTIFACT_HEADER,
    DECISION_HEADER,
    TYP,
    Verifier,
    VerifyReason,
    b64url_decode,
    b64url_encode,
    verify_message,
)
from tests.test_artifacts import (
    ISSUER,
    LEEWAY,
    NOW,
    PAYLOAD,
    SUBJECT,
    Env,
    forge,
    header_for,
    later_claims,
    make_claims,
    make_env,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Characters a mutation may splice in besides the base64url alphabet.
NOISE = ALPHABET + ".=+/ \t\n\x00é\u2028\U0001f600"

ENV = make_env()
BASES: tuple[tuple[str, bytes, str], ...] = (
    (ENV.signer.sign(make_claims(ENV.signer)), PAYLOAD, SUBJECT),
    # a key in its rotation grace period is as valid as the active one
    (ENV.grace.sign(make_claims(ENV.grace)), PAYLOAD, SUBJECT),
    # longer claims, empty payload, another subject
    (
        ENV.signer.sign(
            make_claims(
                ENV.signer,
                aud="guard.exec.agent-9.tools.call",
                rules=tuple(f"rule-{i}" for i in range(20)),
                parents=tuple(f"dec-{i}" for i in range(8)),
                payload_sha256=payload_digest(b""),
                resource="fichier:é/ü/漢字",
            )
        ),
        b"",
        "guard.exec.agent-9.tools.call",
    ),
)


def _verify(token: str, payload: bytes, subject: str) -> None:
    ENV.verifier.verify(token, subject=subject, payload=payload, now=NOW)


def test_bases_are_valid() -> None:
    for token, payload, subject in BASES:
        _verify(token, payload, subject)


# --- mutations ----------------------------------------------------------------------------


def _segments(token: str) -> list[str]:
    return token.split(".")


def _b64(data: bytes) -> str:
    return b64url_encode(data).decode("ascii")


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Flip a bit, substitute, insert or delete a byte: always a different byte string."""
    buf = bytearray(data)
    op = rng.randrange(4) if buf else 2
    if op == 0:
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        i = rng.randrange(len(buf))
        buf[i] = (buf[i] + rng.randrange(1, 256)) % 256
    elif op == 2:
        buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
    else:
        del buf[rng.randrange(len(buf))]
    return bytes(buf)


def _mutate_text(rng: random.Random, text: str) -> str:
    """Substitute, insert or delete one character, or flip a bit of one: always different."""
    op = rng.randrange(4) if text else 1
    i = rng.randrange(len(text)) if text else 0
    if op == 0:
        c = rng.choice(NOISE.replace(text[i], ""))
        return text[:i] + c + text[i + 1 :]
    if op == 1:
        return text[:i] + rng.choice(NOISE) + text[i:]
    if op == 2:
        return text[:i] + text[i + 1 :]
    flipped = chr(ord(text[i]) ^ (1 << rng.randrange(7)))
    return text[:i] + flipped + text[i + 1 :]


def mutate(
    rng: random.Random, token: str, payload: bytes, subject: str
) -> tuple[str, str, bytes, str]:
    """One random mutation of a valid triple; returns (kind, token, payload, subject)."""
    kind = rng.choice(MUTATION_KINDS)
    segs = _segments(token)
    if kind == "payload":
        return kind, token, _mutate_bytes(rng, payload), subject
    if kind == "subject":
        return kind, token, payload, _mutate_text(rng, subject)
    if kind == "token-text":
        return kind, _mutate_text(rng, token), payload, subject
    if kind == "token-cut":
        cut = rng.randrange(len(token))
        return kind, token[:cut] + token[cut + 1 + rng.randrange(8) :], payload, subject
    if kind == "segment-swap":
        other = _segments(rng.choice([t for t, _, _ in BASES if t != token]))
        i = rng.choice([i for i in range(3) if other[i] != segs[i]])
        segs[i] = other[i]
        return kind, ".".join(segs), payload, subject
    # "<segment>-bytes": mutate the decoded bytes of one segment, re-encoded canonically,
    # so the mutation reaches JSON parsing and the signature check instead of base64.
    i = ("header", "claims", "signature").index(kind.split("-")[0])
    segs[i] = _b64(_mutate_bytes(rng, b64url_decode(segs[i])))
    return kind, ".".join(segs), payload, subject


MUTATION_KINDS = (
    "payload",
    "subject",
    "token-text",
    "token-cut",
    "segment-swap",
    "header-bytes",
    "claims-bytes",
    "signature-bytes",
)


def run_mutations(n: int, seed: int) -> tuple[Counter[str], Counter[str], list[str]]:
    """Apply *n* seeded mutations; count rejections by reason and by mutation kind."""
    rng = random.Random(seed)
    by_reason: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    accepted: list[str] = []
    for _ in range(n):
        base = rng.choice(BASES)
        kind, token, payload, subject = mutate(rng, *base)
        assert (token, payload, subject) != base, kind
        by_kind[kind] += 1
        try:
            _verify(token, payload, subject)
        except VerificationError as exc:  # any other exception type fails the test
            by_reason[exc.reason] += 1
        else:
            accepted.append(f"{kind}: {token!r} {payload!r} {subject!r}")
    return by_reason, by_kind, accepted


def _report(n: int, by_reason: Counter[str], by_kind: Counter[str], accepted: list[str]) -> str:
    reasons = ", ".join(f"{r}={c}" for r, c in by_reason.most_common())
    kinds = ", ".join(f"{k}={c}" for k, c in sorted(by_kind.items()))
    return (
        f"S9 mutations={n} accepted={len(accepted)} rejected={by_reason.total()}"
        f" [{reasons}] kinds [{kinds}]"
    )


def test_seeded_mutations_are_all_rejected() -> None:
    n = 20_000
    by_reason, by_kind, accepted = run_mutations(n, seed=9)
    print(_report(n, by_reason, by_kind, accepted))
    assert accepted == []
    assert by_reason.total() == n
    assert set(by_kind) == set(MUTATION_KINDS)
    # the mutations reach every stage of verification, not only the base64 check
    for reason in (
        VerifyReason.MALFORMED,
        VerifyReason.BAD_HEADER,
        VerifyReason.UNKNOWN_KID,
        VerifyReason.BAD_SIGNATURE,
        VerifyReason.WRONG_AUDIENCE,
        VerifyReason.PAYLOAD_MISMATCH,
    ):
        assert by_reason[reason] > 0, reason


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_million_mutations_are_all_rejected() -> None:
    n = 1_000_000
    by_reason, by_kind, accepted = run_mutations(n, seed=10)
    print(_report(n, by_reason, by_kind, accepted))
    assert accepted == []
    assert by_reason.total() == n


# --- hypothesis ---------------------------------------------------------------------------

_HYP = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@_HYP
@given(
    base=st.sampled_from(BASES),
    segment=st.integers(0, 2),
    position=st.integers(0, 10_000),
    bit=st.integers(0, 7),
)
def test_any_bit_flip_in_any_segment_is_rejected(
    base: tuple[str, bytes, str], segment: int, position: int, bit: int
) -> None:
    token, payload, subject = base
    segs = _segments(token)
    raw = bytearray(b64url_decode(segs[segment]))
    raw[position % len(raw)] ^= 1 << bit
    segs[segment] = _b64(bytes(raw))
    with pytest.raises(VerificationError) as e:
        _verify(".".join(segs), payload, subject)
    expected = {
        0: {"malformed", "bad_header", "unknown_kid"},
        1: {"bad_signature"},
        2: {"bad_signature"},
    }[segment]
    assert e.value.reason in expected


@_HYP
@given(base=st.sampled_from(BASES), position=st.integers(0, 10_000), char=st.characters())
def test_any_character_substitution_is_rejected(
    base: tuple[str, bytes, str], position: int, char: str
) -> None:
    token, payload, subject = base
    i = position % len(token)
    if token[i] == char:
        return
    with pytest.raises(VerificationError):
        _verify(token[:i] + char + token[i + 1 :], payload, subject)


@_HYP
@given(base=st.sampled_from(BASES), payload=st.binary(max_size=200))
def test_any_other_payload_is_rejected(base: tuple[str, bytes, str], payload: bytes) -> None:
    token, original, subject = base
    if payload == original:
        return
    with pytest.raises(VerificationError) as e:
        _verify(token, payload, subject)
    assert e.value.reason == VerifyReason.PAYLOAD_MISMATCH


@_HYP
@given(
    token=st.one_of(
        st.text(max_size=300),
        st.from_regex(r"\A[A-Za-z0-9_-]{0,120}\.[A-Za-z0-9_-]{0,400}\.[A-Za-z0-9_-]{0,90}\Z"),
    )
)
def test_arbitrary_strings_are_rejected(token: str) -> None:
    with pytest.raises(VerificationError):
        _verify(token, PAYLOAD, SUBJECT)


# Re-signed tokens: validly signed by a key the verifier knows, but wrong in one respect.

_not_typ = st.text(max_size=30).filter(lambda t: t != TYP)


@_HYP
@given(typ=_not_typ)
def test_resigned_wrong_typ(typ: str) -> None:
    token = forge(ENV.key, header_for(ENV.key, typ=typ), msgspec.json.decode(_claims_json()))
    _expect(token, VerifyReason.BAD_HEADER)


@_HYP
@given(kid=st.text(max_size=60))
def test_resigned_unknown_kid(kid: str) -> None:
    if kid in ENV.jwks:
        return
    token = forge(ENV.key, header_for(ENV.key, kid=kid), msgspec.json.decode(_claims_json()))
    _expect(token, VerifyReason.UNKNOWN_KID)


@_HYP
@given(which=st.sampled_from(["revoked", "retired"]), dt=st.integers(-1000, 1000))
def test_resigned_revoked_kid(which: str, dt: int) -> None:
    signer: Signer = getattr(ENV, which)
    token = signer.sign(make_claims(signer))
    with pytest.raises(VerificationError) as e:
        ENV.verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW + max(dt, 0))
    assert e.value.reason == VerifyReason.REVOKED_KID


@_HYP
@given(aud=st.text(min_size=1, max_size=80).filter(lambda a: a != SUBJECT))
def test_resigned_wrong_audience(aud: str) -> None:
    _expect(ENV.signer.sign(make_claims(ENV.signer, aud=aud)), VerifyReason.WRONG_AUDIENCE)


@_HYP
@given(exp=st.integers(0, int(NOW - LEEWAY)))
def test_resigned_expired(exp: int) -> None:
    claims = make_claims(ENV.signer, iat=min(exp, NOW), nbf=min(exp, NOW), exp=exp)
    _expect(ENV.signer.sign(claims), VerifyReason.EXPIRED)


@_HYP
@given(decision=st.text(max_size=40).filter(lambda d: d != "dec-01JD8"))
def test_message_with_other_decision_header(decision: str) -> None:
    headers = {ARTIFACT_HEADER: BASES[0][0], DECISION_HEADER: decision}
    with pytest.raises(VerificationError) as e:
        verify_message(ENV.verifier, subject=SUBJECT, headers=headers, payload=PAYLOAD, now=NOW)
    assert e.value.reason == VerifyReason.DECISION_MISMATCH


def _claims_json() -> bytes:
    return msgspec.json.encode(make_claims(ENV.signer))


def _expect(token: str, reason: VerifyReason) -> None:
    with pytest.raises(VerificationError) as e:
        _verify(token, PAYLOAD, SUBJECT)
    assert e.value.reason == reason, e.value


# --- S10: rotation ------------------------------------------------------------------------


def _sign_at(signer: Signer, t: int) -> str:
    return signer.sign(later_claims(signer, t - NOW))


def _load(key_dir: Path) -> tuple[Signer, Callable[[], Verifier]]:
    signer = Signer(load_private_key(key_dir / "signing-key.pem"), issuer=ISSUER)
    return signer, lambda: Verifier(key_dir / "jwks.json", leeway_s=LEEWAY)


def test_s10_rotation_overlap_then_revocation(tmp_path: Path) -> None:
    generate_key(tmp_path)
    old_signer, fresh_verifier = _load(tmp_path)
    before = fresh_verifier()
    grace = 300
    t_rotate = NOW + 1000
    rotation = rotate_key(tmp_path, grace_s=grace, now=t_rotate)
    new_signer, fresh_verifier = _load(tmp_path)
    assert (old_signer.kid, new_signer.kid) == (rotation.retired_kid, rotation.new_kid)
    after = fresh_verifier()

    # A verifier that has not fetched the new JWKS does not know the new key.
    with pytest.raises(VerificationError) as e:
        before.verify(
            _sign_at(new_signer, t_rotate), subject=SUBJECT, payload=PAYLOAD, now=t_rotate
        )
    assert e.value.reason == VerifyReason.UNKNOWN_KID

    # Under load: tokens from both keys signed and verified across the rotation timeline.
    counts: Counter[tuple[str, str, str]] = Counter()
    for step in range(2000):
        t = t_rotate - 100 + step * (grace + 400) // 2000  # from before rotation to after grace
        phase = "overlap" if t < t_rotate + grace else "after"
        for name, signer in (("old", old_signer), ("new", new_signer)):
            token = _sign_at(signer, t)
            try:
                after.verify(token, subject=SUBJECT, payload=PAYLOAD, now=t)
            except VerificationError as exc:
                counts[phase, name, str(exc.reason)] += 1
            else:
                counts[phase, name, "accepted"] += 1
    print("S10", dict(sorted(counts.items())))
    assert counts["overlap", "old", "accepted"] > 0
    assert counts["overlap", "new", "accepted"] > 0
    assert counts["after", "old", "accepted"] == 0  # 0 revoked-key accepts
    assert counts["after", "old", "revoked_kid"] > 0
    assert counts["after", "new", "accepted"] > 0
    rejected_in_overlap = [k for k in counts if k[0] == "overlap" and k[2] != "accepted"]
    assert rejected_in_overlap == []
    assert {k for k in counts if k[0] == "after" and k[2] != "accepted"} == {
        ("after", "old", "revoked_kid")
    }

    # The window edge is exact: usable strictly before not_after.
    edge = t_rotate + grace
    token = _sign_at(old_signer, edge - 10)
    after.verify(token, subject=SUBJECT, payload=PAYLOAD, now=edge - 0.001)
    with pytest.raises(VerificationError) as e:
        after.verify(token, subject=SUBJECT, payload=PAYLOAD, now=edge)
    assert e.value.reason == VerifyReason.REVOKED_KID


def test_s10_emergency_revocation(tmp_path: Path) -> None:
    _, jwks_path = generate_key(tmp_path)
    signer, fresh_verifier = _load(tmp_path)
    token = _sign_at(signer, NOW)
    fresh_verifier().verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)
    revoke_key(jwks_path, signer.kid, now=NOW)
    with pytest.raises(VerificationError) as e:
        fresh_verifier().verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)
    assert e.value.reason == VerifyReason.REVOKED_KID


def test_env_is_shared_with_test_artifacts() -> None:
    # guard: the stranger key really is unknown to the JWKS used above
    assert isinstance(ENV, Env)
    assert ENV.stranger.kid not in ENV.jwks
    assert isinstance(ENV.key, Ed25519PrivateKey)
