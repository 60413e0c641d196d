"""Strict intent decoding: every malformed class is a value, never an exception."""

from __future__ import annotations

import base64
import json
import re
import threading

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus_guard.decision import Reason, crockford_128, new_decision_id
from bus_guard.intent import Intent, Malformed, Subject, decode_intent, parse_subject
from bus_guard.ledger._records import intent_decision_id

GOOD = {
    "id": "01JD8ABC",
    "action": "payments.transfer",
    "resource": "account:acct-1",
    "params": {"amount": 120.5, "currency": "USD", "to": "account:acct-9"},
    "ts": 1764150000.123,
    "parents": [],
}


def _json(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_valid_json_intent_decodes() -> None:
    intent = decode_intent(_json())
    assert isinstance(intent, Intent)
    assert intent.params["amount"] == 120.5 and intent.parents == ()


def test_valid_msgpack_intent_decodes_when_content_type_says_so() -> None:
    payload = msgspec.msgpack.encode(GOOD)
    assert isinstance(decode_intent(payload, "application/msgpack"), Intent)
    # The same bytes as JSON are malformed: the content type decides the codec.
    assert isinstance(decode_intent(payload, None), Malformed)


@pytest.mark.parametrize(
    ("payload", "content_type", "fragment"),
    [
        (_json(extra=1), None, "unknown field"),
        (_json(ts="yesterday"), None, "Expected `float`"),
        (_json(id=...), None, "missing required field `id`"),
        (_json(id="has space"), None, "matching regex"),
        (b'{"id": "a", "id": "b", "action": "x", "resource": "r", "ts": 1}', None, "duplicate key"),
        (
            _json(params={"amount": 1, "amount2": 2}).replace(b'"amount2"', b'"amount"'),
            None,
            "duplicate key",
        ),
        (_json().replace(b"120.5", b"NaN"), None, "malformed"),
        (_json().replace(b"120.5", b"Infinity"), None, "malformed"),
        (_json().replace(b"120.5", b"1e999"), None, "out of range"),
        (_json().replace(b"120.5", b"1" * 40), None, "64-bit"),
        (_json(params={"a": [[[[[[[[[[1]]]]]]]]]]}), None, "nested deeper"),
        (b"[" * 5000 + b"]" * 5000, None, ""),
        (b"\xff\xfe{}", None, ""),
        (_json(params={"a": "x" * 70000}), None, "exceeds"),
        (b"", None, ""),
        (_json(), "text/plain", "unsupported content type"),
        (b"\x81\xa1a\x01\x81", "application/msgpack", ""),
    ],
)
def test_each_malformed_class_is_a_malformed_value(
    payload: bytes, content_type: str | None, fragment: str
) -> None:
    result = decode_intent(payload, content_type)
    assert isinstance(result, Malformed), result
    assert result.reason is Reason.MALFORMED
    assert fragment in result.message


def test_msgpack_duplicate_keys_are_malformed() -> None:
    good = msgspec.msgpack.encode(GOOD)
    # fixmap of 6 entries -> claim 7 and repeat the "id" entry at the end.
    dup = (
        bytes([good[0] + 1]) + good[1:] + msgspec.msgpack.encode("id") + msgspec.msgpack.encode("z")
    )
    result = decode_intent(dup, "application/msgpack")
    assert isinstance(result, Malformed) and "duplicate" in result.message


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.sampled_from([None, "application/msgpack", "application/json"]))
def test_decoder_is_total_on_arbitrary_bytes(payload: bytes, content_type: str | None) -> None:
    """SCENARIOS S12: any bytes give exactly one value, never an exception."""
    result = decode_intent(payload, content_type)
    assert isinstance(result, Intent | Malformed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*GOOD, "principal", "x"]), json_values, max_size=8))
def test_decoder_is_total_on_structured_json(body: dict[str, object]) -> None:
    payload = json.dumps(body).encode()  # json.dumps writes NaN/Infinity: must be refused
    result = decode_intent(payload)
    assert isinstance(result, Intent | Malformed)
    if isinstance(result, Intent):
        assert set(body) <= {*GOOD, "principal"}


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("guard.in.agent-7.payments.transfer", ("agent-7", "payments.transfer")),
        ("guard.in.a_b.x", ("a_b", "x")),
        ("guard.in.agent-7", None),
        ("guard.in.agent!7.x", None),
        ("guard.in." + "a" * 65 + ".x", None),
        ("guard.exec.agent-7.x", None),
        ("other.in.agent-7.x", None),
        ("guard.in.agent-7.x.b@d", None),
    ],
)
def test_parse_subject(subject: str, expected: tuple[str, str] | None) -> None:
    parsed = parse_subject(subject, "guard")
    assert (tuple(parsed) if parsed else None) == expected
    if expected is not None:
        assert parsed is not None and type(parsed) is Subject
        assert (parsed.principal, parsed.action) == expected == parsed


def test_decision_ids_are_unique_ulids() -> None:
    ids = {new_decision_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)


def test_decision_ids_are_monotonic_and_unique_across_threads() -> None:
    # Monotonic ULIDs: one thread's ids sort in the order they were made, also within one
    # millisecond (where only the counter distinguishes them), and threads calling the
    # embedding API concurrently never share one.
    ids = [new_decision_id() for _ in range(50000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    made: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(new_decision_id() for _ in range(20000))

    threads = [threading.Thread(target=work, args=(m,)) for m in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for m in made for i in m]
    assert len(set(every)) == len(every) == 80000


@settings(max_examples=300)
@given(st.binary(min_size=16, max_size=16))
def test_crockford_128_is_base32_with_the_crockford_alphabet(data: bytes) -> None:
    # Decision ids derived from intents are stored in ledgers: the fast encoding must give
    # exactly what RFC 4648 base32 + the Crockford alphabet gave.
    table = bytes.maketrans(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    )
    expected = base64.b32encode(data).rstrip(b"=").translate(table).decode("ascii")
    assert crockford_128(data) == expected


def test_intent_decision_ids_are_stable() -> None:
    # Pinned: a changed derivation would split one intent's decisions across versions.
    assert intent_decision_id("guard", "agent-1", "intent-1") == "TZ6537VRBQKN8EEGYP7GCTNM50"
