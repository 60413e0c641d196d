"""No agent can stop, stall or fool the gateway (SPEC §10 "Hostile agents"; SCENARIOS S18).

Every case publishes through a real nats-server to ``bus-guard run`` as a child process,
in both intake modes: under the shipped ``compose/`` configuration (agents in their own
account, each allowed to publish only ``guard.in.<own name>.>``, the gateway with its
credentials), or, where a case needs what the accounts rule out (a reply subject that
reaches another agent), on one open account. The hostile agent speaks the protocol itself
(:class:`tests.hostilekit.RawClient`), so it sends what nats-py would refuse to.

For every input the suite knows up front what its terminal outcome must be: one exec, deny
or hold message identified by the SHA-256 of the payload it decides (every payload is made
unique), or a documented server refusal (``-ERR``, a closed connection or, in stream mode, a
PubAck error). :meth:`tests.hostilekit.Report.problems` asserts, for every input: exactly
one outcome (not zero, not two), and what the case requires of it; no exec message that
``bus_guard.decide`` would not allow or whose artifact does not verify; a victim agent's
intents, published steadily while the attack runs, each decided within
:data:`~tests.hostilekit.VICTIM_BOUND_S`; the gateway process alive at the end and its
resident set bounded. ``pytest -s`` prints the counts of each attack.

One named case per class of the issue, then a generated corpus (seeded, deterministic for
a seed and a clock) over subjects, headers and payloads in JSON and msgpack. A larger
corpus runs with ``-m slow``.
"""

from __future__ import annotations

import math
import random
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest

from bus_guard.signing._keys import generate_key

from .conftest import POLICIES
from .hostilekit import (
    DENIED,
    MALFORMED,
    NOT_FORWARDED,
    ORACLE,
    POLICY,
    Case,
    Expect,
    Mode,
    Raw,
    RawClient,
    Report,
    arena,
    header_block,
    refused,
    run_attack,
)

MODES: Final = pytest.mark.parametrize("mode", ["core", "stream"])

ATTACKER: Final = "agent-7"  # in the payments group: transfers up to 1000 are allowed to it
LARGE_MAX_PAYLOAD: Final = 8 * 1024 * 1024  # the class-4 server's, to let 1 MiB of headers in
JS_HEADER_LIMIT: Final = 65535  # JetStream refuses to store larger header blocks
PARENTS_PER_INTENT: Final = 5000
PARENT_FLOOD_INTENTS: Final = 60
CORPUS_SEED: Final = 18
CORPUS_SIZE: Final = 320
SLOW_CORPUS_SIZE: Final = 3000

# An inline status line (``NATS/1.0 503``): a denial; in stream mode JetStream stores the
# header block without it, and the intent is decided as policy says.
INLINE_STATUS: Final = Expect(outcome="deny", reasons=frozenset({"malformed"}), stream=ORACLE)

MSGPACK: Final = "application/msgpack"
MSGPACK_HEADERS: Final = header_block([(b"Content-Type", MSGPACK.encode())])

# Test-only rules that a naive matcher evaluates in exponential / high-polynomial time.
HOSTILE_BUNDLE: Final = r"""
bundle: hostile
version: "1.0.0"
mode: enforce
description: Test-only patterns that backtrack in a naive matcher (tests/test_hostile.py).

schemas:
  files.annotate: {memo: string}

rules:
  - id: deep-csv
    effect: allow
    description: A glob with five stars.
    actions: [files.read]
    resources: ["bucket:*/*/*/*/*.csv"]

  - id: memo-words
    effect: allow
    description: A regex with a nested quantifier.
    actions: [files.annotate]
    when: {field: params.memo, matches: '^(\w+\s?)*$'}
"""


