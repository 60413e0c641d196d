"""Signing and verifying artifacts: round trips, interop with joserfc, every reject reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws, jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet, OKPKey

from bus_guard import verify
from bus_guard.cli._verify import main_verify
from bus_guard.errors import ConfigError, SigningError, VerificationError
from bus_guard.signing import _signer as artifacts
from bus_guard.signing._keys import jwk_entry, kid_for
from bus_guard.signing._signer import ArtifactClaims, Signer, payload_digest
from bus_guard.verify import (
    ARTIFACT_HEADER,
    DECISION_HEADER,
    Jwks,
    Verifier,
    VerifyReason,
    _base64url,
    _format,
    _jwks,
    _merkle,
    _strict_json,
    _verifier,
    b64url_decode,
    b64url_encode,
    verify_message,
)

NOW = 1_764_150_000
ISSUER = "gw-1"
SUBJECT = "guard.exec.agent-7.payments.transfer"
PAYLOAD = b'{"id":"01JD8","action":"payments.transfer","amount":120.5}'
LEEWAY = 5.0


# --- shared helpers (test_forgery imports these) -----------------------------------------


def as_json(claims: ArtifactClaims) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(msgspec.json.encode(claims))
    return out


def b64(data: bytes) -> str:
    return b64url_encode(data).decode("ascii")


def forge(key: Ed25519PrivateKey, header: dict[str, Any] | bytes, claims: Any) -> str:
    """A token with arbitrary header and claims bytes, validly signed by *key*."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{b64(h)}.{b64(c)}".encode()
    return f"{signing_input.decode()}.{b64(key.sign(signing_input))}"


def header_for(key: Ed25519PrivateKey, **over: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "EdDSA", "kid": kid_for(key), "typ": "guard-artifact+jwt"}
    header.update(over)
    return {k: v for k, v in header.items() if v is not None}


def make_claims(signer: Signer, **over: Any) -> ArtifactClaims:
    claims = signer.build_claims(
        now=NOW,
        sub="agent-7",
        aud=SUBJECT,
        jti="dec-01JD8",
        action="payments.transfer",
        resource="account:acct-1",
        intent_id="01JD8",
        payload=PAYLOAD,
        policy_digest="sha256:" + "ab" * 32,
        policy_version="2025-11-26.1",
        rules=("allow-small-transfers",),
        mode="enforce",
        parents=("dec-parent",),
        lineage_depth=1,
        lineage_root="agent-1",
        ledger_seq=42,
    )
    return msgspec.structs.replace(claims, **over)


def later_claims(signer: Signer, dt: int) -> ArtifactClaims:
    claims = make_claims(signer)
    return msgspec.structs.replace(claims, iat=NOW + dt, nbf=NOW + dt, exp=claims.exp + dt)


def claims_dict(signer: Signer, **over: Any) -> dict[str, Any]:
    out = as_json(make_claims(signer))
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class Env:
    key: Ed25519PrivateKey  # active
    signer: Signer
    revoked: Signer  # revoked_at = NOW - 10
    retired: Signer  # not_after = NOW - 1 (rotation grace over)
    grace: Signer  # not_after = NOW + 100 (still in its grace period)
    stranger: Signer  # not in the JWKS
    jwks: Jwks
    verifier: Verifier


def make_env() -> Env:
    def signer() -> Signer:
        return Signer(Ed25519PrivateKey.generate(), issuer=ISSUER)

    active, revoked, retired, grace, stranger = (signer() for _ in range(5))
    jwks = Jwks(
        [
            jwk_entry(active._key),
            jwk_entry(revoked._key, revoked_at=NOW - 10),
            jwk_entry(retired._key, not_after=NOW - 1),
            jwk_entry(grace._key, not_after=NOW + 100),
        ]
    )
    return Env(
        key=active._key,
        signer=active,
        revoked=revoked,
        retired=retired,
        grace=grace,
        stranger=stranger,
        jwks=jwks,
        verifier=Verifier(jwks, leeway_s=LEEWAY),
    )


@pytest.fixture(scope="module")
def env() -> Env:
    return make_env()


def good_token(env: Env) -> str:
    return env.signer.sign(make_claims(env.signer))


# --- signing ------------------------------------------------------------------------------


def test_round_trip(env: Env) -> None:
    claims = make_claims(env.signer)
    token = env.signer.sign(claims)
    assert env.verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW) == claims
    assert env.signer.sign(claims) == token  # Ed25519 is deterministic


