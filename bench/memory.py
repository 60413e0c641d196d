"""Gateway memory over many intents: RSS must stay flat, not grow with the count.

Starts ``bus-guard run --mode core``, drives ``--count`` intents through it (at most
``--window`` in flight, as :mod:`bench.relay`), and samples the gateway's resident set
size (``/proc/<pid>/status``) at ``--samples`` evenly spaced points. Reported: RSS after
warm-up (the first sample), the last, the peak, and the growth from the first to the last
sample per 100,000 intents. The baseline is the bare nats-py relay over the same intents.

    python -m bench.memory --count 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from bench import harness
from bench.common import emit, machine, rss_kib, table
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key


def track(url: str, cmd: list[str], count: int, samples: int, window: int) -> dict[str, Any]:
    with harness.Relay(cmd) as relay:
        every = max(1, count // samples)
        points: list[tuple[int, int]] = [(0, rss_kib(relay.pid))]

        def sample(received: int) -> None:
            points.append((received, rss_kib(relay.pid)))

        run = asyncio.run(
            harness.throughput(
                url, count, window=window, on_progress=sample, progress_every=every, timeout_s=600
            )
        )
    first = points[1] if len(points) > 2 else points[0]
    last = points[-1]
    span = max(1, last[0] - first[0])
    return {
        "received": run["received"],
        "per_s": run["per_s"],
        "rss_kib": points,
        "rss_start_kib": points[0][1],
        "rss_first_sample_kib": first[1],
        "rss_last_kib": last[1],
        "rss_peak_kib": max(kib for _, kib in points),
        "growth_kib_per_100k": (last[1] - first[1]) * 100_000 / span,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    out: dict[str, Any] = {}
    with NatsServer(jetstream=False) as server, tempfile.TemporaryDirectory() as tmp:
        key, _ = generate_key(Path(tmp))
        for name, cmd in (
            ("bare", harness.bare_cmd(server.url)),
            ("bus_guard", harness.guard_cmd(server.url, key)),
        ):
            out[name] = track(server.url, cmd, args.count, args.samples, args.window)
    rows = [
        [
            name,
            r["received"],
            r["rss_first_sample_kib"] / 1024,
            r["rss_last_kib"] / 1024,
            r["rss_peak_kib"] / 1024,
            r["growth_kib_per_100k"],
        ]
        for name, r in out.items()
    ]
    text = "\n".join(
        [
            f"## memory: relay RSS over {args.count:,} intents ({args.samples} samples)",
            table(
                ["relay", "intents", "RSS first MiB", "RSS last MiB", "peak MiB", "KiB/100k"],
                rows,
            ),
        ]
    )
    emit(
        {"benchmark": "memory", "machine": machine(), "count": args.count, **out},
        text,
        json_only=args.json,
    )


if __name__ == "__main__":
    main()
