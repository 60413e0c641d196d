"""``bus-guard watch``: a live view of denials and holds for operators, and of what
approvers did about the holds.

Denials and holds come from the deny and hold subjects (:class:`DecisionRecord`), narrowed on
the server by principal and action. Votes and hold resolutions come from the ledger's
decision records (:class:`LedgerRecord`, ``<prefix>.ledger.*.d.*``): every decision record
passes by, and only those that name a hold (a non-empty ``hold``: an approver's vote,
counted or refused, and a hold's release or denial) are decoded and shown, filtered here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final, cast

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.console import Console
from rich.text import Text

from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli._safe import safe, safe_json, say
from bus_guard.errors import GatewayError
from bus_guard.intake._gateway import round_trip
from bus_guard.intake._jetstream import Stored, first_seq_since, read
from bus_guard.ledger._records import LedgerRecord, decode_record
from bus_guard.pipeline import DecisionRecord
from bus_guard.subjects import DEFAULT_PREFIX, Subjects

__all__ = (
    "WatchFilter",
    "format_json",
    "format_ledger_record",
    "format_record",
    "subject_matches",
    "timestamp",
    "watch",
)

log = logging.getLogger(__name__)

_decoder: Final = msgspec.json.Decoder(DecisionRecord)
_STYLE: Final = {
    "deny": "bold red",
    "hold": "bold yellow",
    "allow": "bold green",
    "approve": "bold green",
    "reject": "bold red",
    "refused": "bold magenta",
    "released": "bold green",
    "denied": "bold red",
}
# In a ledger record's JSON only a record about a hold has this: ``hold`` is left out when
# empty (omit_defaults), and a quote inside any string value is escaped (``\"hold\":``),
# so the bytes are searched before anything is decoded.
_HOLD_KEY: Final = b'"hold":"'


def subject_matches(pattern: str, value: str) -> bool:
    """Whether the dotted *value* matches the NATS subject *pattern* (``*`` one token,
    a final ``>`` one or more)."""
    want, got = pattern.split("."), value.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(got) == len(want)


@dataclass(frozen=True, slots=True)
class WatchFilter:
    principal: str | None = None
    action: str | None = None  # exact, or NATS wildcards: payments.* / tools.>
    reason: str | None = None

    def subjects(self, prefix: str) -> list[str]:
        """Narrow on the server where the subject can: principal and action are tokens."""
        subjects = Subjects(prefix)
        if self.principal is None and self.action is None:
            # Everything, the invalid-subject denials (<prefix>.deny.~invalid) included.
            return [subjects.wildcard(kind) for kind in ("deny", "hold")]
        principal = self.principal or "*"
        action = self.action or ">"
        return [subjects.subject(kind, principal, action) for kind in ("deny", "hold")]

    def ledger_subject(self, prefix: str) -> str:
        """Every decision record of every gateway: votes and resolutions are filtered here
        (their subjects name the decision, not the principal or the action)."""
        return Subjects(prefix).ledger().any_decision("*")

    def matches(self, record: DecisionRecord | LedgerRecord) -> bool:
        return self.reason is None or record.reason == self.reason

    def matches_ledger(self, record: LedgerRecord) -> bool:
        """A vote or resolution: the principal and action it names (a record that names
        none is left out when filtering on it), and the reason."""
        if self.principal is not None and record.principal != self.principal:
            return False
        if self.action is not None and not subject_matches(self.action, record.action):
            return False
        return self.matches(record)


def timestamp(ts: float) -> str:
    """A decision's time as the lines show it: UTC, ISO 8601, milliseconds."""
    if not 0 <= ts < 253402300800:  # a record's own ts: anything a float holds
        return f"{'?':<24}"
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int(ts * 1000) % 1000:03d}Z"


def _timed(ts: float, line: Text) -> Text:
    """*line* after the record's time: watch's lines start with when it was decided."""
    return Text.assemble((f"{timestamp(ts)} ", "dim"), line)