def test_token_layout(env: Env) -> None:
    token = good_token(env)
    header, body, sig = token.split(".")
    assert b64url_decode(header) == (
        b'{"alg":"EdDSA","kid":"' + env.signer.kid.encode() + b'","typ":"guard-artifact+jwt"}'
    )
    assert json.loads(b64url_decode(body)) == as_json(make_claims(env.signer))
    assert len(b64url_decode(sig)) == 64
    assert "=" not in token


def test_build_claims(env: Env) -> None:
    signer = Signer(env.key, issuer="gw-9", ttl_s=30.5)
    claims = signer.build_claims(
        now=NOW + 0.9,
        sub="a",
        aud="guard.exec.a.x",
        jti="d",
        action="x",
        resource="r",
        intent_id="i",
        payload=b"payload",
        policy_digest="p",
        policy_version="1",
        rules=(),
        mode="observe",
        would_deny=True,
    )
    assert (claims.iss, claims.iat, claims.nbf, claims.exp) == ("gw-9", NOW, NOW, NOW + 31)
    assert claims.payload_sha256 == payload_digest(b"payload")
    assert claims.would_deny


def test_payload_digest() -> None:
    # SHA-256("") in unpadded base64url
    assert payload_digest(b"") == "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def test_signer_jwks_and_kid(env: Env) -> None:
    doc = env.signer.jwks()
    assert [k["kid"] for k in doc["keys"]] == [env.signer.kid]
    assert "d" not in doc["keys"][0]
    token = good_token(env)
    assert Verifier(doc).verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"issuer": ""}, "issuer"),
        ({"issuer": "gw", "ttl_s": 0}, "ttl_s"),
        ({"issuer": "gw", "ttl_s": float("nan")}, "ttl_s"),
    ],
)
def test_signer_rejects_bad_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Signer(Ed25519PrivateKey.generate(), **kwargs)


def test_signer_rejects_non_ed25519_key() -> None:
    with pytest.raises(ConfigError, match="Ed25519"):
        Signer(object(), issuer="gw")  # type: ignore[arg-type]


def test_signing_failures_are_signing_errors(env: Env) -> None:
    with pytest.raises(SigningError, match="issuer"):
        env.signer.sign(make_claims(env.signer, iss="someone-else"))
    with pytest.raises(SigningError, match="cannot sign"):
        env.signer.sign(make_claims(env.signer, resource="\ud800"))  # not encodable as UTF-8
    with pytest.raises(SigningError, match="cannot sign"):
        env.signer.sign(make_claims(env.signer, rules=(object(),)))


_text = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    sub=st.text(min_size=1, max_size=20),
    resource=_text,
    action=_text,
    rules=st.lists(_text, max_size=4).map(tuple),
    parents=st.lists(_text, max_size=4).map(tuple),
    ledger_seq=st.integers(0, 2**53 - 1),
    payload=st.binary(max_size=64),
)
def test_round_trip_any_claims(
    sub: str,
    resource: str,
    action: str,
    rules: tuple[str, ...],
    parents: tuple[str, ...],
    ledger_seq: int,
    payload: bytes,
) -> None:
    env = _ENV
    claims = make_claims(
        env.signer,
        sub=sub,
        resource=resource,
        action=action,
        rules=rules,
        parents=parents,
        ledger_seq=ledger_seq,
        payload_sha256=payload_digest(payload),
    )
    token = env.signer.sign(claims)
    assert env.verifier.verify(token, subject=SUBJECT, payload=payload, now=NOW) == claims
    assert _joserfc_decode(env, token).claims == as_json(claims)


_ENV = make_env()


# --- interop with an independent JOSE implementation -------------------------------------


def _keyset(env: Env) -> KeySet:
    doc: Any = env.jwks.to_dict()
    return KeySet.import_key_set(doc)


def _joserfc_decode(env: Env, token: str) -> jwt.Token:
    keyset = _keyset(env)
    # joserfc flags the polymorphic "EdDSA" alg as deprecated by RFC 9864 (which names
    # it "Ed25519"); SPEC §6 fixes "EdDSA", so the warning is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return jwt.decode(token, keyset, algorithms=["EdDSA"])


