"""The constitution: deny and escalate rules that no ordinary policy bundle can override or
remove (README, "Constitution"). Pure: no NATS, no clock.

* A constitution is a policy set like any other (YAML bundles, compiled, its test cases
  run) pushed as a bundle of kind ``constitution``, with one difference: every rule must
  ``deny`` or ``escalate``. An ``allow`` there is refused (``broken``): a constitution says
  what may never happen, or never without a human; the ordinary set says what may.
* It is signed by **M of N** constitution keys: its pointer is a JWS in the JSON general
  serialization (RFC 7515 §7.2.1): one payload (the :class:`~bus_guard.policy._bundle.
  Manifest`), several signatures, each with its own protected header (``alg`` EdDSA, ``kid``,
  ``typ`` ``guard-constitution+jwt``). Only distinct trusted keys, usable at the time,
  whose signature verifies, count; fewer than the quorum is a refusal (``quorum``).
* :class:`LayeredSet` decides with both: a constitution denial other than "no rule of mine
  matched" stands whatever the ordinary set says (``denied_by_rule``, a declared param of
  the wrong type, ``policy_stale``); else the ordinary set decides, except that a
  constitution escalation turns an ordinary allow into the constitution's hold (an
  ordinary denial still denies). A decision made by the constitution names its digest and
  its version, which begins with ``constitution/``: every decision says which layer made
  it. An ordinary set in observe mode stays in observe: its own policy outcomes become
  ``allow`` with ``would_deny`` (a constitution escalation still holds such an intent),
  the constitution's are enforced; the combination itself is ``enforce``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.decision import POLICY_REASONS, Decision, Effect, Reason, Request
from bus_guard.errors import BundleRefused
from bus_guard.pipeline import PolicySetLike
from bus_guard.policy._bundle import Compiled, Manifest, decode_manifest
from bus_guard.signing._keys import kid_for
from bus_guard.verify import ALG, JwkEntry, Jwks, b64url_decode, b64url_encode
from bus_guard.verify._strict_json import strict_loads

__all__ = (
    "CONSTITUTION_LAYER",
    "CONSTITUTION_TYP",
    "LayeredSet",
    "add_signature",
    "check_constitution",
    "read_constitution",
    "sign_constitution",
)

CONSTITUTION_TYP: Final = "guard-constitution+jwt"
CONSTITUTION_LAYER: Final = "constitution/"  # the start of a constitution set's version
_MAX_POINTER_BYTES: Final = 64 * 1024  # a manifest and a few dozen signatures
_MAX_SIGNATURES: Final = 64


def check_constitution(compiled: Compiled) -> None:
    """A constitution only denies or escalates: :class:`BundleRefused` ``broken`` naming
    every rule that allows."""
    allows = [r.id for r in compiled.policies.rules if r.effect == "allow"]
    if allows:
        raise BundleRefused(
            "broken",
            f"a constitution may only deny or escalate; these rules allow: {', '.join(allows)}",
        )


class _Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    protected: str
    signature: str


class _General(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    payload: str
    signatures: list[_Signature]


_GENERAL_DECODER: Final = msgspec.json.Decoder(_General)


def _signature(key: Ed25519PrivateKey, payload: str) -> _Signature:
    header = msgspec.json.encode({"alg": ALG, "kid": kid_for(key), "typ": CONSTITUTION_TYP})
    protected = b64url_encode(header).decode("ascii")
    signing_input = f"{protected}.{payload}".encode("ascii")
    return _Signature(protected, b64url_encode(key.sign(signing_input)).decode("ascii"))


def sign_constitution(manifest: Manifest, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The pointer of a constitution *manifest*, signed by each of *keys*."""
    if manifest.kind != "constitution":
        raise ValueError("a constitution pointer carries a constitution manifest")
    payload = b64url_encode(msgspec.json.encode(manifest)).decode("ascii")
    return msgspec.json.encode(_General(payload, [_signature(k, payload) for k in keys]))


def add_signature(pointer: bytes, key: Ed25519PrivateKey) -> bytes:
    """*pointer* with *key*'s signature added (``bus-guard policy sign``); one that *key*
    signed already is returned as it is."""
    try:
        general = _GENERAL_DECODER.decode(pointer)
    except msgspec.DecodeError as exc:
        raise BundleRefused("unsigned", f"not a constitution pointer: {exc}") from None
    kid = kid_for(key)
    for sig in general.signatures:
        try:
            if strict_loads(b64url_decode(sig.protected)).get("kid") == kid:
                return pointer
        except (ValueError, AttributeError, RecursionError):
            continue
    signed = [*general.signatures, _signature(key, general.payload)]
    return msgspec.json.encode(_General(general.payload, signed))