def format_record(record: DecisionRecord) -> Text:
    """One line: who, what, why, which rule; every field escaped (agents write them)."""
    effect = "would-deny" if record.would_deny else record.effect
    what = f"{record.action} {record.resource}".strip() or record.subject
    return Text.assemble(
        (f"{safe(effect.upper()):<10}", _STYLE.get(record.effect, "bold")),
        " ",
        (f"{safe(record.principal or '?'):<12}", "cyan"),
        f" {safe(what)}  ",
        (safe(record.reason), "magenta"),
        f" rules={safe(','.join(record.rules) or '-')}  ",
        (f"{safe(record.message)} id={safe(record.decision_id)}", "dim"),
    )


def _ledger_effect(record: LedgerRecord) -> str:
    if record.effect in ("approve", "reject"):  # a vote counted
        return record.effect
    # The gateway records a hold's resolution with intake "<hold stream>/resolution/<hold>"
    # and a refused vote with the vote message's "<approve stream>/<seq>/<time>".
    if record.intake.split("/")[1:2] == ["resolution"]:
        return "released" if record.effect == "allow" else "denied"
    return "refused"


def format_ledger_record(record: LedgerRecord) -> Text:
    """One line for a vote (who voted on which hold: counted, or refused and why) or a
    hold's resolution (released or denied, and why); every field escaped."""
    effect = _ledger_effect(record)
    who = record.approver or record.principal or "?"
    held = (record.principal if record.approver else "", record.action, record.resource)
    what = " ".join(x for x in held if x)
    approvals = f" approvals={','.join(record.approvals)}" if record.approvals else ""
    return Text.assemble(
        (f"{safe(effect.upper()):<10}", _STYLE.get(effect, "bold")),
        " ",
        (f"{safe(who):<12}", "cyan"),
        f" hold={safe(record.hold)}{' ' if what else ''}{safe(what)}  ",
        (safe(record.reason), "magenta"),
        f"{safe(approvals)}  ",
        (f"{safe(record.message)} id={safe(record.decision_id)}", "dim"),
    )


def format_json(data: bytes) -> str:
    """The record as received, as one line of JSON that is safe to print (JSON Lines)."""
    return safe_json(msgspec.json.format(data, indent=0).decode())


