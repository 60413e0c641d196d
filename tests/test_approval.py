"""Approval tokens (:mod:`bus_guard.approval`): sign, read strictly, check; every way a
body is refused; and an independent JOSE library (joserfc, as for artifacts) agreeing with
us both ways."""

from __future__ import annotations

import json
import warnings
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey

from bus_guard.approval import (
    APPROVAL_TYP,
    MAX_APPROVAL_BYTES,
    MAX_REASON_CHARS,
    ApprovalClaims,
    ApprovalError,
    check_signature,
    read_approval,
    sign_approval,
)
from bus_guard.signing._keys import kid_for, public_jwk
from bus_guard.verify import b64url_encode, payload_digest
from bus_guard.verify._strict_json import strict_loads

KEY = Ed25519PrivateKey.generate()
KID = kid_for(KEY.public_key())
CLAIMS = ApprovalClaims(
    hold="5QF3J8RZ0T7W2M4K9XH6B1N0CD",
    payload_sha256=payload_digest(b'{"amount": 25000}'),
    approver="alice",
    verdict="approve",
    iat=1_764_150_000.5,
    reason="invoice 4711 checked",
)
HEADER: dict[str, Any] = {"alg": "EdDSA", "kid": KID, "typ": APPROVAL_TYP}


def _claims_dict(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(CLAIMS)
    out.update(changes)
    return out


def _b64(data: bytes) -> str:
    return b64url_encode(data).decode("ascii")


def _token(header: bytes | dict[str, Any], claims: bytes | dict[str, Any]) -> bytes:
    """A token over exactly these header and claims bytes, signed with KEY."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{_b64(h)}.{_b64(c)}"
    return f"{signing_input}.{_b64(KEY.sign(signing_input.encode()))}".encode()


def test_sign_read_check_round_trip() -> None:
    token = sign_approval(KEY, KID, CLAIMS)
    read = read_approval(token.encode())
    assert read.kid == KID and read.claims == CLAIMS
    assert check_signature(read, KEY.public_key())
    assert not check_signature(read, Ed25519PrivateKey.generate().public_key())
    header = json.loads(_b64_decode(token.split(".")[0]))
    assert header == HEADER
    # a token we build by hand from the same parts reads the same (no hidden state)
    assert read_approval(_token(HEADER, _claims_dict())).claims == CLAIMS
    # surrounding whitespace (a trailing newline from a file or a shell) is tolerated
    assert read_approval(token.encode() + b"\n").claims == CLAIMS


def _b64_decode(seg: str) -> bytes:
    from bus_guard.verify import b64url_decode

    return b64url_decode(seg)


def test_a_tampered_token_does_not_check() -> None:
    token = sign_approval(KEY, KID, CLAIMS)
    head, body, sig = token.split(".")
    flipped = bytearray(_b64_decode(sig))
    flipped[0] ^= 1
    assert not check_signature(
        read_approval(f"{head}.{body}.{_b64(bytes(flipped))}".encode()), KEY.public_key()
    )
    # other claims under the original signature: the verdict turned around
    other = _b64(json.dumps(_claims_dict(verdict="reject")).encode())
    read = read_approval(f"{head}.{other}.{sig}".encode())
    assert read.claims.verdict == "reject"
    assert not check_signature(read, KEY.public_key())


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({**HEADER, "typ": "JWT"}, "typ"),
        ({**HEADER, "typ": "guard-artifact+jwt"}, "typ"),
        ({**HEADER, "alg": "ES256"}, "alg"),
        ({**HEADER, "alg": "none"}, "alg"),
        ({"alg": "EdDSA", "typ": APPROVAL_TYP}, "exactly alg, kid and typ"),
        ({**HEADER, "crit": ["x"]}, "exactly alg, kid and typ"),
        ({**HEADER, "kid": ""}, "kid"),
        ({**HEADER, "kid": 7}, "kid"),
        ({**HEADER, "kid": "k" * 129}, "kid"),
        (["alg", "kid", "typ"], "exactly alg, kid and typ"),
    ],
)
def test_a_wrong_header_is_refused(header: Any, why: str) -> None:
    with pytest.raises(ApprovalError, match=why):
        read_approval(_token(header, _claims_dict()))


def test_duplicate_members_are_refused_in_header_and_claims() -> None:
    head = b'{"alg":"EdDSA","kid":"%s","typ":"%s","typ":"JWT"}' % (
        KID.encode(),
        APPROVAL_TYP.encode(),
    )
    with pytest.raises(ApprovalError, match="DuplicateMember\\('typ'\\)"):
        read_approval(_token(head, _claims_dict()))
    # msgspec alone would keep the last "verdict": the strict parser refuses the object
    body = json.dumps(_claims_dict())[:-1].encode() + b', "verdict": "reject"}'
    with pytest.raises(ApprovalError, match="duplicate member 'verdict'"):
        read_approval(_token(HEADER, body))


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        (_claims_dict(extra="x"), "extra"),
        (_claims_dict(payload_sha256="A" * 42), "payload_sha256"),
        (_claims_dict(payload_sha256="A" * 44), "payload_sha256"),
        (_claims_dict(payload_sha256="A" * 42 + "="), "payload_sha256"),
        (_claims_dict(payload_sha256="sha256:" + "A" * 36), "payload_sha256"),
        (_claims_dict(verdict="maybe"), "verdict"),
        (_claims_dict(hold=""), "hold"),
        (_claims_dict(hold="a b"), "hold"),
        (_claims_dict(hold="x" * 129), "hold"),
        (_claims_dict(approver="alice\x1b[2J"), "approver"),
        (_claims_dict(reason="x" * (MAX_REASON_CHARS + 1)), "reason"),
        (_claims_dict(iat=-1), "iat"),
        (_claims_dict(iat="now"), "iat"),
        ({k: v for k, v in _claims_dict().items() if k != "payload_sha256"}, "payload_sha256"),
        ([1, 2], "claims"),
    ],
)
def test_claims_out_of_shape_are_refused(claims: Any, why: str) -> None:
    with pytest.raises(ApprovalError, match=why):
        read_approval(_token(HEADER, claims))


def test_nan_claims_are_refused() -> None:
    body = json.dumps(_claims_dict())[:-1].encode() + b', "x": NaN}'
    with pytest.raises(ApprovalError, match="claims"):
        read_approval(_token(HEADER, body))


def test_deep_json_is_refused_not_raised() -> None:
    """Nesting deep enough for the parser's RecursionError fits in the size limit (the C
    scanner recurses once per level, up to the interpreter's recursion limit): it is an
    ApprovalError, in the header and the claims."""
    deep = b"[" * 1200 + b"]" * 1200
    with pytest.raises(RecursionError):  # what the reader has to catch
        strict_loads(deep)
    assert len(_token(deep, _claims_dict())) <= MAX_APPROVAL_BYTES
    for token in (_token(deep, _claims_dict()), _token(HEADER, deep)):
        with pytest.raises(ApprovalError):
            read_approval(token)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"a" * (MAX_APPROVAL_BYTES + 1), f"more than {MAX_APPROVAL_BYTES}"),
        ("é.b.c".encode(), "not ASCII"),
        (b"a.b", "three base64url segments"),
        (b"a.b.c.d", "three base64url segments"),
        (b"", "three base64url segments"),
        (b"!!.e30.AA", "not a compact JWS"),
    ],
)
def test_bodies_that_are_no_token_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(ApprovalError, match=why):
        read_approval(body)


def test_a_signature_of_the_wrong_length_is_refused() -> None:
    head, body, _ = sign_approval(KEY, KID, CLAIMS).split(".")
    with pytest.raises(ApprovalError, match="64 bytes"):
        read_approval(f"{head}.{body}.{_b64(bytes(63))}".encode())


def test_the_size_limit_is_the_whole_body() -> None:
    """A token just at the limit is read (and a longest reason fits well within it)."""
    longest = msgspec.structs.replace(CLAIMS, reason="é" * MAX_REASON_CHARS)
    token = sign_approval(KEY, KID, longest).encode()
    assert len(token) <= MAX_APPROVAL_BYTES
    assert read_approval(token).claims == longest
    padded = token + b" " * (MAX_APPROVAL_BYTES - len(token))
    assert read_approval(padded).claims == longest
    with pytest.raises(ApprovalError, match="bytes"):
        read_approval(padded + b" ")


# --- interop with an independent JOSE implementation -------------------------------------


def _joserfc_key() -> OKPKey:
    return OKPKey.import_key(public_jwk(KEY))


def test_joserfc_verifies_our_approval_tokens() -> None:
    token = sign_approval(KEY, KID, CLAIMS)
    # joserfc flags the polymorphic "EdDSA" alg as deprecated by RFC 9864; SPEC §6 fixes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        decoded = jws.deserialize_compact(token, _joserfc_key(), algorithms=["EdDSA"])
        broken = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        with pytest.raises(Exception, match="signature"):
            jws.deserialize_compact(broken, _joserfc_key(), algorithms=["EdDSA"])
    assert decoded.protected == HEADER
    assert json.loads(decoded.payload) == _claims_dict()


def test_we_read_approval_tokens_joserfc_makes() -> None:
    """Another tool can produce votes: joserfc orders the header its own way and encodes
    the claims with spaces; we read and check them all the same."""
    header = {"typ": APPROVAL_TYP, "kid": KID, "alg": "EdDSA"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        token = jws.serialize_compact(
            header, json.dumps(_claims_dict()), OKPKey.import_key(KEY), algorithms=["EdDSA"]
        )
    assert token.split(".")[0] != sign_approval(KEY, KID, CLAIMS).split(".")[0]
    read = read_approval(token.encode())
    assert read.claims == CLAIMS and read.kid == KID
    assert check_signature(read, KEY.public_key())
