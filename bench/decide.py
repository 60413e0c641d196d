"""In-process decisions: bus_guard next to Cedar and Rego, on policy families of 10 to
10,000 rules.

Two parts, each run ``--runs`` times (medians reported):

1. The shipped example policies: strict decoding alone (``decode_intent``, the floor any
   decision pays; the baseline), the full ``bus_guard.decide`` (subject parse + strict
   decode + authorize) and ``authorize`` on pre-decoded intents.
2. The generated families of :mod:`bench.rulesets` (``--families``) at each ``--rules``
   size, the same seeded requests for every engine, each given its natural input built
   before timing:

   * ``decide``: bytes to decision (``bus_guard.decide``: subject, strict decoding,
     authorize); ``evaluate``: ``PolicySet.evaluate(Request)`` alone;
   * ``cedar``: ``cedarpy.is_authorized(request, PolicySet, Entities)``, handles reused;
   * ``rego``: ``opa_eval.OpaEval.evaluate_parsed(input JSON)`` (regorus in-process).

   *Cold*: a fresh load, then one pass over a list of requests on at least 50,000
   distinct (principal, action) pairs (``--pairs``); *warm*: requests over a few hundred
   pairs, timed after an untimed pass. Peers have no cache: they are timed on the start
   of the cold list. *Load*: validating and compiling the bundles (from parsed data, as
   after YAML), timed every round; its memory once per size with ``tracemalloc`` (what
   stays allocated with the policy set, and the peak while loading).

   Before anything is timed, every size is checked: bus_guard's effect, reason and rule
   ids against the reference interpreter of the S16 test (``tests/reference.py``), and
   every peer's allow/deny against bus_guard's, on the start of the cold list (2,000
   requests, 200 at 10,000 rules); a disagreement aborts the run. Rounds measure every
   size back to back (sizes measured minutes apart on a shared machine drift by more
   than the growth itself), with the harness's own inputs frozen out of the garbage
   collector's sight (``gc.freeze``). Every time is given twice: from the loop's rate
   (mean) and as single calls' p50; on a shared machine the p50 is the steadier. Cedar
   and Rego are skipped, with a note, when ``cedarpy`` / ``opa-eval`` are not installed
   (``pip install -e '.[bench]'``).

    python -m bench.decide --families all --rules 10,100,1000,10000 --runs 3
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench import rulesets
from bench.common import emit, machine, medians, table, timed_calls
from bus_guard import decide, load_policies
from bus_guard.decision import Request
from bus_guard.intent import Intent, decode_intent, parse_subject
from bus_guard.pipeline import authorize
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


def _mib(n: float) -> float:
    return n / (1 << 20)


def _load_memory(engines: rulesets.Engines) -> dict[str, float]:
    """What a fresh load allocates (tracemalloc): kept once loaded, and at its peak."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        policies = engines.load()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del policies
    return {"kept_mib": _mib(kept - before), "peak_mib": _mib(peak - before)}


@dataclass
class _Inputs:
    """One spec's requests as each engine takes them, built before timing."""

    cold: list[Request]
    cold_bytes: list[tuple[str, bytes]]
    warm: list[Request]
    warm_bytes: list[tuple[str, bytes]]
    cedar: list[dict[str, Any]]
    rego: list[str]
    pairs: int


def _lists(
    spec: rulesets.Spec, cold_pairs: int
) -> tuple[list[rulesets.BenchRequest], list[rulesets.BenchRequest]]:
    return rulesets.request_lists(spec, cold_pairs=cold_pairs, warm_count=min(20_000, cold_pairs))


def _inputs(spec: rulesets.Spec, now: float, cold_pairs: int) -> _Inputs:
    cold, warm = _lists(spec, cold_pairs)
    peers = cold[:4000]  # the peers have no cache: any requests are "cold" to them
    return _Inputs(
        [rulesets.bus_guard_request(r) for r in cold],
        [(r.subject, rulesets.intent_bytes(r, now, i)) for i, r in enumerate(cold)],
        [rulesets.bus_guard_request(r) for r in warm],
        [(r.subject, rulesets.intent_bytes(r, now, i)) for i, r in enumerate(warm)],
        [rulesets.cedar_request(r) for r in peers] if rulesets.HAVE_CEDAR else [],
        [rulesets.rego_input(r) for r in peers] if rulesets.HAVE_REGO else [],
        rulesets.distinct_pairs(cold),
    )