def _valid_kid(sig: _Signature, payload: str, keys: Jwks, now: float) -> str:
    """The kid of a signature that counts, else raise ``ValueError`` saying why not."""
    try:
        header = strict_loads(b64url_decode(sig.protected))
        signature = b64url_decode(sig.signature)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not a JWS signature: {exc}") from None
    if not isinstance(header, dict) or header.keys() != {"alg", "kid", "typ"}:
        raise ValueError("the protected header must have exactly alg, kid, typ")
    if header["alg"] != ALG or header["typ"] != CONSTITUTION_TYP:
        raise ValueError(f"alg must be {ALG} and typ {CONSTITUTION_TYP}")
    kid = header["kid"]
    entry: JwkEntry | None = keys.entry(kid) if isinstance(kid, str) else None
    if entry is None:
        raise ValueError(f"{kid!r} is not a constitution key")
    if not entry.usable_at(now):
        raise ValueError(f"{kid!r} is revoked or retired")
    try:
        entry.public_key.verify(signature, f"{sig.protected}.{payload}".encode("ascii"))
    except (InvalidSignature, UnicodeEncodeError):
        raise ValueError(f"the signature by {kid!r} does not verify") from None
    return str(kid)


def read_constitution(
    pointer: bytes, keys: Jwks, *, quorum: int, now: float, deployment: str
) -> Manifest:
    """The manifest of a constitution pointer signed by at least *quorum* distinct keys of
    *keys* usable at *now*, for this *deployment*; else :class:`BundleRefused`."""
    if len(pointer) > _MAX_POINTER_BYTES:
        raise BundleRefused("malformed", f"pointer is {len(pointer)} bytes, not a constitution")
    try:
        strict_loads(pointer)  # duplicate members refused before msgspec keeps the last
        general = _GENERAL_DECODER.decode(pointer)
    except (ValueError, RecursionError) as exc:
        raise BundleRefused(
            "unsigned", f"not a signed constitution (JWS JSON): {exc}"[:300]
        ) from None
    if not general.signatures or len(general.signatures) > _MAX_SIGNATURES:
        raise BundleRefused("unsigned", f"{len(general.signatures)} signatures")
    signers: set[str] = set()
    why: list[str] = []
    for sig in general.signatures:
        try:
            signers.add(_valid_kid(sig, general.payload, keys, now))
        except ValueError as exc:
            why.append(str(exc))
    if len(signers) < quorum:
        raise BundleRefused(
            "quorum",
            f"{len(signers)} valid signature{'s' if len(signers) != 1 else ''} of distinct "
            f"constitution keys, {quorum} required" + (f" ({'; '.join(why[:4])})" if why else ""),
        )
    try:
        claims = b64url_decode(general.payload)
    except ValueError as exc:
        raise BundleRefused("malformed", f"payload: {exc}") from None
    manifest = decode_manifest(claims)
    if manifest.kind != "constitution":
        raise BundleRefused("wrong_kind", f"a {manifest.kind} bundle, expected constitution")
    if manifest.deployment != deployment:
        raise BundleRefused(
            "wrong_deployment",
            f"a constitution for deployment {manifest.deployment!r}, this is {deployment!r}",
        )
    return manifest


_STANDS: Final = frozenset({Reason.NO_MATCHING_RULE, Reason.ESCALATED_BY_RULE})


class LayeredSet:
    """The constitution over the ordinary set: see the module docstring."""

    __slots__ = ("_observing", "constitution", "digest", "mode", "ordinary", "version")

    def __init__(self, constitution: PolicySetLike, ordinary: PolicySetLike) -> None:
        self.constitution = constitution
        self.ordinary = ordinary
        # What decisions made before any rule (malformed, bad subject, ...) name.
        self.digest = ordinary.digest
        self.version = ordinary.version
        self.mode: Literal["enforce"] = "enforce"
        # An ordinary set in observe mode stays in observe under the constitution: its own
        # policy outcomes are let through, marked (the constitution's are enforced).
        self._observing = ordinary.mode == "observe"

    def __repr__(self) -> str:
        return f"LayeredSet({self.constitution!r} over {self.ordinary!r})"

    def evaluate(self, request: Request) -> Decision:
        first = self.constitution.evaluate(request)
        if first.reason not in _STANDS:  # the constitution denies: nothing overrides it
            return first
        second = self.ordinary.evaluate(request)
        if (
            self._observing
            and second.effect is not Effect.ALLOW
            and second.reason in POLICY_REASONS
        ):
            second = msgspec.structs.replace(second, effect=Effect.ALLOW, would_deny=True)
        if first.reason is Reason.ESCALATED_BY_RULE and second.effect is not Effect.DENY:
            return first  # an ordinary allow (or hold) is the constitution's hold
        return second

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return self.constitution.approver_key(kid) or self.ordinary.approver_key(kid)
