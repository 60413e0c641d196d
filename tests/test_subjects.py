"""bus_guard.subjects: every subject, stream and bucket name, from one prefix.

The literal names below are the wire: agents, executors, operators and ``compose/`` rely on
them, so they are spelled out here rather than derived."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus_guard.intake import _preflight
from bus_guard.intent import parse_subject
from bus_guard.ledger import LedgerSubjects as LedgerSubjectsFromLedger
from bus_guard.settings import Settings
from bus_guard.subjects import (
    DEFAULT_PREFIX,
    FAMILIES,
    INVALID_TOKEN,
    ROLES,
    LedgerSubjects,
    Streams,
    Subjects,
)

ROOT = Path(__file__).resolve().parent.parent
INTENT = "guard.in.agent-7.payments.transfer"


def test_every_family_under_the_default_prefix() -> None:
    s = Subjects()
    assert s.prefix == DEFAULT_PREFIX == "guard" == Settings().prefix
    assert FAMILIES == ("in", "exec", "deny", "hold", "ledger", "approve", "canary")
    assert [s.root(f) for f in FAMILIES] == [
        "guard.in",
        "guard.exec",
        "guard.deny",
        "guard.hold",
        "guard.ledger",
        "guard.approve",
        "guard.canary",
    ]
    assert [s.wildcard(f) for f in FAMILIES] == [
        "guard.in.>",
        "guard.exec.>",
        "guard.deny.>",
        "guard.hold.>",
        "guard.ledger.>",
        "guard.approve.>",
        "guard.canary.>",
    ]
    assert s.subject("deny", "*", "payments.>") == "guard.deny.*.payments.>"
    assert s.subject("approve", "d-1") == "guard.approve.d-1"
    assert s.intent("agent-7", "payments.transfer") == INTENT


def test_outputs_keep_the_intents_tail() -> None:
    s = Subjects("guard")
    assert s.tail(INTENT) == "agent-7.payments.transfer"
    assert s.output("exec", INTENT) == "guard.exec.agent-7.payments.transfer"
    assert s.output("deny", INTENT) == "guard.deny.agent-7.payments.transfer"
    assert s.output("hold", INTENT) == "guard.hold.agent-7.payments.transfer"
    assert s.output("exec", "guard.in.a.b") == "guard.exec.a.b"
    assert s.deny_invalid == "guard.deny.~invalid"
    assert INVALID_TOKEN == "~invalid"


@pytest.mark.parametrize(
    "subject",
    [
        "guard.in.",  # no tail at all
        "guard.in",
        "guard.exec.agent-7.x",  # another family
        "guard.inx.agent-7.x",
        "guardx.in.agent-7.x",
        "other.in.agent-7.x",
        "a.b.in.agent-7.x",
        "",
    ],
)
def test_a_subject_outside_the_intake_has_no_tail(subject: str) -> None:
    s = Subjects("guard")
    with pytest.raises(ValueError, match=re.escape("is not under 'guard.in.'")):
        s.tail(subject)
    with pytest.raises(ValueError):
        s.output("exec", subject)


def test_a_dotted_prefix() -> None:
    s = Subjects("a.b")
    assert s.root("exec") == "a.b.exec" and s.wildcard("in") == "a.b.in.>"
    assert s.intent("p", "x.y") == "a.b.in.p.x.y"
    assert s.tail("a.b.in.p.x.y") == "p.x.y"
    assert s.output("hold", "a.b.in.p.x.y") == "a.b.hold.p.x.y"
    assert s.deny_invalid == "a.b.deny.~invalid"
    for wrong in ("a.in.p.x", "a.b.c.in.p.x", "guard.in.p.x", "a.bin.p.x"):
        with pytest.raises(ValueError):
            s.tail(wrong)
    assert [s.streams.name(r) for r in ROLES] == [
        "A_B_IN",
        "A_B_EXEC",
        "A_B_DENY",
        "A_B_HOLD",
        "A_B_LEDGER",
        "A_B_APPROVE",
    ]
    assert [s.streams.subject(r) for r in ROLES] == [
        "a.b.in.>",
        "a.b.exec.>",
        "a.b.deny.>",
        "a.b.hold.>",
        "a.b.ledger.>",
        "a.b.approve.>",
    ]
    assert (s.streams.jwks_bucket, s.streams.executed_bucket) == ("a-b-jwks", "a-b-executed")
    ledger = s.ledger("gw-1")
    assert (ledger.all, ledger.own, ledger.chain) == (
        "a.b.ledger.>",
        "a.b.ledger.gw-1.>",
        "a.b.ledger.gw-1.c",
    )
    assert ledger.decision("D1") == "a.b.ledger.gw-1.d.D1"


def test_streams_and_buckets_under_the_default_prefix() -> None:
    streams = Subjects().streams
    assert ROLES == ("intake", "exec", "deny", "hold", "ledger", "approve")
    assert [streams.name(r) for r in ROLES] == [
        "GUARD_IN",
        "GUARD_EXEC",
        "GUARD_DENY",
        "GUARD_HOLD",
        "GUARD_LEDGER",
        "GUARD_APPROVE",
    ]
    assert (streams.intake, streams.exec, streams.deny, streams.hold, streams.ledger) == (
        "GUARD_IN",
        "GUARD_EXEC",
        "GUARD_DENY",
        "GUARD_HOLD",
        "GUARD_LEDGER",
    )
    assert [streams.subject(r) for r in ROLES] == [
        "guard.in.>",
        "guard.exec.>",
        "guard.deny.>",
        "guard.hold.>",
        "guard.ledger.>",
        "guard.approve.>",
    ]
    assert (streams.jwks_bucket, streams.executed_bucket) == ("guard-jwks", "guard-executed")
    assert Streams.kv_stream(streams.jwks_bucket) == "KV_guard-jwks"
    assert Streams.kv_stream(streams.executed_bucket) == "KV_guard-executed"
    assert streams == Streams("guard")


def test_ledger_subjects() -> None:
    own = Subjects().ledger("gw-1")
    assert own == LedgerSubjects("guard", "gw-1")
    assert (own.root, own.all, own.own, own.chain) == (
        "guard.ledger",
        "guard.ledger.>",
        "guard.ledger.gw-1.>",
        "guard.ledger.gw-1.c",
    )
    assert own.decision("01J0") == "guard.ledger.gw-1.d.01J0"
    assert own.any_decision("01J0") == "guard.ledger.*.d.01J0"
    every = Subjects().ledger()
    assert every.gateway == "*" and every.decision("*") == "guard.ledger.*.d.*"


def test_the_old_homes_name_the_same_classes() -> None:
    """Modules that imported Streams / LedgerSubjects from their old homes get these."""
    assert _preflight.Streams is Streams and _preflight.ROLES is ROLES
    assert LedgerSubjectsFromLedger is LedgerSubjects


def test_settings_carry_the_subjects_of_their_prefix() -> None:
    settings = Settings(prefix="a.b", gateway_id="gw-1")
    assert settings.subjects == Subjects("a.b")
    assert settings.subjects.streams.ledger == "A_B_LEDGER"
    assert Settings(gateway_id="gw-1").subjects == Subjects()
    # derived, not a setting: settings equal whatever their subjects object is
    assert Settings(gateway_id="gw-1") == Settings(gateway_id="gw-1")


_token = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
_prefixes = st.lists(_token, min_size=1, max_size=3).map(".".join)


@given(prefix=_prefixes, principal=_token, action=st.lists(_token, min_size=1, max_size=3))
def test_every_parsed_intent_maps_to_its_outputs(
    prefix: str, principal: str, action: list[str]
) -> None:
    """What parse_subject accepts, the mapping takes apart the same way."""
    s = Subjects(prefix)
    subject = s.intent(principal, ".".join(action))
    parsed = parse_subject(subject, prefix)
    assert parsed is not None
    assert (parsed.principal, parsed.action) == (principal, ".".join(action))
    assert s.tail(subject) == f"{parsed.principal}.{parsed.action}"
    for kind in ("exec", "deny", "hold"):
        assert s.output(kind, subject) == f"{prefix}.{kind}.{principal}.{'.'.join(action)}"


def _deployment_text() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "compose").rglob("*.conf"))]
    files += sorted((ROOT / "compose").glob("*.yml"))
    return "\n".join(p.read_text() for p in files)


def test_readme_and_compose_use_the_names_this_module_gives() -> None:
    """compose/ permissions and the README name streams, buckets and subject families by
    hand: each of them must be one this module derives for the default prefix."""
    text = _deployment_text()
    s = Subjects()
    streams = {s.streams.name(r) for r in ROLES}
    buckets = {s.streams.jwks_bucket, s.streams.executed_bucket}
    # the policy publisher's rights name the pointer bucket's stream too, the witness's the
    # gateway registry's
    kv_streams = {
        Streams.kv_stream(b) for b in (*buckets, s.streams.policy_bucket, s.streams.gateways_bucket)
    }
    named_streams = set(re.findall(r"\bGUARD_[A-Z]+\b", text))
    assert named_streams and named_streams <= streams
    assert {"GUARD_IN", "GUARD_LEDGER"} <= named_streams
    named_kv = set(re.findall(r"\bKV_guard-[a-z-]+", text))
    assert named_kv == kv_streams
    named_buckets = set(re.findall(r"(?<![A-Za-z0-9_.$-])guard-(?:jwks|executed)\b", text))
    assert named_buckets == buckets
    families = set(re.findall(r"(?<![A-Za-z0-9_.$-])guard\.([a-z]+)", text))
    assert families == set(FAMILIES)
    assert s.deny_invalid in text