def _check_size(n: int) -> int:
    """Requests checked against the reference and the peers: fewer at large sizes (the
    reference reads every rule for every request; Rego takes ~25 ms at 10,000 rules)."""
    return max(200, min(2000, 2_000_000 // max(n, 1)))


def _measure(
    engines: rulesets.Engines, inputs: _Inputs, now: float, budget_s: float
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One round at one size: a fresh load (timed), cold evaluate and cold decide (each on a
    fresh load, the whole cold list unless *budget_s* x 4 runs out), then warm decide and
    evaluate after an untimed pass, and the peers."""
    out: dict[str, dict[str, float]] = {}
    gc.collect()
    t0 = time.perf_counter()
    policies = engines.load()
    load = {"load_s": time.perf_counter() - t0}
    out["evaluate cold"] = timed_calls(policies.evaluate, inputs.cold, budget_s=budget_s * 4)
    policies = engines.load()

    def decide_one(r: tuple[str, bytes]) -> object:
        return decide(policies, r[0], r[1], now=now)

    out["decide cold"] = timed_calls(decide_one, inputs.cold_bytes, budget_s=budget_s * 4)
    timed_calls(decide_one, inputs.warm_bytes, budget_s=budget_s)  # warm-up
    out["decide warm"] = timed_calls(decide_one, inputs.warm_bytes, budget_s=budget_s)
    out["evaluate warm"] = timed_calls(policies.evaluate, inputs.warm, budget_s=budget_s)
    if engines.cedar is not None:
        cedar, ps, ents = engines.cedar
        out["cedar"] = timed_calls(
            lambda r: cedar.is_authorized(r, ps, ents), inputs.cedar, budget_s=budget_s
        )
    if engines.rego is not None:
        out["rego"] = timed_calls(engines.rego.evaluate_parsed, inputs.rego, budget_s=budget_s)
    return out, load


RATIOS = (
    ("decide cold", "cedar"),
    ("decide cold", "rego"),
    ("decide warm", "cedar"),
    ("decide warm", "rego"),
    ("evaluate cold", "cedar"),
    ("evaluate cold", "rego"),
)


def run_family(
    family: str,
    sizes: list[int],
    runs: int,
    budget_s: float,
    cold_pairs: int = rulesets.COLD_PAIRS,
    tmp: Path | None = None,
) -> dict[str, Any]:
    """Every size of one family: agreement first, then *runs* rounds that measure every
    size back to back (sizes measured minutes apart on a shared machine drift by more
    than the growth itself); medians."""
    now = time.time()
    engines: dict[int, rulesets.Engines] = {}
    inputs: dict[int, _Inputs] = {}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for n in sizes:
            spec = rulesets.FAMILIES[family](n)
            engines[n] = rulesets.Engines(spec, tmp or Path(scratch))
            inputs[n] = _inputs(spec, now, cold_pairs)
            cold, _ = _lists(spec, cold_pairs)
            agreement = engines[n].check(cold[: _check_size(n)])
            out[str(n)] = {
                "rules": engines[n].policies.rule_count,
                "bundles": len(spec.bundles),
                "cold_requests": len(inputs[n].cold),
                "cold_distinct_pairs": inputs[n].pairs,
                "warm_requests": len(inputs[n].warm),
                "agreement": agreement,
                "peer_load_s": {k: v for k, v in engines[n].load_s.items() if k != "bus_guard"},
                "memory": _load_memory(engines[n]),
            }
        results: dict[int, list[dict[str, dict[str, float]]]] = {n: [] for n in sizes}
        loads: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
        # The inputs (hundreds of thousands of requests, every engine's) are the harness's,
        # not a gateway's: out of the collector's sight, or every full collection during a
        # timed loop walks them all and charges whichever engine allocates Python objects.
        gc.collect()
        gc.freeze()
        try:
            for _ in range(runs):
                for n in sizes:
                    measured, load = _measure(engines[n], inputs[n], now, budget_s)
                    results[n].append(measured)
                    loads[n].append(load)
        finally:
            gc.unfreeze()
    smallest = str(sizes[0])
    for n in sizes:
        row = out[str(n)]
        med = {name: medians([r[name] for r in results[n]]) for name in results[n][0]}
        row["median"] = med
        row["load_s"] = statistics.median(x["load_s"] for x in loads[n])
        # Rates (calls in a loop over its duration) and p50s of single calls: on a shared
        # machine, a short call is rarely preempted, so the p50s are the steadier figure.
        row["ratios"] = {
            f"{ours}_vs_{peer}".replace(" ", "_"): med[ours]["per_s"] / med[peer]["per_s"]
            for ours, peer in RATIOS
            if peer in med
        } | {
            f"{ours}_vs_{peer}_p50".replace(" ", "_"): med[peer]["p50_us"] / med[ours]["p50_us"]
            for ours, peer in RATIOS
            if peer in med
        }
    for n in sizes:
        row, first = out[str(n)], out[smallest]["median"]
        row["growth"] = {  # time per decision at n / at the smallest size
            name: first[name]["per_s"] / m["per_s"] for name, m in row["median"].items()
        }
        row["growth_p50"] = {
            name: m["p50_us"] / first[name]["p50_us"] for name, m in row["median"].items()
        }
    return out


def run_families(
    families: list[str], sizes: list[int], runs: int, budget_s: float, cold_pairs: int
) -> dict[str, Any]:
    notes = []
    if not rulesets.HAVE_CEDAR:
        notes.append("cedar skipped: cedarpy not installed (pip install -e '.[bench]')")
    if not rulesets.HAVE_REGO:
        notes.append("rego skipped: opa-eval not installed (pip install -e '.[bench]')")
    by_family = {}
    for family in families:
        by_family[family] = run_family(family, sizes, runs, budget_s, cold_pairs)
    return {"families": by_family, "notes": notes}


def family_rows(by_family: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for family, sizes in by_family.items():
        for n, row in sizes.items():
            med, ratios = row["median"], row["ratios"]

            def us(name: str, med: dict[str, Any] = med) -> str:
                if name not in med:
                    return "-"
                return f"{1e6 / med[name]['per_s']:.2f} / {med[name]['p50_us']:.2f}"

            def x(name: str, ratios: dict[str, float] = ratios) -> str:
                if name not in ratios:
                    return "-"
                return f"{ratios[name]:.1f} / {ratios[name + '_p50']:.1f}"

            rows.append(
                [
                    family,
                    n,
                    us("decide cold"),
                    us("decide warm"),
                    us("evaluate cold"),
                    us("evaluate warm"),
                    us("cedar"),
                    us("rego"),
                    x("decide_cold_vs_cedar"),
                    x("decide_cold_vs_rego"),
                    f"{row['growth']['decide cold']:.2f} / {row['growth_p50']['decide cold']:.2f}",
                    row["load_s"],
                    row["memory"]["kept_mib"],
                    row["memory"]["peak_mib"],
                ]
            )
    return rows


FAMILY_HEADERS = [
    "family",
    "rules",
    "decide cold µs",
    "decide warm µs",
    "evaluate cold µs",
    "evaluate warm µs",
    "cedar µs",
    "rego µs",
    "decide cold x cedar",
    "decide cold x rego",
    "decide cold vs smallest",
    "load s",
    "load MiB kept",
    "load MiB peak",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20000, help="requests per example measurement")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rules", default="10,100,1000,10000", help="rule-set sizes")
    p.add_argument(
        "--families", default="all", help=f"comma-separated, or all: {', '.join(rulesets.FAMILIES)}"
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=rulesets.COLD_PAIRS,
        help="distinct (principal, action) pairs of the cold list",
    )
    p.add_argument("--budget", type=float, default=1.5, help="max seconds per measurement")
    p.add_argument("--no-examples", action="store_true", help="skip the example policies")
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    sizes = [int(x) for x in args.rules.split(",") if x]
    families = list(rulesets.FAMILIES) if args.families == "all" else args.families.split(",")
    examples = None if args.no_examples else run_examples(args.count, args.runs, args.budget)
    generated = run_families(families, sizes, args.runs, args.budget, args.pairs)
    result = {
        "benchmark": "decide",
        "machine": machine(),
        "runs": args.runs,
        "examples": examples,
        "generated": generated,
    }
    text = []
    if examples is not None:
        ex = examples["median"]
        text += [
            f"## decide: example policies ({examples['rules']} rules), medians of {args.runs}",
            table(
                ["variant", "decisions/s", "p50 µs", "p99 µs"],
                [[k, v["per_s"], v["p50_us"], v["p99_us"]] for k, v in ex.items()],
            ),
            f"decide / decode-only: {examples['ratio_decide_vs_decode_only']:.2f}",
            "",
        ]
    text += [
        "## decide: bus_guard vs Cedar vs Rego, generated families (time per decision,"
        f" medians of {args.runs} rounds)",
        table(FAMILY_HEADERS, family_rows(generated["families"])),
        "µs and ratios: from the loop's rate / from single calls' p50. cold: a fresh load,"
        " then one pass over requests on >= 50,000 distinct (principal, action) pairs; warm:"
        " a few hundred pairs, after a pass. load: validate + compile; MiB: tracemalloc,"
        " kept after the load and at its peak.",
        *generated["notes"],
    ]
    emit(result, "\n".join(text), json_only=args.json)


if __name__ == "__main__":
    main()
