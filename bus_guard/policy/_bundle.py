"""Policy bundles: a policy set as one value that is compiled, tested, signed, stored,
fetched and compiled again anywhere with the same result. Pure: no NATS and no clock
(reading a directory is the only I/O, and the caller passes ``now``).

* :class:`BundleContent`: the files of a policy directory: the policy files, the files
  they name (approvers' JWKS) and the test cases (``tests/*.yaml``). Encoded with msgpack;
  its SHA-256 names it in the content store.
* :class:`Compiled`: what compiling content gives: the :class:`PolicySet` (its ``version``
  stamped with the bundle's revision, see :func:`~bus_guard.policy._load.load_policy_sources`),
  the content, and its test cases' results. A set whose test cases fail, or that does not
  compile, is a :class:`~bus_guard.errors.BundleRefused` (``tests_failed``, ``broken``)
  naming every failing case or problem: it never becomes active.
* :class:`Manifest`: what a policy publisher signs: kind, deployment, revision, the policy
  set's digest and version, the content's digest and size, the number of test cases,
  and when it was issued. Stored as a compact JWS (RFC 7515, EdDSA, ``typ``
  ``guard-policy+jwt``, ``kid`` of the publisher's key) under the bundle pointer key.

:func:`read_manifest` checks a pointer against the trusted publishers' JWKS, the
deployment and the kind; :func:`check_content` checks fetched content against its
manifest. Every refusal is a :class:`~bus_guard.errors.BundleRefused` whose ``reason`` is
one of :data:`REFUSALS`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.decision import Decision, Effect, Reason, Request
from bus_guard.errors import BundleRefused, PolicyError
from bus_guard.pipeline import PolicySetLike
from bus_guard.policy._cases import CaseResults, check_cases
from bus_guard.policy._evaluator import PolicySet
from bus_guard.policy._load import MAX_FILE_BYTES, load_policy_sources
from bus_guard.settings import MAX_BUNDLE_BYTES
from bus_guard.verify import ALG, JwkEntry, Jwks, b64url_decode, b64url_encode
from bus_guard.verify._strict_json import strict_loads

__all__ = (
    "DEFAULT_MAX_BUNDLE_BYTES",
    "MANIFEST_TYP",
    "REFUSALS",
    "BundleContent",
    "BundleKind",
    "Compiled",
    "Manifest",
    "StaleSet",
    "check_compiled",
    "check_content",
    "compile_content",
    "compile_directory",
    "content_digest",
    "content_of",
    "decode_content",
    "decode_manifest",
    "encode_content",
    "peek_revision",
    "read_directory",
    "read_manifest",
    "sign_manifest",
)

MANIFEST_TYP: Final = "guard-policy+jwt"
DEFAULT_MAX_BUNDLE_BYTES: Final = MAX_BUNDLE_BYTES
_MAX_POINTER_BYTES: Final = 8192  # a manifest JWS is ~600 bytes
TESTS_DIR: Final = "tests"

BundleKind = Literal["policy", "constitution"]

# Why a bundle never became active: the closed set of refusal reasons (README, "Policy
# distribution"), counted per reason in the gateway's policy statistics.
REFUSALS: Final = (
    "unsigned",  # the pointer is no signed manifest (not a JWS, or no signature)
    "unknown_key",  # signed by a key that is not a trusted publisher's
    "revoked_key",  # signed by a publisher key revoked or retired by then
    "bad_signature",  # the signature does not verify
    "malformed",  # a manifest that does not decode strictly
    "wrong_deployment",  # a bundle for another deployment (or prefix)
    "wrong_kind",  # a bundle of another kind under this pointer
    "rollback",  # a revision not newer than the active one
    "too_large",  # content larger than the gateway accepts
    "content_mismatch",  # content whose digest or size is not the manifest's
    "broken",  # content that does not decode or compile; a directory that does not
    "tests_failed",  # a set whose test cases fail
    "quorum",  # a constitution without enough valid signatures of its keys
    "digest_mismatch",  # content that compiles to another policy digest than the signed one
    "store_unavailable",  # the pointer or the content could not be read (retried)
)

_Int53 = Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]
_Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]


class BundleContent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A policy directory's files, by their path relative to it (``/`` separated)."""

    policies: dict[str, bytes]  # *.yaml / *.yml directly in the directory
    files: dict[str, bytes] = {}  # the files bundles name (approvers' JWKS)
    tests: dict[str, bytes] = {}  # tests/*.yaml, by name within tests/

    @property
    def size(self) -> int:
        parts = (self.policies, self.files, self.tests)
        return sum(len(data) for part in parts for data in part.values())


