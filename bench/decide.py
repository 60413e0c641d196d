"""In-process decisions per second: bus_guard next to Cedar and Rego, 10 to 10,000 rules.

Two parts, each run ``--runs`` times (medians reported):

1. The shipped example policies: strict decoding alone (``decode_intent``, the floor any
   decision pays; the baseline), the full ``bus_guard.decide`` (subject parse + strict
   decode + authorize) and ``authorize`` on pre-decoded intents.
2. Equivalent generated rule sets (:mod:`bench.rulesets`) at each ``--rules`` size, the
   same seeded requests for every engine, each engine given its natural input built
   before timing:

   * ``bus_guard``: the compiled evaluator, ``PolicySet.evaluate(Request)``;
   * ``bus_guard decide``: bytes to decision (``bus_guard.decide``), decoding included;
   * ``cedar``: ``cedarpy.is_authorized(request, PolicySet, Entities)``, handles reused;
   * ``rego``: ``opa_eval.OpaEval.evaluate_parsed(input JSON)`` (regorus in-process).

   Loading and compiling are not timed (reported separately). Before timing, every
   engine's decision on every request is compared; a disagreement aborts the run.
   Cedar and Rego are skipped, with a note, when ``cedarpy`` / ``opa-eval`` are not
   installed (``pip install -e '.[bench]'``).

   The evaluator's growth with the rule count ("time vs smallest" on its rows) comes from
   extra rounds that time every size back to back in bare loops (the best round of each
   size, as ``timeit`` takes): sizes measured minutes apart on a shared machine drift by
   more than the growth itself.

    python -m bench.decide --rules 10,100,1000,10000 --runs 3
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench import rulesets
from bench.common import emit, machine, medians, table, timed_calls
from bus_guard import decide, load_policies
from bus_guard.decision import Request
from bus_guard.intent import Intent, decode_intent, parse_subject
from bus_guard.pipeline import authorize
from bus_guard.policy._evaluator import PolicySet
from bus_guard.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent
_enc = msgspec.json.Encoder()
_SUBJECTS = Subjects()


def example_requests(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """A seeded mix over every rule of the examples: allows, denies, holds, no-match."""
    rng = random.Random(seed)
    now = time.time()
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            principal, action, resource = (
                rng.choice(["agent-7", "agent-9", "agent-2"]),
                "payments.transfer",
                rng.choice(["account:acct-1", "account:sanctioned-9"]),
            )
            params: dict[str, object] = {
                "amount": rng.choice([10, 999, 1500]),
                "currency": rng.choice(["USD", "EUR", "GBP"]),
                "to": "account:acct-2",
            }
        elif kind < 0.75:
            principal, action, resource = "agent-3", "tools.http.get", "tool:http"
            params = {"url": rng.choice(["https://api.example.com/v1", "http://evil/"])}
        else:
            principal = f"agent-{rng.randint(1, 9)}"
            action = rng.choice(["tools.search", "tools.shell"])
            resource, params = "tool:x", {"q": "z"}
        body = {
            "id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "action": action,
            "resource": resource,
            "params": params,
            "ts": now,
        }
        out.append((_SUBJECTS.intent(principal, action), _enc.encode(body)))
    return out


def run_examples(count: int, runs: int, budget_s: float) -> dict[str, Any]:
    policies = load_policies(ROOT / "policies")
    reqs = example_requests(count)
    now = time.time()
    pre = []
    for subject, payload in reqs:
        sub, intent = parse_subject(subject, _SUBJECTS.prefix), decode_intent(payload)
        assert sub is not None and isinstance(intent, Intent)
        pre.append((sub, intent))
    variants: dict[str, tuple[Callable[[Any], object], list[Any]]] = {
        "decode_only (baseline)": (lambda r: decode_intent(r[1]), reqs),
        "decide (decode+authorize)": (lambda r: decide(policies, r[0], r[1], now=now), reqs),
        "authorize (pre-decoded)": (lambda r: authorize(r[0], r[1], policies, now=now), pre),
    }
    for fn, items in variants.values():  # warm-up
        timed_calls(fn, items[:2000])
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, (fn, items) in variants.items():
            results[name].append(timed_calls(fn, items, budget_s=budget_s))
    med = {name: medians(r) for name, r in results.items()}
    return {
        "policies": policies.version,
        "rules": policies.rule_count,
        "median": med,
        "ratio_decide_vs_decode_only": med["decide (decode+authorize)"]["per_s"]
        / med["decode_only (baseline)"]["per_s"],
    }


def _variants(
    engines: rulesets.Engines, reqs: list[rulesets.BenchRequest], now: float
) -> dict[str, tuple[Callable[[Any], object], list[Any]]]:
    """Each engine's call and its inputs, built before timing."""
    evaluate = engines.policies.evaluate
    policies = engines.policies
    variants: dict[str, tuple[Callable[[Any], object], list[Any]]] = {
        "bus_guard": (
            lambda r: evaluate(r),
            [rulesets.bus_guard_request(r) for r in reqs],
        ),
        "bus_guard decide": (
            lambda r: decide(policies, r[0], r[1], now=now),
            [(r.subject, rulesets.intent_bytes(r, now, i)) for i, r in enumerate(reqs)],
        ),
    }
    if engines.cedar is not None:
        cedarpy, ps, ents = engines.cedar
        variants["cedar"] = (
            lambda r: cedarpy.is_authorized(r, ps, ents),
            [rulesets.cedar_request(r) for r in reqs],
        )
    if engines.rego is not None:
        variants["rego"] = (engines.rego.evaluate_parsed, [rulesets.rego_input(r) for r in reqs])
    return variants