def test_joserfc_verifies_our_tokens(env: Env) -> None:
    token = good_token(env)
    decoded = _joserfc_decode(env, token)
    assert decoded.header == {"alg": "EdDSA", "kid": env.signer.kid, "typ": "guard-artifact+jwt"}
    assert decoded.claims == as_json(make_claims(env.signer))
    registry = jwt.JWTClaimsRegistry(
        now=NOW, leeway=5, aud={"essential": True, "value": SUBJECT}, iss={"value": ISSUER}
    )
    registry.validate(decoded.claims)
    # and joserfc rejects a token whose signature we break
    broken = token.rsplit(".", 1)[0] + "." + b64(bytes(64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        with pytest.raises(Exception, match="signature"):
            jws.deserialize_compact(broken, _keyset(env), algorithms=["EdDSA"])


def test_we_verify_joserfc_tokens(env: Env) -> None:
    # joserfc orders header members and encodes claims differently (spaces after
    # separators): our verifier's slow paths must accept them.
    key = OKPKey.import_key(env.key)
    header = {"typ": "guard-artifact+jwt", "kid": env.signer.kid, "alg": "EdDSA"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        token = jwt.encode(header, claims_dict(env.signer), key, algorithms=["EdDSA"])
    assert token.split(".")[0] != good_token(env).split(".")[0]
    claims = env.verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)
    assert claims == make_claims(env.signer)


# --- every reason ------------------------------------------------------------------------


@dataclass
class Case:
    token: Any
    subject: str = SUBJECT
    payload: bytes = PAYLOAD
    now: float = NOW
    verifier: Verifier | None = None


def _flip_last_char(seg: str) -> str:
    # Same decoded bytes, different (non-canonical) text: the unused low bits set.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return seg[:-1] + alphabet[alphabet.index(seg[-1]) | 1]


def _swap_sig(env: Env, token: str) -> str:
    other = env.signer.sign(make_claims(env.signer, jti="other"))
    return token.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


Build = Callable[[Env], Case]

CASES: dict[VerifyReason, dict[str, Build]] = {
    VerifyReason.MALFORMED: {
        "not-a-jws": lambda e: Case("hello"),
        "empty": lambda e: Case(""),
        "two-segments": lambda e: Case(good_token(e).rsplit(".", 1)[0]),
        "four-segments": lambda e: Case(good_token(e) + ".AAAA"),
        "empty-segment": lambda e: Case(".".join(good_token(e).split(".")[::2])),
        "padding": lambda e: Case(good_token(e) + "=="),
        "non-alphabet": lambda e: Case(good_token(e).replace("-", "+").replace("_", "/") + "+/"),
        "whitespace": lambda e: Case(good_token(e) + "\n"),
        "not-str": lambda e: Case(good_token(e).encode()),
        "none": lambda e: Case(None),
        "too-long": lambda e: Case(good_token(e) + "A" * 70_000),
        "len-mod-4-is-1": lambda e: Case(good_token(e) + "AAA"),  # 86 + 3 chars
        "non-canonical-sig-bits": lambda e: Case(
            ".".join([*good_token(e).split(".")[:2], _flip_last_char(good_token(e).split(".")[2])])
        ),
        "header-not-json": lambda e: Case(forge(e.key, b"{nope", claims_dict(e.signer))),
        "header-not-object": lambda e: Case(forge(e.key, b"[]", claims_dict(e.signer))),
        "header-duplicate": lambda e: Case(
            forge(
                e.key,
                b'{"alg":"EdDSA","alg":"EdDSA","kid":"'
                + e.signer.kid.encode()
                + b'","typ":"guard-artifact+jwt"}',
                claims_dict(e.signer),
            )
        ),
        "claims-not-json": lambda e: Case(forge(e.key, header_for(e.key), b"{")),
        "claims-not-object": lambda e: Case(forge(e.key, header_for(e.key), [1, 2])),
        "claims-invalid-utf8": lambda e: Case(forge(e.key, header_for(e.key), b'{"iss":"\xff"}')),
        "claims-unknown": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, admin=True))
        ),
        "claims-missing": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, payload_sha256=None))
        ),
        "claims-float-time": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, exp=NOW + 60.0))
        ),
        "claims-bool-int": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, ledger_seq=True))
        ),
        "claims-huge-int": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, ledger_seq=2**53))
        ),
        "claims-negative-time": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, nbf=-1))
        ),
        "claims-bad-digest": lambda e: Case(
            forge(e.key, header_for(e.key), claims_dict(e.signer, payload_sha256="abc"))
        ),
        "claims-duplicate": lambda e: Case(
            forge(
                e.key,
                header_for(e.key),
                b'{"aud":"guard.exec.someone-else.x",'
                + json.dumps(claims_dict(e.signer)).encode()[1:],
            )
        ),
    },
    VerifyReason.BAD_HEADER: {
        "alg-none": lambda e: Case(forge(e.key, header_for(e.key, alg="none"), {})),
        "alg-hs256": lambda e: Case(forge(e.key, header_for(e.key, alg="HS256"), {})),
        "alg-missing": lambda e: Case(forge(e.key, header_for(e.key, alg=None), {})),
        "typ-jwt": lambda e: Case(forge(e.key, header_for(e.key, typ="JWT"), {})),
        "typ-missing": lambda e: Case(forge(e.key, header_for(e.key, typ=None), {})),
        "crit": lambda e: Case(forge(e.key, header_for(e.key, crit=["exp"]), {})),
        "extra-member": lambda e: Case(
            forge(e.key, header_for(e.key, jku="https://evil.test/jwks"), {})
        ),
        "kid-missing": lambda e: Case(forge(e.key, header_for(e.key, kid=None), {})),
        "kid-not-str": lambda e: Case(forge(e.key, header_for(e.key, kid=7), {})),
    },
    VerifyReason.UNKNOWN_KID: {
        "stranger-key": lambda e: Case(e.stranger.sign(make_claims(e.stranger))),
        "made-up-kid": lambda e: Case(forge(e.key, header_for(e.key, kid="nope"), {})),
    },
    VerifyReason.REVOKED_KID: {
        "revoked": lambda e: Case(e.revoked.sign(make_claims(e.revoked))),
        "retired": lambda e: Case(e.retired.sign(make_claims(e.retired))),
        "grace-over": lambda e: Case(e.grace.sign(later_claims(e.grace, 90)), now=NOW + 100),
    },
    VerifyReason.BAD_SIGNATURE: {
        "zero-sig": lambda e: Case(good_token(e).rsplit(".", 1)[0] + "." + b64(bytes(64))),
        "short-sig": lambda e: Case(
            good_token(e).rsplit(".", 1)[0] + "." + b64(b64url_decode(good_token(e)[-86:])[:63])
        ),
        "long-sig": lambda e: Case(good_token(e) + "AAAA"),
        "other-tokens-sig": lambda e: Case(_swap_sig(e, good_token(e))),
        "other-key-same-kid": lambda e: Case(
            forge(e.stranger._key, header_for(e.key), claims_dict(e.signer))
        ),
        # signature checked before claims are parsed: garbage claims, bad signature
        "bad-sig-before-claims": lambda e: Case(
            forge(e.key, header_for(e.key), b"{").rsplit(".", 1)[0] + "." + b64(bytes(64))
        ),
    },
    VerifyReason.WRONG_AUDIENCE: {
        "other-subject": lambda e: Case(good_token(e), subject="guard.exec.agent-8.payments.x"),
    },
    VerifyReason.NOT_YET_VALID: {
        "nbf-beyond-leeway": lambda e: Case(good_token(e), now=NOW - LEEWAY - 1),
    },
    VerifyReason.EXPIRED: {
        "exp-beyond-leeway": lambda e: Case(good_token(e), now=NOW + 60 + LEEWAY),
        "long-ago": lambda e: Case(good_token(e), now=NOW + 86_400),
    },
    VerifyReason.WRONG_ISSUER: {
        "other-gateway": lambda e: Case(
            good_token(e), verifier=Verifier(e.jwks, issuer="gw-2", leeway_s=LEEWAY)
        ),
    },
    VerifyReason.PAYLOAD_MISMATCH: {
        "one-byte": lambda e: Case(good_token(e), payload=PAYLOAD.replace(b"120.5", b"920.5")),
        "empty": lambda e: Case(good_token(e), payload=b""),
        "appended": lambda e: Case(good_token(e), payload=PAYLOAD + b" "),
    },
}

