"""What every benchmark program shares: timing, medians, percentiles, JSON + a table."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def timed_calls(
    fn: Callable[[Any], object], items: Sequence[Any], *, budget_s: float = float("inf")
) -> dict[str, float]:
    """Call ``fn(item)`` for each item (or until *budget_s* ran out); rate and latency.

    The rate is over the whole loop; p50/p99 are per call, clock overhead included
    (~0.1 µs), the same for every engine measured this way.
    """
    clock = time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    deadline = clock() + budget_s * 1e9 if budget_s != float("inf") else None
    start = clock()
    for item in items:
        t0 = clock()
        fn(item)
        t1 = clock()
        append(t1 - t0)
        if deadline is not None and t1 > deadline:
            break
    total_s = (clock() - start) / 1e9
    lat.sort()
    return {
        "n": len(lat),
        "per_s": len(lat) / total_s,
        "p50_us": percentile(lat, 50) / 1e3,
        "p99_us": percentile(lat, 99) / 1e3,
    }


def medians(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-key median of several runs' results."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def machine() -> dict[str, Any]:
    """Where the figures came from."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


def rss_kib(pid: int) -> int:
    """Resident set size of a process (Linux /proc), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def emit(result: Mapping[str, Any], text: str, *, json_only: bool = False) -> None:
    """Print the readable table (unless *json_only*), then the JSON document."""
    if not json_only:
        print(text, flush=True)
        print(flush=True)
    print(json.dumps(result, indent=2), flush=True)
