"""In-process decisions per second for the shipped example policies.

Baseline in the same run: strict decoding alone (``decode_intent``), the floor any
decision pays. Reports the full ``bus_guard.decide`` (subject parse + strict decode +
authorize) and the compiled evaluator alone, with p50/p99 per decision; medians of
``--runs`` runs.

    python -m bench.decide --count 50000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec

from bus_guard import decide, load_policies
from bus_guard.authorize import authorize
from bus_guard.messages import Intent, decode_intent, parse_subject
from bus_guard.state import State

ROOT = Path(__file__).resolve().parent.parent
_enc = msgspec.json.Encoder()


def requests(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
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
        out.append((f"guard.in.{principal}.{action}", _enc.encode(body)))
    return out


def _timed(fn: Callable[[str, bytes], object], reqs: list[tuple[str, bytes]]) -> dict[str, float]:
    lat = []
    clock = time.perf_counter_ns
    start = clock()
    for subject, payload in reqs:
        t0 = clock()
        fn(subject, payload)
        lat.append(clock() - t0)
    total_s = (clock() - start) / 1e9
    lat.sort()
    return {
        "per_s": len(reqs) / total_s,
        "p50_us": lat[len(lat) // 2] / 1e3,
        "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=50000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--policies", type=Path, default=ROOT / "policies")
    args = p.parse_args()
    policies = load_policies(args.policies)
    reqs = requests(args.count)
    now = time.time()
    state = State()
    decoded = [(parse_subject(s, "guard"), decode_intent(b)) for s, b in reqs]
    pre = {payload: d for (_, payload), d in zip(reqs, decoded, strict=True)}

    def policy_only(subject: str, payload: bytes) -> object:
        sub, intent = pre[payload]
        assert sub is not None and isinstance(intent, Intent)
        return authorize(sub, intent, policies, state, now=now)

    variants: dict[str, Callable[[str, bytes], object]] = {
        "decode_only (baseline)": lambda s, b: decode_intent(b),
        "decide (decode+authorize)": lambda s, b: decide(policies, s, b, now=now),
        "authorize (pre-decoded)": policy_only,
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        _timed(fn, reqs[:2000])
    for _ in range(args.runs):
        for name, fn in variants.items():
            runs[name].append(_timed(fn, reqs))
    med = {
        name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
        for name, rs in runs.items()
    }
    print(
        json.dumps(
            {
                "benchmark": "decide",
                "policies": policies.version,
                "rules": policies.rule_count,
                "count": args.count,
                "runs": args.runs,
                "median": med,
                "ratio_decide_vs_decode_only": round(
                    med["decide (decode+authorize)"]["per_s"]
                    / med["decode_only (baseline)"]["per_s"],
                    3,
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
