"""Where a deployment stands on the execution-governance maturity model (observe →
enforce), from evidence: the ledger's decision records of a window. Pure: records in, an
:class:`Assessment` out (``bus-guard maturity`` reads the records and prints it).

The stages, each a fact about the window's records, not an answer to a questionnaire:

* **observe**: policies run in observe mode; the gateway forwards what enforcement would
  deny (``would_deny``). Evidence: the share of decisions made in observe mode, and per
  action what observe mode would have denied.
* **cover**: every action agents use has a rule. Evidence: actions whose every decision
  was ``no_matching_rule`` (denied by default: no rule names them).
* **enforce**: decisions are made in enforce mode; humans resolve holds. Evidence: the
  enforce share; holds and how long their resolution took; holds still open.
* **prove**: every executed action carries an artifact and the ledger verifies. Evidence:
  artifacts per kind, and the ledger audit (when the caller ran it).
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bus_guard.ledger._records import DECISION, LedgerRecord
from bus_guard.verify._format import BATCH_PREFIX

__all__ = ("Assessment", "Assessor", "assess", "duration_text")


@dataclass(frozen=True, slots=True)
class Assessment:
    window_s: float
    decisions: int
    enforce: int
    observe: int
    would_deny: dict[str, int]  # action -> observe-mode allows enforcement would deny
    observed_only: tuple[str, ...]  # actions decided only in observe mode, none would-deny
    uncovered: dict[str, int]  # action -> decisions, every one no_matching_rule
    holds: int
    holds_resolved: int
    holds_open: int
    resolve_s: dict[str, float]  # p50 / max seconds from hold to resolution
    artifacts: dict[str, int]  # per-message / batched
    ledger: str  # "verified", "FAILED: ...", or "not checked"
    stage: str
    next_steps: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def assess(
    records: Iterable[LedgerRecord], *, window_s: float, ledger: str = "not checked"
) -> Assessment:
    """The assessment of the decision records of a window of *window_s* seconds;
    *ledger*: what the ledger audit said."""
    assessor = Assessor(window_s)
    for record in records:
        assessor.feed(record)
    return assessor.finish(ledger)


class Assessor:
    """:func:`assess`, record by record (memory grows with the actions, holds and modes
    seen, not with the records)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.decisions = 0
        self._modes: collections.Counter[str] = collections.Counter()
        self._would: collections.Counter[str] = collections.Counter()
        self._by_action_mode: dict[str, set[str]] = collections.defaultdict(set)
        self._reasons: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self._hold_ts: dict[str, float] = {}
        self._resolved_ts: dict[str, float] = {}
        self._artifacts: collections.Counter[str] = collections.Counter()

    def feed(self, r: LedgerRecord) -> None:
        if r.kind != DECISION:
            return
        if r.hold:  # a vote or a hold's resolution: not an intent's decision
            if r.intake.split("/")[1:2] == ["resolution"]:
                self._resolved_ts[r.hold] = r.ts
                if r.artifact:
                    self._artifacts[_kind(r.artifact)] += 1
            return
        self.decisions += 1
        mode = "observe" if r.mode == "observe" else "enforce"
        self._modes[mode] += 1
        if r.action:
            self._by_action_mode[r.action].add(mode)
            self._reasons[r.action][r.reason] += 1
        if r.would_deny:
            self._would[r.action or "?"] += 1
        if r.effect == "hold":
            self._hold_ts[r.decision_id] = r.ts
        if r.effect == "allow" and r.artifact:
            self._artifacts[_kind(r.artifact)] += 1

    def finish(self, ledger: str = "not checked") -> Assessment:
        would, hold_ts, resolved_ts = self._would, self._hold_ts, self._resolved_ts
        uncovered = {
            action: sum(reasons.values())
            for action, reasons in sorted(self._reasons.items())
            if set(reasons) == {"no_matching_rule"}
        }
        observed_only = tuple(
            sorted(
                action
                for action, seen in self._by_action_mode.items()
                if seen == {"observe"} and not would[action] and action not in uncovered
            )
        )
        durations = sorted(
            resolved_ts[h] - ts
            for h, ts in hold_ts.items()
            if h in resolved_ts and resolved_ts[h] >= ts
        )
        resolve_s = {"p50": statistics.median(durations), "max": durations[-1]} if durations else {}
        resolved = sum(1 for h in hold_ts if h in resolved_ts)
        holds_open = len(hold_ts) - resolved
        stage, steps = _next(
            decisions=self.decisions,
            modes=self._modes,
            would=would,
            observed_only=observed_only,
            uncovered=uncovered,
            holds_open=holds_open,
            ledger=ledger,
            window_s=self.window_s,
        )
        return Assessment(
            window_s=self.window_s,
            decisions=self.decisions,
            enforce=self._modes["enforce"],
            observe=self._modes["observe"],
            would_deny=dict(sorted(would.items())),
            observed_only=observed_only,
            uncovered=uncovered,
            holds=len(hold_ts),
            holds_resolved=resolved,
            holds_open=holds_open,
            resolve_s=resolve_s,
            artifacts=dict(sorted(self._artifacts.items())),
            ledger=ledger,
            stage=stage,
            next_steps=steps,
        )


def _kind(artifact: str) -> str:
    return "batched" if artifact.startswith(BATCH_PREFIX) else "per-message"


def _next(
    *,
    decisions: int,
    modes: collections.Counter[str],
    would: collections.Counter[str],
    observed_only: tuple[str, ...],
    uncovered: dict[str, int],
    holds_open: int,
    ledger: str,
    window_s: float,
) -> tuple[str, tuple[str, ...]]:
    """The stage reached and the next concrete steps, most important first."""
    window = duration_text(window_s)
    if decisions == 0:
        return "none", (f"no decision in the last {window}: is a gateway running here?",)
    steps: list[str] = []
    if ledger.startswith("FAILED"):
        steps.append(f"the ledger does not verify ({ledger}): investigate before anything else")
    if uncovered:
        names = ", ".join(sorted(uncovered))
        steps.append(
            f"write rules for {len(uncovered)} action(s) no rule names ({names}): every one "
            f"was denied no_matching_rule in the last {window}"
        )
    if observed_only:
        names = ", ".join(observed_only)
        steps.append(
            f"these {len(observed_only)} action(s) are only observed; 0 would-deny in "
            f"{window}: enforce them ({names})"
        )
    if would:
        worst = ", ".join(f"{a} ({n})" for a, n in would.most_common(3))
        steps.append(
            f"review what observe mode would have denied before enforcing: {worst} "
            "(bus-guard watch --since with --action)"
        )
    if holds_open:
        steps.append(f"{holds_open} hold(s) wait for approvers: bus-guard holds")
    if ledger == "not checked":
        steps.append("verify the ledger (give --jwks): the evidence is only as good as it")
    if modes["observe"] and not modes["enforce"]:
        stage = "observe"
    elif modes["observe"]:
        stage = "partly enforced"
    elif uncovered:
        stage = "enforce (coverage gaps)"
    elif ledger == "verified":
        stage = "enforce, proven"
    else:
        stage = "enforce"
    if not steps:
        steps.append(
            "enforced everywhere, every action covered, the ledger verified: keep "
            "`bus-guard ledger verify` scheduled and watch bus_guard_decisions_total"
        )
    return stage, tuple(steps)
