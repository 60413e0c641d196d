"""The JWKS executors verify with: Ed25519 public keys by ``kid``, each with its rotation
window.

A JWKS (RFC 7517) is loaded once, strictly (:func:`load_jwks`): every key must be an
Ed25519 public JWK (``kty`` ``OKP``, ``crv`` ``Ed25519``) with a ``kid``, usable for
``EdDSA`` signatures; private material is refused. Two extension members bound a key's
use: ``revoked_at`` (the key is withdrawn, e.g. compromised) and ``not_after`` (the end
of a rotation's grace period), both unix seconds. :mod:`bus_guard.signing` writes them;
a generic JOSE verifier ignores them, so give it :meth:`Jwks.usable_at` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bus_guard.errors import ConfigError
from bus_guard.verify._base64url import b64url_decode
from bus_guard.verify._format import ALG
from bus_guard.verify._strict_json import strict_loads

__all__ = ("JwkEntry", "Jwks", "load_jwks")


@dataclass(frozen=True, slots=True)
class JwkEntry:
    """One Ed25519 public key of a JWKS, with its rotation window.

    ``revoked_at`` (key compromised or withdrawn) and ``not_after`` (end of a rotation
    grace period) are unix seconds; from the earlier of them on, the key is refused.
    ``members`` keeps every member of the JWK as loaded, so that rewriting a JWKS keeps
    members this module does not interpret (RFC 7517 §4: ignore, don't drop).
    """

    kid: str
    public_key: Ed25519PublicKey = field(compare=False)
    x: str
    revoked_at: float | None = None
    not_after: float | None = None
    members: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def refused_from(self) -> float:
        """The first instant at which the key is no longer usable (``inf`` if never)."""
        ends = [t for t in (self.revoked_at, self.not_after) if t is not None]
        return min(ends, default=math.inf)

    def usable_at(self, now: float) -> bool:
        return now < self.refused_from

    def to_jwk(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.x,
            "kid": self.kid,
            "alg": ALG,
            "use": "sig",
        }
        out.update(
            (k, v)
            for k, v in self.members.items()
            if k not in out and k not in ("revoked_at", "not_after")
        )
        if self.not_after is not None:
            out["not_after"] = _json_time(self.not_after)
        if self.revoked_at is not None:
            out["revoked_at"] = _json_time(self.revoked_at)
        return out


def _json_time(t: float) -> int | float:
    return int(t) if float(t).is_integer() else t


class Jwks(Mapping[str, Ed25519PublicKey]):
    """An immutable JWKS: ``kid`` → Ed25519 public key, plus each key's rotation window."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[JwkEntry]) -> None:
        by_kid: dict[str, JwkEntry] = {}
        for entry in entries:
            if entry.kid in by_kid:
                raise ConfigError(f"JWKS: duplicate kid {entry.kid!r}")
            by_kid[entry.kid] = entry
        self._entries: Mapping[str, JwkEntry] = MappingProxyType(by_kid)

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._entries[kid].public_key

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Jwks({list(self._entries)!r})"

    @property
    def entries(self) -> tuple[JwkEntry, ...]:
        return tuple(self._entries.values())

    def entry(self, kid: str) -> JwkEntry | None:
        return self._entries.get(kid)

    def usable_at(self, now: float) -> Jwks:
        """The keys still usable at *now*: what to hand a generic JOSE verifier, which
        ignores ``revoked_at`` / ``not_after``."""
        return Jwks(e for e in self._entries.values() if e.usable_at(now))

    def replace(self, entry: JwkEntry) -> Jwks:
        """A copy with *entry* added, or replacing the entry with the same ``kid``."""
        return Jwks([*(e for e in self._entries.values() if e.kid != entry.kid), entry])

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [e.to_jwk() for e in self._entries.values()]}

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self.to_dict()), indent=2) + b"\n"


def _jwk_time(jwk: Mapping[str, Any], name: str, where: str) -> float | None:
    value = jwk.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{where}: {name} must be unix seconds, got {value!r}")
    return float(value)


def _parse_jwk(jwk: Any, where: str) -> JwkEntry:
    if not isinstance(jwk, Mapping):
        raise ConfigError(f"{where}: not a JSON object")
    if "d" in jwk:
        # A JWKS is published to every verifier; refuse to handle private material.
        raise ConfigError(f"{where}: contains a private key (member 'd')")
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ConfigError(f"{where}: not an Ed25519 key (kty/crv must be OKP/Ed25519)")
    if jwk.get("alg", ALG) != ALG:
        raise ConfigError(f"{where}: alg must be {ALG}, got {jwk.get('alg')!r}")
    if jwk.get("use", "sig") != "sig":
        raise ConfigError(f"{where}: use must be 'sig', got {jwk.get('use')!r}")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ConfigError(f"{where}: key_ops does not allow 'verify'")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ConfigError(f"{where}: missing kid (artifacts always name their key)")
    x = jwk.get("x")
    try:
        raw = b64url_decode(x) if isinstance(x, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}: x must be 32 bytes of unpadded base64url")
    return JwkEntry(
        kid=kid,
        public_key=Ed25519PublicKey.from_public_bytes(raw),
        x=x if isinstance(x, str) else "",
        revoked_at=_jwk_time(jwk, "revoked_at", where),
        not_after=_jwk_time(jwk, "not_after", where),
        members=MappingProxyType(dict(jwk)),
    )


def load_jwks(source: Jwks | Mapping[str, Any] | str | os.PathLike[str] | bytes) -> Jwks:
    """Load and validate a JWKS from a file path, raw JSON bytes or a decoded dict.

    Every key must be an Ed25519 public JWK with a ``kid``; anything else is a
    :class:`~bus_guard.errors.ConfigError` naming the source and the key.
    """
    if isinstance(source, Jwks):
        return source
    where = "JWKS"
    doc: Any
    if isinstance(source, Mapping):
        doc = source
    else:
        if isinstance(source, bytes):
            data = source
        else:
            where = os.fspath(source)
            try:
                data = Path(source).read_bytes()
            except FileNotFoundError:
                raise ConfigError(f"{where}: JWKS file not found") from None
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read JWKS: {exc.strerror}") from exc
        try:
            doc = strict_loads(data)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from exc
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list):
        raise ConfigError(f"{where}: not a JWKS (expected an object with a 'keys' array)")
    if not keys:
        raise ConfigError(f"{where}: JWKS has no keys")
    entries = [_parse_jwk(jwk, f"{where}: keys[{i}]") for i, jwk in enumerate(keys)]
    kids = [e.kid for e in entries]
    dups = sorted({k for k in kids if kids.count(k) > 1})
    if dups:
        raise ConfigError(f"{where}: duplicate kid {dups[0]!r}")
    return Jwks(entries)
