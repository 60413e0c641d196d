"""What an agent can put in a message, checked where the gateway reads it (no server here):
headers, reply subjects, msgpack canonical form, parents, resources, subjects that are not
UTF-8. Each test names one bound or rule of the README's "Hostile input" section."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus_guard.decision import Effect, Reason
from bus_guard.intent import MAX_PARENTS, Intent, Malformed, decode_intent, wire_safe
from bus_guard.pipeline import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    decide,
    decode,
    header_problem,
    outcome_of,
    reply_allowed,
)
from bus_guard.policy import PolicySet

MSGPACK = "application/msgpack"
TRANSFER = "guard.in.agent-7.payments.transfer"
NOW = 1_764_150_000.0


def _intent(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "i-1",
        "action": "payments.transfer",
        "resource": "account:acct-1",
        "params": {"amount": 10.0, "currency": "USD", "to": "account:acct-9"},
        "ts": NOW,
    }
    return body | over


# --- msgpack: canonical by construction -----------------------------------------------------


def _fixstr(s: str) -> bytes:
    raw = s.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def _map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def _enc(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def _f32(x: float) -> bytes:
    return b"\xca" + struct.pack(">f", x)


def _transfer_pairs(params: bytes, resource: list[bytes] | None = None) -> bytes:
    pairs = [
        (_fixstr("id"), _enc("i-1")),
        (_fixstr("action"), _enc("payments.transfer")),
    ]
    pairs += [(_fixstr("resource"), r) for r in (resource or [_enc("account:acct-1")])]
    pairs += [(_fixstr("params"), params), (_fixstr("ts"), _enc(NOW))]
    return _map(pairs)


def test_the_issues_msgpack_exploits_are_malformed(policies: PolicySet) -> None:
    """A duplicate key balanced by a float32 (same length as the canonical encoding) was
    allowed as a small transfer; so was a sanctioned resource followed by an allowed one."""
    amount_twice = _map(
        [
            (_fixstr("amount"), b"\xcf" + (5000).to_bytes(8, "big")),  # uint64 5000
            (_fixstr("amount"), _f32(10.0)),
            (_fixstr("currency"), _enc("USD")),
        ]
    )
    resource_twice = [_enc("account:sanctioned-001"), _enc("account:acct-1")]
    good_params = _enc({"amount": 10.0, "currency": "USD", "to": "account:acct-9"})
    for payload in (_transfer_pairs(amount_twice), _transfer_pairs(good_params, resource_twice)):
        got = decode_intent(payload, MSGPACK)
        assert isinstance(got, Malformed) and "canonical" in got.message
        d = decide(policies, TRANSFER, payload, now=NOW, content_type=MSGPACK)
        assert (d.effect, d.reason) == (Effect.DENY, Reason.MALFORMED)
    # The canonical encoding of the same intent is accepted.
    canonical = _enc(_intent())
    assert isinstance(decode_intent(canonical, MSGPACK), Intent)
    assert decide(policies, TRANSFER, canonical, now=NOW, content_type=MSGPACK).allowed


@pytest.mark.parametrize(
    "params",
    [
        b"\x81" + _fixstr("n") + b"\xcc\x05",  # uint8 for 5 (a fixint is shorter)
        b"\x81" + _fixstr("n") + b"\xd1\x00\x05",  # int16 for 5
        b"\x81" + _fixstr("n") + _f32(1.5),  # float32
        b"\xde\x00\x01" + _fixstr("n") + b"\x05",  # map16 for one entry
        b"\x81" + b"\xd9\x01n" + b"\x05",  # str8 key of one byte
        b"\x81" + _fixstr("n") + b"\xc4\x01x",  # bin
        b"\x81" + _fixstr("n") + b"\xd4\x01\x00",  # fixext
    ],
)
def test_non_canonical_msgpack_is_malformed(params: bytes) -> None:
    assert isinstance(decode_intent(_transfer_pairs(params), MSGPACK), Malformed)


_SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
)


@settings(max_examples=300)
@given(
    st.dictionaries(st.text(max_size=6), _SCALARS, max_size=5),
    st.integers(0, 4),
    st.data(),
)
def test_what_is_authorized_is_what_any_decoder_reads(
    params: dict[str, Any], dup: int, data: st.DataObject
) -> None:
    """Whatever a first-key or a last-key decoder would read of an accepted payload, it
    is the intent the gateway decided on: accepted payloads have no duplicate keys."""
    keys = list(params)
    pairs = [(_enc(k), _enc(v)) for k, v in params.items()]
    if keys and dup:  # repeat a key with another value
        k = data.draw(st.sampled_from(keys))
        pairs.append((_enc(k), _enc(data.draw(_SCALARS))))
    raw_params = bytes([0x80 | len(pairs)]) + b"".join(a + b for a, b in pairs)
    got = decode_intent(_transfer_pairs(raw_params), MSGPACK)
    first = {msgspec.msgpack.decode(a): msgspec.msgpack.decode(b) for a, b in reversed(pairs)}
    last = {msgspec.msgpack.decode(a): msgspec.msgpack.decode(b) for a, b in pairs}
    if isinstance(got, Intent):
        assert got.params == first == last
    else:
        assert first != last or len(first) < len(pairs)  # refused only if ambiguous


# --- parents, resources ---------------------------------------------------------------------


def test_parents_beyond_the_cap_are_malformed() -> None:
    ok = msgspec.json.encode(_intent(parents=[f"p-{i}" for i in range(MAX_PARENTS)]))
    assert isinstance(decode_intent(ok), Intent)
    many = msgspec.json.encode(_intent(parents=[f"p-{i}" for i in range(5000)]))
    got = decode_intent(many)
    assert isinstance(got, Malformed) and "parents" in got.message


@pytest.mark.parametrize(
    "resource",
    [
        "account:Sanctioned-1 ",  # trailing space
        " account:sanctioned-1",  # leading space
        "account: sanctioned-1",  # inner space
        "account:s\u0430nctioned-1",  # Cyrillic a
        "account:sanctioned-1\t",
        "account:sanctioned\x00-1",
        "account:sanctioned\u200b-1",  # zero-width space
        "account:sanctioned-\uff11",  # fullwidth digit
    ],
)
def test_resources_outside_their_canonical_form_are_malformed(
    policies: PolicySet, resource: str
) -> None:
    payload = msgspec.json.encode(_intent(resource=resource))
    got = decode_intent(payload)
    assert isinstance(got, Malformed) and "canonical" in got.message
    d = decide(policies, TRANSFER, payload, now=NOW)
    assert (d.effect, d.reason) == (Effect.DENY, Reason.MALFORMED)


def test_case_and_sign_cannot_evade_the_example_policies(policies: PolicySet) -> None:
    """The shipped policies deny sanctioned accounts in any letter case, and a negative
    amount is not a small transfer."""
    for resource in ("account:sanctioned-1", "account:Sanctioned-1", "ACCOUNT:SANCTIONED-1"):
        d = decide(policies, TRANSFER, msgspec.json.encode(_intent(resource=resource)), now=NOW)
        assert d.effect is Effect.DENY, resource
    params = {"amount": -5000.0, "currency": "USD", "to": "account:acct-9"}
    d = decide(policies, TRANSFER, msgspec.json.encode(_intent(params=params)), now=NOW)
    assert d.effect is Effect.DENY and d.reason is Reason.NO_MATCHING_RULE


# --- headers and replies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"Status": "503"}, "reserved"),
        ({"description": "x"}, "reserved"),
        ({"X(1)": "v"}, "token"),
        ({"X Y": "v"}, "token"),
        ({"X:Y": "v"}, "token"),
        ({"": "v"}, "token"),
        ({"X-A": "a\r\nNats-Msg-Id: forged"}, "control"),
        ({"X-A": "a\x1b[2J"}, "control"),
        ({"X-A": "\udcff"}, "control"),
        ({f"X-{i}": "v" for i in range(MAX_HEADERS + 1)}, "headers"),
        ({"X-A": "v" * MAX_HEADER_BYTES}, "bytes"),
    ],
)
def test_headers_that_cannot_be_forwarded_are_malformed(
    policies: PolicySet, headers: dict[str, str], why: str
) -> None:
    problem = header_problem(headers)
    assert problem is not None and why in problem
    payload = msgspec.json.encode(_intent())
    _, intent = decode(TRANSFER, payload, None, headers=headers)
    assert isinstance(intent, Malformed)
    # Without the headers the same intent is allowed: the headers alone deny it.
    assert isinstance(decode(TRANSFER, payload, None)[1], Intent)


def test_ordinary_headers_pass() -> None:
    headers = {"traceparent": "00-abc-def-01", "Content-Type": "application/json", "X-Tab": "a\tb"}
    assert header_problem(headers) is None
    assert header_problem({f"X-{i}": "v" for i in range(MAX_HEADERS)}) is None


@pytest.mark.parametrize(
    ("reply", "principal", "inbox", "ok"),
    [
        ("_INBOX.agent-7.abc", "agent-7", "principal", True),
        ("_INBOX.agent-7.abc.1", "agent-7", "principal", True),
        ("_INBOX.agent-2.abc", "agent-7", "principal", False),  # another agent's inbox
        ("_INBOX.agent-70.abc", "agent-7", "principal", False),
        ("_INBOX.agent-2.abc", "agent-7", "any", True),
        ("_R_.aBc.1", "agent-7", "principal", True),  # the server's cross-account alias
        ("_R_.aBc.1", None, "principal", True),
        ("_INBOX.agent-7.abc", None, "principal", False),  # bad subject: no principal
        ("guard.exec.agent-7.x", "agent-7", "any", False),
        ("$JS.API.STREAM.DELETE.GUARD_LEDGER", "agent-7", "any", False),
        ("_INBOX.agent-7.>", "agent-7", "principal", False),
        ("_INBOX.agent-7.*", "agent-7", "any", False),
        ("_INBOX.\udcff", "agent-7", "any", False),  # not UTF-8 on the wire
        ("_INBOX.agent-7. x", "agent-7", "principal", False),
        ("_INBOX.agent-7." + "x" * 300, "agent-7", "principal", False),
    ],
)
def test_replies_go_only_to_inboxes(
    reply: str, principal: str | None, inbox: str, ok: bool
) -> None:
    assert reply_allowed(reply, principal, inbox=inbox) is ok


# --- subjects that are not UTF-8 ------------------------------------------------------------


def test_a_non_utf8_subject_is_a_bad_subject_with_a_json_safe_record(
    policies: PolicySet,
) -> None:
    raw = b"guard.in.agent-7.tools.\xff\xfe"
    subject = raw.decode("utf-8", "surrogateescape")  # as the gateway's client reads it
    payload = msgspec.json.encode(_intent())
    decoded = decode(subject, payload, None)
    assert decoded == (None, None)
    d = decide(policies, subject, payload, now=NOW)
    assert d.reason is Reason.BAD_SUBJECT
    outcome = outcome_of("d-1", subject, payload, decoded, d, gateway="gw", now=NOW)
    assert outcome.subject == "guard.in.agent-7.tools.\\xff\\xfe"
    msgspec.json.encode(outcome)  # encodable: records and the ledger can carry it


@given(st.binary(max_size=40))
def test_wire_safe_is_utf8_and_keeps_ascii(raw: bytes) -> None:
    text = raw.decode("utf-8", "surrogateescape")
    safe = wire_safe(text)
    safe.encode("utf-8")  # never raises
    if raw.isascii():
        assert safe == text


def test_nan_and_huge_numbers_in_msgpack_are_malformed() -> None:
    for value in (math.nan, math.inf):
        payload = _enc(_intent(params={"amount": value}))
        assert isinstance(decode_intent(payload, MSGPACK), Malformed)


# --- declared param types are enforced ------------------------------------------------------

_TYPED = b"""
bundle: typed
version: "1"
schemas:
  pay.*: {amount: number, count: integer, memo: string, extra: any}
