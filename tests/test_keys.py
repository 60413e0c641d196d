"""Key files, JWKS shape and thumbprints, rotation bookkeeping."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc.jwk import KeySet, OKPKey

from bus_guard.errors import ConfigError
from bus_guard.signing import _keys as keys
from bus_guard.signing._keys import (
    add_key_to_jwks,
    generate_key,
    kid_for,
    load_private_key,
    public_jwk,
    revoke_key,
    rotate_key,
)
from bus_guard.verify import Jwks, b64url_decode, load_jwks

NOW = 1_764_150_000.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_key_writes_0600_key_and_public_jwks(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the key must not depend on the caller's umask
    try:
        key_path, jwks_path = generate_key(tmp_path / "k")
    finally:
        os.umask(old_umask)
    assert key_path == tmp_path / "k" / "signing-key.pem"
    assert jwks_path == tmp_path / "k" / "jwks.json"
    assert _mode(key_path) == 0o600
    assert _mode(jwks_path) == 0o644
    assert _mode(tmp_path / "k") == 0o700
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = load_private_key(key_path)
    doc = json.loads(jwks_path.read_text())
    assert doc == {"keys": [public_jwk(key)]}
    (jwk,) = doc["keys"]
    assert list(jwk) == ["kty", "crv", "x", "kid", "alg", "use"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in jwk
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert b64url_decode(jwk["x"]) == raw
    assert not list((tmp_path / "k").glob(".*"))  # no temporary files left behind


def test_key_file_is_created_0600_never_wider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Atomic creation: the file that will become the key is born with mode 0600 and
    # O_EXCL, not chmod-ed afterwards.
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)  # keys.py calls os.open
    generate_key(tmp_path)
    key_opens = [(f, m) for p, f, m in opened if "signing-key.pem" in p and f & os.O_CREAT]
    assert key_opens, opened
    for flags, mode in key_opens:
        assert mode == 0o600
        assert flags & os.O_EXCL


def test_kid_is_rfc7638_thumbprint() -> None:
    # RFC 8037 appendix A.2/A.3: the Ed25519 test key and its thumbprint.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    public = Ed25519PublicKey.from_public_bytes(b64url_decode(x))
    assert kid_for(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_kid_matches_joserfc_thumbprint() -> None:
    for _ in range(20):
        key = Ed25519PrivateKey.generate()
        jwk = public_jwk(key)
        theirs = OKPKey.import_key({k: jwk[k] for k in ("kty", "crv", "x")})
        assert jwk["kid"] == kid_for(key) == kid_for(key.public_key()) == theirs.thumbprint()


def test_jwks_imports_into_joserfc(tmp_path: Path) -> None:
    _, jwks_path = generate_key(tmp_path)
    keyset = KeySet.import_key_set(json.loads(jwks_path.read_text()))
    (key,) = keyset.keys
    assert isinstance(key, OKPKey)
    assert key.kid == key.thumbprint()


def test_refuses_to_overwrite_existing_key(tmp_path: Path) -> None:
    key_path, jwks_path = generate_key(tmp_path)
    before = key_path.read_bytes(), jwks_path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite") as e:
        generate_key(tmp_path)
    assert str(key_path) in str(e.value)
    assert (key_path.read_bytes(), jwks_path.read_bytes()) == before
    generate_key(tmp_path, overwrite=True)
    assert key_path.read_bytes() != before[0]
    assert _mode(key_path) == 0o600


def test_refuses_to_overwrite_existing_jwks(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"jwks\.json: already exists"):
        generate_key(tmp_path)
    assert not (tmp_path / "signing-key.pem").exists()


def _pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey, password: bytes | None) -> bytes:
    enc: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if password:
        enc = serialization.BestAvailableEncryption(password)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"", "not a PEM private key"),
        (b"hello", "not a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a valid PEM"),
        (_pem(ec.generate_private_key(ec.SECP256R1()), None), "not an Ed25519 key"),
        (_pem(Ed25519PrivateKey.generate(), b"secret"), "encrypted"),
    ],
    ids=["missing", "empty", "not-pem", "bad-pem", "ec-key", "encrypted"],
)
def test_load_private_key_errors_name_the_file(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "signing-key.pem"
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as e:
        load_private_key(path)
    assert str(e.value).startswith(f"{path}: ")


def test_load_private_key_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a regular file|cannot read") as e:
        load_private_key(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_private_key_unreadable(tmp_path: Path) -> None:
    key_path, _ = generate_key(tmp_path)
    key_path.chmod(0)
    with pytest.raises(ConfigError, match="not readable"):
        load_private_key(key_path)


def test_load_private_key_warns_when_group_or_world_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_path, _ = generate_key(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bus_guard.signing._keys"):
        load_private_key(key_path)
    assert not caplog.records
    key_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="bus_guard.signing._keys"):
        assert isinstance(load_private_key(key_path), Ed25519PrivateKey)
    (record,) = caplog.records
    assert str(key_path) in record.getMessage()
    assert "644" in record.getMessage()


# --- JWKS loading -------------------------------------------------------------------------


def _jwk(**over: object) -> dict[str, object]:
    jwk: dict[str, object] = dict(public_jwk(Ed25519PrivateKey.generate()))
    jwk.update(over)
    return {k: v for k, v in jwk.items() if v is not None}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "not a JWKS"),
        ({"keys": {}}, "not a JWKS"),
        ({"keys": []}, "no keys"),
        ({"keys": [1]}, "not a JSON object"),
        ({"keys": [_jwk(kty="RSA")]}, "not an Ed25519 key"),
        ({"keys": [_jwk(crv="Ed448")]}, "not an Ed25519 key"),
        ({"keys": [_jwk(alg="ES256")]}, "alg must be EdDSA"),
        ({"keys": [_jwk(use="enc")]}, "use must be 'sig'"),
        ({"keys": [_jwk(key_ops=["sign"])]}, "key_ops"),
        ({"keys": [_jwk(kid=None)]}, "missing kid"),
        ({"keys": [_jwk(kid="")]}, "missing kid"),
        ({"keys": [_jwk(x="AAAA")]}, "32 bytes"),
        ({"keys": [_jwk(x=public_jwk(Ed25519PrivateKey.generate())["x"] + "=")]}, "32 bytes"),
        ({"keys": [_jwk(d="c2VjcmV0")]}, "private key"),
        ({"keys": [_jwk(not_after="tomorrow")]}, "not_after must be unix seconds"),
        ({"keys": [_jwk(revoked_at=True)]}, "revoked_at must be unix seconds"),
        ({"keys": [_jwk(revoked_at=-1)]}, "revoked_at must be unix seconds"),
        ({"keys": [_jwk(kid="a"), _jwk(kid="a")]}, "duplicate kid 'a'"),
    ],
)
def test_load_jwks_rejects_bad_documents(
    tmp_path: Path, doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_jwks(doc)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message) as e:
        load_jwks(path)
    assert str(path) in str(e.value)


def test_load_jwks_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_jwks(tmp_path / "nope.json")
    dup = b'{"keys": [], "keys": []}'
    with pytest.raises(ConfigError, match="duplicate member"):
        load_jwks(dup)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_jwks(b"{")


def test_jwks_is_an_immutable_mapping_and_keeps_unknown_members() -> None:
    key = Ed25519PrivateKey.generate()
    jwk = _jwk(not_after=NOW + 10, x5u="https://example.test/k")
    jwk.update(public_jwk(key))
    jwks = load_jwks({"keys": [jwk]})
    kid = kid_for(key)
    assert list(jwks) == [kid]
    assert jwks[kid] == key.public_key()
    entry = jwks.entry(kid)
    assert entry is not None
    assert entry.not_after == NOW + 10
    assert entry.usable_at(NOW + 9.99)
    assert not entry.usable_at(NOW + 10)
    assert jwks.to_dict()["keys"][0]["x5u"] == "https://example.test/k"
    assert load_jwks(jwks.to_json()).to_dict() == jwks.to_dict()
    assert list(jwks.usable_at(NOW + 10)) == []
    with pytest.raises(TypeError):
        jwks[kid] = key.public_key()  # type: ignore[index]
    with pytest.raises(AttributeError):
        jwks.extra = 1  # type: ignore[attr-defined]


# --- rotation -----------------------------------------------------------------------------


def test_rotate_key_replaces_key_and_retires_old_after_grace(tmp_path: Path) -> None:
    key_path, jwks_path = generate_key(tmp_path)
    old_kid = kid_for(load_private_key(key_path))
    rotation = rotate_key(tmp_path, grace_s=600, now=NOW)
    new_key = load_private_key(key_path)
    assert _mode(key_path) == 0o600
    assert rotation.new_kid == kid_for(new_key) != old_kid
    assert rotation.retired_kid == old_kid
    assert rotation.not_after == NOW + 600
    jwks = load_jwks(jwks_path)
    assert set(jwks) == {old_kid, rotation.new_kid}
    old, new = jwks.entry(old_kid), jwks.entry(rotation.new_kid)
    assert old is not None and new is not None
    assert (old.not_after, old.revoked_at) == (NOW + 600, None)
    assert (new.not_after, new.revoked_at) == (None, None)
    assert set(jwks.usable_at(NOW + 599)) == {old_kid, rotation.new_kid}
    assert set(jwks.usable_at(NOW + 600)) == {rotation.new_kid}
    assert not list(tmp_path.glob(".*"))

    # A second rotation retires the second key and keeps the first one's earlier window.
    second = rotate_key(tmp_path, grace_s=600, now=NOW + 100)
    jwks = load_jwks(jwks_path)
    assert len(jwks) == 3
    first = jwks.entry(old_kid)
    assert first is not None and first.not_after == NOW + 600
    mid = jwks.entry(rotation.new_kid)
    assert mid is not None and mid.not_after == NOW + 700
    assert second.retired_kid == rotation.new_kid


def test_rotate_key_needs_current_key_in_jwks(tmp_path: Path) -> None:
    generate_key(tmp_path)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [_jwk()]}))
    with pytest.raises(ConfigError, match="does not contain the current key"):
        rotate_key(tmp_path, now=NOW)


def test_add_key_then_retire_two_phase(tmp_path: Path) -> None:
    key_path, jwks_path = generate_key(tmp_path)
    old_kid = kid_for(load_private_key(key_path))
    new = Ed25519PrivateKey.generate()
    # phase 1: publish the new key, retire nothing
    jwks = add_key_to_jwks(jwks_path, new.public_key(), now=NOW)
    assert set(jwks) == {old_kid, kid_for(new)}
    assert all(e.refused_from == float("inf") for e in jwks.entries)
    assert load_jwks(jwks_path).to_dict() == jwks.to_dict()
    # phase 2: retire the old key after a grace period (adding the new key again is a no-op)
    jwks = add_key_to_jwks(jwks_path, new, retire_kids=[old_kid], grace_s=30, now=NOW)
    entry = load_jwks(jwks_path).entry(old_kid)
    assert entry is not None and entry.not_after == NOW + 30
    assert len(jwks) == 2
    with pytest.raises(ConfigError, match="unknown kid"):
        add_key_to_jwks(jwks_path, new, retire_kids=["nope"], now=NOW)
    with pytest.raises(ConfigError, match="being added"):
        add_key_to_jwks(jwks_path, new, retire_kids=[kid_for(new)], now=NOW)
    with pytest.raises(ConfigError, match="grace_s"):
        add_key_to_jwks(jwks_path, new, grace_s=-1, now=NOW)


def test_revoke_key(tmp_path: Path) -> None:
    key_path, jwks_path = generate_key(tmp_path)
    kid = kid_for(load_private_key(key_path))
    jwks = revoke_key(jwks_path, kid, now=NOW)
    entry = load_jwks(jwks_path).entry(kid)
    assert entry is not None and entry.revoked_at == NOW
    assert json.loads(jwks_path.read_text())["keys"][0]["revoked_at"] == int(NOW)
    assert isinstance(jwks, Jwks) and not list(jwks.usable_at(NOW))
    with pytest.raises(ConfigError, match="no key"):
        revoke_key(jwks_path, "nope", now=NOW)


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(keys).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == keys.__name__
    }
    assert public <= set(keys.__all__)
    assert all(hasattr(keys, name) for name in keys.__all__)
