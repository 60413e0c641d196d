"""``bus-guard watch``: a live view of denials and holds for operators."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import anyio
import msgspec
import nats
from nats.aio.msg import Msg
from rich.console import Console
from rich.text import Text

from bus_guard.cli._safe import safe, safe_json
from bus_guard.intake._gateway import round_trip
from bus_guard.pipeline import DecisionRecord
from bus_guard.subjects import DEFAULT_PREFIX, Subjects

__all__ = ("WatchFilter", "format_json", "format_record", "watch")

log = logging.getLogger(__name__)

_decoder: Final = msgspec.json.Decoder(DecisionRecord)
_STYLE: Final = {"deny": "bold red", "hold": "bold yellow", "allow": "bold green"}


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

    def matches(self, record: DecisionRecord) -> bool:
        return self.reason is None or record.reason == self.reason


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


def format_json(data: bytes) -> str:
    """The record as received, as one line of JSON that is safe to print (JSON Lines)."""
    return safe_json(msgspec.json.format(data, indent=0).decode())


async def watch(
    nats_url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    filters: WatchFilter = WatchFilter(),
    count: int | None = None,
    as_json: bool = False,
    console: Console | None = None,
    ready: anyio.Event | None = None,
) -> int:
    """Print deny/hold records until interrupted (or ``count`` records were shown)."""
    console = console or Console(highlight=False)
    done = anyio.Event()
    shown = 0

    def show(line: Text | str) -> None:
        # soft_wrap: rich would break a long line in two, and the second would start with an
        # agent's text (the terminal's own wrapping adds no line to the output).
        console.print(line, soft_wrap=True, highlight=False, markup=False, emoji=False)

    async def on_record(msg: Msg) -> None:
        nonlocal shown
        try:
            record = _decoder.decode(msg.data)
            if not filters.matches(record):
                return
            line = format_json(msg.data) if as_json else format_record(record)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            show(Text(safe(f"unreadable record on {msg.subject}: {exc}"), "red"))
            return
        show(line)
        shown += 1
        if count is not None and shown >= count:
            done.set()

    nc = await nats.connect(nats_url, name="bus-guard watch")
    try:
        for subject in filters.subjects(prefix):
            await nc.subscribe(subject, cb=on_record)
        await round_trip(nc)
        if ready is not None:
            ready.set()
        await done.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await nc.drain()
    return 0