@pytest.fixture(scope="module")
def hostile_policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped bundles (``policies/*.yaml``, with their approvers' keys) plus
    :data:`HOSTILE_BUNDLE`."""
    directory = tmp_path_factory.mktemp("policies")
    for bundle in POLICIES.glob("*.yaml"):
        shutil.copy(bundle, directory / bundle.name)
    shutil.copytree(POLICIES / "approvers", directory / "approvers")  # their keys
    (directory / "hostile.yaml").write_text(HOSTILE_BUNDLE)
    return directory


@pytest.fixture(scope="module")
def hostile_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_key(tmp_path_factory.mktemp("keys"))


async def attack(
    tmp: Path,
    mode: Mode,
    policies: Path,
    keys: tuple[Path, Path],
    cases: Sequence[Case],
    *,
    label: str,
    max_payload: int | None = None,
) -> Report:
    """*cases* against a fresh gateway on the shipped compose/ configuration."""
    key, jwks = keys
    with arena(tmp, mode, policies=policies, key=key, jwks=jwks, max_payload=max_payload) as a:
        return await run_attack(a, cases, label=label)


# -- building intents -------------------------------------------------------------------------


def subject(action: str, principal: str = ATTACKER) -> bytes:
    return f"guard.in.{principal}.{action}".encode()


def body(
    action: str, resource: str, params: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": kw.pop("id"),
        "action": action,
        "resource": resource,
        "params": params or {},
        "ts": kw.pop("ts", time.time()),
    }
    return out | kw


def as_json(intent: dict[str, Any]) -> bytes:
    return msgspec.json.encode(intent)


def json_case(
    name: str,
    action: str,
    resource: str,
    params: dict[str, Any] | None = None,
    *,
    expect: Expect = ORACLE,
    principal: str = ATTACKER,
    headers: bytes | None = None,
    **kw: Any,
) -> Case:
    payload = as_json(body(action, resource, params, id=name, **kw))
    return Case(name, Raw(subject(action, principal), payload, headers), expect)


def search(
    name: str,
    *,
    headers: bytes | None = None,
    expect: Expect = ORACLE,
    reply: bytes | None = None,
    principal: str = ATTACKER,
) -> Case:
    """An intent every agent is allowed (rule search-for-all): forwarded unless something
    else about the message is wrong."""
    payload = as_json(body("tools.search", "tool:search", {"q": name}, id=name))
    return Case(name, Raw(subject("tools.search", principal), payload, headers, reply), expect)


# msgpack, written by hand: the encodings msgspec would never produce


def mp_str(value: str, *, wide: bool = False) -> bytes:
    raw = value.encode()
    if len(raw) < 32 and not wide:
        return bytes([0xA0 | len(raw)]) + raw
    if len(raw) < 256:
        return b"\xd9" + bytes([len(raw)]) + raw
    return b"\xda" + struct.pack(">H", len(raw)) + raw


def mp_map(n: int, *, wide: bool = False) -> bytes:
    return b"\xde" + struct.pack(">H", n) if wide else bytes([0x80 | n])


def mp_f64(value: float) -> bytes:
    return b"\xcb" + struct.pack(">d", value)


def mp_f32(value: float) -> bytes:
    return b"\xca" + struct.pack(">f", value)


def mp_uint(value: int, width: int) -> bytes:
    """*value* as an unsigned integer of *width* bytes (1, 2, 4, 8): non-minimal if small."""
    tag = {1: b"\xcc", 2: b"\xcd", 4: b"\xce", 8: b"\xcf"}[width]
    return tag + value.to_bytes(width, "big")


def mp_intent(
    name: str,
    *,
    resources: Sequence[bytes],
    params: Sequence[tuple[bytes, bytes]],
    action: str = "payments.transfer",
) -> bytes:
    """A msgpack intent from encoded pieces: each ``resources`` entry is one ``resource``
    key (more than one: duplicate keys), ``params`` the encoded (key, value) pairs."""
    pairs = [
        (mp_str("id"), mp_str(name)),
        (mp_str("action"), mp_str(action)),
        *((mp_str("resource"), r) for r in resources),
        (mp_str("ts"), mp_f64(time.time())),
        (mp_str("params"), mp_map(len(params)) + b"".join(k + v for k, v in params)),
    ]
    return mp_map(len(pairs)) + b"".join(k + v for k, v in pairs)


def transfer_params(amount: bytes, *, wide: bool = False) -> list[tuple[bytes, bytes]]:
    return [
        (mp_str("amount", wide=wide), amount),
        (mp_str("currency", wide=wide), mp_str("USD", wide=wide)),
        (mp_str("to", wide=wide), mp_str("account:acct-9", wide=wide)),
    ]


def msgpack_case(name: str, payload: bytes, expect: Expect = MALFORMED) -> Case:
    return Case(name, Raw(subject("payments.transfer"), payload, MSGPACK_HEADERS), expect, MSGPACK)


# -- 1. invalid UTF-8 in subjects and replies ---------------------------------------------


@MODES
async def test_invalid_utf8_subject(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """The server routes any bytes (``guard.in.agent-7.>`` matches); nats-py cannot even
    decode such a subject. Each is one denial ``bad_subject`` on ``guard.deny.~invalid``."""
    bad_subject = Expect(outcome="deny", reasons=frozenset({"bad_subject"}))
    tails = {
        "ff-fe": b"tools.\xff\xfe",
        "lone-continuation": b"tools.\x80",
        "truncated-2-byte": b"tools.\xc3",
        "overlong-slash": b"tools.\xc0\xaf",
        "surrogate": b"tools.\xed\xa0\x80",
        "whole-action": b"\xfe\xff",
    }
    cases = []
    for label, tail in tails.items():
        case = search(f"utf8-subject-{label}", expect=bad_subject)
        cases.append(
            Case(case.name, Raw(b"guard.in.agent-7." + tail, case.msg.payload), bad_subject)
        )
    report = await attack(
        tmp_path, mode, hostile_policies, hostile_keys, cases, label="utf8-subject"
    )
    report.check()
    for case in cases:
        assert [o.subject for o in report.of(case)] == ["guard.deny.~invalid"]


@MODES
async def test_invalid_utf8_reply(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """Reply ``_INBOX.\\xff`` (one open account: under compose/ the server would replace
    it with its ``_R_.`` alias). The decision is made and published as usual; the reply is
    refused: nothing the gateway sends arrives on it."""
    key, jwks = hostile_keys
    attacker = "agent-1"
    cases = [
        search("utf8-reply", reply=b"_INBOX.\xff", principal=attacker),
        search("utf8-reply-token", reply=b"_INBOX.agent-1.\xc3\x28", principal=attacker),
    ]
    with arena(tmp_path, mode, policies=hostile_policies, key=key, jwks=jwks, accounts=False) as a:
        async with RawClient(a.server.port, subs=("_INBOX.>",)) as watcher:
            report = await run_attack(a, cases, label="utf8-reply", attacker=attacker)
            report.check()
            await reply_barrier(watcher, "agent-3")
    replies = {c.msg.reply or b"" for c in cases}
    assert gateway_replies(watcher, replies) == []
    if mode == "core":  # (stream mode: JetStream's PubAcks go there, never the gateway's)
        assert [d.subject for d in watcher.deliveries if d.subject in replies] == []


async def reply_barrier(client: RawClient, principal: str) -> None:
    """Return once any reply the gateway made to an earlier, decided intent has reached
    *client*: *principal* sends an intent with a reply to its own inbox, which *client*
    subscribes to; the gateway (core mode: one subscription, decided in order) or JetStream
    (stream mode: PubAcks in storage order) answers it after everything decided before."""
    barrier = f"_INBOX.{principal}.barrier-{time.time_ns()}".encode()
    case = search(f"barrier-{time.time_ns()}", principal=principal)
    await client.send(Raw(case.msg.subject, case.msg.payload, reply=barrier))
    await client.first_on(barrier, timeout_s=10)


def gateway_replies(client: RawClient, subjects: set[bytes]) -> list[bytes]:
    """What arrived on *subjects* that is a decision (JetStream's own PubAcks are not)."""
    return [
        d.payload
        for d in client.deliveries
        if d.subject in subjects and b"decision_id" in d.payload
    ]


# -- 2. status headers -----------------------------------------------------------------------


@MODES
async def test_status_headers(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """``Status`` / ``Description`` headers and inline status lines are what the server
    uses for no-responders, heartbeats and flow control: a pull consumer takes such an
    intent for a control message (stream mode used to swallow it, never decided, pinning
    the consumer). Each must be one denial ``malformed``. Except an inline status line in
    stream mode: JetStream stores the header block without it (measured with nats-server
    2.15), so what the gateway pulls is an ordinary intent, decided as policy says."""
    headers = {
        "status-503": header_block([(b"Status", b"503")]),
        "status-description": header_block([(b"Status", b"404"), (b"Description", b"No Messages")]),
        "inline-503": header_block([(b"X-Trace", b"1")], status=b"503 Bad"),
        "inline-503-bare": header_block(status=b"503"),
        "inline-100-heartbeat": header_block(
            [(b"Nats-Last-Consumer", b"1"), (b"Nats-Last-Stream", b"1")],
            status=b"100 Idle Heartbeat",
        ),
        "inline-100-flow-control": header_block(status=b"100 FlowControl Request"),
        "inline-404": header_block(status=b"404 No Messages"),
        "inline-408": header_block(status=b"408 Request Timeout"),
        "inline-409": header_block(status=b"409 Consumer Deleted"),
    }
    cases = [
        search(
            f"status-{n}", headers=h, expect=INLINE_STATUS if n.startswith("inline") else MALFORMED
        )
        for n, h in headers.items()
    ]
    report = await attack(tmp_path, mode, hostile_policies, hostile_keys, cases, label="status")
    report.check()


# -- 3. headers that cannot be republished -----------------------------------------------------


@MODES
async def test_unrepublishable_headers(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """Header names that are not RFC 7230 tokens (nats-py refuses to publish them), values
    with control characters, a header block just under JetStream's 64 KiB limit (the
    forwarded copy, artifact added, would be over it), thousands of headers: one denial
    each, on an intent that would otherwise be forwarded."""
    near_limit = JS_HEADER_LIMIT - 1024
    pad = near_limit - len(header_block([(b"X-Pad", b"")]))
    cases = [
        search("name-parens", headers=header_block([(b"X(1)", b"v")]), expect=MALFORMED),
        search("name-space", headers=header_block([(b"X Trace", b"v")]), expect=MALFORMED),
        search("name-empty", headers=header_block([(b"", b"v")]), expect=MALFORMED),
        search("name-control", headers=header_block([(b"X\x01Y", b"v")]), expect=MALFORMED),
        search("name-non-ascii", headers=header_block([("X-Ü".encode(), b"v")]), expect=MALFORMED),
        search("name-invalid-utf8", headers=header_block([(b"X-\xff", b"v")]), expect=DENIED),
        search("value-nul", headers=header_block([(b"X-V", b"a\x00b")]), expect=MALFORMED),
        search("value-control", headers=header_block([(b"X-V", b"a\x01b")]), expect=MALFORMED),
        search("value-del", headers=header_block([(b"X-V", b"a\x7fb")]), expect=MALFORMED),
        search("value-bare-cr", headers=header_block([(b"X-V", b"a\rb")]), expect=MALFORMED),
        search("value-invalid-utf8", headers=header_block([(b"X-V", b"\xfe\xff")]), expect=DENIED),
        # "a:b: c" is the header "a" with the value "b: c" on the wire: whatever policy says
        search("name-colon", headers=header_block([(b"a:b", b"c")]), expect=POLICY),
        search("near-64k", headers=header_block([(b"X-Pad", b"v" * pad)]), expect=DENIED),
        search(
            "many-headers",
            headers=header_block([(b"X-%d" % i, b"v") for i in range(4000)]),
            expect=MALFORMED,
        ),
    ]
    assert len(cases[-2].msg.headers or b"") == near_limit
    report = await attack(tmp_path, mode, hostile_policies, hostile_keys, cases, label="headers")
    report.check()


# -- 4. a megabyte of headers ------------------------------------------------------------------


@MODES
async def test_megabyte_of_headers(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """On a server with a larger ``max_payload`` (8 MiB; the accounts unchanged), an
    allowed intent with about 1 MiB of headers, and one whose headers fill the server's
    ``max_payload`` (the forwarded copy, artifact headers added, cannot be published).
    Core mode: one denial ``malformed`` each. Stream mode: JetStream refuses to store a
    header block over 64 KiB (PubAck error 10097), so they never reach the gateway."""
    too_big = Expect(
        refused=frozenset({"stream"}), outcome="deny", reasons=frozenset({"malformed"})
    )
    mib = header_block([(b"X-Pad-%d" % i, b"v" * 65536) for i in range(16)])
    fill = search("fill-max-payload").msg
    room = LARGE_MAX_PAYLOAD - len(fill.payload) - len(header_block([(b"X-Pad", b"")])) - 16
    fill = Raw(fill.subject, fill.payload, header_block([(b"X-Pad", b"v" * room)]))
    cases = [
        search("headers-1mib", headers=mib, expect=too_big),
        Case("fill-max-payload", fill, too_big),
        search("after-the-big-ones"),  # decided as usual afterwards
    ]
    assert 1 << 20 <= len(mib) < 1 << 20 | 1 << 16
    assert LARGE_MAX_PAYLOAD - 64 < cases[1].msg.size <= LARGE_MAX_PAYLOAD
    report = await attack(
        tmp_path,
        mode,
        hostile_policies,
        hostile_keys,
        cases,
        label="1mib-headers",
        max_payload=LARGE_MAX_PAYLOAD,
    )
    report.check()


# -- 5. non-canonical msgpack -------------------------------------------------------------------


@MODES
async def test_noncanonical_msgpack(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """A decoder that keeps the last of duplicate keys and one that keeps the first read two
    different intents from the same bytes: the gateway would authorize 10.0 USD from
    acct-1 while an executor transfers 5000 (above the hold threshold) or from a sanctioned
    account. Non-minimal encodings allow the same trick with fewer tells. Every one of these
    is denied ``malformed``, never forwarded; including duplicates padded (float32 values,
    which re-encode 4 bytes longer) so that a minimal re-encoding has the input's length."""
    amount_5000 = mp_uint(5000, 4)  # the dropped value; 12 bytes with its key
    dup_amount = [*transfer_params(amount_5000), (mp_str("amount"), mp_f64(10.0))]
    padded_amount = [
        *transfer_params(amount_5000),
        (mp_str("amount"), mp_f32(10.0)),
        (mp_str("pad"), mp_f32(1.0)),
        (mp_str("pae"), mp_f32(1.0)),
    ]
    sanctioned, acct = mp_str("account:sanctioned-001"), mp_str("account:acct-1")
    ten = mp_f64(10.0)
    padded_resource = [
        (mp_str("amount"), mp_f32(10.0)),
        *transfer_params(ten)[1:],
        *((mp_str(f"p{i}"), mp_f32(1.0)) for i in range(7)),
    ]
    payloads = {
        "dup-amount": mp_intent("dup-amount", resources=[acct], params=dup_amount),
        "dup-resource": mp_intent(
            "dup-resource", resources=[sanctioned, acct], params=transfer_params(ten)
        ),
        "dup-amount-same-length": mp_intent(
            "dup-amount-same-length", resources=[acct], params=padded_amount
        ),
        "dup-resource-same-length": mp_intent(
            "dup-resource-same-length", resources=[sanctioned, acct], params=padded_resource
        ),
        "uint64-amount": mp_intent(
            "uint64-amount", resources=[acct], params=transfer_params(mp_uint(10, 8))
        ),
        "uint8-amount": mp_intent(
            "uint8-amount", resources=[acct], params=transfer_params(mp_uint(10, 1))
        ),
        "float32-amount": mp_intent(
            "float32-amount", resources=[acct], params=transfer_params(mp_f32(10.0))
        ),
        "str8-keys": mp_intent(
            "str8-keys", resources=[acct], params=transfer_params(ten, wide=True)
        ),
        "map16-params": mp_intent(
            "map16-params", resources=[acct], params=transfer_params(ten)
        ).replace(mp_str("params") + mp_map(3), mp_str("params") + mp_map(3, wide=True)),
    }
    # the padded duplicates really are as long as their minimal re-encoding
    for name in ("dup-amount-same-length", "dup-resource-same-length"):
        payload = payloads[name]
        assert len(msgspec.msgpack.encode(msgspec.msgpack.decode(payload))) == len(payload)
    control = as_json(
        body(
            "payments.transfer",
            "account:acct-1",
            {"amount": 10.0, "currency": "USD", "to": "account:acct-9"},
            id="canonical",
        )
    )
    cases = [msgpack_case(name, payload) for name, payload in payloads.items()]
    canonical = msgspec.msgpack.encode(msgspec.json.decode(control))
    cases.append(msgpack_case("canonical", canonical, ORACLE))  # control: allowed
    report = await attack(tmp_path, mode, hostile_policies, hostile_keys, cases, label="msgpack")
    report.check()
    assert [o.kind for o in report.of(cases[-1])] == ["exec"]


# -- 6. thousands of parents ---------------------------------------------------------------------


@MODES
async def test_thousands_of_parents(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """60 intents naming 5,000 unknown parents each: a gateway that looks every parent up
    in the ledger is busy for minutes. Each is denied (``malformed`` past the cap on
    parents, or ``lineage_violation``) while the victim's intents keep their bound."""
    rng = random.Random(6)
    lineage = Expect(outcome="deny", reasons=frozenset({"malformed", "lineage_violation"}))
    cases = []
    for i in range(PARENT_FLOOD_INTENTS):
        parents = [f"{rng.getrandbits(32):08x}" for _ in range(PARENTS_PER_INTENT)]
        name = f"parents-{i}"
        intent = body("tools.search", "tool:search", {"q": name}, id=name, parents=parents)
        if i % 2:
            raw = Raw(subject("tools.search"), msgspec.msgpack.encode(intent), MSGPACK_HEADERS)
        else:
            raw = Raw(subject("tools.search"), as_json(intent))
        cases.append(Case(name, raw, lineage))
    assert max(len(c.msg.payload) for c in cases) < 65536  # within the gateway's max payload
    report = await attack(tmp_path, mode, hostile_policies, hostile_keys, cases, label="parents")
    report.check()


# -- 7. pathological resources against globs and regexes ---------------------------------


@MODES
async def test_pathological_patterns(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """``bucket:*/*/*/*/*.csv`` against a 407-character resource of slashes and
    ``^(\\w+\\s?)*$`` against a 28-character memo take a backtracking matcher minutes
    (measured on the compiled policy: each character more multiplies the time). Each is
    decided (no rule matches: denied) within the bound; matching controls are allowed."""
    cases = [
        json_case("glob-slashes", "files.read", "bucket:" + "/" * 400, expect=DENIED),
        json_case("glob-almost-csv", "files.read", "bucket:" + "a/" * 199 + "x.cs", expect=DENIED),
        json_case("regex-memo", "files.annotate", "doc:1", {"memo": "a" * 27 + "!"}, expect=DENIED),
        json_case(
            "regex-memo-words", "files.annotate", "doc:1", {"memo": "ab " * 9 + "!"}, expect=DENIED
        ),
        json_case("glob-control", "files.read", "bucket:a/b/c/d/e.csv"),
        json_case("regex-control", "files.annotate", "doc:1", {"memo": "hello world"}),
    ]
    assert len("bucket:" + "/" * 400) == 407
    report = await attack(tmp_path, mode, hostile_policies, hostile_keys, cases, label="patterns")
    report.check()
    assert [o.kind for c in cases[-2:] for o in report.of(c)] == ["exec", "exec"]


# -- 8. spelling evasions of a deny -----------------------------------------------------------


@MODES
async def test_spelling_evasions(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """The shipped policies deny every action on ``account:sanctioned-*`` and allow agent-7
    transfers ``le 1000``. Spellings an executor or a bank may read as the sanctioned
    account, and a negative amount (``-5000 le 1000``: a transfer the other way round),
    must not be forwarded."""

    def transfer(
        name: str, resource: str, amount: float = 10.0, expect: Expect = NOT_FORWARDED
    ) -> Case:
        params = {"amount": amount, "currency": "USD", "to": "account:acct-9"}
        return json_case(name, "payments.transfer", resource, params, expect=expect)

    cases = [
        transfer("upper-case", "account:Sanctioned-1"),
        transfer("all-caps", "ACCOUNT:SANCTIONED-1"),
        transfer("space-after-colon", "account: sanctioned-1"),
        transfer("leading-space", " account:sanctioned-1"),
        transfer("trailing-space", "account:sanctioned-1 "),
        transfer("cyrillic-a", "account:s\u0430nctioned-1"),
        transfer("fullwidth-s", "account:\uff53anctioned-1"),
        transfer("zero-width-space", "account:sanctioned\u200b-1"),
        transfer("nul", "account:sanctioned-1\u0000"),
        transfer("newline", "account:sanctioned-1\n"),
        transfer("negative-amount", "account:acct-1", amount=-5000.0),
        transfer("negative-tiny", "account:acct-1", amount=-0.01),
        transfer("sanctioned", "account:sanctioned-1", expect=ORACLE),  # control: denied
        transfer("plain", "account:acct-1", expect=ORACLE),  # control: allowed
    ]
    report = await attack(tmp_path, mode, hostile_policies, hostile_keys, cases, label="evasions")
    report.check()
    assert [o.kind for o in report.of(cases[-1])] == ["exec"]


# -- 9. replies aimed at another agent ---------------------------------------------------------


@MODES
async def test_reply_to_another_agents_inbox(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    """On one open account (compose/ rules this out: each agent subscribes only to its own
    inbox and replies cross accounts as ``_R_.`` aliases), agent-1 sends intents whose reply
    subject is agent-2's inbox. Each is decided as usual; agent-2 receives no decision.
    Control: a reply to agent-1's own inbox is answered (core mode; in stream mode every
    reply is JetStream's PubAck, and the gateway never replies)."""
    key, jwks = hostile_keys
    attacker = "agent-1"
    theirs = [b"_INBOX.agent-2.x", b"_INBOX.agent-2.a.b.c", b"_INBOX.agent-2"]
    cases = [
        search(f"reply-agent-2-{i}", reply=r, principal=attacker) for i, r in enumerate(theirs)
    ]
    own = b"_INBOX.agent-1.own"
    cases.append(search("reply-own", reply=own, principal=attacker))
    with arena(tmp_path, mode, policies=hostile_policies, key=key, jwks=jwks, accounts=False) as a:
        async with (
            RawClient(a.server.port, subs=("_INBOX.agent-2.>", "_INBOX.agent-2")) as agent2,
            RawClient(a.server.port, subs=("_INBOX.agent-1.>",)) as agent1,
        ):
            report = await run_attack(a, cases, label="reply-theft", attacker=attacker)
            report.check()
            await reply_barrier(agent2, "agent-2")
            await reply_barrier(agent1, "agent-1")
    assert gateway_replies(agent2, set(theirs)) == []
    if mode == "core":
        assert [d.subject for d in agent2.deliveries if d.subject in theirs] == []
        assert len(gateway_replies(agent1, {own})) == 1


# -- the generated corpus ------------------------------------------------------------------

_NON_TOKEN_NAME_CHARS: Final = b'()<>@,;\\"/[]?={} \x7f'
_CONTROL: Final = bytes([*range(0, 9), *range(10, 32), 0x7F])  # all but HTAB
_SUBJECT_CONTROL: Final = bytes([*range(1, 9), *range(14, 32), 0x7F])  # not split by the server
_ACTIONS: Final = (
    "tools.search",
    "tools.shell",
    "tools.http.get",
    "payments.transfer",
    "files.read",
    "files.annotate",
)


class Corpus:
    """Hostile inputs from one seed; the same seed and clock give the same bytes."""

    def __init__(self, seed: int, *, now: float, max_payload: int) -> None:
        self.rng = random.Random(seed)
        self.seed, self.now, self.max_payload = seed, now, max_payload
        self.n = 0

    def cases(self, count: int) -> list[Case]:
        makers = (self.subject_case, self.header_case, self.json_case, self.msgpack_case)
        out = []
        for i in range(count):
            self.n = i
            out.append(makers[i % len(makers)]())
        return out

    @property
    def name(self) -> str:
        return f"c{self.seed}-{self.n:04d}"

    # a valid intent, of any kind, with a unique id

    def valid(self) -> dict[str, Any]:
        rng = self.rng
        action = rng.choice(_ACTIONS)
        params: dict[str, Any]
        match action:
            case "payments.transfer":
                params = {
                    "amount": rng.choice([1, 10.5, 999.99, 1000, 1000.01, 5000, 0, 1e9]),
                    "currency": rng.choice(["USD", "EUR", "GBP"]),
                    "to": "account:acct-9",
                }
                resource = rng.choice(["account:acct-1", "account:sanctioned-7", "account:acct-2"])
            case "tools.http.get":
                params = {"url": rng.choice(["https://api.example.com/x", "http://evil.test/"])}
                resource = "tool:http"
            case "files.read":
                resource = rng.choice(["bucket:a/b/c/d/e.csv", "bucket:a/b.csv", "bucket:x"])
                params = {}
            case "files.annotate":
                params = {"memo": rng.choice(["hello world", "a b c", "no!"])}
                resource = "doc:1"
            case _:
                params = {"q": "x" * rng.randint(0, 40)}
                resource = f"tool:{action.rsplit('.', 1)[1]}"
        return body(action, resource, params, id=self.name, ts=self.now)

    def search_intent(self) -> bytes:
        return as_json(body("tools.search", "tool:search", {"q": "x"}, id=self.name, ts=self.now))

    # subjects

    def subject_case(self) -> Case:
        rng, name = self.rng, self.name
        intent = self.valid()
        payload = as_json(intent)
        action = intent["action"].encode()
        kind = rng.choice(
            [
                "invalid-utf8",
                "non-ascii",
                "control",
                "wildcard",
                "long-token",
                "line-too-long",
                "many-tokens",
                "empty-token",
                "other-principal",
                "no-action",
            ]
        )
        bad_subject = Expect(outcome="deny", reasons=frozenset({"bad_subject"}))
        match kind:
            case "invalid-utf8":
                junk = bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 6)))
                token = rng.choice([junk, b"x" + junk, junk + b"y"])
                return Case(name, Raw(subject("tools.") + token, payload), bad_subject)
            case "non-ascii":
                token = rng.choice(["é", "ß", "t\u043e\u043els", "数据", "\U0001f600"]).encode()
                return Case(name, Raw(subject("tools.") + token, payload), ORACLE)
            case "control":
                c = bytes([rng.choice(_SUBJECT_CONTROL)])
                return Case(name, Raw(subject("tools.") + b"a" + c + b"b", payload), ORACLE)
            case "wildcard":
                tail = rng.choice([b"*", b">", b"payments.*", b"tools.>", b"*.search"])
                return Case(name, Raw(subject("") + tail, payload), ORACLE)
            case "long-token":
                token = bytes(rng.choice(b"abcXYZ019_-") for _ in range(rng.randint(129, 3800)))
                return Case(name, Raw(subject("tools.") + token, payload), ORACLE)
            case "line-too-long":  # the server's max control line is 4096 bytes
                token = b"x" * rng.randint(4300, 9000)
                return Case(name, Raw(subject("tools.") + token, payload), refused())
            case "many-tokens":
                tokens = ".".join(
                    rng.choice(["a", "bb", "c-d", "e_f"]) for _ in range(rng.randint(2, 120))
                )
                intent["action"] = tokens
                return Case(name, Raw(subject(tokens), as_json(intent)), ORACLE)
            case "empty-token":
                s = rng.choice(
                    [
                        b"guard.in.agent-7..x",
                        b"guard.in.agent-7.x.",
                        b"guard.in.agent-7.x..y",
                        b"guard.in.agent-7.",
                    ]
                )
                return Case(name, Raw(s, payload), refused())
            case "other-principal":
                other = rng.choice(["agent-9", "agent-77", "AGENT-7", "agent-1", "gateway"])
                return Case(name, Raw(subject(action.decode(), other), payload), refused())
            case _:
                return Case(name, Raw(b"guard.in.agent-7", payload), refused())

    # headers, on an intent that is otherwise forwarded

    def header_case(self) -> Case:
        rng, name = self.rng, self.name
        payload = self.search_intent()
        s = subject("tools.search")
        kind = rng.choice(
            [
                "benign",
                "non-token-name",
                "control-value",
                "invalid-utf8",
                "status",
                "inline-status",
                "many",
                "big",
                "too-big",
                "forged",
                "jetstream",
                "garbage-version",
                "content-type",
            ]
        )

        def case(pairs: list[tuple[bytes, bytes]], expect: Expect, **kw: Any) -> Case:
            return Case(name, Raw(s, payload, header_block(pairs, **kw)), expect)

        def token(n: int = 8) -> bytes:
            return b"X-" + bytes(
                rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789-") for _ in range(n)
            )

        match kind:
            case "benign":
                pairs = [(token(), token(rng.randint(1, 40))) for _ in range(rng.randint(1, 6))]
                if rng.random() < 0.5:
                    pairs.append(
                        (
                            b"traceparent",
                            b"00-%032x-%016x-01" % (rng.getrandbits(128), rng.getrandbits(64)),
                        )
                    )
                return case(pairs, ORACLE)
            case "non-token-name":
                bad = bytes([rng.choice(_NON_TOKEN_NAME_CHARS)])
                n = token(4)
                return case([(n[:3] + bad + n[3:], b"v")], MALFORMED)
            case "control-value":
                c = bytes([rng.choice(_CONTROL)])
                if c == b"\n":
                    c = b"\x0b"  # a LF would end the line: a different header
                return case([(token(), b"a" + c + b"b")], MALFORMED)
            case "invalid-utf8":
                # A lone continuation byte first: never valid UTF-8 (random high bytes can
                # form a valid character, such as \xc2\xab, which is forwarded faithfully).
                junk = bytes([rng.randint(0x80, 0xBF)]) + bytes(
                    rng.randint(0x80, 0xFF) for _ in range(rng.randint(0, 3))
                )
                pair = rng.choice([(b"X-" + junk, b"v"), (token(), junk)])
                return case([pair], DENIED)
            case "status":
                pairs = [
                    (
                        rng.choice([b"Status", b"status", b"STATUS"]),
                        str(rng.randint(100, 599)).encode(),
                    )
                ]
                if rng.random() < 0.5:
                    pairs.append((b"Description", b"No Messages"))
                return case(pairs, MALFORMED)
            case "inline-status":
                code = rng.choice(
                    [b"100", b"404", b"408", b"409", b"503", str(rng.randint(100, 599)).encode()]
                )
                desc = rng.choice([b"", b" Idle Heartbeat", b" No Messages", b" Bad"])
                pairs = [(token(), b"v")] if rng.random() < 0.5 else []
                return case(pairs, INLINE_STATUS, status=code + desc)
            case "many":
                count = rng.randint(2000, 4500)
                return case([(b"X-%d" % i, b"v") for i in range(count)], MALFORMED)
            case "big":  # 32 KiB .. 62 KiB of header: stored by JetStream, forwarded copy is not
                size = rng.randint(32 * 1024, 62 * 1024)
                return case([(b"X-Pad", b"v" * size)], DENIED)
            case "too-big":  # over JetStream's 64 KiB header limit
                size = rng.randint(66 * 1024, 200 * 1024)
                expect = Expect(refused=frozenset({"stream"}), outcome="deny")
                return case([(b"X-Pad", b"v" * size)], expect)
            case "forged":
                forged = rng.choice(
                    [b"Guard-Artifact", b"Guard-Decision", b"guard-artifact", b"Nats-Msg-Id"]
                )
                return case([(forged, b"forged-" + name.encode())], ORACLE)
            case "jetstream":  # JetStream acts on these (refuses to store); core: stripped
                pair = rng.choice(
                    [
                        (b"Nats-Expected-Stream", b"nope"),
                        (b"Nats-Rollup", b"all"),
                        (b"Nats-Expected-Last-Sequence", b"999999"),
                        (b"Nats-TTL", b"1s"),
                    ]
                )
                return case([pair], Expect(refused=frozenset({"stream"}), oracle=True))
            case "garbage-version":
                block = rng.choice(
                    [
                        b"NATS/2.0\r\nX-A: b\r\n\r\n",
                        b"HTTP/1.1 200 OK\r\n\r\n",
                        b"GARBAGE\r\n\r\n",
                        b"NATS/1.0\r\nno colon here\r\n\r\n",
                    ]
                )
                return Case(name, Raw(s, payload, block), POLICY)
            case _:
                ctype = rng.choice(
                    [
                        b"application/json",
                        b"APPLICATION/JSON",
                        b"application/json; charset=utf-8",
                        b"text/plain",
                        b"application/msgpack",
                    ]
                )
                pairs = [(b"Content-Type", ctype)]
                if rng.random() < 0.3:  # two content types: which one does an executor read?
                    pairs.append((b"content-type", b"application/msgpack"))
                    return case(pairs, POLICY)
                return Case(name, Raw(s, payload, header_block(pairs)), ORACLE, ctype.decode())

    # JSON payloads

    def json_case(self) -> Case:
        rng, name = self.rng, self.name
        intent = self.valid()
        s = subject(intent["action"])
        kind = rng.choice(
            [
                "valid",
                "deep",
                "huge-int",
                "non-finite",
                "duplicate",
                "invalid-utf8",
                "wrong-type",
                "unknown-field",
                "spoof",
                "stale",
                "blob",
                "over-gateway",
                "max-payload",
                "over-max-payload",
                "random",
                "parents",
                "noise",
            ]
        )
        payload: bytes
        match kind:
            case "valid":
                payload = as_json(intent)
            case "deep":
                depth = rng.randint(9, 60)
                intent["params"]["deep"] = None
                payload = as_json(intent).replace(
                    b'"deep":null', b'"deep":' + b"[" * depth + b"]" * depth
                )
            case "huge-int":
                intent["params"]["n"] = 0
                big = str(rng.choice([1, -1]) * 10 ** rng.randint(19, 400)).encode()
                payload = as_json(intent).replace(b'"n":0', b'"n":' + big)
            case "non-finite":
                intent["params"]["x"] = 0
                literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
                payload = as_json(intent).replace(b'"x":0', b'"x":' + literal)
            case "duplicate":
                raw = as_json(intent)
                if rng.random() < 0.5:
                    payload = raw[:-1] + b',"resource":"account:sanctioned-1"}'
                else:
                    payload = raw.replace(b'"params":{', b'"params":{"amount":5000,', 1)
                    payload = payload.replace(
                        b'"params":{"amount":5000,}', b'"params":{"amount":5000}'
                    )
            case "invalid-utf8":
                junk = bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 4)))
                intent["resource"] = "r-placeholder"
                payload = as_json(intent).replace(b"r-placeholder", b"r-" + junk)
            case "wrong-type":
                field, value = rng.choice(
                    [
                        ("id", self.n),  # a number: unique like the name it replaces
                        ("ts", "now"),
                        ("params", [1]),
                        ("parents", "p"),
                        ("principal", 7),
                        ("resource", None),
                        ("action", ["tools"]),
                        ("ts", True),
                    ]
                )
                intent[field] = value
                payload = as_json(intent)
            case "unknown-field":
                intent[rng.choice(["surprise", "Resource", "effect", "allow"])] = True
                payload = as_json(intent)
            case "spoof":
                field, value = rng.choice(
                    [
                        ("principal", "agent-9"),
                        ("action", "tools.search"),
                        ("principal", "agent-7"),
                        ("action", "tools.shell"),
                    ]
                )
                intent[field] = value
                payload = as_json(intent)
            case "stale":
                intent["ts"] = self.now + rng.choice([-1000.0, -400.0, 120.0, 1e12, -1e12])
                payload = as_json(intent)
            case "blob":
                intent["params"]["memo"] = "z" * rng.randint(1024, 60 * 1024)
                payload = as_json(intent)
            case "over-gateway":  # over the gateway's 64 KiB, within the server's max_payload
                intent["params"]["memo"] = "z" * rng.randint(70 * 1024, self.max_payload // 2)
                payload = as_json(intent)
            case "max-payload":  # exactly the server's max_payload
                intent["params"]["memo"] = ""
                raw = as_json(intent)
                payload = raw.replace(
                    b'"memo":""', b'"memo":"' + b"z" * (self.max_payload - len(raw)) + b'"'
                )
                assert len(payload) == self.max_payload
            case "over-max-payload":
                intent["params"]["memo"] = "z" * (self.max_payload + rng.randint(1, 64 * 1024))
                return Case(name, Raw(s, as_json(intent)), refused())
            case "random":
                payload = name.encode() + rng.randbytes(rng.randint(0, 300))
            case "parents":
                intent["parents"] = [
                    f"{rng.getrandbits(48):012x}" for _ in range(rng.randint(1, 50))
                ]
                lineage = Expect(
                    outcome="deny", reasons=frozenset({"malformed", "lineage_violation"})
                )
                return Case(name, Raw(s, as_json(intent)), lineage)
            case _:
                raw = as_json(intent)
                payload = rng.choice(
                    [
                        b"\xef\xbb\xbf" + raw,
                        raw + b"garbage",
                        b"  \n" + raw + b"\n ",
                        raw.replace(b'"id"', b'"\\u0069d"'),
                        raw + raw,
                        b"[" + raw + b"]",
                        raw.replace(b"{", b'{"x":"\\ud800",', 1),
                    ]
                )
        return Case(name, Raw(s, payload), ORACLE)

    # msgpack payloads

    def msgpack_case(self) -> Case:
        rng, name = self.rng, self.name
        intent = self.valid()
        s = subject(intent["action"])
        kind = rng.choice(
            [
                "valid",
                "random",
                "truncated",
                "non-canonical",
                "bin-resource",
                "ext",
                "huge-int",
                "nan",
                "deep",
                "invalid-utf8",
                "int-key",
                "wrong-type",
                "blob",
            ]
        )
        payload: bytes
        expect = ORACLE
        match kind:
            case "valid":
                payload = msgspec.msgpack.encode(intent)
            case "random":
                payload = b"\x80" + name.encode() + rng.randbytes(rng.randint(0, 200))
            case "truncated":
                raw = msgspec.msgpack.encode(intent)
                payload = raw[: rng.randint(len(raw) // 2, len(raw) - 1)]
            case "non-canonical":
                expect = MALFORMED
                payload = self.noncanonical(intent)
            case "bin-resource":
                intent["resource"] = b"account:acct-1"
                payload = msgspec.msgpack.encode(intent)
            case "ext":
                intent["params"]["x"] = msgspec.msgpack.Ext(rng.randint(0, 127), rng.randbytes(8))
                payload = msgspec.msgpack.encode(intent)
            case "huge-int":
                intent["params"]["n"] = 0
                raw = msgspec.msgpack.encode(intent)
                # a uint64: beyond int64, or a non-minimal encoding of a smaller value
                payload = raw.replace(
                    mp_str("n") + b"\x00", mp_str("n") + b"\xcf" + rng.randbytes(8)
                )
            case "nan":
                intent["params"]["x"] = rng.choice([math.nan, math.inf, -math.inf])
                payload = msgspec.msgpack.encode(intent)
            case "deep":
                deep: Any = []
                for _ in range(rng.randint(9, 60)):
                    deep = [deep]
                intent["params"]["deep"] = deep
                payload = msgspec.msgpack.encode(intent)
            case "invalid-utf8":
                intent["resource"] = "r-placeholder"
                junk = bytes(rng.randint(0x80, 0xFF) for _ in range(4))
                payload = msgspec.msgpack.encode(intent).replace(
                    b"r-placeholder", b"r-placeh" + junk + b"r"
                )
            case "int-key":
                intent["params"] = {1: "one"}
                payload = msgspec.msgpack.encode(intent)
            case "wrong-type":
                field = rng.choice(["id", "ts", "params", "parents"])
                # the id keeps the case unique: a number, a list or a map holding the name
                wrong = (
                    [self.n, [self.name], {"id": self.name}]
                    if field == "id"
                    else [None, 7, "x", [1], {}]
                )
                intent[field] = rng.choice(wrong)
                payload = msgspec.msgpack.encode(intent)
            case _:
                intent["params"]["memo"] = rng.randbytes(rng.randint(1024, 60 * 1024))
                payload = msgspec.msgpack.encode(intent)
        return Case(name, Raw(s, payload, MSGPACK_HEADERS), expect, MSGPACK)

    def noncanonical(self, intent: dict[str, Any]) -> bytes:
        """*intent* in msgpack with one non-minimal encoding or a duplicate key."""
        rng = self.rng
        raw = msgspec.msgpack.encode(intent)
        key = mp_str("resource")
        choice = rng.choice(["dup-resource", "str8", "map16", "uint64-ts", "float32-param"])
        match choice:
            case "dup-resource":
                dup = key + mp_str("account:sanctioned-1")
                return bytes([raw[0] + 1]) + dup + raw[1:]  # one more entry in the fixmap
            case "str8":
                return raw.replace(key, mp_str("resource", wide=True), 1)
            case "map16":
                return mp_map(raw[0] & 0x0F, wide=True) + raw[1:]
            case "uint64-ts":
                i = raw.index(mp_str("ts")) + len(mp_str("ts"))
                return raw[:i] + mp_uint(int(self.now), 8) + raw[i + 9 :]
            case _:
                intent["params"]["f"] = 0.5
                raw = msgspec.msgpack.encode(intent)
                return raw.replace(mp_str("f") + mp_f64(0.5), mp_str("f") + mp_f32(0.5))


def corpus(seed: int, count: int, *, now: float, max_payload: int) -> list[Case]:
    return Corpus(seed, now=now, max_payload=max_payload).cases(count)


def test_corpus_is_deterministic_and_hostile() -> None:
    """The same seed and clock give the same bytes; the corpus is large and varied enough."""
    now = time.time()
    first = corpus(CORPUS_SEED, CORPUS_SIZE, now=now, max_payload=1 << 20)
    again = corpus(CORPUS_SEED, CORPUS_SIZE, now=now, max_payload=1 << 20)
    assert [c.msg for c in first] == [c.msg for c in again]
    assert len(first) >= 300
    assert len({c.digest for c in first}) == len(first)  # run_attack asserts it for any
    assert sum(bool(c.expect.refused) for c in first) >= 20
    assert sum(c.msg.headers is not None and c.content_type == MSGPACK for c in first) >= 60
    invalid_utf8 = 0
    for c in first:
        try:
            c.msg.subject.decode()
        except UnicodeDecodeError:
            invalid_utf8 += 1
    assert invalid_utf8 >= 3


async def corpus_attack(
    mode: Mode, tmp: Path, policies: Path, keys: tuple[Path, Path], seed: int, count: int
) -> Report:
    key, jwks = keys
    with arena(tmp, mode, policies=policies, key=key, jwks=jwks) as a:
        async with RawClient(a.server.port, *a.login(ATTACKER)) as probe:
            max_payload = probe.max_payload
        cases = corpus(seed, count, now=time.time(), max_payload=max_payload)
        return await run_attack(a, cases, label=f"corpus-{seed}")


@MODES
async def test_generated_corpus(
    mode: Mode, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    report = await corpus_attack(
        mode, tmp_path, hostile_policies, hostile_keys, CORPUS_SEED, CORPUS_SIZE
    )
    report.check()


@pytest.mark.slow
@MODES
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_generated_corpus_large(
    mode: Mode, seed: int, tmp_path: Path, hostile_policies: Path, hostile_keys: tuple[Path, Path]
) -> None:
    report = await corpus_attack(
        mode, tmp_path, hostile_policies, hostile_keys, seed, SLOW_CORPUS_SIZE
    )
    report.check()