_CONTENT_ENCODER: Final = msgspec.msgpack.Encoder()
_CONTENT_DECODER: Final = msgspec.msgpack.Decoder(BundleContent)


def encode_content(content: BundleContent) -> bytes:
    return _CONTENT_ENCODER.encode(content)


def decode_content(data: bytes) -> BundleContent:
    """Strictly decode stored content; :class:`BundleRefused` ``broken`` otherwise."""
    try:
        return _CONTENT_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise BundleRefused("broken", f"bundle content does not decode: {exc}") from None


def content_digest(data: bytes) -> str:
    """``sha256:<hex>`` of encoded content: its name in the content store."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Compiled:
    """A policy set ready to become active: compiled, its test cases passed."""

    policies: PolicySet
    content: BundleContent
    cases: CaseResults

    @property
    def digest(self) -> str:
        return self.policies.digest


def _policy_files(root: Path) -> list[Path]:
    if root.is_dir():
        return sorted(f for f in root.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
    return [root] if root.is_file() else []


def _read(file: Path) -> bytes:
    """At most the limit and a byte to tell (the compiler names a file over it)."""
    with file.open("rb") as f:
        return f.read(MAX_FILE_BYTES + 1)


def read_directory(path: str | os.PathLike[str]) -> BundleContent:
    """The files of the policy directory *path*, as a bundle: its policy files, the
    files they name (read by compiling them) and its tests. Raises
    :class:`~bus_guard.errors.PolicyError` for what does not compile (every problem)."""
    return compile_directory(path).content


def compile_directory(path: str | os.PathLike[str], *, revision: int | None = None) -> Compiled:
    """Compile and test the policy directory *path* (``policy check`` + ``policy test``
    in one step). Raises :class:`~bus_guard.errors.PolicyError` listing every problem of
    a set that does not compile, :class:`~bus_guard.errors.BundleRefused`
    (``tests_failed``) naming every failing case."""
    root = Path(path)
    files = _policy_files(root)
    if not files:
        where = "no policy files (*.yaml, *.yml) in this directory" if root.is_dir() else None
        raise PolicyError([f"{root}: {where or 'no such file or directory'}"])
    folder = files[0].parent
    sources: dict[str, bytes] = {}
    for file in files:
        try:
            sources[file.name] = _read(file)
        except OSError as exc:
            raise PolicyError([f"{file}: cannot read: {exc.strerror or exc}"]) from exc
    named: dict[str, bytes] = {}

    def read_named(name: str) -> bytes:
        data = _read(folder.joinpath(*name.split("/")))
        named[name] = data
        return data

    policies = load_policy_sources(sources, base=folder, files=read_named, revision=revision)
    tests: dict[str, bytes] = {}
    tests_dir = folder / TESTS_DIR
    if root.is_dir() and tests_dir.is_dir():
        for file in _policy_files(tests_dir):
            try:
                tests[file.name] = _read(file)
            except OSError as exc:
                raise PolicyError([f"{file}: cannot read: {exc.strerror or exc}"]) from exc
    content = BundleContent(sources, named, tests)
    return _tested(policies, content, f"{tests_dir}{os.sep}")


def compile_content(
    content: BundleContent, *, revision: int | None = None, base: str = "bundle", layer: str = ""
) -> Compiled:
    """Compile and test bundle content (what a gateway fetched). Raises
    :class:`~bus_guard.errors.BundleRefused`: ``broken`` with every compile problem,
    ``tests_failed`` with every failing case."""
    try:
        policies = load_policy_sources(
            content.policies, base=base, files=content.files, revision=revision, layer=layer
        )
    except PolicyError as exc:
        raise BundleRefused("broken", "; ".join(exc.problems)) from None
    return _tested(policies, content, f"{base}/{TESTS_DIR}/")


def _tested(policies: PolicySet, content: BundleContent, where: str) -> Compiled:
    tests = {f"{where}{name}": data for name, data in content.tests.items()}
    results = check_cases(policies, tests)
    if results.failures:
        count = len(results.failures)
        raise BundleRefused(
            "tests_failed",
            f"{count} test case{'s' if count > 1 else ''} failed: " + "; ".join(results.failures),
        )
    return Compiled(policies, content, results)


# --- the signed manifest ----------------------------------------------------------------


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a policy publisher signs for one revision of one deployment's bundle."""

    kind: BundleKind
    deployment: _Token  # binds the bundle to one deployment (default: the subject prefix)
    revision: _Int53  # monotonically increasing per deployment and kind
    digest: _Sha256  # the compiled policy set's digest (what decisions name)
    version: str  # the set's bundle versions (``payments@1.2.0,tools@1.0.0``)
    content: _Sha256  # the encoded content's SHA-256: its name in the content store
    size: Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]  # the encoded content's bytes
    cases: Annotated[int, msgspec.Meta(ge=0)] = 0  # test cases the publisher ran
    issued_at: Annotated[float, msgspec.Meta(ge=0)]  # unix seconds: freshness counts from it

    @property
    def object_name(self) -> str:
        """The content's object name in the store (``sha256-<hex>``)."""
        return self.content.replace(":", "-")


