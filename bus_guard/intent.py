"""The intent agents send: its subject and its payload, decoded strictly.

Decoding is strict and total: :func:`decode_intent` returns an :class:`Intent` or a
:class:`Malformed` value, and never raises for any input bytes. Decoders and encoders are
built once, at import.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Final, NamedTuple

import msgspec

from bus_guard.decision import Reason
from bus_guard.settings import MAX_NESTING_DEPTH, MAX_PAYLOAD_BYTES
from bus_guard.subjects import Subjects
from bus_guard.verify._strict_json import DuplicateMember, strict_loads

__all__ = (
    "MAX_PARENTS",
    "Intent",
    "Malformed",
    "Subject",
    "decode_intent",
    "parse_subject",
    "wire_safe",
)

ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,128}$"

IntentId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Principal = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

MSGPACK_TYPES: Final = frozenset({"application/msgpack", "application/x-msgpack"})
JSON_TYPES: Final = frozenset({"", "application/json"})

# JSON integers beyond 64 bits are not interchangeable between languages; deny them.
MAX_INT: Final = 2**63 - 1
MIN_INT: Final = -(2**63)
# Parents an intent may name: each is a ledger lookup (bounded work per intent).
MAX_PARENTS: Final = 16

Parents = Annotated[tuple[IntentId, ...], msgspec.Meta(max_length=MAX_PARENTS)]


class Intent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An action intent as an agent publishes it (SPEC §3)."""

    id: IntentId
    action: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    resource: Annotated[str, msgspec.Meta(max_length=1024)]
    ts: float
    params: dict[str, Any] = {}
    parents: Parents = ()
    principal: Principal | None = None


