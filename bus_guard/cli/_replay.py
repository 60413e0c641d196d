"""``bus-guard replay`` and ``bus-guard policy impact``: recorded intents decided again.

Both read what the gateways keep (README, "Replay"): the retained intent bytes (bucket
``<prefix>-intents``, :mod:`bus_guard.ledger._intents`), the ledger (the decision's
record, its parents' records), and the policy sets archived by digest (object store
``<prefix>-policy-sets``, :mod:`bus_guard.intake._archive`). The decision itself is
:func:`bus_guard.ledger._reevaluate.redecide`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from bus_guard.cli._safe import say
from bus_guard.decision import Lineage, resolution_decision_id
from bus_guard.errors import BundleRefused, GatewayError, PolicyError
from bus_guard.intake._archive import archive_name, decode_archived
from bus_guard.intake._jetstream import first_by_subject, first_seq_since, last_by_subject, read
from bus_guard.ledger._intents import Retained, intents_bucket, read_retained, retained_subject
from bus_guard.ledger._lineage import lineage_of
from bus_guard.ledger._records import DECISION, LedgerRecord, decode_record
from bus_guard.ledger._reevaluate import Redecision, differences, layer_of, redecide
from bus_guard.pipeline import PolicySetLike
from bus_guard.policy._bundle import StaleSet, compile_content, compile_directory, decode_content
from bus_guard.policy._constitution import CONSTITUTION_LAYER, LayeredSet
from bus_guard.policy._load import load_policies
from bus_guard.settings import Checks, StreamSettings
from bus_guard.subjects import Subjects

__all__ = ("add_commands", "cmd_impact", "cmd_replay")

log = logging.getLogger(__name__)

_DECISION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

EXIT_SAME, EXIT_DIFFERS, EXIT_USAGE = 0, 1, 2
_CORE_NO_LEDGER: Final = "core mode keeps no ledger: parents cannot be checked"  # as _core's
_REPLAY_EPILOG: Final = """\
Decide a recorded decision again: the intent bytes the gateway retained (bucket
<prefix>-intents, see 'bus-guard run --intent-retention'), at the recorded time, under the
policy set that made it (fetched by its digest from <prefix>-policy-sets, where every
gateway archives the sets it activates; with the constitution in force then), with its
lineage rebuilt from the recorded parent decisions as the gateway did, and the recorded use
of its limits. Prints whether it reproduces: effect, reason, rules, layer.

examples:
  bus-guard replay 01JD2Q5X3M7N8P9R0S1T2V3W4X --nats nats://127.0.0.1:4222
  bus-guard replay 01JD2Q5X3M7N8P9R0S1T2V3W4X --json | jq .reproduces

exit codes:
  0  the decision reproduces
  1  it differs (what differs is printed), or the bus could not be reached
  2  usage, or not found: no such decision, its intent not retained (retention off or
     expired), its policy set not archived
  130 interrupted (Ctrl-C); 141 the output pipe closed (`| head`): quietly
"""
_IMPACT_EPILOG: Final = """\
Decide the intents recorded in the window again under the candidate set compiled (and
tested) from DIR, before anyone pushes it: under the constitution that was in force for
each (as the gateway would combine them), with the recorded lineage and limit use. Prints
how many would change, by old effect/reason -> new effect/reason, with examples.

examples:
  bus-guard policy impact policies/ --nats nats://127.0.0.1:4222 --since 1h
  bus-guard policy impact policies/ --since 24h --limit-examples 10 --json

exit codes:
  0  the impact was computed (changes or not)
  1  the bus could not be reached or read
  2  usage: DIR does not compile; intent retention is off (a DIR whose test cases
     fail is analysed, with a warning: it could not be pushed as it is)
  130 interrupted (Ctrl-C); 141 the output pipe closed (`| head`): quietly
