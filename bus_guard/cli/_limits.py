"""``bus-guard limits``: what every rate limit and budget key has used of its window now."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Final, TextIO

import msgspec

from bus_guard.cli._approve import span
from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli._safe import safe, safe_json, say
from bus_guard.decision import LimitSpec
from bus_guard.intake._limits import LimitStore, Usage
from bus_guard.subjects import Subjects

__all__ = ("cmd_limits", "format_usage", "limit_state")

EXIT_OK: Final = 0
_encoder: Final = msgspec.json.Encoder()


def format_usage(u: Usage) -> str:
    """One line, escaped: limit (rule), key, used / max, window, when room comes back."""
    used = f"{u.used:g}/{u.max:g}" + (" requests" if u.kind == "count" else "")
    full = "  FULL" if u.used >= u.max else ""
    return safe(
        f"{u.limit} (rule {u.rule})  {u.per} {u.key!r}  {used} per {span(u.window_s)}  "
        f"{u.spends} spend(s), oldest leaves in {span(u.frees_in_s)}{full}"
    )


async def limit_state(
    urls: str, creds: str | None, prefix: str, pairs: Sequence[tuple[LimitSpec, str]]
) -> dict[tuple[str, str], float]:
    """What each (limit, key) of *pairs* has used now (``policy explain --nats``)."""
    if not pairs:
        return {}
    nc = await connect(urls, creds=creds, name="bus-guard policy explain")
    try:
        store = LimitStore(nc.jetstream(timeout=5.0), Subjects(prefix).streams.limits_bucket)
        return {(spec.name, key): await store.used_now(spec, key) for spec, key in pairs}
    finally:
        await nc.close()


async def cmd_limits(args: argparse.Namespace, out: TextIO) -> int:
    """List the limit keys with spends in their window; 0 (none is no error)."""
    nc = await connect(NatsOptions.from_args(args), name="bus-guard limits")
    try:
        bucket = Subjects(args.prefix).streams.limits_bucket
        store = LimitStore(nc.jetstream(timeout=5.0), bucket)
        found = await store.usage(args.principal)
    finally:
        await nc.close()
    for u in found:
        if args.json:
            print(safe_json(_encoder.encode(u).decode()), file=out)
        else:
            say(out, format_usage(u))
    if not found and not args.json:
        who = f" for {args.principal!r}" if args.principal else ""
        say(out, safe(f"no limit has spends in its window now{who}"))
    return EXIT_OK
