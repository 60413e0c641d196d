"""Signing keys and the JWKS that publishes their public halves.

A key directory holds ``signing-key.pem`` (PKCS#8 PEM Ed25519, mode 0600) and
``jwks.json`` (RFC 7517). Each key's ``kid`` is its RFC 7638 thumbprint, so a ``kid`` names
exactly one public key wherever it is seen.

Rotation (SPEC §6, SCENARIOS S10) is two edits of the JWKS: the new key is added, and the
retired key gets a ``not_after`` member (unix seconds) at the end of a grace period long
enough for every verifier to fetch the new JWKS and for artifacts already signed with the
old key to expire. ``revoked_at`` is the emergency variant: the key is refused from that
instant on. Both are extension members that :mod:`bus_guard.verify` enforces; a generic
JOSE verifier ignores them, so give it :meth:`~bus_guard.verify.Jwks.usable_at` instead.

The JWKS model (:class:`~bus_guard.verify.JwkEntry`, :class:`~bus_guard.verify.Jwks`,
:func:`~bus_guard.verify.load_jwks`) is the verifier's; this module only makes entries
from keys and edits the file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bus_guard.errors import ConfigError
from bus_guard.verify import JwkEntry, Jwks, b64url_encode, load_jwks

__all__ = (
    "DEFAULT_GRACE_S",
    "JWKS_FILENAME",
    "KEY_FILENAME",
    "Rotation",
    "add_key_to_jwks",
    "generate_key",
    "jwk_entry",
    "kid_for",
    "load_private_key",
    "merge_jwks",
    "public_jwk",
    "revoke_key",
    "rotate_key",
)

logger = logging.getLogger(__name__)

KEY_FILENAME = "signing-key.pem"
JWKS_FILENAME = "jwks.json"
# Must cover JWKS propagation to every verifier plus the artifact TTL and clock leeway.
DEFAULT_GRACE_S = 3600.0
# A PEM Ed25519 key is ~120 bytes; refuse to slurp anything large by mistake.
_MAX_KEY_FILE_BYTES = 64 * 1024


def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def _x(public: Ed25519PublicKey) -> str:
    """The JWK ``x`` member: the raw public key, base64url."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64url_encode(raw).decode("ascii")


def kid_for(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """RFC 7638 JWK thumbprint: base64url SHA-256 of ``{"crv","kty","x"}`` in that order."""
    canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{_x(_public(public_key))}"}}'
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest()).decode("ascii")


def jwk_entry(
    key: Ed25519PrivateKey | Ed25519PublicKey,
    *,
    not_after: float | None = None,
    revoked_at: float | None = None,
) -> JwkEntry:
    """The JWKS entry of *key*'s public half, ``kid`` its thumbprint (:func:`kid_for`)."""
    public = _public(key)
    return JwkEntry(
        kid=kid_for(public),
        public_key=public,
        x=_x(public),
        not_after=not_after,
        revoked_at=revoked_at,
    )


def public_jwk(key: Ed25519PrivateKey | Ed25519PublicKey) -> dict[str, Any]:
    """The public JWK of *key* (never the private part), as the JWKS model writes it."""
    return jwk_entry(key).to_jwk()