"""


class NotFound(Exception):
    """What replay needs is not there (exit 2)."""


def add_commands(
    sub: argparse._SubParsersAction[Any], pol: argparse._SubParsersAction[Any]
) -> None:
    """``replay`` (top level) and ``policy impact``."""
    from bus_guard.cli._arguments import _prefix_option, duration, nats_options

    rep = sub.add_parser(
        "replay",
        help="decide a recorded decision again, under the policy set that made it",
        epilog=_REPLAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("decision_id", metavar="DECISION_ID", help="the decision's id")
    nats_options(rep)
    _prefix_option(rep)
    _judging_options(rep)
    rep.add_argument("--json", action="store_true", help="one JSON object")

    imp = pol.add_parser(
        "impact",
        help="what a candidate policy directory would change over recorded decisions",
        epilog=_IMPACT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("path", type=Path, metavar="DIR", help="the candidate policy directory")
    nats_options(imp)
    _prefix_option(imp)
    imp.add_argument(
        "--since",
        type=duration,
        default=3600.0,
        metavar="DURATION",
        help="the window: intents decided this long ago or later (default: 1h)",
    )
    imp.add_argument(
        "--limit-examples",
        type=int,
        default=3,
        metavar="N",
        help="decisions shown per change (default: 3)",
    )
    _judging_options(imp)
    imp.add_argument("--json", action="store_true", help="one JSON object")


def _judging_options(p: argparse.ArgumentParser) -> None:
    checks, stream = Checks(), StreamSettings()
    p.add_argument(
        "--max-skew",
        type=float,
        default=checks.max_past_skew_s,
        metavar="SECONDS",
        help=f"as the gateway's --max-skew (default: {checks.max_past_skew_s:g})",
    )
    p.add_argument(
        "--max-lineage-depth",
        type=int,
        default=stream.max_lineage_depth,
        metavar="N",
        help=f"as the gateway's (default: {stream.max_lineage_depth})",
    )


# --- reading what was kept ----------------------------------------------------------------


@dataclass
class _Kept:
    """The ledger, the retained intents and the archived sets of one prefix."""

    nc: Client
    prefix: str
    max_lineage_depth: int
    js: JetStreamContext = field(init=False)
    subjects: Subjects = field(init=False)
    _sets: dict[str, PolicySetLike] = field(default_factory=dict)
    _records: dict[str, LedgerRecord | None] = field(default_factory=dict)
    _store: ObjectStore | None = None
    _ledger: bool | None = None  # whether there is a ledger stream (unknown yet)

    def __post_init__(self) -> None:
        self.js = self.nc.jetstream(timeout=5.0)
        self.subjects = Subjects(self.prefix)
        self.bucket = intents_bucket(self.prefix)
        self.stream = f"KV_{self.bucket}"

    async def retention_on(self) -> bool:
        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def retained(self, decision_id: str) -> Retained:
        stored = await last_by_subject(
            self.js, self.stream, retained_subject(self.bucket, decision_id)
        )
        if stored is None:
            raise NotFound(
                f"{decision_id}: its intent is not retained in bucket {self.bucket} (an "
                "older decision than the retention, a vote or a hold's resolution, or a "
                "gateway running with --intent-retention 0)"
            )
        try:
            retained = read_retained(stored.data, stored.headers)
        except ValueError as exc:
            raise NotFound(f"{decision_id}: {exc}") from None
        if retained.decision.decision_id != decision_id:
            raise NotFound(f"{decision_id}: the retained message is another decision's")
        return retained

    async def record(self, decision_id: str) -> LedgerRecord | None:
        """The first ledger record of *decision_id* (the one that stands), or ``None``."""
        if decision_id in self._records:
            return self._records[decision_id]
        found: LedgerRecord | None = None
        if self._ledger is None:  # core-mode gateways alone keep no ledger stream
            try:
                await self.js.stream_info(self.subjects.streams.ledger)
                self._ledger = True
            except nats.js.errors.NotFoundError:
                self._ledger = False
        if not self._ledger:
            return None
        try:
            stored = await first_by_subject(
                self.js,
                self.subjects.streams.ledger,
                self.subjects.ledger().any_decision(decision_id),
            )
        except nats.js.errors.NotFoundError:
            stored = None
        if stored is not None:
            try:
                record = decode_record(stored.data)
            except msgspec.DecodeError:
                record = None
            if record is not None and record.kind == DECISION and record.decision_id == decision_id:
                found = record
        self._records[decision_id] = found
        return found

    async def policy_set(self, digest: str) -> PolicySetLike:
        """The archived set *digest*, compiled again (its digest checked)."""
        cached = self._sets.get(digest)
        if cached is not None:
            return cached
        name = archive_name(digest)
        try:
            if self._store is None:
                self._store = await self.js.object_store(self.subjects.streams.policy_store)
            got = await self._store.get(name)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.ObjectNotFoundError):
            raise NotFound(
                f"policy set {digest} is not archived ({self.subjects.streams.policy_store}/"
                f"{name}): was it decided by a gateway older than the archive?"
            ) from None
        try:
            meta = decode_archived(got.info.description)
            content = decode_content(got.data or b"")
            layer = CONSTITUTION_LAYER if meta.kind == "constitution" else ""
            compiled = await anyio.to_thread.run_sync(
                lambda: compile_content(content, revision=meta.revision, base=name, layer=layer)
            )
        except (ValueError, BundleRefused) as exc:
            raise NotFound(f"archived policy set {digest} does not compile: {exc}") from None
        if compiled.digest != digest:
            raise NotFound(f"archived {name} compiles to {compiled.digest}, not {digest}")
        self._sets[digest] = compiled.policies
        return compiled.policies

    async def lineage(self, retained: Retained) -> Lineage | None:
        """The lineage the gateway computed for *retained*: from the parents' first ledger
        records as they stood when it was decided (a parent recorded later, or a hold
        resolved later, was not decided then: the child would have waited, then been denied
        ``lineage_violation``)."""
        decision = retained.decision
        names = decision.parents
        if not names:
            return None
        if decision.core:
            return Lineage(violation=_CORE_NO_LEDGER)
        at = decision.ts
        records: dict[str, LedgerRecord | None] = {}
        pending: list[tuple[str, str]] = []
        for name in names:
            record = await self.record(name)
            if record is not None and record.ts > at:
                record = None
            if record is not None and record.effect == "hold":
                resolution = await self.record(resolution_decision_id(self.prefix, name))
                if resolution is not None and resolution.ts <= at:
                    record = resolution
                else:
                    pending.append((name, "held"))
            elif record is None:
                pending.append((name, "unknown"))
            records[name] = record
        waiting = {n for n, _ in pending}
        final_no = [n for n in names if n not in waiting and not _allows(records[n])]
        if pending and not final_no:
            first, state = pending[0]
            return Lineage(violation=f"parent {first} was still {state} when it was decided")
        ordered = sorted(names, key=lambda n: n not in final_no) if final_no else list(names)
        principal = decision.principal
        return lineage_of(principal, ordered, records, max_depth=self.max_lineage_depth)

    async def deciding_set(self, retained: Retained) -> PolicySetLike:
        """The set (with its constitution) that decided *retained*."""
        decision = retained.decision
        if decision.constitution:
            policies: PolicySetLike = LayeredSet(
                await self.policy_set(decision.constitution),
                await self.policy_set(decision.ordinary or decision.policy_digest),
            )
        else:
            policies = await self.policy_set(decision.policy_digest)
        if decision.reason == "policy_stale":
            return StaleSet(policies, "the policy set was stale when it decided")
        return policies


def _allows(record: LedgerRecord | None) -> bool:
    return record is not None and record.effect == "allow"


def _checks(args: argparse.Namespace) -> Checks:
    return Checks(max_past_skew_s=args.max_skew)


async def _judge(
    kept: _Kept, retained: Retained, policies: PolicySetLike, checks: Checks
) -> Redecision:
    # The limit use is the retained header's: the ledger record's, copied when retained
    # (no look-up per decision for a window of them).
    return redecide(
        retained,
        policies,
        prefix=kept.prefix,
        checks=checks,
        lineage=await kept.lineage(retained),
        recorded_limits=retained.decision.limits,
    )


# --- replay -------------------------------------------------------------------------------


async def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    from bus_guard.cli._connect import NatsOptions, connect

    if _DECISION_ID.fullmatch(args.decision_id) is None:  # it becomes a subject token
        say(out, f"replay: {args.decision_id!r} is not a decision id ([A-Za-z0-9_-], 1-64)")
        return EXIT_USAGE

    nc = await connect(NatsOptions.from_args(args), name="bus-guard replay")
    try:
        kept = _Kept(nc, args.prefix, args.max_lineage_depth)
        try:
            return await _replay(kept, args.decision_id, _checks(args), args.json, out)
        except NotFound as exc:
            say(out, f"replay: {exc}")
            return EXIT_USAGE
        except (nats.errors.Error, TimeoutError) as exc:
            raise GatewayError(f"replay: reading the bus failed: {exc!r}") from None
    finally:
        await nc.close()


async def _replay(kept: _Kept, decision_id: str, checks: Checks, as_json: bool, out: TextIO) -> int:
    if not await kept.retention_on():
        raise NotFound(
            f"intent retention is off: there is no bucket {kept.bucket} (gateways keep "
            "intents with --intent-retention, 7 days by default; 0 turns it off)"
        )
    record = await kept.record(decision_id)
    try:
        retained = await kept.retained(decision_id)
    except NotFound:
        if record is None:
            raise NotFound(
                f"{decision_id}: no such decision (not in the ledger, no retained intent)"
            ) from None
        if record.hold:
            raise NotFound(
                f"{decision_id}: a {record.effect} on hold {record.hold} (a vote or the hold's "
                "resolution): approvals are not re-evaluated; replay the hold"
            ) from None
        raise
    recorded = retained.decision
    if record is not None and (
        record.effect != recorded.effect or record.payload_sha256 != recorded.payload_sha256
    ):
        raise NotFound(f"{decision_id}: the retained intent is not the ledger's decision")
    redo = await _judge(kept, retained, await kept.deciding_set(retained), checks)
    new = redo.decision
    diffs = differences(recorded, new) if redo.re_evaluated else []
    same = not diffs
    if as_json:
        doc = {
            "decision_id": decision_id,
            "reproduces": same,
            "re_evaluated": redo.re_evaluated,
            "recorded": _summary(
                recorded.effect, recorded.reason, recorded.rules, recorded.policy_version
            ),
            "replayed": _summary(new.effect.value, new.reason.value, new.rules, new.policy_version),
            "policy_digest": recorded.policy_digest,
            "constitution": recorded.constitution,
            "subject": recorded.subject,
            "decided_at": recorded.ts,
            "differences": diffs,
            "notes": list(redo.notes),
        }
        print(json.dumps(doc), file=out)
        return EXIT_SAME if same else EXIT_DIFFERS
    say(out, f"decision {decision_id}: {recorded.subject} at {_when(recorded.ts)}")
    say(out, f"  policy   {recorded.policy_version} ({recorded.policy_digest})")
    if recorded.constitution:
        say(out, f"  under constitution {recorded.constitution}")
    say(
        out,
        "  recorded "
        + _line(recorded.effect, recorded.reason, recorded.rules, recorded.policy_version),
    )
    say(
        out,
        f"  replayed {_line(new.effect.value, new.reason.value, new.rules, new.policy_version)}",
    )
    for note in redo.notes:
        say(out, f"  note: {note}")
    if same:
        say(out, "REPRODUCES" if redo.re_evaluated else "AS RECORDED (not re-evaluated)")
        return EXIT_SAME
    say(out, "DIFFERS: " + "; ".join(diffs))
    return EXIT_DIFFERS


def _summary(effect: str, reason: str, rules: Sequence[str], version: str) -> dict[str, Any]:
    return {"effect": effect, "reason": reason, "rules": list(rules), "layer": layer_of(version)}


def _line(effect: str, reason: str, rules: Sequence[str], version: str) -> str:
    return f"{effect} {reason} rules={','.join(rules) or '-'} layer={layer_of(version)}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# --- impact -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    old: tuple[str, str]  # (effect, reason)
    new: tuple[str, str]


async def cmd_impact(args: argparse.Namespace, out: TextIO) -> int:
    from bus_guard.cli._connect import NatsOptions, connect

    failing = ""
    try:
        candidate = (await anyio.to_thread.run_sync(compile_directory, args.path)).policies
    except BundleRefused as exc:
        if exc.reason != "tests_failed":
            say(out, f"policy impact: {args.path} cannot be a candidate: {exc}")
            return EXIT_USAGE
        # Its own test cases fail: it could not be pushed as it is, but what it would
        # change is still worth knowing (perhaps the cases are what is out of date).
        candidate = await anyio.to_thread.run_sync(load_policies, args.path)
        failing = str(exc)
    except PolicyError as exc:
        say(out, f"policy impact: {args.path} cannot be a candidate: {exc}")
        return EXIT_USAGE
    if failing:  # on stderr: --json keeps one document on stdout
        log.warning("%s would be refused as it is: %s", args.path, failing)
    nc = await connect(NatsOptions.from_args(args), name="bus-guard policy impact")
    try:
        kept = _Kept(nc, args.prefix, args.max_lineage_depth)
        if not await kept.retention_on():
            say(
                out,
                f"policy impact: intent retention is off: there is no bucket {kept.bucket} "
                "(gateways keep intents with --intent-retention, 7 days by default)",
            )
            return EXIT_USAGE
        try:
            return await _impact(kept, candidate, args, out, failing=failing)
        except (nats.errors.Error, TimeoutError) as exc:
            raise GatewayError(f"policy impact: reading the bus failed: {exc!r}") from None
    finally:
        await nc.close()


async def _impact(
    kept: _Kept, candidate: PolicySetLike, args: argparse.Namespace, out: TextIO, *, failing: str
) -> int:
    since = time.time() - args.since
    checks = _checks(args)
    subject = retained_subject(kept.bucket, "*")
    start = await first_seq_since(kept.nc, kept.stream, subject, since)
    total, unreadable, notes = 0, 0, Counter[str]()
    changes: Counter[Change] = Counter()
    examples: dict[Change, list[dict[str, str]]] = {}
    if start:
        async for stored in read(kept.nc, kept.stream, subject, start_seq=start):
            try:
                retained = read_retained(stored.data, stored.headers)
            except ValueError:
                unreadable += 1
                continue
            recorded = retained.decision
            total += 1
            policies = candidate
            if recorded.constitution:  # the gateway would put the constitution over it
                try:
                    policies = LayeredSet(await kept.policy_set(recorded.constitution), candidate)
                except NotFound as exc:
                    notes[f"constitution not archived, candidate alone: {exc}"] += 1
            redo = await _judge(kept, retained, policies, checks)
            for note in redo.notes:
                if note.startswith("limit state: not re-evaluated") or not redo.re_evaluated:
                    notes[note] += 1
            new = redo.decision
            change = Change(
                (recorded.effect, recorded.reason), (new.effect.value, new.reason.value)
            )
            changes[change] += 1
            shown = examples.setdefault(change, [])
            if change.old != change.new and len(shown) < args.limit_examples:
                shown.append(
                    {
                        "decision_id": recorded.decision_id,
                        "principal": recorded.principal,
                        "action": recorded.action,
                        "resource": recorded.resource,
                        "rules": ",".join(new.rules),
                    }
                )
    changed = sum(n for c, n in changes.items() if c.old != c.new)
    ordered = sorted(changes.items(), key=lambda kv: (kv[0].old == kv[0].new, -kv[1], kv[0].old))
    if args.json:
        doc = {
            "candidate": {
                "path": str(args.path),
                "digest": candidate.digest,
                "version": candidate.version,
                "tests_failed": failing,
            },
            "since": since,
            "decisions": total,
            "changed": changed,
            "unchanged": total - changed,
            "unreadable": unreadable,
            "changes": [
                {
                    "old": {"effect": c.old[0], "reason": c.old[1]},
                    "new": {"effect": c.new[0], "reason": c.new[1]},
                    "count": n,
                    "examples": examples.get(c, []),
                }
                for c, n in ordered
                if c.old != c.new
            ],
            "unchanged_by_outcome": [
                {"effect": c.old[0], "reason": c.old[1], "count": n}
                for c, n in ordered
                if c.old == c.new
            ],
            "notes": dict(notes),
        }
        print(json.dumps(doc), file=out)
        return EXIT_SAME
    say(
        out,
        f"policy impact of {args.path} ({candidate.version}, {candidate.digest}) over "
        f"{total} decision(s) since {_when(since)}: {changed} would change",
    )
    for c, n in ordered:
        if c.old == c.new:
            continue
        say(out, f"  {c.old[0]}/{c.old[1]} -> {c.new[0]}/{c.new[1]}: {n}")
        for ex in examples.get(c, []):
            say(
                out,
                f"      e.g. {ex['decision_id']} {ex['principal']} {ex['action']} {ex['resource']}",
            )
    for c, n in ordered:
        if c.old == c.new:
            say(out, f"  unchanged {c.old[0]}/{c.old[1]}: {n}")
    if unreadable:
        say(out, f"  {unreadable} retained message(s) unreadable (skipped)")
    for note, n in notes.items():
        say(out, f"  note ({n}): {note}")
    return EXIT_SAME
