"""``bus-guard maturity``: where this deployment stands, observe → enforce, from the
ledger's decision records of a window (:mod:`bus_guard.ledger._maturity`)."""

from __future__ import annotations

import argparse
import io
import time
from typing import Final, TextIO

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli._safe import safe, safe_json, say
from bus_guard.errors import GatewayError
from bus_guard.intake._jetstream import first_seq_since, read
from bus_guard.ledger._maturity import Assessment, Assessor, duration_text
from bus_guard.ledger._records import decode_record
from bus_guard.subjects import Subjects

__all__ = ("cmd_maturity", "format_assessment")

_encoder: Final = msgspec.json.Encoder()


async def cmd_maturity(args: argparse.Namespace, out: TextIO) -> int:
    """0 with the assessment printed (a deployment early on the way is no error)."""
    subjects = Subjects(args.prefix)
    stream = subjects.streams.ledger
    decisions = subjects.ledger().any_decision("*")
    assessor = Assessor(args.since)
    nc = await connect(NatsOptions.from_args(args), name="bus-guard maturity")
    try:
        try:
            first = await first_seq_since(nc, stream, decisions, time.time() - args.since)
        except nats.errors.NoRespondersError:
            raise GatewayError(
                f"no ledger stream {stream}: the evidence is stream mode's ledger"
            ) from None
        if first:
            async for stored in read(nc, stream, decisions, start_seq=first):
                try:
                    assessor.feed(decode_record(stored.data))
                except msgspec.DecodeError:
                    continue  # the audit (--jwks) names such a record
        ledger = "not checked"
        if args.jwks is not None:
            ledger = await _audit(nc, stream, args)
    finally:
        await nc.close()
    assessment = assessor.finish(ledger)
    if args.json:
        print(safe_json(_encoder.encode(assessment.to_json()).decode()), file=out)
    else:
        for line in format_assessment(assessment):
            say(out, line)
    return 0


async def _audit(nc: Client, stream: str, args: argparse.Namespace) -> str:
    from bus_guard.cli._ledger import audit_stream
    from bus_guard.verify import load_jwks

    report = io.StringIO()
    try:
        code = await audit_stream(
            nc,
            stream,
            prefix=args.prefix,
            jwks=load_jwks(args.jwks),
            require_sealed=False,
            out=report,
        )
    except nats.js.errors.NotFoundError:
        return "FAILED: no ledger stream"
    if code == 0:
        return "verified"
    lines = report.getvalue().splitlines()
    first = next(
        (line.strip() for line in lines if line.startswith("  ") and "then:" not in line), ""
    )
    return f"FAILED: {first or lines[-1].strip()}"


def format_assessment(a: Assessment) -> list[str]:
    """The report's lines (values escaped: actions are agents' words)."""

    def share(n: int) -> str:
        return f"{100 * n / a.decisions:.0f}%" if a.decisions else "-"

    lines = [
        f"maturity over the last {duration_text(a.window_s)}: {a.stage}",
        f"  decisions        {a.decisions}: enforce {a.enforce} ({share(a.enforce)}), "
        f"observe {a.observe} ({share(a.observe)})",
        "  would-deny       " + (", ".join(f"{k} {v}" for k, v in a.would_deny.items()) or "none"),
        "  observed only    " + (", ".join(a.observed_only) or "none"),
        "  no rule names    "
        + (", ".join(f"{k} ({v})" for k, v in a.uncovered.items()) or "none: every action covered"),
        f"  holds            {a.holds}: {a.holds_resolved} resolved, {a.holds_open} open"
        + (
            f"; resolved in {duration_text(a.resolve_s['p50'])} (median), "
            f"{duration_text(a.resolve_s['max'])} (longest)"
            if a.resolve_s
            else ""
        ),
        "  artifacts        " + (", ".join(f"{k} {v}" for k, v in a.artifacts.items()) or "none"),
        f"  ledger           {a.ledger}",
        "next:",
        *(f"  - {step}" for step in a.next_steps),
    ]
    return [safe(line) for line in lines]