MESSAGE_REASONS = {
    VerifyReason.REPLAY,
    VerifyReason.MISSING_ARTIFACT,
    VerifyReason.DECISION_MISMATCH,
}


def test_every_reason_has_a_case() -> None:
    # The two tables below plus the message-level tests cover the whole closed set.
    assert set(CASES) | MESSAGE_REASONS == set(VerifyReason)
    assert {r.value for r in VerifyReason} == {
        "malformed",
        "bad_header",
        "unknown_kid",
        "revoked_kid",
        "bad_signature",
        "wrong_audience",
        "not_yet_valid",
        "expired",
        "wrong_issuer",
        "payload_mismatch",
        "replay",
        "missing_artifact",
        "decision_mismatch",
    }


@pytest.mark.parametrize(
    ("reason", "build"),
    [
        pytest.param(r, b, id=f"{r}-{name}")
        for r, cases in CASES.items()
        for name, b in cases.items()
    ],
)
def test_rejects_with_reason(env: Env, reason: VerifyReason, build: Build) -> None:
    case = build(env)
    verifier = case.verifier or env.verifier
    with pytest.raises(VerificationError) as e:
        verifier.verify(case.token, subject=case.subject, payload=case.payload, now=case.now)
    assert e.value.reason == reason, e.value


@pytest.mark.parametrize(
    "now",
    [NOW - LEEWAY, NOW, NOW + 60 + LEEWAY - 0.001],
    ids=["nbf-within-leeway", "now", "exp-within-leeway"],
)
def test_accepts_within_leeway(env: Env, now: float) -> None:
    assert env.verifier.verify(good_token(env), subject=SUBJECT, payload=PAYLOAD, now=now)


