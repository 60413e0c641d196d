"""End-to-end throughput: publisher -> relay process -> sink, through a real nats-server.

Runs, on the same server with the same intents, interleaved, ``--runs`` times each:

* ``bare``: a bare nats-py relay (subscribe -> republish, nothing else): the baseline;
* ``core``: ``bus-guard run --mode core`` with per-message signed artifacts;
* ``core-batched``: the same with ``--artifacts batched`` (one signature per Merkle tree),
  skipped with a note while ``bus-guard run`` has no ``--artifacts`` option;
* with ``--scale``: ``core`` with two gateway processes in the same queue group;
* with ``--prototype``: ``prototype-batched``, the bench-only stand-in for batched core
  intake (:mod:`bench.batched_prototype`): what the design reaches before the gateway
  wiring exists; not the product path.

Every intent is allowed by the example policies, so every one is authorized, signed and
forwarded. The publisher keeps at most ``--window`` intents in flight, so the numbers are
sustained rates, not buffer fills. Medians and ratios to ``bare`` are printed, and each
variant's CPU time per intent (user + system of its relay processes over the measured run,
from ``/proc``): on a machine where relay, nats-server and the load driver share few cores,
the rate says who got the CPU, the CPU per intent what relaying one intent costs.

    python -m bench.relay --count 20000 --runs 3 --scale
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import harness
from bench.common import emit, machine, table
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key


def variants(
    url: str, key: Path, *, batched: bool, scale: bool, prototype: bool = False
) -> dict[str, list[list[str]]]:
    """name -> the command of each relay process of that variant."""
    out = {
        "bare": [harness.bare_cmd(url)],
        "core": [harness.guard_cmd(url, key)],
    }
    if batched:
        out["core-batched"] = [harness.guard_cmd(url, key, artifacts="batched")]
    if prototype:
        out["prototype-batched"] = [harness.prototype_cmd(url, key)]
    if scale:
        out["core x2"] = [harness.guard_cmd(url, key, gateway_id=f"gw{i}") for i in (1, 2)]
    return out


def measure(url: str, cmds: list[list[str]], count: int, window: int) -> tuple[float, float]:
    """(intents per second, relay CPU µs per intent: every relay process of the variant)."""
    with ExitStack() as stack:
        relays = [stack.enter_context(harness.Relay(cmd)) for cmd in cmds]
        asyncio.run(harness.throughput(url, min(2000, count), window=window))  # warm-up
        before = [r.cpu_s() for r in relays]
        run = asyncio.run(harness.throughput(url, count, window=window))
        after = [r.cpu_s() for r in relays]
    if run["received"] != count:
        raise SystemExit(f"{cmds[0][2]}: lost {count - run['received']} of {count} messages")
    cpu = sum((a or 0.0) - (b or 0.0) for a, b in zip(after, before, strict=True))
    return run["per_s"], cpu / count * 1e6


def run(
    url: str,
    key: Path,
    count: int,
    runs: int,
    window: int,
    *,
    scale: bool,
    want_batched: bool,
    prototype: bool = False,
) -> dict[str, Any]:
    notes = []
    batched = want_batched and harness.supports_artifacts_flag()
    if want_batched and not batched:
        notes.append(
            "core-batched skipped: `bus-guard run --artifacts` is not available yet "
            "(bus_guard.signing._batch.BatchSigner is; the gateway does not call it yet)"
        )
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    plan = variants(url, key, batched=batched, scale=scale, prototype=prototype)
    for _ in range(runs):
        for name, cmds in plan.items():
            rate, cpu_us = measure(url, cmds, count, window)
            results.setdefault(name, []).append(rate)
            cpu.setdefault(name, []).append(cpu_us)
    med = {k: statistics.median(v) for k, v in results.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    ratios = {f"{k}_vs_bare": v / med["bare"] for k, v in med.items() if k != "bare"}
    if "core x2" in med:
        ratios["core_x2_vs_core"] = med["core x2"] / med["core"]
    if cpu_med["bare"] > 0:  # /proc available: the cost ratio, free of CPU sharing
        ratios.update(
            (f"{k}_cpu_vs_bare", v / cpu_med["bare"]) for k, v in cpu_med.items() if k != "bare"
        )
    return {
        "per_s": results,
        "median_per_s": med,
        "cpu_us_per_intent": cpu,
        "median_cpu_us_per_intent": cpu_med,
        "ratios": ratios,
        "notes": notes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=int, default=2000, help="max intents in flight")
    p.add_argument("--scale", action="store_true", help="also two gateways in one queue group")
    p.add_argument("--no-batched", action="store_true", help="skip the batched variant")
    p.add_argument("--prototype", action="store_true", help="also the bench-only batched stand-in")
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    with NatsServer(jetstream=False) as server, tempfile.TemporaryDirectory() as tmp:
        key, _ = generate_key(Path(tmp))
        res = run(
            server.url,
            key,
            args.count,
            args.runs,
            args.window,
            scale=args.scale,
            want_batched=not args.no_batched,
            prototype=args.prototype,
        )
    med = res["median_per_s"]
    cpu = res["median_cpu_us_per_intent"]
    rows = [
        [
            name,
            v,
            ", ".join(f"{x:,.0f}" for x in res["per_s"][name]),
            "baseline" if name == "bare" else f"{v / med['bare']:.2f}",
            cpu[name],
            "baseline" if name == "bare" else f"{cpu[name] / cpu['bare']:.2f}x",
        ]
        for name, v in med.items()
    ]
    text = "\n".join(
        [
            f"## relay: intents/s end to end (core NATS), {args.count} intents,"
            f" medians of {args.runs}",
            table(
                ["variant", "median/s", "runs", "vs bare", "relay CPU µs/intent", "CPU vs bare"],
                rows,
            ),
            *(
                ["two gateways vs one: " + f"{res['ratios']['core_x2_vs_core']:.2f}"]
                if "core x2" in med
                else []
            ),
            *res["notes"],
        ]
    )
    emit(
        {"benchmark": "relay", "machine": machine(), "count": args.count, "runs": args.runs, **res},
        text,
        json_only=args.json,
    )


if __name__ == "__main__":
    main()