class _Shape(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """:class:`Intent` as decoded from JSON: same fields and constraints, but an absent
    optional field is ``UNSET`` (and not encoded), so the shape records which keys were
    there. Only :func:`decode_intent` uses it, for the duplicate-key proof."""

    id: IntentId
    action: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    resource: Annotated[str, msgspec.Meta(max_length=1024)]
    ts: float
    params: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    parents: Parents | msgspec.UnsetType = msgspec.UNSET
    principal: Principal | msgspec.UnsetType | None = msgspec.UNSET


class Malformed(NamedTuple):
    """Why a payload could not be accepted as an intent."""

    reason: Reason
    message: str


class Subject(NamedTuple):
    principal: str
    action: str


_json_shape: Final = msgspec.json.Decoder(_Shape)
_msgpack_intent: Final = msgspec.msgpack.Decoder(Intent)
_msgpack_any: Final = msgspec.msgpack.Decoder()
_msgpack_enc: Final = msgspec.msgpack.Encoder()
_json_enc: Final = msgspec.json.Encoder()


def _surely_no_duplicates(payload: bytes, shape: _Shape) -> bool:
    """``True`` only if the JSON *payload*, which decoded to *shape*, has no duplicate keys.

    ``False`` means "cannot tell cheaply": the caller then runs the stdlib scan
    (:func:`~bus_guard.verify._strict_json.strict_loads`, only to see duplicates and
    non-finite constants; msgspec does the typing). The test is a count of ``:`` bytes, at
    C speed, and it is exact. Proof:

    * *payload* is valid JSON (msgspec decoded all of it, params included), so outside
      string tokens a ``:`` is exactly a name separator: ``raw = N + S``, with ``N`` the
      key tokens at every depth and ``S`` the colons inside string tokens.
    * With no ``\\u`` in *payload* no escape yields a ``:`` (the others give ``"`` ``\\``
      ``/`` or controls), and a ``:`` in a token is a ``:`` decoded: each decoded string
      holds exactly the colons of its token.
    * msgspec's compact encoding of *shape* has one ``:`` after each field present (absent
      ones are ``UNSET`` and omitted, so that is ``P``, the distinct top-level keys) and
      after each params key at any depth (``K``, the keys left after decoding), plus the
      colons of every decoded string (``C``); it escapes no ``:``, and numbers, ``true``,
      ``false`` and ``null`` have none: ``enc = P + K + C``. Every decoded key or string
      comes from a distinct token, so ``C <= S``.
    * ``raw - enc = (N_top - P) + (N_params - K) + (S - C)``: each term is ``>= 0`` and is
      ``0`` iff nothing at that place was overwritten by a later duplicate key. Equal
      counts prove there are no duplicates anywhere; with none the counts are equal. The
      fast path is exact both ways (tests/test_decode_fast.py checks it by generation).
    """
    if b"\\" in payload and b"\\u" in payload:
        return False
    try:
        encoded = _json_enc.encode(shape)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return False
    return payload.count(b":") == encoded.count(b":")


def _intent(shape: _Shape) -> Intent:
    """The :class:`Intent` of a decoded shape (already validated: same constraints)."""
    params, parents, principal = shape.params, shape.parents, shape.principal
    return Intent(
        id=shape.id,
        action=shape.action,
        resource=shape.resource,
        ts=shape.ts,
        params={} if params is msgspec.UNSET else params,
        parents=() if parents is msgspec.UNSET else parents,
        principal=None if principal is msgspec.UNSET else principal,
    )


_new_tuple: Final = tuple.__new__
_SUBJECT_CACHE_MAX: Final = 8192
_subject_cache: dict[tuple[str, str], Subject | None] = {}
_TOKENS: Final = r"[A-Za-z0-9_-]{1,128}"
_subject_res: dict[str, re.Pattern[str]] = {}


def parse_subject(subject: str, prefix: str) -> Subject | None:
    """Split ``<prefix>.in.<principal>.<action...>``; ``None`` if it is not one.

    Subjects repeat (principals x actions), so results are memoised in a bounded dict that
    is cleared when full; one anchored regex per prefix does the parsing on a miss.
    """
    key = (subject, prefix)
    try:
        return _subject_cache[key]
    except KeyError:
        pass
    pattern = _subject_res.get(prefix)
    if pattern is None:
        intake = re.escape(Subjects(prefix).root("in"))
        pattern = re.compile(rf"{intake}\.([A-Za-z0-9_-]{{1,64}})\.({_TOKENS}(?:\.{_TOKENS})*)")
        _subject_res[prefix] = pattern
    m = pattern.fullmatch(subject)
    # m.groups() is exactly (principal, action): made a Subject without the Python frame
    # of a NamedTuple's generated __new__ (0.24 against 0.88 µs; every subject a cold
    # cache has not seen pays it: bench.decide's cold lists, a gateway's new principals).
    result = _new_tuple(Subject, m.groups()) if m is not None else None
    if len(_subject_cache) >= _SUBJECT_CACHE_MAX:
        _subject_cache.clear()
    _subject_cache[key] = result
    return result


def _check_value(value: Any, depth: int, max_depth: int) -> str | None:
    """Bound nesting and numbers in free-form params; return a problem or ``None``."""
    if depth > max_depth:
        return f"params nested deeper than {max_depth}"
    # A string or an in-range int one level down is accepted here, without a call: exactly
    # what the call would return for it (None), at depth + 1 <= max_depth. Most params are
    # those; and dicts (params itself) are tested first, which changes no answer (no value
    # is both a dict and a bool, str, int or float). Callgrind, core mode: two Python calls
    # and four isinstance calls less per intent, ~1.5k instructions.
    child = depth + 1
    shallow = child <= max_depth
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return "non-string key in params"
            if shallow and (type(v) is str or (type(v) is int and MIN_INT <= v <= MAX_INT)):
                continue
            if (problem := _check_value(v, child, max_depth)) is not None:
                return problem
        return None
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        return None if MIN_INT <= value <= MAX_INT else "integer out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "non-finite number"
    if isinstance(value, list | tuple):
        for v in value:
            if shallow and (type(v) is str or (type(v) is int and MIN_INT <= v <= MAX_INT)):
                continue
            if (problem := _check_value(v, child, max_depth)) is not None:
                return problem
        return None
    return f"unsupported value type {type(value).__name__} in params"


def decode_intent(
    payload: bytes,
    content_type: str | None = None,
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    max_depth: int = MAX_NESTING_DEPTH,
) -> Intent | Malformed:
    """Decode and validate one intent; total: any input gives a value, never an exception."""
    if len(payload) > max_bytes:
        return Malformed(Reason.MALFORMED, f"payload of {len(payload)} bytes exceeds {max_bytes}")
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        if ctype in JSON_TYPES:
            shape = _json_shape.decode(payload)
            if not _surely_no_duplicates(payload, shape):
                strict_loads(payload)
            intent = _intent(shape)
        elif ctype in MSGPACK_TYPES:
            intent = _msgpack_intent.decode(payload)
            # Canonical by construction: the payload must be exactly msgspec's encoding of
            # what it decodes to. That encoding has unique map keys (a dict cannot repeat
            # one), the shortest form of every integer, length and string header, float64
            # floats and no bin/ext, so any conforming decoder, first-key or last-key,
            # reads what was authorized. (Comparing lengths only was fooled: a float32
            # re-encodes longer and balances what a duplicate key removes.)
            if _msgpack_enc.encode(_msgpack_any.decode(payload)) != payload:
                return Malformed(
                    Reason.MALFORMED,
                    "msgpack is not canonical (duplicate keys, non-minimal integers or "
                    "lengths, float32, bin or ext)",
                )
        else:
            return Malformed(Reason.MALFORMED, f"unsupported content type {ctype!r}")
    except DuplicateMember as exc:
        return Malformed(Reason.MALFORMED, f"duplicate key {exc.name!r}")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Malformed(Reason.MALFORMED, str(exc))
    except UnicodeDecodeError:
        return Malformed(Reason.MALFORMED, "payload is not valid UTF-8")
    except RecursionError:
        return Malformed(Reason.MALFORMED, "payload nested too deeply")
    except ValueError as exc:  # json: bad constants, numbers the scanner refuses
        return Malformed(Reason.MALFORMED, str(exc))
    problem = _check_value(intent.params, 1, max_depth)
    if problem is not None:
        return Malformed(Reason.MALFORMED, problem)
    if not math.isfinite(intent.ts):
        return Malformed(Reason.MALFORMED, "ts is not a finite number")
    resource = intent.resource
    if not (resource.isascii() and resource.isprintable()) or " " in resource:
        return Malformed(Reason.MALFORMED, f"resource is not canonical: {_why_not(resource)}")
    return intent


def _why_not(resource: str) -> str:
    """Where *resource* leaves its canonical form: printable ASCII without whitespace.

    Resources are identifiers that policies match with globs; a spelling a policy does
    not foresee (a leading space, a look-alike letter from another script, a control
    character) must not slip past a deny, so anything else is refused: percent-encode it.
    """
    for i, ch in enumerate(resource):
        if not ("!" <= ch <= "~"):
            return (
                f"U+{ord(ch):04X} at offset {i}; resources are printable ASCII without "
                "whitespace (percent-encode anything else)"
            )
    return "unknown"  # unreachable: the caller found a character outside "!".."~"


def wire_safe(text: str) -> str:
    """*text* with every lone surrogate as a visible ``\\xNN`` escape.

    The gateway's client decodes subjects with ``surrogateescape`` (a subject is bytes, and
    an agent may send any); what a record or a log line carries of a subject must be valid
    UTF-8 for JSON. ASCII, the common case, is returned as is.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