def test_key_in_grace_period_still_verifies(env: Env) -> None:
    token = env.grace.sign(later_claims(env.grace, 90))
    assert env.verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW + 99.9)


def test_verify_defaults_to_wall_clock(env: Env) -> None:
    with pytest.raises(VerificationError) as e:
        env.verifier.verify(good_token(env), subject=SUBJECT, payload=PAYLOAD)
    assert e.value.reason in {VerifyReason.EXPIRED, VerifyReason.NOT_YET_VALID}


def test_verifier_rejects_bad_config(env: Env) -> None:
    with pytest.raises(ConfigError, match="leeway_s"):
        Verifier(env.jwks, leeway_s=-1)
    with pytest.raises(ConfigError, match="not found"):
        Verifier("/nonexistent/jwks.json")


# --- message level and replay -------------------------------------------------------------


def test_replay_hook_called_last_and_only_for_valid(env: Env) -> None:
    seen: set[str] = set()

    def consume(jti: str) -> bool:
        if jti in seen:
            return True
        seen.add(jti)
        return False

    verifier = Verifier(env.jwks, leeway_s=LEEWAY, seen=consume)
    token = good_token(env)
    with pytest.raises(VerificationError, match="payload_mismatch"):
        verifier.verify(token, subject=SUBJECT, payload=b"other", now=NOW)
    assert seen == set()  # an invalid artifact does not consume its decision id
    verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)
    assert seen == {"dec-01JD8"}
    with pytest.raises(VerificationError) as e:
        verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)
    assert e.value.reason == VerifyReason.REPLAY


def test_verify_message(env: Env) -> None:
    token = good_token(env)
    headers = {ARTIFACT_HEADER: token, DECISION_HEADER: "dec-01JD8", "traceparent": "00-x"}
    claims = verify_message(
        env.verifier, subject=SUBJECT, headers=headers, payload=PAYLOAD, now=NOW
    )
    assert claims.jti == "dec-01JD8"
    # Guard-Decision is optional
    only = {ARTIFACT_HEADER: token}
    assert verify_message(env.verifier, subject=SUBJECT, headers=only, payload=PAYLOAD, now=NOW)
    # a bad artifact fails with its own reason
    with pytest.raises(VerificationError, match="wrong_audience"):
        verify_message(env.verifier, subject="guard.exec.x.y", headers=headers, payload=PAYLOAD)


@pytest.mark.parametrize("headers", [None, {}, {"Guard-Decision": "dec-01JD8"}])
def test_verify_message_missing_artifact(env: Env, headers: dict[str, str] | None) -> None:
    with pytest.raises(VerificationError) as e:
        verify_message(env.verifier, subject=SUBJECT, headers=headers, payload=PAYLOAD, now=NOW)
    assert e.value.reason == VerifyReason.MISSING_ARTIFACT


def test_verify_message_decision_mismatch(env: Env) -> None:
    headers = {ARTIFACT_HEADER: good_token(env), DECISION_HEADER: "dec-other"}
    with pytest.raises(VerificationError) as e:
        verify_message(env.verifier, subject=SUBJECT, headers=headers, payload=PAYLOAD, now=NOW)
    assert e.value.reason == VerifyReason.DECISION_MISMATCH


# --- CLI entry point ----------------------------------------------------------------------