async def watch(
    nats: NatsOptions | str,
    *,
    prefix: str = DEFAULT_PREFIX,
    filters: WatchFilter = WatchFilter(),
    count: int | None = None,
    as_json: bool = False,
    since_s: float | None = None,
    console: Console | None = None,
    ready: anyio.Event | None = None,
) -> int:
    """Print deny/hold records, votes and hold resolutions until interrupted, or until
    exactly *count* records were shown; *since_s*: first the deny and hold streams' records
    from that many seconds back (oldest first), then live, with none shown twice.

    Returns 0, or 1 when the connection is lost (one line on stderr says so)."""
    console = console or Console(highlight=False)
    done = anyio.Event()
    lost: list[str] = []
    shown = 0
    # While the streams are replayed, live records wait here; replayed ids are not shown
    # again when they arrive live too (a record is stored, then delivered).
    replaying = since_s is not None
    waiting: list[tuple[str, bytes]] = []
    replayed: set[str] = set()

    def show(line: Text | str) -> None:
        # soft_wrap: rich would break a long line in two, and the second would start with an
        # agent's text (the terminal's own wrapping adds no line to the output).
        console.print(line, soft_wrap=True, highlight=False, markup=False, emoji=False)

    def shown_one() -> None:
        nonlocal shown
        shown += 1
        if count is not None and shown >= count:
            done.set()

    def on_decision(subject: str, data: bytes) -> None:
        if done.is_set():
            return  # exactly --count: what arrives after the last one is not shown
        try:
            record = _decoder.decode(data)
            if not filters.matches(record) or record.decision_id in replayed:
                return
            line = format_json(data) if as_json else _timed(record.ts, format_record(record))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            show(Text(safe(f"unreadable record on {subject}: {exc}"), "red"))
            return
        show(line)
        shown_one()

    async def on_ledger(msg: Msg) -> None:
        if done.is_set() or _HOLD_KEY not in msg.data:
            return  # shown enough, or an intent's decision: not about a hold
        try:
            record = decode_record(msg.data)
            if not record.hold or not filters.matches_ledger(record):
                return
            line = (
                format_json(msg.data)
                if as_json
                else _timed(record.ts, format_ledger_record(record))
            )
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            show(Text(safe(f"unreadable record on {msg.subject}: {exc}"), "red"))
            return
        show(line)
        shown_one()

    async def on_record(msg: Msg) -> None:
        if replaying:
            waiting.append((msg.subject, msg.data))
        else:
            on_decision(msg.subject, msg.data)

    async def on_closed() -> None:
        if not done.is_set():
            lost.append("lost the connection to NATS")
            done.set()

    options = nats if isinstance(nats, NatsOptions) else NatsOptions(urls=nats)
    nc = await connect(options, name="bus-guard watch", on_closed=on_closed)
    try:
        for subject in filters.subjects(prefix):
            await nc.subscribe(subject, cb=on_record)
        await nc.subscribe(filters.ledger_subject(prefix), cb=on_ledger)
        await round_trip(nc)
        if since_s is not None:
            # Closed at once when --count stops it early: its reads unsubscribe.
            replay = _replay(nc, prefix, filters, since_s)
            async with contextlib.aclosing(replay):
                async for subject, data in replay:
                    if done.is_set():
                        break
                    on_decision(subject, data)
                    with contextlib.suppress(msgspec.DecodeError):
                        replayed.add(_decoder.decode(data).decision_id)
            replaying = False
            for subject, data in waiting:
                on_decision(subject, data)
            waiting.clear()
            replayed.clear()
        if ready is not None:
            ready.set()
        await done.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if not nc.is_closed:
                await nc.drain()
    if lost:
        say(sys.stderr, f"bus-guard: {lost[0]} ({options.urls})")
        return 1
    return 0


async def _replay(
    nc: Client, prefix: str, filters: WatchFilter, since_s: float
) -> AsyncGenerator[tuple[str, bytes], None]:
    """The deny and hold streams' records since *since_s* seconds ago, as of now, merged
    oldest first (each stream is in the order it was stored). Direct gets only: an
    operator account needs no consumer (``compose/auth.conf``)."""
    streams = Subjects(prefix).streams
    since = time.time() - since_s
    async with contextlib.AsyncExitStack() as stack:
        sources: list[AsyncGenerator[Stored, None]] = []
        pairs = zip((streams.deny, streams.hold), filters.subjects(prefix), strict=True)
        for stream, subject in pairs:
            try:
                first = await first_seq_since(nc, stream, subject, since)
                if not first:
                    continue
                # read() is an async generator (annotated as the iterator it is used as).
                source = cast(
                    AsyncGenerator[Stored, None], read(nc, stream, subject, start_seq=first)
                )
                sources.append(await stack.enter_async_context(contextlib.aclosing(source)))
            except nats.errors.NoRespondersError:
                log.warning("--since: no %s stream (core-mode gateways keep none)", stream)
            except nats.errors.Error as exc:
                raise GatewayError(f"--since: cannot read the {stream} stream: {exc!r}") from None
        heads: list[tuple[float, int, Stored]] = []
        for i, source in enumerate(sources):
            first_msg = await anext(source, None)
            if first_msg is not None:
                heads.append((_ts(first_msg.data), i, first_msg))
        while heads:
            heads.sort(key=lambda h: (h[0], h[1]))
            _, i, stored = heads.pop(0)
            yield stored.subject, stored.data
            following = await anext(sources[i], None)
            if following is not None:
                heads.append((_ts(following.data), i, following))


def _ts(data: bytes) -> float:
    try:
        return _ts_decoder.decode(data).ts
    except msgspec.DecodeError:
        return 0.0


class _Ts(msgspec.Struct):
    ts: float = 0.0


_ts_decoder: Final = msgspec.json.Decoder(_Ts)