_MANIFEST_DECODER: Final = msgspec.json.Decoder(Manifest)
_HEADER_MEMBERS: Final = frozenset({"alg", "kid", "typ"})


def sign_manifest(key: Ed25519PrivateKey, kid: str, manifest: Manifest) -> bytes:
    """The compact JWS of *manifest*, signed with the publisher's *key* (JWKS ``kid``)."""
    header = msgspec.json.encode({"alg": ALG, "kid": kid, "typ": MANIFEST_TYP})
    signing_input = b64url_encode(header) + b"." + b64url_encode(msgspec.json.encode(manifest))
    return signing_input + b"." + b64url_encode(key.sign(signing_input))


def peek_revision(token: bytes) -> int:
    """The revision a pointer *claims*, unverified (0 if it claims none): what a publisher
    numbers its next push after. Never a reason to trust anything. A compact JWS (a
    policy bundle) or a JWS JSON serialization (a constitution)."""
    try:
        if token.lstrip().startswith(b"{"):
            payload = strict_loads(token).get("payload", "")
        else:
            payload = token.split(b".")[1].decode("ascii")
        claims = strict_loads(b64url_decode(payload))
        revision = claims.get("revision") if isinstance(claims, dict) else None
    except (ValueError, IndexError, AttributeError, TypeError, RecursionError):
        return 0
    return revision if isinstance(revision, int) and not isinstance(revision, bool) else 0


def decode_manifest(claims: bytes) -> Manifest:
    """Strictly decode a manifest's JSON; :class:`BundleRefused` ``malformed`` otherwise."""
    try:
        strict_loads(claims)  # duplicate members and NaN refused before msgspec reads it
        manifest = _MANIFEST_DECODER.decode(claims)
    except (ValueError, RecursionError) as exc:
        raise BundleRefused("malformed", f"manifest: {exc}"[:300]) from None
    if not math.isfinite(manifest.issued_at):
        raise BundleRefused("malformed", "manifest: issued_at is not a finite time")
    return manifest


