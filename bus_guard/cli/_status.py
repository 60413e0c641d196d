"""``bus-guard status``: every gateway on the bus, from the NATS micro service API.

One ``$SRV.STATS.bus-guard`` request; every gateway answers (the service export in
``compose/auth.conf`` streams the answers back), and the answers are collected for
``--wait`` seconds. One row per gateway, sorted by gateway id, or ``--json``: each
gateway's status document (the STATS ``data`` of its ``status`` endpoint) with its micro
service id, one per line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final, TextIO

import anyio
import msgspec
from nats.aio.client import Client
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli._safe import safe, safe_json, say
from bus_guard.intake._service import SERVICE_NAME, STATUS_ENDPOINT

__all__ = ("cmd_status", "gateway_stats")

_encoder: Final = msgspec.json.Encoder()


async def gateway_stats(
    nc: Client, *, wait_s: float, expect: int | None = None
) -> list[dict[str, Any]]:
    """The STATS answers of every bus_guard gateway within *wait_s* (sooner once *expect*
    answered), sorted by gateway id: each the micro service's own STATS document."""
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []
    enough = anyio.Event()

    async def on_answer(msg: Any) -> None:
        try:
            answers.append(msgspec.json.decode(msg.data))
        except msgspec.DecodeError:
            return
        if expect is not None and len(answers) >= expect:
            enough.set()

    sub = await nc.subscribe(inbox, cb=on_answer)
    try:
        await nc.publish(f"$SRV.STATS.{SERVICE_NAME}", b"", reply=inbox)
        with anyio.move_on_after(wait_s):
            await enough.wait()
    finally:
        await sub.unsubscribe()
    return sorted(answers, key=lambda a: str(_status_of(a).get("identity", {}).get("gateway")))


def _status_of(stats: dict[str, Any]) -> dict[str, Any]:
    """The status document inside a STATS answer (empty if it has none)."""
    for endpoint in stats.get("endpoints") or []:
        if isinstance(endpoint, dict) and endpoint.get("name") == STATUS_ENDPOINT:
            data = endpoint.get("data")
            return data if isinstance(data, dict) else {}
    return {}


def _row(stats: dict[str, Any]) -> list[str]:
    status = _status_of(stats)
    identity = status.get("identity", {})
    counters = status.get("statistics", {})
    decisions = status.get("decisions", {})
    latency = status.get("latency_s", {})
    effects = " ".join(
        f"{effect}={sum(reasons.values())}" for effect, reasons in sorted(decisions.items())
    )
    errors = counters.get("internal_errors", 0) + counters.get("publish_failures", 0)
    queues = status.get("queues", {})

    def ms(key: str) -> str:
        value = latency.get(key)
        return f"{value * 1000:.1f}" if isinstance(value, int | float) else "-"

    return [
        str(identity.get("gateway", "?")),
        str(stats.get("id", "?")),
        f"{identity.get('mode', '?')}/{identity.get('artifacts', '?')}",
        f"{identity.get('policy_version', '?')} {str(identity.get('policy_digest', '?'))[:19]}",
        str(identity.get("kid", "?")),
        "yes" if status.get("ready") else "NO",
        f"{status.get('uptime_s', 0):.0f}s",
        effects or "-",
        str(errors),
        str(queues.get("intake", 0)),
        f"{ms('p50')}/{ms('p99')}",
    ]


_COLUMNS: Final = (
    "gateway",
    "service id",
    "mode",
    "policy",
    "kid",
    "ready",
    "up",
    "decisions",
    "errors",
    "queued",
    "p50/p99 ms",
)


async def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """0 when at least one gateway answered, 1 when none did."""
    nc = await connect(NatsOptions.from_args(args), name="bus-guard status")
    try:
        found = await gateway_stats(nc, wait_s=args.wait)
    finally:
        await nc.close()
    if args.json:
        for stats in found:
            document = {"service_id": stats.get("id"), **_status_of(stats)}
            print(safe_json(_encoder.encode(document).decode()), file=out)
    elif found:
        table = Table(title=f"bus_guard gateways on {safe(args.nats)}")
        for column in _COLUMNS:
            table.add_column(column)
        for stats in found:
            table.add_row(*(Text(safe(cell)) for cell in _row(stats)))
        Console(file=out, highlight=False, width=200 if not out.isatty() else None).print(table)
    if not found:
        say(
            sys.stderr,
            f"bus-guard: no gateway answered $SRV.STATS.{SERVICE_NAME} in {args.wait:g}s",
        )
        return 1
    return 0