@pytest.fixture
def cli_files(env: Env, tmp_path: Path) -> tuple[Path, Path, Path]:
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(env.jwks.to_json())
    payload = tmp_path / "payload.json"
    payload.write_bytes(PAYLOAD)
    token = tmp_path / "artifact.txt"
    token.write_text(good_token(env) + "\n")
    return jwks, payload, token


def test_main_verify_valid(env: Env, cli_files: tuple[Path, Path, Path]) -> None:
    jwks, payload, token = cli_files
    for artifact in (good_token(env), f"@{token}"):
        out = io.StringIO()
        rc = main_verify(
            jwks=jwks, subject=SUBJECT, payload=payload, artifact=artifact, out=out, now=NOW
        )
        assert rc == 0
        assert json.loads(out.getvalue()) == as_json(make_claims(env.signer))


def test_main_verify_invalid(env: Env, cli_files: tuple[Path, Path, Path]) -> None:
    jwks, payload, _ = cli_files
    out = io.StringIO()
    rc = main_verify(
        jwks=jwks,
        subject="guard.exec.agent-8.x",
        payload=payload,
        artifact=good_token(env),
        out=out,
        now=NOW,
    )
    assert rc == 1
    assert out.getvalue().startswith("invalid: wrong_audience: ")


def test_main_verify_bad_input(tmp_path: Path, cli_files: tuple[Path, Path, Path]) -> None:
    jwks, payload, _ = cli_files
    for kwargs in (
        {"jwks": tmp_path / "missing.json", "payload": payload, "artifact": "x"},
        {"jwks": jwks, "payload": tmp_path / "missing", "artifact": "x"},
        {"jwks": jwks, "payload": payload, "artifact": f"@{tmp_path / 'missing'}"},
    ):
        out = io.StringIO()
        assert main_verify(subject=SUBJECT, out=out, now=NOW, **kwargs) == 2  # type: ignore[arg-type]
        assert out.getvalue().startswith("error: ")


# --- module surface -----------------------------------------------------------------------


def test_verify_imports_nothing_heavy() -> None:
    code = (
        "import sys, bus_guard.verify\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "ours = sorted(m for m in sys.modules if m.startswith('bus_guard.'))\n"
        "print(sorted(roots & {'nats', 'pydantic', 'yaml', 'anyio', 'rich'}), ours)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split(maxsplit=1)
    assert out[0] == "[]", out
    # bus_guard.verify and its own modules, and the exception tree: nothing else of ours.
    ours = eval(out[1])  # a printed list of module names
    assert [m for m in ours if not m.startswith("bus_guard.verify")] == ["bus_guard.errors"]


@pytest.mark.parametrize(
    "module", [verify, artifacts, _format, _base64url, _strict_json, _merkle, _jwks, _verifier]
)
def test_all_matches_public_names(module: Any) -> None:
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
        and callable(value)
    }
    assert defined <= set(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)
    assert isinstance(module.__all__, tuple)


def test_crit_header_is_refused_by_name(env: Env) -> None:
    # crit would also fail the exact-members check; the message must say why.
    token = forge(env.key, header_for(env.key, crit=["exp"], exp=NOW), {})
    with pytest.raises(VerificationError, match="bad_header: critical header") as e:
        env.verifier.verify(token, subject=SUBJECT, payload=PAYLOAD, now=NOW)
    assert e.value.reason == VerifyReason.BAD_HEADER


# --- strict JSON (the header, claims not in our encoder's bytes, JWKS files, intents) ------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_strict_loads_is_json_loads_on_plain_json(value: Any) -> None:
    text = json.dumps(value)
    assert _strict_json.strict_loads(text) == json.loads(text)
    assert _strict_json.strict_loads(text.encode()) == json.loads(text)


def test_strict_loads_refuses_what_msgspec_would_hide() -> None:
    with pytest.raises(_strict_json.DuplicateMember, match="duplicate member 'b'") as e:
        _strict_json.strict_loads(b'{"a": [{"b": 1, "c": 2, "b": 1}]}')
    assert e.value.name == "b"
    assert msgspec.json.decode(b'{"b": 1, "b": 2}') == {"b": 2}  # what it would hide
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match=f"non-finite number {constant}"):
            _strict_json.strict_loads(f'{{"a": {constant}}}')
    with pytest.raises(ValueError, match="BOM"):  # as json.loads says
        _strict_json.strict_loads(b"\xef\xbb\xbf{}")
    with pytest.raises(UnicodeDecodeError):
        _strict_json.strict_loads(b'"\xff"')