rules:
  - {id: allow-pay, effect: allow, actions: [pay.send]}
  - id: deny-big
    effect: deny
    actions: [pay.send]
    when: {field: params.amount, gt: 10000}
"""


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"amount": 10}, Reason.ALLOWED_BY_RULE),
        ({"amount": 99999}, Reason.DENIED_BY_RULE),
        ({"amount": "99999"}, Reason.MALFORMED),  # a deny evaded by type, before this
        ({"amount": True}, Reason.MALFORMED),
        ({"amount": [99999]}, Reason.MALFORMED),
        ({"count": 2.0, "amount": 1}, Reason.ALLOWED_BY_RULE),  # a whole float is an integer
        ({"count": 2.5}, Reason.MALFORMED),
        ({"memo": 5}, Reason.MALFORMED),
        ({"extra": {"x": [1]}}, Reason.ALLOWED_BY_RULE),  # "any" declares nothing
        ({"amount": None}, Reason.ALLOWED_BY_RULE),  # null is missing: the rules judge it
        ({}, Reason.ALLOWED_BY_RULE),
    ],
)
def test_params_of_another_type_than_declared_are_malformed(
    params: dict[str, Any], reason: Reason
) -> None:
    from bus_guard.policy import load_policy_sources

    policies = load_policy_sources({"typed.yaml": _TYPED})
    payload = msgspec.json.encode(
        {"id": "t", "action": "pay.send", "resource": "r", "params": params, "ts": NOW}
    )
    d = decide(policies, "guard.in.agent-1.pay.send", payload, now=NOW)
    assert d.reason is reason, d.message
    if reason is Reason.MALFORMED:
        assert d.effect is Effect.DENY and "schema 'pay.*' declares" in d.message