def read_manifest(
    token: bytes,
    publishers: Jwks,
    *,
    now: float,
    deployment: str,
    kind: BundleKind = "policy",
) -> Manifest:
    """The manifest of a bundle pointer, once it verified with a trusted publisher key
    usable at *now* and names this *deployment* and *kind*; else :class:`BundleRefused`."""
    if len(token) > _MAX_POINTER_BYTES:
        raise BundleRefused("malformed", f"pointer is {len(token)} bytes, not a manifest")
    parts = token.strip().split(b".")
    if len(parts) != 3 or not parts[2]:
        raise BundleRefused("unsigned", "the pointer is not a signed manifest (compact JWS)")
    try:
        header = strict_loads(b64url_decode(parts[0].decode("ascii")))
        claims = b64url_decode(parts[1].decode("ascii"))
        signature = b64url_decode(parts[2].decode("ascii"))
    except (ValueError, RecursionError) as exc:
        raise BundleRefused("unsigned", f"the pointer is not a compact JWS: {exc}"[:200]) from None
    if not isinstance(header, dict) or header.keys() != _HEADER_MEMBERS:
        raise BundleRefused("unsigned", "the manifest header must have exactly alg, kid, typ")
    if header["alg"] != ALG or header["typ"] != MANIFEST_TYP:
        raise BundleRefused(
            "unsigned", f"the manifest must be alg {ALG}, typ {MANIFEST_TYP} (not alg none)"
        )
    kid = header["kid"]
    entry = publishers.entry(kid) if isinstance(kid, str) else None
    if entry is None:
        raise BundleRefused("unknown_key", f"signed by {kid!r}, not a trusted publisher key")
    if not entry.usable_at(now):
        raise BundleRefused("revoked_key", f"publisher key {kid!r} is revoked or retired")
    try:
        entry.public_key.verify(signature, parts[0] + b"." + parts[1])
    except InvalidSignature:
        raise BundleRefused("bad_signature", f"the signature by {kid!r} does not verify") from None
    manifest = decode_manifest(claims)
    if manifest.kind != kind:
        raise BundleRefused("wrong_kind", f"a {manifest.kind} bundle, expected {kind}")
    if manifest.deployment != deployment:
        raise BundleRefused(
            "wrong_deployment",
            f"a bundle for deployment {manifest.deployment!r}, this is {deployment!r}",
        )
    return manifest


def check_content(manifest: Manifest, data: bytes, *, max_bytes: int) -> BundleContent:
    """The content *data* fetched for *manifest*, once its size and digest are the
    signed ones; :class:`BundleRefused` otherwise."""
    if len(data) > max_bytes:
        raise BundleRefused("too_large", f"content is {len(data):,} bytes, more than {max_bytes:,}")
    if len(data) != manifest.size or content_digest(data) != manifest.content:
        raise BundleRefused(
            "content_mismatch",
            f"content ({len(data):,} bytes, {content_digest(data)}) is not the signed "
            f"{manifest.content} ({manifest.size:,} bytes)",
        )
    return decode_content(data)


def check_compiled(manifest: Manifest, compiled: Compiled) -> None:
    """The compiled set must be the one the publisher signed (its policy digest)."""
    if compiled.digest != manifest.digest:
        raise BundleRefused(
            "digest_mismatch",
            f"content compiles to {compiled.digest}, the manifest signs {manifest.digest}",
        )


def content_of(files: Mapping[str, bytes]) -> BundleContent:
    """Content from a flat mapping of relative paths (tests under ``tests/``): for tests
    and tools that build a bundle in memory."""
    inside = f"{TESTS_DIR}/"
    policies = {n: d for n, d in files.items() if "/" not in n and n.endswith((".yaml", ".yml"))}
    tests = {n.removeprefix(inside): d for n, d in files.items() if n.startswith(inside)}
    others = {n: d for n, d in files.items() if n not in policies and not n.startswith(inside)}
    return BundleContent(policies, others, tests)


# --- freshness --------------------------------------------------------------------------


class StaleSet:
    """What the gateway decides with while its active set is older than the maximum age:
    every intent is denied ``policy_stale``, naming the stale set's digest and version.
    Approvals find no approver (fail closed: no hold is released under a stale policy).
    Swapped in whole, like any set, so the hot path pays nothing for freshness."""

    __slots__ = ("_decision", "digest", "mode", "stale", "version")

    def __init__(self, stale: PolicySetLike, message: str) -> None:
        self.stale = stale
        self.digest = stale.digest
        self.version = stale.version
        self.mode = stale.mode
        self._decision = Decision(
            Effect.DENY,
            Reason.POLICY_STALE,
            message=message,
            policy_digest=stale.digest,
            policy_version=stale.version,
            mode=stale.mode,
        )

    def __repr__(self) -> str:
        return f"StaleSet({self.version!r}, {self.digest[:19]}…)"

    def evaluate(self, request: Request) -> Decision:
        return self._decision

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return None
