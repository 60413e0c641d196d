"""The count-based duplicate-key proof in ``decode_intent`` is exact (SPEC §3, strict decoding).

Payloads are generated as raw JSON text, so keys can repeat at any depth, strings can hold
``:`` and ``"``, escapes (``\\u003a`` is a ``:``) and odd whitespace appear anywhere. The
fast path must never say "no duplicates" when there are some, and ``decode_intent`` must
decide exactly as the stdlib scan alone would.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bus_guard.decision import Reason
from bus_guard.intent import (
    Intent,
    Malformed,
    _check_value,
    _json_shape,
    _surely_no_duplicates,
    decode_intent,
)

WS = st.sampled_from(["", " ", "\n", "\t", "\r\n ", "  "])
TEXT = st.text(alphabet=st.sampled_from('ab:":\\/é\n\t\u2028x'), max_size=6)
KEYS = st.sampled_from(["a", "b", "a:b", ":", '":', "é", "x\n", "\\u", ""])


def _string(s: str, escape: bool) -> str:
    """A JSON string token for *s*; with *escape*, every character as ``\\uXXXX``."""
    if escape:
        return '"' + "".join(f"\\u{ord(c):04{'x' if ord(c) % 2 else 'X'}}" for c in s) + '"'
    return json.dumps(s, ensure_ascii=False)


def _obj(draw: st.DrawFn, depth: int) -> str:
    pairs = draw(st.lists(st.tuples(KEYS, st.booleans()), max_size=4))
    # bool(pairs): with `pairs and draw(...)` mypy infers draw's type from the list.
    if bool(pairs) and draw(st.booleans()):  # force a duplicate somewhere
        pairs.append(draw(st.sampled_from(pairs)))
    ws = draw(WS)
    items = [
        f"{draw(WS)}{_string(k, esc)}{draw(WS)}:{draw(WS)}{_value(draw, depth + 1)}{draw(WS)}"
        for k, esc in pairs
    ]
    return "{" + ws + ",".join(items) + "}"


def _value(draw: st.DrawFn, depth: int) -> str:
    kinds = ["int", "float", "str", "lit"] + (["obj", "arr"] if depth < 4 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "int":
        return str(draw(st.integers(-(2**40), 2**40)))
    if kind == "float":
        return repr(draw(st.floats(allow_nan=False, allow_infinity=False, width=32)))
    if kind == "str":
        return _string(draw(TEXT), draw(st.booleans()))
    if kind == "lit":
        return draw(st.sampled_from(["true", "false", "null"]))
    if kind == "obj":
        return _obj(draw, depth)
    return "[" + ",".join(_value(draw, depth + 1) for _ in range(draw(st.integers(0, 3)))) + "]"


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    fields = [
        ("id", _string(draw(st.sampled_from(["i-1", "abc"])), draw(st.booleans()))),
        ("action", _string(draw(st.sampled_from(["a.b", "x:y"])), draw(st.booleans()))),
        ("resource", _string(draw(TEXT), draw(st.booleans()))),
        ("ts", str(draw(st.integers(0, 2**31)))),
    ]
    if draw(st.booleans()):
        fields.append(("params", _obj(draw, 1)))
    if draw(st.booleans()):
        fields.append(("parents", draw(st.sampled_from(["[]", '["p-1"]', '[ "a" , "b" ]']))))
    if draw(st.booleans()):
        fields.append(("principal", draw(st.sampled_from(["null", '"agent-1"']))))
    if draw(st.booleans()):  # a duplicate top-level key, either value
        fields.append(draw(st.sampled_from(fields)))
    fields = draw(st.permutations(fields))
    ws = draw(WS)
    items = [
        f"{draw(WS)}{_string(k, draw(st.booleans()))}{draw(WS)}:{draw(WS)}{v}" for k, v in fields
    ]
    return (ws + "{" + ",".join(items) + draw(WS) + "}" + draw(WS)).encode()


class _Dup(ValueError):
    pass


def _hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Dup
    return dict(pairs)


def _has_duplicates(payload: bytes) -> bool:
    try:
        json.loads(payload, object_pairs_hook=_hook)
    except _Dup:
        return True
    return False


@settings(max_examples=600, deadline=None)
@given(payloads())
def test_fast_path_never_misses_a_duplicate(payload: bytes) -> None:
    dup = _has_duplicates(payload)
    try:
        shape = _json_shape.decode(payload)
    except Exception:
        return  # msgspec refused it: the fast path never runs
    fast = _surely_no_duplicates(payload, shape)
    assert not (fast and dup), payload
    if not dup and b"\\u" not in payload:
        assert fast, payload  # and exact the other way: no needless fallback
    result = decode_intent(payload)
    if dup:
        assert isinstance(result, Malformed) and result.reason is Reason.MALFORMED
        assert "duplicate key" in result.message


def test_examples() -> None:
    ok = b'{"id":"i","action":"a","resource":"r:1","ts":1,"params":{"u":"h://x:1"}}'
    assert isinstance(decode_intent(ok), Intent)
    for bad in (
        b'{"id":"i","action":"a","resource":"r","ts":1,"params":{"a":{"b":1,"b":2}}}',
        b'{"id":"i","action":"a","resource":"r","ts":1,"ts":1}',
        b'{"id":"i","action":"a","resource":"r","ts":1,"parents":[],"parents":[]}',
        b'{"id":"i","action":"a","resource":"r","ts":1,"params":{"\\u0061":"x","a":":"}}',
        b'{"id":"i","action":"a","resource":"r","ts":1,"params":{"a":"\\u003a","a":1}}',
        b'{"id":"i","action":"a","resource":"r","ts":1,"params":{"a:":1,"a:":1}}',
    ):
        result = decode_intent(bad)
        assert isinstance(result, Malformed) and "duplicate key" in result.message, bad
    full = b'{"id":"i","action":"a","resource":"r","ts":1,"params":{},"parents":[],'
    full += b'"principal":null}'
    intent = decode_intent(full)
    assert isinstance(intent, Intent)
    assert intent == Intent(id="i", action="a", resource="r", ts=1.0)


def _check_value_slow(value: Any, depth: int, max_depth: int) -> str | None:
    """``intent._check_value`` without its fast path for shallow strings and ints."""
    if depth > max_depth:
        return f"params nested deeper than {max_depth}"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value <= 2**63 - 1 else "integer out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "non-finite number"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return "non-string key in params"
            if (problem := _check_value_slow(v, depth + 1, max_depth)) is not None:
                return problem
        return None
    if isinstance(value, list | tuple):
        for v in value:
            if (problem := _check_value_slow(v, depth + 1, max_depth)) is not None:
                return problem
        return None
    return f"unsupported value type {type(value).__name__} in params"


_SCALARS = (
    st.none()
    | st.booleans()
    | st.text(max_size=3)
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1])
    | st.floats()
    | st.builds(bytes)
)
_PARAMS = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=2) | st.integers(0, 2), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None)
@given(_PARAMS, st.integers(0, 4), st.integers(0, 4))
def test_check_value_fast_path_is_exact(value: Any, depth: int, max_depth: int) -> None:
    """The shallow-scalar fast path gives what the plain recursion gives, at every depth."""
    assert _check_value(value, depth, max_depth) == _check_value_slow(value, depth, max_depth)