# --- files ------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write *path* atomically, created with *mode* from the first byte on.

    The data goes to a temporary file opened ``O_EXCL`` with *mode* (umask can only narrow
    it), then is linked into place: ``link`` refuses an existing target, ``replace``
    swaps it. Readers never see a partial file, nor a key file with wider permissions.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # exactly *mode*, whatever the umask removed
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConfigError(f"{path}: already exists; refusing to overwrite") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_key(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a new Ed25519 key in *out_dir*: ``signing-key.pem`` (0600) and ``jwks.json``.

    Refuses (``ConfigError``) when either file exists, unless *overwrite*; use
    :func:`rotate_key` to replace a key in service.
    """
    out_dir = Path(out_dir)
    key_path, jwks_path = out_dir / KEY_FILENAME, out_dir / JWKS_FILENAME
    if not overwrite:
        for p in (key_path, jwks_path):
            if p.exists():
                raise ConfigError(f"{p}: already exists; refusing to overwrite")
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        _write_new(key_path, _pem(key), 0o600, overwrite=overwrite)
        _write_new(jwks_path, Jwks([jwk_entry(key)]).to_json(), 0o644, overwrite=overwrite)
    except OSError as exc:
        raise ConfigError(f"{out_dir}: cannot write key files: {exc}") from exc
    return key_path, jwks_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM Ed25519 key; ``ConfigError`` naming *path* otherwise.

    A key readable by group or others is loaded, with a warning.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{path}: signing key is not a regular file")
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: signing key not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: signing key is not readable (permission denied)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read signing key: {exc.strerror}") from exc
    if data.lstrip()[:1] == b"{":
        raise ConfigError(
            f"{path}: not a PEM private key but JSON (a JWKS, public keys only); "
            "--key takes the signing-key.pem that 'bus-guard keys new' wrote next to it"
        )
    if len(data) > _MAX_KEY_FILE_BYTES or b"-----BEGIN" not in data:
        raise ConfigError(f"{path}: not a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{path}: signing key is encrypted; bus_guard needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a valid PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    # Only about a file that is a key: warning about a JWKS before refusing it misleads.
    if st.st_mode & 0o077:
        logger.warning(
            "%s: signing key is accessible by group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(st.st_mode),
        )
    return key


# --- rotation ---------------------------------------------------------------------------


def _write_jwks(path: Path, jwks: Jwks) -> None:
    try:
        _write_new(path, jwks.to_json(), 0o644, overwrite=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write JWKS: {exc}") from exc


def _check_grace(grace_s: float) -> None:
    if not (math.isfinite(grace_s) and grace_s >= 0):
        raise ConfigError(f"grace_s must be a finite number >= 0, got {grace_s!r}")


def add_key_to_jwks(
    jwks_path: Path,
    new_key: Ed25519PublicKey | Ed25519PrivateKey,
    *,
    retire_kids: Collection[str] = (),
    grace_s: float = DEFAULT_GRACE_S,
    now: float | None = None,
) -> Jwks:
    """Add *new_key* to the JWKS file and retire *retire_kids* after *grace_s*; return it.

    Adding a key without retiring any is the first half of a two-phase rotation: publish
    the new key, wait until verifiers have it, then switch the signer and retire the old
    key. A retire window only ever shortens: an already earlier ``not_after`` is kept.
    """
    _check_grace(grace_s)
    now = time.time() if now is None else now
    jwks = load_jwks(jwks_path)
    unknown = sorted(set(retire_kids) - set(jwks))
    if unknown:
        raise ConfigError(f"{jwks_path}: cannot retire unknown kid(s) {unknown}")
    new = jwk_entry(new_key)
    if new.kid in retire_kids:
        raise ConfigError(f"{jwks_path}: cannot retire the key being added ({new.kid})")
    if new.kid not in jwks:
        jwks = jwks.replace(new)
    end = now + grace_s
    for kid in retire_kids:
        old = jwks.entry(kid)
        assert old is not None  # checked above
        if old.not_after is None or old.not_after > end:
            jwks = jwks.replace(replace(old, not_after=end))
    _write_jwks(jwks_path, jwks)
    return jwks


def revoke_key(jwks_path: Path, kid: str, *, now: float | None = None) -> Jwks:
    """Refuse *kid* from *now* on (``revoked_at``), e.g. after a key compromise."""
    now = time.time() if now is None else now
    jwks = load_jwks(jwks_path)
    entry = jwks.entry(kid)
    if entry is None:
        raise ConfigError(f"{jwks_path}: no key {kid!r} to revoke")
    if entry.revoked_at is None or entry.revoked_at > now:
        jwks = jwks.replace(replace(entry, revoked_at=now))
        _write_jwks(jwks_path, jwks)
    return jwks


def merge_jwks(*sets: Jwks) -> Jwks:
    """Every key of every set; a key in several keeps the earliest ``revoked_at`` and the
    earliest ``not_after`` any of them gives it. So merging never makes a key usable
    longer: a gateway whose file predates a revocation cannot undo it (the bucket the
    gateways publish to is the merge of all their JWKS files)."""
    merged: dict[str, JwkEntry] = {}
    for jwks in sets:
        for entry in jwks.entries:
            known = merged.get(entry.kid)
            if known is None:
                merged[entry.kid] = entry
                continue
            merged[entry.kid] = replace(
                known,
                revoked_at=_earliest(known.revoked_at, entry.revoked_at),
                not_after=_earliest(known.not_after, entry.not_after),
            )
    return Jwks(merged.values())


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True, slots=True)
class Rotation:
    """What :func:`rotate_key` did."""

    new_kid: str
    retired_kid: str
    not_after: float
    key_path: Path
    jwks_path: Path


def rotate_key(
    key_dir: Path, *, grace_s: float = DEFAULT_GRACE_S, now: float | None = None
) -> Rotation:
    """Replace the signing key in *key_dir* (``bus-guard keys rotate``).

    Order matters for a crash at any point: (1) the new private key is written to a
    temporary 0600 file; (2) the JWKS gains the new key and the old one gets
    ``not_after = now + grace_s``; (3) the new key replaces ``signing-key.pem``. Before (3)
    the gateway still signs with the old key, which the JWKS still accepts; the old
    private key is destroyed by the replace, as a retired key should be.

    Gateways must reload both files; verifiers must refresh the JWKS before the gateways
    start signing with the new key, or they will answer ``unknown_kid`` in between.
    """
    _check_grace(grace_s)
    now = time.time() if now is None else now
    key_dir = Path(key_dir)
    key_path, jwks_path = key_dir / KEY_FILENAME, key_dir / JWKS_FILENAME
    old = load_private_key(key_path)
    old_kid = kid_for(old)
    jwks = load_jwks(jwks_path)
    if old_kid not in jwks:
        raise ConfigError(f"{jwks_path}: does not contain the current key {old_kid}")
    new = Ed25519PrivateKey.generate()
    staged = key_dir / f".{KEY_FILENAME}.next"
    try:
        _write_new(staged, _pem(new), 0o600, overwrite=True)
        updated = add_key_to_jwks(jwks_path, new, retire_kids=(old_kid,), grace_s=grace_s, now=now)
        os.replace(staged, key_path)
        _fsync_dir(key_dir)
    except OSError as exc:
        raise ConfigError(f"{key_dir}: key rotation failed: {exc}") from exc
    finally:
        staged.unlink(missing_ok=True)
    retired = updated.entry(old_kid)
    assert retired is not None and retired.not_after is not None
    return Rotation(
        new_kid=kid_for(new),
        retired_kid=old_kid,
        not_after=retired.not_after,
        key_path=key_path,
        jwks_path=jwks_path,
    )
