"""This checkout against another revision: core-mode relaying, paired, on one server.

Both gateways (``bus-guard run --mode core``, per-message artifacts unless ``--artifacts``)
relay the same allowed intents through the same nats-server with the same policies (by
default the *other* tree's ``policies/``, so that both do the same policy work). The runs
are interleaved and their order alternates (A B, B A, ...), so that the drift of a shared
machine falls on both alike; what is reported is the median of the *paired* differences
(this minus other, run by run) besides each side's median. A paired median near zero, or in
this tree's favour, is what "at least as fast" means on a noisy machine.

The other tree needs its own virtual environment with bus_guard installed (editable), e.g.::

    git worktree add /tmp/base e35243e && make -C /tmp/base dev
    python -m bench.versus --other /tmp/base --runs 9 --count 30000
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import relay
from bench.common import emit, machine, table
from bus_guard.server import NatsServer
from bus_guard.signing import generate_key

ROOT = Path(__file__).resolve().parent.parent


def _cmd(
    tree: Path, python: Path, url: str, key: Path, policies: Path, artifacts: str
) -> list[str]:
    argv = [
        str(python),
        "-m",
        "bus_guard",
        "--log-level",
        "info",
        "run",
        "--nats",
        url,
        "--policies",
        str(policies),
        "--key",
        str(key),
        "--mode",
        "core",
        "--max-skew",
        "86400",
        "--gateway-id",
        "gw",
    ]
    if artifacts != "per-message":
        argv += ["--artifacts", artifacts]
    # Run from the tree itself, so that `-m bus_guard` imports that tree's package.
    return ["/bin/sh", "-c", f"cd {shlex.quote(str(tree))} && exec {shlex.join(argv)}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other checkout (with .venv)")
    p.add_argument("--policies", type=Path, default=None, help="default: OTHER/policies")
    p.add_argument("--count", type=int, default=30000)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--window", type=int, default=2000, help="max intents in flight")
    p.add_argument("--artifacts", default="per-message", choices=["per-message", "batched"])
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    other = args.other.resolve()
    policies = (args.policies or other / "policies").resolve()
    sides = {
        "this": (ROOT, Path(sys.executable)),
        "other": (other, other / ".venv" / "bin" / "python"),
    }
    runs: dict[str, list[tuple[float, float]]] = {"this": [], "other": []}
    with NatsServer(jetstream=False) as server, tempfile.TemporaryDirectory() as tmp:
        key, _ = generate_key(Path(tmp))
        for i in range(args.runs):
            order = ["this", "other"] if i % 2 == 0 else ["other", "this"]
            for name in order:
                tree, python = sides[name]
                cmd = _cmd(tree, python, server.url, key, policies, args.artifacts)
                runs[name].append(relay.measure(server.url, [cmd], args.count, args.window))
    rate = {k: [r for r, _ in v] for k, v in runs.items()}
    cpu = {k: [c for _, c in v] for k, v in runs.items()}
    res: dict[str, Any] = {
        "benchmark": "versus",
        "machine": machine(),
        "other": str(other),
        "policies": str(policies),
        "artifacts": args.artifacts,
        "count": args.count,
        "runs": args.runs,
        "per_s": rate,
        "cpu_us_per_intent": cpu,
        "median_per_s": {k: statistics.median(v) for k, v in rate.items()},
        "median_cpu_us_per_intent": {k: statistics.median(v) for k, v in cpu.items()},
        "paired_median_per_s_diff": statistics.median(
            a - b for a, b in zip(rate["this"], rate["other"], strict=True)
        ),
        "paired_median_cpu_us_diff": statistics.median(
            a - b for a, b in zip(cpu["this"], cpu["other"], strict=True)
        ),
    }
    rows = [
        [name, res["median_per_s"][name], res["median_cpu_us_per_intent"][name]]
        for name in ("this", "other")
    ]
    text = "\n".join(
        [
            f"## versus {other}: core mode, {args.artifacts} artifacts, {args.count} intents, "
            f"{args.runs} paired runs",
            table(["tree", "median/s", "relay CPU µs/intent"], rows),
            f"paired median difference (this - other): {res['paired_median_per_s_diff']:+,.0f}/s, "
            f"{res['paired_median_cpu_us_diff']:+.1f} µs CPU per intent",
        ]
    )
    emit(res, text, json_only=args.json)


if __name__ == "__main__":
    main()
