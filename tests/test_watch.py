"""``bus-guard watch`` on a real server: what operators see (denials, holds, votes and hold
resolutions), and what filters hide."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from rich.console import Console

from bus_guard.cli._watch import (
    WatchFilter,
    format_json,
    format_ledger_record,
    format_record,
    subject_matches,
    watch,
)
from bus_guard.intake._gateway import Gateway
from bus_guard.ledger._records import LedgerRecord
from bus_guard.ledger._records import encode_record as encode_ledger
from bus_guard.pipeline import DecisionRecord, encode_record
from bus_guard.policy._load import load_policies
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key
from bus_guard.signing._signer import Signer

from .conftest import POLICIES
from .helpers import intent, make_signer, terminal_safe

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def _untimed(line: str) -> str:
    """*line* without the timestamp every watch line starts with (asserted)."""
    found = _TIMESTAMP.match(line)
    assert found is not None, line
    return line[found.end() :]


async def _watched(nats_url: str, tmp_path: Path, filters: WatchFilter, count: int) -> str:
    key, _ = generate_key(tmp_path)
    signer = make_signer(key, issuer="gw")
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    ready = anyio.Event()
    nc = await nats.connect(nats_url)
    with anyio.fail_after(10):  # watch returns after `count` records
        await _drive(nats_url, nc, signer, filters, count, console, ready)
    await nc.drain()
    return buf.getvalue()


async def _drive(
    nats_url: str,
    nc: Client,
    signer: Signer,
    filters: WatchFilter,
    count: int,
    console: Console,
    ready: anyio.Event,
) -> None:
    async with (
        Gateway(Settings(nats_url=nats_url, mode="core"), load_policies(POLICIES), signer),
        anyio.create_task_group() as tg,
    ):

        async def run_watch() -> None:
            await watch(nats_url, filters=filters, count=count, console=console, ready=ready)

        tg.start_soon(run_watch)
        await ready.wait()
        await nc.publish("guard.in.agent-1.tools.shell", intent("tools.shell", "tool:sh", {}))
        await nc.publish("guard.in.agent-1.tools.search", intent("tools.search", "t", {}))
        await nc.publish(
            "guard.in.agent-9.payments.transfer",
            intent("payments.transfer", "account:acct-1", {"amount": 5000, "currency": "USD"}),
        )
        await nc.publish("guard.in.agent-2.tools.shell", intent("tools.shell", "tool:sh", {}))


async def test_watch_shows_who_what_why_and_which_rule(nats_url: str, tmp_path: Path) -> None:
    text = await _watched(nats_url, tmp_path, WatchFilter(), count=3)
    # deny and hold are separate subscriptions: their relative order is not guaranteed
    lines = sorted(_untimed(line) for line in text.strip().splitlines())
    assert len(lines) == 3
    assert "DENY" in lines[0] and "agent-1" in lines[0] and "tools.shell" in lines[0]
    assert "denied_by_rule" in lines[0] and "no-shell" in lines[0]
    assert "DENY" in lines[1] and "agent-2" in lines[1]
    assert "HOLD" in lines[2] and "agent-9" in lines[2] and "transfer-large" in lines[2]
    assert "tools.search" not in text  # allowed intents are not on the deny/hold streams


async def test_watch_filters_by_principal_and_reason(nats_url: str, tmp_path: Path) -> None:
    text = await _watched(nats_url, tmp_path, WatchFilter(principal="agent-2"), count=1)
    assert "agent-2" in text and "agent-1" not in text and "agent-9" not in text
    text = await _watched(
        nats_url, tmp_path / "b", WatchFilter(reason="escalated_by_rule"), count=1
    )
    assert "HOLD" in text and "agent-9" in text and "DENY" not in text


def test_watch_filters_narrow_on_the_server_through_the_subjects() -> None:
    # Unfiltered: every deny, the invalid-subject ones (guard.deny.~invalid) included.
    assert WatchFilter().subjects("guard") == ["guard.deny.>", "guard.hold.>"]
    assert WatchFilter("agent-2").subjects("guard") == [
        "guard.deny.agent-2.>",
        "guard.hold.agent-2.>",
    ]
    assert WatchFilter("agent-2", "payments.*").subjects("a.b") == [
        "a.b.deny.agent-2.payments.*",
        "a.b.hold.agent-2.payments.*",
    ]


# -- what agents write cannot reach the operator's terminal -------------------------------

# Each value is something a terminal would obey or an operator would misread.
HOSTILE = {
    "principal": "agent-7\x1b[2J",  # clear screen
    "action": "tools.shell\x1b]0;all clear\x07",  # window title
    "resource": "tool:sh\x1b]52;c;cm0gLXJmIH4=\x07",  # OSC 52: the operator's clipboard
    "subject": "guard.deny.agent-7.\udcff",  # a subject byte decoded with surrogateescape
    "reason": "denied_by_rule\u202e",  # right-to-left override
    "message": "x\r\nALLOW      agent-7      payments.transfer  allowed_by_rule",  # fake line
    "decision_id": "d1\x9b2J\u2028",  # C1 CSI, line separator
    "intent_id": "i\u200d\u2066",
    "payload": '{"id": "\x1b[H"}\n\x85',
}


def _hostile(**fields: object) -> DecisionRecord:
    values: dict[str, object] = {"effect": "deny", **HOSTILE, "rules": ("no-shell\x1b[0m",)}
    return DecisionRecord(**{**values, **fields})  # type: ignore[arg-type]


def test_a_record_is_one_escaped_line() -> None:
    record = _hostile(rules=("no-shell", "[bold]x[/]"))
    plain = format_record(record).plain
    terminal_safe(plain + "\n", 1)
    assert "agent-7\\x1b[2J" in plain and "tool:sh\\x1b]52;c;cm0gLXJmIH4=\\x07" in plain
    assert "x\\r\\nALLOW" in plain and "denied_by_rule\\u202e" in plain
    assert "d1\\x9b2J\\u2028" in plain and "[bold]x[/]" in plain  # text, never markup
    what = format_record(_hostile(action="", resource="")).plain
    assert "guard.deny.agent-7.\\udcff" in what  # the subject, when there is no action


_wire_text = st.text(st.characters(codec="utf-8"), max_size=20)  # no lone surrogates
# Lone surrogates only off the wire: msgspec refuses to encode or decode them, but a subject
# decoded with surrogateescape can hold them.
_any_text = st.text(
    st.one_of(st.characters(exclude_categories=()), st.integers(0xD800, 0xDFFF).map(chr)),
    max_size=20,
)


def _records(text: st.SearchStrategy[str]) -> st.SearchStrategy[DecisionRecord]:
    fields = st.fixed_dictionaries(
        {name: text for name in HOSTILE},
        optional={"effect": text, "would_deny": st.booleans(), "rules": st.tuples(text, text)},
    )
    return fields.map(lambda f: _hostile(**f))


@settings(max_examples=200, deadline=None)
@given(_records(_any_text))
def test_any_record_is_one_safe_line(record: DecisionRecord) -> None:
    terminal_safe(format_record(record).plain + "\n", 1)


@settings(max_examples=200, deadline=None)
@given(_records(_wire_text))
def test_any_records_json_is_one_safe_line_that_decodes_to_it(record: DecisionRecord) -> None:
    line = format_json(encode_record(record))
    terminal_safe(line + "\n", 1)
    assert msgspec.json.decode(line, type=DecisionRecord) == record


async def _watch_published(
    nats_url: str, published: list[tuple[str, bytes]], *, count: int, as_json: bool = False
) -> str:
    buf = io.StringIO()
    # Narrow: a record longer than the console must still be one line, never wrapped by rich.
    console = Console(file=buf, width=60, color_system=None)
    ready = anyio.Event()
    nc = await nats.connect(nats_url)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run_watch() -> None:
                await watch(nats_url, count=count, as_json=as_json, console=console, ready=ready)

            tg.start_soon(run_watch)
            await ready.wait()
            for subject, data in published:
                await nc.publish(subject, data)
    await nc.drain()
    return buf.getvalue()


_PUBLISHED = [
    ("guard.deny.agent-7.tools.shell", encode_record(_hostile(subject="guard.deny.a"))),
    ("guard.hold.agent-7.tools.shell", encode_record(_hostile(effect="hold", subject="s"))),
]


async def test_watch_prints_hostile_records_escaped_one_line_each(nats_url: str) -> None:
    # Only the first counts: records on deny and hold may arrive in either order.
    junk = ("guard.deny.agent-7\x1b[2J.x", b"\x1b]0;title\x07 not json")
    text = await _watch_published(nats_url, [junk, *_PUBLISHED], count=2)
    lines = terminal_safe(text, 3)
    assert lines[0].startswith("unreadable record on guard.deny.agent-7\\x1b[2J.x: ")
    assert sorted(_untimed(line).split()[0] for line in lines[1:]) == ["DENY", "HOLD"]
    assert all("\\r\\nALLOW" in line for line in lines[1:])


async def test_watch_json_is_one_safe_line_per_record_and_decodes_to_it(nats_url: str) -> None:
    text = await _watch_published(nats_url, _PUBLISHED, count=2, as_json=True)
    lines = terminal_safe(text, 2)
    got = sorted(msgspec.json.decode(line, type=DecisionRecord).effect for line in lines)
    assert got == ["deny", "hold"]
    for line in lines:
        record = msgspec.json.decode(line, type=DecisionRecord)
        assert record.message == HOSTILE["message"] and record.payload == HOSTILE["payload"]
        assert "\\u009b" in line and "\\u2028" in line and "\\u202e" in line  # JSON escapes


async def test_an_agents_intent_reaches_watch_escaped(nats_url: str, tmp_path: Path) -> None:
    key, _ = generate_key(tmp_path)
    buf = io.StringIO()
    console = Console(file=buf, width=60, color_system=None)
    ready = anyio.Event()
    nc = await nats.connect(nats_url)
    settings_ = Settings(nats_url=nats_url, mode="core")
    with anyio.fail_after(10):
        async with (
            Gateway(settings_, load_policies(POLICIES), make_signer(key, issuer="gw")),
            anyio.create_task_group() as tg,
        ):

            async def run_watch() -> None:
                await watch(nats_url, count=1, console=console, ready=ready)

            tg.start_soon(run_watch)
            await ready.wait()
            # Resources are refused unless printable ASCII; a subject token can still carry
            # control characters (not whitespace): it is a bad subject, recorded as sent.
            await nc.publish(
                "guard.in.agent-1.tools.sh\x1b]52;c;cm0gLXJmIH4=\x07ALLOW",
                intent("tools.shell", "tool:shell", {}),
            )
    await nc.drain()
    (line,) = terminal_safe(buf.getvalue(), 1)
    assert _untimed(line).startswith("DENY") and "sh\\x1b]52;c;cm0gLXJmIH4=\\x07ALLOW" in line


def test_the_demos_executed_line_is_escaped_too() -> None:
    from bus_guard.cli._demo import _executed
    from bus_guard.verify import ArtifactClaims

    claims = ArtifactClaims(
        iss="gw",
        sub="agent-7\x1b[2J",
        aud="guard.exec.agent-7.x",
        iat=0,
        nbf=0,
        exp=1,
        jti="d1\u2028",
        action="x\x1b]0;t\x07",
        resource="r\r\nALLOW",
        intent_id="i",
        payload_sha256="A" * 43,
        policy_digest="sha256:0",
        policy_version="1",
        rules=("r\u202e",),
        mode="enforce",
    )
    (line,) = terminal_safe(_executed(claims).plain + "\n", 1)
    assert line.startswith("EXECUTED") and "r\\r\\nALLOW" in line and "r\\u202e" in line


# -- votes and resolutions, from the ledger -------------------------------------------------
#
# Records as the gateway writes them about holds (its contract, LedgerRecord: a vote has
# ``hold`` and ``approver``, parent the hold; a resolution has ``hold`` and no approver). The
# gateway's side is not on this branch: the test publishes them on the ledger subjects.


def _ledger(decision_id: str, effect: str, reason: str, **fields: Any) -> LedgerRecord:
    return LedgerRecord(
        kind="decision",
        gateway="gw-1",
        seq=1,
        prev="",
        ts=1.0,
        decision_id=decision_id,
        effect=effect,
        reason=reason,
        **fields,
    )


_ALLOW = _ledger("A1", "allow", "allowed_by_rule", principal="agent-9", action="payments.transfer")
_VOTE = _ledger("V1", "approve", "approved", hold="H1", approver="alice", parents=("H1",))
_REFUSED = _ledger(
    "V2",
    "deny",
    "approver_not_allowed",
    message="mallory is not an approver of this hold",
    hold="H1",
    approver="mallory",
    parents=("H1",),
    intake="GUARD_APPROVE/7/1764150000000000000",
)
_RELEASED = _ledger(
    "R1",
    "allow",
    "approved",
    hold="H1",
    principal="agent-9",
    action="payments.transfer",
    resource="account:acct-1",
    approvals=("V1", "V3"),
    parents=("H1",),
    intake="GUARD_HOLD/resolution/H1",
)


def _on_ledger(*records: LedgerRecord) -> list[tuple[str, bytes]]:
    return [(f"guard.ledger.gw-1.d.{r.decision_id}", encode_ledger(r)) for r in records]


async def test_watch_shows_votes_and_resolutions_not_other_decisions(nats_url: str) -> None:
    # The allow comes first on the one ledger subscription: were it shown, it would be
    # among the three lines `count` waits for.
    published = _on_ledger(_ALLOW, _VOTE, _REFUSED, _RELEASED)
    lines = terminal_safe(await _watch_published(nats_url, published, count=3), 3)
    assert [_untimed(line).split()[:3] for line in lines] == [
        ["APPROVE", "alice", "hold=H1"],
        ["REFUSED", "mallory", "hold=H1"],
        ["RELEASED", "agent-9", "hold=H1"],
    ]
    assert "approver_not_allowed" in lines[1] and "mallory is not an approver" in lines[1]
    assert "payments.transfer account:acct-1  approved approvals=V1,V3" in lines[2]
    assert "id=A1" not in "".join(lines)


async def test_watch_json_prints_ledger_records_as_received(nats_url: str) -> None:
    text = await _watch_published(nats_url, _on_ledger(_ALLOW, _VOTE), count=1, as_json=True)
    (line,) = terminal_safe(text, 1)
    assert msgspec.json.decode(line, type=LedgerRecord) == _VOTE


async def test_watch_filters_votes_and_resolutions_here(nats_url: str) -> None:
    other = msgspec.structs.replace(_RELEASED, decision_id="R2", principal="agent-2")
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    ready = anyio.Event()
    nc = await nats.connect(nats_url)
    filters = WatchFilter(principal="agent-2", action="payments.*")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run_watch() -> None:
                await watch(nats_url, filters=filters, count=1, console=console, ready=ready)

            tg.start_soon(run_watch)
            await ready.wait()
            # a vote names no principal, the first resolution another one: both left out
            for subject, data in _on_ledger(_VOTE, _RELEASED, other):
                await nc.publish(subject, data)
    await nc.drain()
    (line,) = terminal_safe(buf.getvalue(), 1)
    assert _untimed(line).startswith("RELEASED") and "agent-2" in line and "id=R2" in line


def test_subject_patterns_match_as_nats_does() -> None:
    assert subject_matches("payments.*", "payments.transfer")
    assert not subject_matches("payments.*", "payments.transfer.big")
    assert subject_matches("payments.>", "payments.transfer.big")
    assert not subject_matches("payments.>", "payments")
    assert subject_matches("payments.transfer", "payments.transfer")
    assert not subject_matches("payments.transfer", "payments.transfers")
    assert not subject_matches("payments.*", "")


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "approver": _any_text,
            "principal": _any_text,
            "action": _any_text,
            "resource": _any_text,
            "reason": _any_text,
            "message": _any_text,
            "hold": _any_text.filter(bool),
            "decision_id": _any_text,
            "effect": st.sampled_from(["approve", "reject", "deny", "allow"]),
            "approvals": st.tuples(_any_text, _any_text),
        }
    )
)
def test_any_vote_or_resolution_is_one_safe_line(fields: dict[str, Any]) -> None:
    terminal_safe(format_ledger_record(_ledger(**fields)).plain + "\n", 1)
