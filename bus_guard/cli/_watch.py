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
from rich.markup import escape

from bus_guard.intake._gateway import round_trip
from bus_guard.pipeline import DecisionRecord
from bus_guard.subjects import DEFAULT_PREFIX, Subjects

__all__ = ("WatchFilter", "format_record", "watch")

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
        principal = self.principal or "*"
        action = self.action or ">"
        subjects = Subjects(prefix)
        return [subjects.subject(kind, principal, action) for kind in ("deny", "hold")]

    def matches(self, record: DecisionRecord) -> bool:
        return self.reason is None or record.reason == self.reason


def format_record(record: DecisionRecord) -> str:
    """One line of rich markup: who, what, why, which rule."""
    effect = "would-deny" if record.would_deny else record.effect
    style = _STYLE.get(record.effect, "bold")
    rules = ",".join(record.rules) or "-"
    what = f"{record.action} {record.resource}".strip() or record.subject
    return (
        f"[{style}]{effect.upper():<10}[/] [cyan]{escape(record.principal or '?'):<12}[/] "
        f"{escape(what)}  [magenta]{escape(record.reason)}[/] rules={escape(rules)}  "
        f"[dim]{escape(record.message)} id={record.decision_id}[/]"
    )


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

    async def on_record(msg: Msg) -> None:
        nonlocal shown
        try:
            record = _decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            console.print(f"[red]unreadable record on {escape(msg.subject)}: {exc}[/]")
            return
        if not filters.matches(record):
            return
        if as_json:
            console.print_json(msg.data.decode())
        else:
            console.print(format_record(record))
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