GROWTH_ROUNDS = 9


def _loop_rate(policies: PolicySet, requests: list[Request]) -> float:
    """Evaluations per second in a bare loop: no per-call clock, no wrapper."""
    evaluate = policies.evaluate
    start = time.perf_counter()
    for request in requests:
        evaluate(request)
    return len(requests) / (time.perf_counter() - start)


def run_engines(sizes: list[int], count: int, runs: int, budget_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    notes = []
    now = time.time()
    evaluators: dict[int, tuple[PolicySet, list[Request]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            engines = rulesets.Engines(n, Path(tmp))
            reqs = rulesets.requests(n, count)
            agreement = engines.check_agreement(reqs[: min(len(reqs), 2000)])
            variants = _variants(engines, reqs, now)
            evaluators[n] = (engines.policies, variants["bus_guard"][1])
            for fn, items in variants.values():  # warm-up
                timed_calls(fn, items[:500], budget_s=budget_s / 4)
            results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
            for _ in range(runs):
                for name, (fn, items) in variants.items():
                    results[name].append(timed_calls(fn, items, budget_s=budget_s))
            out[str(n)] = {
                "rules": engines.policies.rule_count,
                "load_s": engines.load_s,
                "agreement": agreement,
                "median": {name: medians(r) for name, r in results.items()},
            }
    # The evaluator's growth with the rule count, from rounds that time every size back to
    # back: sizes measured minutes apart on a shared machine drift by more than the growth.
    # Best of the rounds for each size, as timeit does: noise here only ever slows a loop.
    rounds = [
        {n: _loop_rate(policies, items) for n, (policies, items) in evaluators.items()}
        for _ in range(GROWTH_ROUNDS)
    ]
    best = {n: max(r[n] for r in rounds) for n in evaluators}
    smallest = sizes[0] if sizes else 0
    growth = {str(n): best[smallest] / best[n] for n in evaluators}
    if not rulesets.HAVE_CEDAR:
        notes.append("cedar skipped: cedarpy not installed (pip install -e '.[bench]')")
    if not rulesets.HAVE_REGO:
        notes.append("rego skipped: opa-eval not installed (pip install -e '.[bench]')")
    return {"by_rules": out, "growth_interleaved": growth, "notes": notes}


def summarize(engines: dict[str, Any]) -> tuple[dict[str, Any], list[list[object]]]:
    by = engines["by_rules"]
    sizes = list(by)
    ratios: dict[str, Any] = {}
    rows: list[list[object]] = []
    first = by[sizes[0]]["median"]
    for n in sizes:
        med = by[n]["median"]
        ours = med["bus_guard"]["per_s"]
        r: dict[str, float] = {}
        for peer in ("cedar", "rego"):
            if peer in med:
                r[f"bus_guard_vs_{peer}"] = ours / med[peer]["per_s"]
                r[f"decide_vs_{peer}"] = med["bus_guard decide"]["per_s"] / med[peer]["per_s"]
        # growth: time per decision at n rules / at the smallest size; for the evaluator,
        # from the interleaved rounds when present
        for name in med:
            r[f"growth_{name.replace(' ', '_')}"] = first[name]["per_s"] / med[name]["per_s"]
        if n in engines.get("growth_interleaved", {}):
            r["growth_bus_guard"] = engines["growth_interleaved"][n]
        ratios[n] = r
        for name, m in med.items():
            vs_cedar = (
                ours / med["cedar"]["per_s"] if name == "bus_guard" and "cedar" in med else ""
            )
            vs_rego = ours / med["rego"]["per_s"] if name == "bus_guard" and "rego" in med else ""
            rows.append(
                [
                    n,
                    name,
                    m["per_s"],
                    m["p50_us"],
                    m["p99_us"],
                    r[f"growth_{name.replace(' ', '_')}"],
                    f"{vs_cedar:.1f}x" if vs_cedar else "",
                    f"{vs_rego:.1f}x" if vs_rego else "",
                ]
            )
    return ratios, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20000, help="requests per measurement")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rules", default="10,100,1000,10000", help="rule-set sizes")
    p.add_argument("--budget", type=float, default=2.0, help="max seconds per measurement")
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    sizes = [int(x) for x in args.rules.split(",") if x]
    examples = run_examples(args.count, args.runs, args.budget)
    engines = run_engines(sizes, args.count, args.runs, args.budget)
    ratios, rows = summarize(engines)
    result = {
        "benchmark": "decide",
        "machine": machine(),
        "count": args.count,
        "runs": args.runs,
        "examples": examples,
        "engines": engines,
        "ratios": ratios,
    }
    ex = examples["median"]
    text = "\n".join(
        [
            f"## decide: example policies ({examples['rules']} rules), medians of {args.runs}",
            table(
                ["variant", "decisions/s", "p50 µs", "p99 µs"],
                [[k, v["per_s"], v["p50_us"], v["p99_us"]] for k, v in ex.items()],
            ),
            f"decide / decode-only: {examples['ratio_decide_vs_decode_only']:.2f}",
            "",
            "## decide: bus_guard vs Cedar vs Rego, equivalent generated rules",
            table(
                [
                    "rules",
                    "engine",
                    "decisions/s",
                    "p50 µs",
                    "p99 µs",
                    "time vs smallest",
                    "bus_guard xcedar",
                    "bus_guard xrego",
                ],
                rows,
            ),
            "bus_guard rows: time vs smallest from the best of"
            f" {GROWTH_ROUNDS} interleaved rounds of bare evaluation loops",
            *engines["notes"],
        ]
    )
    emit(result, text, json_only=args.json)


if __name__ == "__main__":
    main()
