"""Latency at fixed offered loads: publish -> relay -> sink, p50 / p99 / p99.9.

First the gateway's maximum sustained rate is measured (as in :mod:`bench.relay`); then
intents are published open-loop at 25 %, 50 % and 80 % of it, through the bare nats-py
relay (the baseline) and through ``bus-guard run --mode core``, at the same absolute
rates, and each message's time from publish to arrival on ``guard.exec.>`` is recorded
(publisher and sink share one clock). The latency bus_guard adds is the difference of
the two at each percentile. ``--seconds`` per load (at most ``--max-count`` intents),
``--runs`` times each (the maximum too): each percentile is the median of the runs.

    python -m bench.latency --seconds 5 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import harness
from bench.common import emit, machine, percentile, table
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key

LOADS = (0.25, 0.50, 0.80)
QUANTILES = (50.0, 99.0, 99.9)


def run(
    url: str,
    key: Path,
    *,
    seconds: float,
    max_count: int,
    count_for_max: int,
    artifacts: str | None = None,
    loads: tuple[float, ...] = LOADS,
    runs: int = 1,
    gateway_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    guard = harness.guard_cmd(url, key, artifacts=artifacts) + list(gateway_args)
    lat: dict[str, dict[float, dict[str, Any]]] = {"bus_guard": {}, "bare": {}}
    with harness.Relay(guard):
        asyncio.run(harness.throughput(url, min(2000, count_for_max)))  # warm-up
        peaks = [asyncio.run(harness.throughput(url, count_for_max))["per_s"] for _ in range(runs)]
        peak = statistics.median(peaks)
        for load in loads:
            lat["bus_guard"][load] = _paced_runs(url, peak * load, seconds, max_count, runs)
    with harness.Relay(harness.bare_cmd(url)):  # same absolute rates
        for load in loads:
            lat["bare"][load] = _paced_runs(url, peak * load, seconds, max_count, runs)
    out: dict[str, Any] = {"max_per_s": peak, "max_runs_per_s": peaks, "runs": runs, "loads": {}}
    for load in loads:
        row: dict[str, Any] = {"rate_per_s": peak * load}
        row.update((name, lat[name][load]) for name in ("bare", "bus_guard"))
        row["added"] = {
            f"p{q:g}_us": row["bus_guard"][f"p{q:g}_us"] - row["bare"][f"p{q:g}_us"]
            for q in QUANTILES
        }
        out["loads"][f"{round(load * 100)}%"] = row
    return out


def _paced_runs(url: str, rate: float, seconds: float, max_count: int, runs: int) -> dict[str, Any]:
    """*runs* paced runs at *rate*: each percentile the median of the runs' (one stall of
    a shared VM otherwise decides a whole p99), every run's figures kept."""
    each = [_paced(url, rate, seconds, max_count) for _ in range(runs)]
    return {
        "count": each[0]["count"],
        "received": min(r["received"] for r in each),  # == count: every run got every one
        "achieved_send_per_s": statistics.median(r["achieved_send_per_s"] for r in each),
        **{k: statistics.median(r[k] for r in each) for k in (f"p{q:g}_us" for q in QUANTILES)},
        "runs": each,
    }


def _paced(url: str, rate: float, seconds: float, max_count: int) -> dict[str, Any]:
    count = max(100, min(max_count, int(rate * seconds)))
    asyncio.run(harness.paced(url, rate, min(count, 300)))  # warm-up at this rate
    res = asyncio.run(harness.paced(url, rate, count))
    return {
        "count": count,
        "received": res["received"],
        "achieved_send_per_s": res["achieved_send_per_s"],
        **{f"p{q:g}_us": percentile(res["lat_us"], q) for q in QUANTILES},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per offered load")
    p.add_argument("--max-count", type=int, default=50000, help="cap on intents per load")
    p.add_argument("--count-for-max", type=int, default=20000, help="intents for the max rate")
    p.add_argument(
        "--artifacts",
        default=None,
        choices=["per-message", "batched"],
        help="pass --artifacts to bus-guard run (default: its default, per-message)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per load (medians reported)")
    p.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for bus-guard run (repeatable), e.g. --gateway-arg=--batch-delay-ms"
        " --gateway-arg=0.5",
    )
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    with NatsServer(jetstream=False) as server, tempfile.TemporaryDirectory() as tmp:
        key, _ = generate_key(Path(tmp))
        res = run(
            server.url,
            key,
            seconds=args.seconds,
            max_count=args.max_count,
            count_for_max=args.count_for_max,
            artifacts=args.artifacts,
            runs=args.runs,
            gateway_args=tuple(args.gateway_arg),
        )
    rows = []
    for load, row in res["loads"].items():
        for name in ("bare", "bus_guard", "added"):
            m = row[name]
            rows.append(
                [load, f"{row['rate_per_s']:,.0f}/s", name]
                + [m[f"p{q:g}_us"] / 1000 for q in QUANTILES]
            )
    text = "\n".join(
        [
            f"## latency: publish -> exec, core mode, artifacts {args.artifacts or 'per-message'};"
            f" max {res['max_per_s']:,.0f}/s; medians of {args.runs} runs per load",
            table(["load", "offered", "relay", "p50 ms", "p99 ms", "p99.9 ms"], rows),
        ]
    )
    emit({"benchmark": "latency", "machine": machine(), **res}, text, json_only=args.json)


if __name__ == "__main__":
    main()
