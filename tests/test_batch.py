"""Batched artifacts: RFC 9162 trees, one signed head per batch, verified transparently."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet

from bus_guard import verify
from bus_guard.cli._verify import main_verify
from bus_guard.errors import ConfigError, SigningError, VerificationError
from bus_guard.signing import _batch as batch
from bus_guard.signing._batch import BatchSigner, inclusion_proof, merkle_levels
from bus_guard.signing._keys import jwk_entry
from bus_guard.signing._signer import ArtifactClaims, Signer, payload_digest
from bus_guard.verify import (
    BATCH_PREFIX,
    Jwks,
    Verifier,
    b64url_decode,
    merkle_leaf_hash,
    merkle_node_hash,
    merkle_root_from_proof,
    proof_leads_to,
    verify_message,
)
from bus_guard.verify._base64url import b64url_decode_or_none

from .test_artifacts import (
    ISSUER,
    LEEWAY,
    NOW,
    SUBJECT,
    Env,
    b64,
    forge,
    header_for,
    make_claims,
    make_env,
)

HEAD_TYP = "guard-tree-head+jwt"


# --- the RFC 9162 reference, written from the RFC's recursive definitions ----------------


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def ref_root(leaves: list[bytes]) -> bytes:
    """MTH(D[n]), RFC 9162 §2.1.1."""
    n = len(leaves)
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_root(leaves[:k]) + ref_root(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]), RFC 9162 §2.1.3.1."""
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_root(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_root(leaves[:k])]


