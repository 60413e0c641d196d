"""``bus-guard approve``, ``reject`` and ``holds``: the approvers' commands.

What they print comes mostly from agents (principal, action, resource) and from the
gateway's records (messages that quote agents): every line goes through :func:`say`,
every JSON line through :func:`safe_json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Final, TextIO

import msgspec

from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli._safe import safe, safe_json, say
from bus_guard.errors import ConfigError
from bus_guard.intake._approver import OpenHold, Vote, approve, check_vote, open_holds, reject
from bus_guard.ledger._records import LedgerRecord
from bus_guard.signing._keys import kid_for, load_private_key

__all__ = ("cmd_holds", "cmd_vote", "format_hold", "span")

EXIT_OK, EXIT_FAIL = 0, 1
_UNITS: Final = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def span(seconds: float) -> str:
    """A duration the way an operator reads it: ``45s``, ``12m``, ``3h20m``, ``2d4h``."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in _UNITS:
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        if len(parts) == 2 or (parts and unit == "m"):
            break
    return "".join(parts)


async def cmd_vote(args: argparse.Namespace, out: TextIO) -> int:
    """``bus-guard approve`` / ``reject``: 0 stored (and counted, with ``--wait``), 1
    refused or not recorded; usage and configuration errors raise ConfigError (exit 2)."""
    key = load_private_key(args.key)
    kid = kid_for(key.public_key())
    approver = kid if args.approver is None else args.approver
    try:
        check_vote(args.decision_id, approver, args.reason)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cast = approve if args.command == "approve" else reject
    nc = await connect(NatsOptions.from_args(args), name=f"bus-guard {args.command}")
    try:
        vote = await cast(
            nc,
            args.decision_id,
            key,
            approver=args.approver,
            reason=args.reason,
            prefix=args.prefix,
            wait_s=args.wait,
        )
    finally:
        await nc.close()
    who = f"key {kid}" if approver == kid else f"{approver} (key {kid})"
    say(
        out,
        f"{args.command} vote on hold {args.decision_id} by {who} stored: "
        f"{vote.stream} seq {vote.seq}",
    )
    if not args.wait:
        return EXIT_OK
    return _report(vote, args.wait, out)


def _report(vote: Vote, wait_s: float, out: TextIO) -> int:
    recorded = vote.recorded
    if recorded is None:
        say(
            out,
            f"not recorded by a gateway within {wait_s:g}s: the vote waits in {vote.stream} "
            "for a stream-mode gateway (`bus-guard holds` shows the votes counted)",
        )
        return EXIT_FAIL
    if recorded.effect in ("approve", "reject"):
        say(out, f"counted: {_vote_line(recorded)}")
        code = EXIT_OK
    else:
        say(out, f"refused by the gateway: {_vote_line(recorded)}")
        code = EXIT_FAIL
    if vote.resolution is not None:
        say(out, f"hold resolved: {_resolution_line(vote.resolution)}")
    return code


def _vote_line(record: LedgerRecord) -> str:
    message = f": {record.message}" if record.message else ""
    return f"{record.effect} ({record.reason}) as decision {record.decision_id}{message}"


def _resolution_line(record: LedgerRecord) -> str:
    what = "released" if record.effect == "allow" else "denied"
    approvals = f", approvals {','.join(record.approvals)}" if record.approvals else ""
    return f"{what} ({record.reason}) as decision {record.decision_id}{approvals}"


def format_hold(hold: OpenHold, now: float) -> str:
    """One line, escaped: id, age, who, what, why, votes, expiry."""
    what = " ".join(x for x in (hold.action, hold.resource) if x) or hold.subject
    if not hold.in_ledger:
        votes = "not in the ledger (cannot be voted on)"
    elif hold.quorum:
        votes = f"approvals {len(hold.approved_by)}/{hold.quorum}"
        if hold.approved_by:
            votes += f" ({','.join(hold.approved_by)})"
        if hold.rejected_by:
            votes += f" rejected by {','.join(hold.rejected_by)}"
    else:
        votes = "approvals -/- (no approvers recorded)"
    if not hold.expires:
        expiry = "no expiry"
    elif hold.expires > now:
        expiry = f"expires in {span(hold.expires - now)}"
    else:
        expiry = f"expired {span(now - hold.expires)} ago"
    return safe(
        f"{hold.decision_id}  {span(now - hold.ts):>6} old  {hold.principal or '?'}  {what}  "
        f"rules={','.join(hold.rules) or '-'}  {votes}  {expiry}"
    )


_encoder: Final = msgspec.json.Encoder()


async def cmd_holds(args: argparse.Namespace, out: TextIO) -> int:
    """``bus-guard holds``: the open holds, oldest first; 0 (none is no error)."""
    nc = await connect(NatsOptions.from_args(args), name="bus-guard holds")
    try:
        found = await open_holds(
            nc,
            prefix=args.prefix,
            since=time.time() - args.since,
            limit=args.limit,
            principal=args.principal,
            action=args.action,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        await nc.close()
    now = time.time()
    for hold in found.holds:
        if args.json:
            print(safe_json(_encoder.encode(hold).decode()), file=out)
        else:
            say(out, format_hold(hold, now))
    if args.json:
        if found.more:  # the JSON lines stay what they say; the note goes to stderr
            say(sys.stderr, f"bus-guard: more open holds than --limit {args.limit}")
        return EXIT_OK
    if not found.holds:
        say(out, f"no open holds from the last {span(args.since)}")
    elif found.more:
        say(out, f"(more open holds than --limit {args.limit}: oldest first)")
    return EXIT_OK