def ref_root_from_proof(leaf_hash: bytes, index: int, size: int, proof: bytes) -> bytes | None:
    """The root of RFC 9162 §2.1.3.2's verification procedure, step by step as the RFC
    words it; ``None`` where it says to fail. Only the tests walk proofs this way: the
    library has one walk (``bus_guard.verify._merkle``), checked against this one."""
    if not 0 <= index < size or len(proof) % 32:
        return None
    fn, sn, r = index, size - 1, leaf_hash
    for p in (proof[i : i + 32] for i in range(0, len(proof), 32)):
        if sn == 0:
            return None
        if fn % 2 == 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn //= 2
        sn //= 2
    return r if sn == 0 else None


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_tree_and_proofs_match_the_rfc(n: int, data: st.DataObject) -> None:
    leaves = [i.to_bytes(4, "big") * (i % 3) for i in range(n)]
    levels = merkle_levels([merkle_leaf_hash(x) for x in leaves])
    root = ref_root(leaves)
    assert levels[-1] == [root]
    for m in {0, n - 1, data.draw(st.integers(0, n - 1))}:
        proof = inclusion_proof(levels, m)
        assert proof == b"".join(ref_path(m, leaves))
        assert merkle_root_from_proof(merkle_leaf_hash(leaves[m]), m, n, proof) == root
        # The same proof for any other position fails. (Not so for every other size: the
        # signed head fixes the size, so the proof need not.)
        other = data.draw(st.integers(0, n - 1))
        if other != m:
            assert merkle_root_from_proof(merkle_leaf_hash(leaves[m]), other, n, proof) != root


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 70), data=st.data())
def test_memoised_proof_walk_gives_the_full_walks_answer(n: int, data: st.DataObject) -> None:
    # The verifier's shortcut (a walk stops at a state already proven to lead to the root)
    # must answer exactly as the full walk does: every genuine proof, in any order, and
    # every tampered one, refused even when the memo already holds its leaf's whole path.
    leaves = [i.to_bytes(4, "big") for i in range(n)]
    hashes = [merkle_leaf_hash(x) for x in leaves]
    levels = merkle_levels(hashes)
    root = levels[-1][0]
    memo: dict[tuple[int, int], tuple[bytes, bytes]] = {}
    for m in data.draw(st.permutations(range(n))):
        assert proof_leads_to(hashes[m], m, n, inclusion_proof(levels, m), root, memo)
    assert n == 1 or memo  # the walks were remembered
    for _ in range(20):
        m = data.draw(st.integers(0, n - 1))
        proof = bytearray(inclusion_proof(levels, m))
        kind = data.draw(st.sampled_from(["flip", "cut", "extend", "index", "leaf", "size"]))
        index, size, leaf = m, n, hashes[m]
        if kind == "flip" and proof:
            bit = data.draw(st.integers(0, len(proof) * 8 - 1))
            proof[bit // 8] ^= 1 << (bit % 8)
        elif kind == "cut" and proof:
            del proof[-32:]
        elif kind == "extend":
            proof += hashes[data.draw(st.integers(0, n - 1))]
        elif kind == "index":
            index = data.draw(st.integers(-1, n + 1))
        elif kind == "leaf":
            leaf = hashes[data.draw(st.integers(0, n - 1))]
        elif kind == "size":
            size = data.draw(st.integers(1, n + 2))
        full = merkle_root_from_proof(leaf, index, size, bytes(proof)) == root
        assert proof_leads_to(leaf, index, size, bytes(proof), root, memo) == full
        assert (ref_root_from_proof(leaf, index, size, bytes(proof)) == root) == full


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 70), data=st.data())
def test_full_walk_is_the_rfc_procedure(n: int, data: st.DataObject) -> None:
    # merkle_root_from_proof and proof_leads_to share one walk; it must give the root the
    # RFC's own wording gives for any leaf, index, size and proof, genuine or not.
    hashes = [merkle_leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    levels = merkle_levels(hashes)
    m = data.draw(st.integers(0, n - 1))
    genuine = inclusion_proof(levels, m)
    proof = data.draw(
        st.just(genuine)
        | st.binary(max_size=len(genuine) + 64)
        | st.sampled_from(hashes).map(lambda h: genuine + h)
        | st.just(genuine[:-32])
    )
    index = data.draw(st.integers(-1, n + 1) | st.just(m))
    size = data.draw(st.integers(0, n + 2) | st.just(n))
    leaf = data.draw(st.sampled_from(hashes))
    assert merkle_root_from_proof(leaf, index, size, proof) == ref_root_from_proof(
        leaf, index, size, proof
    )


def test_known_vectors() -> None:
    # Hand-computed RFC 9162 shapes: 3 leaves = ((a, b), c); 5 = (((a,b),(c,d)), e).
    a, b, c, d, e = (merkle_leaf_hash(x) for x in (b"a", b"b", b"c", b"d", b"e"))
    ab, cd = merkle_node_hash(a, b), merkle_node_hash(c, d)
    assert merkle_levels([a, b, c])[-1] == [merkle_node_hash(ab, c)]
    levels = merkle_levels([a, b, c, d, e])
    assert levels[-1] == [merkle_node_hash(merkle_node_hash(ab, cd), e)]
    assert inclusion_proof(levels, 4) == merkle_node_hash(ab, cd)
    assert inclusion_proof(levels, 2) == d + ab + e
    assert merkle_leaf_hash(b"") == hashlib.sha256(b"\x00").digest()


def test_proof_verification_rejects_bad_shapes() -> None:
    leaf = merkle_leaf_hash(b"x")
    assert merkle_root_from_proof(leaf, 0, 1, b"") == leaf
    assert merkle_root_from_proof(leaf, 1, 1, b"") is None  # index beyond the tree
    assert merkle_root_from_proof(leaf, -1, 1, b"") is None
    assert merkle_root_from_proof(leaf, 0, 1, bytes(32)) is None  # longer than the tree
    assert merkle_root_from_proof(leaf, 0, 2, b"") is None  # shorter than the tree
    assert merkle_root_from_proof(leaf, 0, 2, bytes(31)) is None  # not whole hashes
    with pytest.raises(ValueError, match="at least one"):
        merkle_levels([])


# --- signing and verifying batches --------------------------------------------------------


def payloads(n: int) -> list[bytes]:
    return [b'{"n":%d}' % i for i in range(n)]


def batch_claims(signer: Signer, bodies: list[bytes], **over: Any) -> list[ArtifactClaims]:
    return [
        make_claims(signer, jti=f"dec-{i}", payload_sha256=payload_digest(p), **over)
        for i, p in enumerate(bodies)
    ]


def signed(env: Env, n: int) -> tuple[list[str], list[bytes], list[ArtifactClaims]]:
    bodies = payloads(n)
    claims = batch_claims(env.signer, bodies)
    return BatchSigner(env.signer).sign_batch(claims, now=NOW), bodies, claims


def check(verifier: Verifier, token: Any, payload: bytes, **kw: Any) -> ArtifactClaims:
    return verifier.verify(
        token, subject=kw.pop("subject", SUBJECT), payload=payload, now=NOW, **kw
    )


def reason_of(verifier: Verifier, token: Any, payload: bytes, **kw: Any) -> str:
    with pytest.raises(VerificationError) as e:
        verifier.verify(token, payload=payload, **{"subject": SUBJECT, "now": NOW, **kw})
    return e.value.reason


@pytest.fixture
def env() -> Env:
    return make_env()


def test_round_trip(env: Env) -> None:
    tokens, bodies, claims = signed(env, 7)
    verifier = Verifier(env.jwks, leeway_s=LEEWAY)
    for token, body, expected in zip(tokens, bodies, claims, strict=True):
        assert token.startswith(BATCH_PREFIX)
        assert check(verifier, token, body) == expected
    # One Ed25519 verification for the whole batch; the other six came from the cache.
    stats = verifier.statistics()
    assert (stats.heads_verified, stats.head_cache_hits, stats.cached_heads) == (1, 6, 1)
    # Signing is deterministic (Ed25519 and the tree), so a retry gives the same bytes.
    assert BatchSigner(env.signer).sign_batch(claims, now=NOW) == tokens


def test_layout(env: Env) -> None:
    tokens, _, claims = signed(env, 3)
    tag, index, leaf, proof, head = tokens[2].split("~")
    assert (tag + "~", index) == (BATCH_PREFIX, "2")
    # The leaf is the claims segment a per-message artifact would carry.
    assert leaf == env.signer.sign(claims[2]).split(".")[1]
    assert len(b64url_decode(proof)) == 32  # leaf 2 of 3: one sibling, (0, 1)
    header, body, sig = head.split(".")
    assert json.loads(b64url_decode(header)) == {
        "alg": "EdDSA",
        "kid": env.signer.kid,
        "typ": HEAD_TYP,
    }
    root = ref_root([b64url_decode(t.split("~")[2]) for t in tokens])
    assert json.loads(b64url_decode(body)) == {
        "iss": ISSUER,
        "iat": NOW,
        "tree_size": 3,
        "root_hash": b64(root),
    }
    assert {t.split("~")[4] for t in tokens} == {head}
    assert len(b64url_decode(sig)) == 64


def test_head_is_a_standard_jws(env: Env) -> None:
    # Any JOSE library verifies the head; what it covers is documented in bus_guard.verify.
    head = signed(env, 2)[0][0].split("~")[4]
    keyset = KeySet.import_key_set(env.jwks.to_dict())  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        obj = jws.deserialize_compact(head, keyset, algorithms=["EdDSA"])
    assert json.loads(obj.payload)["tree_size"] == 2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_any_size_and_index_verifies(n: int, data: st.DataObject) -> None:
    env = _ENV
    bodies = payloads(n)
    claims = batch_claims(env.signer, bodies)
    tokens = BatchSigner(env.signer).sign_batch(claims, now=NOW)
    assert len(tokens) == n
    verifier = Verifier(env.jwks, leeway_s=LEEWAY)
    for i in {0, n - 1, *data.draw(st.lists(st.integers(0, n - 1), max_size=5))}:
        assert check(verifier, tokens[i], bodies[i]) == claims[i]
        # The artifact of message i never verifies for the payload of another message.
        j = data.draw(st.integers(0, n - 1))
        if j != i:
            assert reason_of(verifier, tokens[i], bodies[j]) == "payload_mismatch"
            # nor with another leaf's index
            parts = tokens[i].split("~")
            parts[1] = str(j)
            assert reason_of(verifier, "~".join(parts), bodies[i]) == "bad_signature"
    assert verifier.statistics().heads_verified == 1


_ENV = make_env()


def test_verify_message_accepts_batched(env: Env) -> None:
    tokens, bodies, claims = signed(env, 2)
    headers = {"Guard-Artifact": tokens[1], "Guard-Decision": claims[1].jti}
    verifier = Verifier(env.jwks)
    got = verify_message(verifier, subject=SUBJECT, headers=headers, payload=bodies[1], now=NOW)
    assert got == claims[1]
    headers["Guard-Decision"] = claims[0].jti
    with pytest.raises(VerificationError, match="decision_mismatch"):
        verify_message(verifier, subject=SUBJECT, headers=headers, payload=bodies[1], now=NOW)


def test_cli_verifies_batched(env: Env, tmp_path: Path) -> None:
    tokens, bodies, _ = signed(env, 3)
    (tmp_path / "jwks.json").write_bytes(env.jwks.to_json())
    (tmp_path / "payload").write_bytes(bodies[1])
    out = io.StringIO()
    code = main_verify(
        jwks=tmp_path / "jwks.json",
        subject=SUBJECT,
        payload=tmp_path / "payload",
        artifact=tokens[1],
        out=out,
        now=NOW,
    )
    assert code == 0, out.getvalue()
    assert json.loads(out.getvalue())["jti"] == "dec-1"


# --- every tamper is rejected --------------------------------------------------------------


def _with(token: str, field: int, value: str) -> str:
    parts = token.split("~")
    parts[field] = value
    return "~".join(parts)


def _head_over(
    key: Ed25519PrivateKey, leaves: list[bytes], *, header: dict[str, Any], **over: Any
) -> str:
    """A tree head over *leaves* signed by *key* with any header and claims."""
    root = merkle_levels([merkle_leaf_hash(x) for x in leaves])[-1][0]
    claims: dict[str, Any] = {"iss": ISSUER, "iat": NOW, "tree_size": len(leaves)}
    claims["root_hash"] = b64(root)
    claims.update(over)
    return forge(key, header, claims)


def _artifact(index: int, leaves: list[bytes], head: str) -> str:
    levels = merkle_levels([merkle_leaf_hash(x) for x in leaves])
    proof = b64(inclusion_proof(levels, index))
    return f"{BATCH_PREFIX}{index}~{b64(leaves[index])}~{proof}~{head}"


def _leaves(env: Env, n: int = 4, **over: Any) -> list[bytes]:
    return [msgspec.json.encode(c) for c in batch_claims(env.signer, payloads(n), **over)]


def test_tampering_is_rejected(env: Env) -> None:
    tokens, bodies, claims = signed(env, 5)
    good, body = tokens[2], bodies[2]
    v = Verifier(env.jwks, leeway_s=LEEWAY)
    tag, index, leaf, proof, head = good.split("~")
    head_h, head_c, head_s = head.split(".")
    proof_raw = b64url_decode(proof)
    other_batch = signed(env, 5)[0]  # same claims, same tree: same artifacts
    assert other_batch == tokens
    moved = BatchSigner(env.signer).sign_batch(claims[::-1], now=NOW)  # another tree

    # leaf claims: a changed claim, or a leaf from another tree, is not under this root
    forged_leaf = msgspec.json.encode(msgspec.structs.replace(claims[2], aud="guard.exec.x"))
    assert reason_of(v, _with(good, 2, b64(forged_leaf)), body) == "bad_signature"
    assert reason_of(v, _with(good, 2, moved[0].split("~")[2]), body) == "bad_signature"
    # proof: any flipped bit, a missing or an extra hash
    for i in (0, 31, 32, len(proof_raw) - 1):
        flipped = bytearray(proof_raw)
        flipped[i] ^= 1
        assert reason_of(v, _with(good, 3, b64(bytes(flipped))), body) == "bad_signature"
    assert reason_of(v, _with(good, 3, b64(proof_raw[:-32])), body) == "bad_signature"
    assert reason_of(v, _with(good, 3, b64(proof_raw + bytes(32))), body) == "bad_signature"
    assert reason_of(v, _with(good, 3, ""), body) == "bad_signature"
    # index: another position, beyond the tree, or not canonical
    for bad in ("0", "1", "3", "4", "5", "9007199254740991"):
        assert reason_of(v, _with(good, 1, bad), body) == "bad_signature"
    for bad in ("02", "-2", "+2", "2.0", "", " 2", "99999999999999999"):
        assert reason_of(v, _with(good, 1, bad), body) == "malformed"
    # the head: another tree's head, a broken signature, a head over another root
    assert reason_of(v, _with(good, 4, moved[0].split("~")[4]), body) == "bad_signature"
    assert reason_of(v, _with(good, 4, f"{head_h}.{head_c}.{b64(bytes(64))}"), body) == (
        "bad_signature"
    )
    other_sig = moved[0].split("~")[4].split(".")[2]
    assert reason_of(v, _with(good, 4, f"{head_h}.{head_c}.{other_sig}"), body) == ("bad_signature")
    body_json = json.loads(b64url_decode(head_c))
    for over in ({"tree_size": 6}, {"tree_size": 4}, {"root_hash": b64(bytes(32))}):
        swapped = {**body_json, **over}
        forged_head = f"{head_h}.{b64(json.dumps(swapped).encode())}.{head_s}"
        assert reason_of(v, _with(good, 4, forged_head), body) == "bad_signature"
    # correctly signed heads that lie about the tree are caught by the proof
    leaves, p1 = _leaves(env), payloads(4)[1]
    hdr = header_for(env.key, typ=HEAD_TYP)

    def under(key: Ed25519PrivateKey, header: dict[str, Any], **over: Any) -> str:
        return _artifact(1, leaves, _head_over(key, leaves, header=header, **over))

    assert reason_of(v, under(env.key, hdr, tree_size=5), p1) == "bad_signature"
    assert reason_of(v, under(env.key, hdr, root_hash=b64(bytes(32))), p1) == "bad_signature"
    # the head's typ, kid, key
    assert reason_of(v, under(env.key, header_for(env.key)), p1) == "bad_header"
    assert reason_of(v, under(env.key, header_for(env.key, typ="JWT")), p1) == "bad_header"
    crit = header_for(env.key, typ=HEAD_TYP, crit=["x"])
    assert reason_of(v, under(env.key, crit), p1) == "bad_header"
    stranger = env.stranger._key
    assert reason_of(v, under(stranger, header_for(stranger, typ=HEAD_TYP)), p1) == "unknown_kid"
    assert reason_of(v, under(stranger, hdr), p1) == "bad_signature"  # our kid, another key
    revoked = env.revoked._key
    assert reason_of(v, under(revoked, header_for(revoked, typ=HEAD_TYP)), p1) == "revoked_kid"
    # head claims that do not decode strictly, even when signed
    for over in ({"tree_size": 0}, {"extra": 1}, {"root_hash": "x"}, {"iat": -1}):
        assert reason_of(v, under(env.key, hdr, **over), p1) == "malformed"
    head_claims = b64url_decode(_head_over(env.key, leaves, header=hdr).split(".")[1])
    dup = forge(env.key, hdr, b'{"tree_size":4,' + head_claims[1:])
    assert reason_of(v, _artifact(1, leaves, dup), p1) == "malformed"
    # a leaf naming another issuer than its head
    other = _leaves(env, iss="gw-2")
    forged = _artifact(0, other, _head_over(env.key, other, header=hdr))
    assert reason_of(v, forged, payloads(4)[0]) == "wrong_issuer"
    # kinds cannot be swapped: a head is no artifact, an artifact no head
    assert reason_of(v, head, body) == "bad_header"
    per_message = env.signer.sign(claims[2])
    assert reason_of(v, _with(good, 4, per_message), body) == "bad_header"
    # shape
    for bad in (
        good + "~",
        good.replace("gb1~", "gb2~"),
        "gb1~",
        tag + "~" + index + "~" + leaf + "~" + proof,
        _with(good, 2, leaf + "="),
        _with(good, 2, leaf[:-1] + "+"),
        _with(good, 2, ""),
        _with(good, 3, proof + "A"),
        _with(good, 4, head + ".x"),
        _with(good, 4, head.replace(".", "", 1)),
        good.replace("~", "~ ", 1),
    ):
        assert reason_of(v, bad, body) == "malformed", bad
    assert check(v, good, body) == claims[2]
    # Only heads whose signature holds are cached (those above whose proof failed are
    # genuine heads); a broken one is verified, and refused, every time.
    fresh = Verifier(env.jwks, leeway_s=LEEWAY)
    broken = _with(good, 4, f"{head_h}.{head_c}.{b64(bytes(64))}")
    for _ in range(2):
        assert reason_of(fresh, broken, body) == "bad_signature"
    assert fresh.statistics() == verify.VerifierStatistics(0, 0, 0)


def test_claim_checks_apply_to_batched(env: Env) -> None:
    tokens, bodies, claims = signed(env, 2)
    v = Verifier(env.jwks, leeway_s=LEEWAY)
    assert reason_of(v, tokens[0], bodies[0], subject="guard.exec.other.x") == "wrong_audience"
    assert reason_of(v, tokens[0], bodies[0], now=NOW - LEEWAY - 1) == "not_yet_valid"
    assert reason_of(v, tokens[0], bodies[0], now=NOW + 60 + LEEWAY) == "expired"
    assert reason_of(v, tokens[0], bodies[0] + b" ") == "payload_mismatch"
    strict = Verifier(env.jwks, leeway_s=LEEWAY, issuer="gw-2")
    assert reason_of(strict, tokens[0], bodies[0]) == "wrong_issuer"
    seen: set[str] = set()

    def once(jti: str) -> bool:
        found = jti in seen
        seen.add(jti)
        return found

    replay = Verifier(env.jwks, leeway_s=LEEWAY, seen=once)
    assert check(replay, tokens[1], bodies[1]) == claims[1]
    assert reason_of(replay, tokens[1], bodies[1]) == "replay"


def test_revocation_applies_to_cached_heads(env: Env) -> None:
    key = Ed25519PrivateKey.generate()
    signer = Signer(key, issuer=ISSUER)
    jwks = Jwks([jwk_entry(key, revoked_at=NOW + 10)])
    v = Verifier(jwks, leeway_s=LEEWAY)
    tokens = BatchSigner(signer).sign_batch(batch_claims(signer, payloads(2)), now=NOW)
    assert check(v, tokens[0], payloads(2)[0])
    assert v.statistics().cached_heads == 1
    assert reason_of(v, tokens[1], payloads(2)[1], now=NOW + 10) == "revoked_kid"
    assert v.statistics().head_cache_hits == 1  # the cached head, refused all the same


def test_head_cache_is_bounded_lru(env: Env) -> None:
    v = Verifier(env.jwks, leeway_s=LEEWAY, max_cached_heads=2)
    batcher = BatchSigner(env.signer)
    batches = []
    for seq in range(4):
        bodies = payloads(2)
        claims = batch_claims(env.signer, bodies, ledger_seq=seq)  # distinct trees
        batches.append((batcher.sign_batch(claims, now=NOW), bodies))
    (a, a_bodies), (b, b_bodies), (c, c_bodies), _ = batches
    check(v, a[0], a_bodies[0])
    check(v, b[0], b_bodies[0])
    check(v, a[1], a_bodies[1])  # hit: a becomes the most recently used
    check(v, c[0], c_bodies[0])  # evicts b, the least recently used
    assert v.statistics() == verify.VerifierStatistics(3, 1, 2)
    check(v, a[0], a_bodies[0])  # still cached
    check(v, b[1], b_bodies[1])  # verified again; evicts c
    assert v.statistics() == verify.VerifierStatistics(4, 2, 2)
    for tokens, bodies in batches:
        check(v, tokens[0], bodies[0])
    assert v.statistics().cached_heads == 2
    with pytest.raises(ConfigError, match="max_cached_heads"):
        Verifier(env.jwks, max_cached_heads=0)


# --- failing closed ---------------------------------------------------------------------


def test_sign_batch_fails_closed(env: Env) -> None:
    batcher = BatchSigner(env.signer, max_batch=4)
    claims = batch_claims(env.signer, payloads(3))
    assert batcher.sign_batch([], now=NOW) == []
    with pytest.raises(SigningError, match="issuer"):
        batcher.sign_batch([*claims, make_claims(env.signer, iss="gw-2")], now=NOW)
    with pytest.raises(SigningError, match="max_batch"):
        batcher.sign_batch(claims * 2, now=NOW)
    with pytest.raises(SigningError, match="cannot sign a batch"):
        batcher.sign_batch([*claims, make_claims(env.signer, resource="\ud800")], now=NOW)

    class Broken(Signer):
        def sign_tree_head(self, *, root: bytes, size: int, now: float) -> str:
            raise RuntimeError("HSM unavailable")

    with pytest.raises(SigningError, match="HSM unavailable"):
        BatchSigner(Broken(env.key, issuer=ISSUER)).sign_batch(claims, now=NOW)
    with pytest.raises(SigningError, match="tree head"):
        env.signer.sign_tree_head(root=b"short", size=1, now=NOW)
    with pytest.raises(SigningError, match="tree head"):
        env.signer.sign_tree_head(root=bytes(32), size=0, now=NOW)
    with pytest.raises(ConfigError):
        BatchSigner(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BatchSigner(env.signer, max_batch=0)


# --- the fast strict base64url decoder agrees with the reference -------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="AQgw_-zZ09+/= \n\u00e9~.", max_size=12) | st.binary(max_size=9).map(b64))
def test_strict_decoder_agrees_with_b64url_decode(text: str) -> None:
    try:
        expected: bytes | None = b64url_decode(text)
    except ValueError:
        expected = None
    assert b64url_decode_or_none(text) == expected


def test_module_surface() -> None:
    assert set(batch.__all__) == {"MAX_BATCH", "BatchSigner", "inclusion_proof", "merkle_levels"}
    assert isinstance(batch.__all__, tuple)
