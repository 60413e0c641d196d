"""Run the benchmark suite: ``python -m bench [--smoke] [--only NAME,...]``.

Each program prints a readable table and then its JSON document; every one measures its
baseline in the same run. The full suite takes over an hour on a 2-core machine (the
decide run, seven policy families at four sizes against Cedar and Rego, about 40 minutes;
the memory run drives 1,000,000 intents); ``--smoke`` runs each with tiny counts.
"""

from __future__ import annotations

import subprocess
import sys

SUITE = {
    "decide": [
        "--count",
        "20000",
        "--runs",
        "3",
        "--rules",
        "10,100,1000,10000",
        "--families",
        "all",
    ],
    "verify": ["--count", "20000", "--runs", "5"],
    "relay": ["--count", "20000", "--runs", "3", "--scale", "--prototype"],
    "stream_relay": ["--count", "20000", "--runs", "3", "--scale"],
    "latency": ["--seconds", "5", "--runs", "3"],
    "latency:batched": ["--seconds", "5", "--runs", "3", "--artifacts", "batched"],
    "memory": ["--count", "1000000"],
    "flood": ["--seconds", "10", "--runs", "3"],
}
SMOKE = {
    "decide": [
        *("--count", "200", "--runs", "1", "--rules", "10,100", "--budget", "0.2"),
        *("--pairs", "300"),
    ],
    "verify": ["--count", "300", "--runs", "1", "--batch", "16"],
    "relay": ["--count", "300", "--runs", "1", "--window", "100", "--scale"],
    "stream_relay": ["--count", "200", "--runs", "1", "--scale"],
    "latency": ["--seconds", "0.2", "--count-for-max", "300", "--max-count", "300", "--runs", "1"],
    "latency:batched": [
        *("--seconds", "0.2", "--count-for-max", "300", "--max-count", "300", "--runs", "1"),
        *("--artifacts", "batched"),
    ],
    "memory": ["--count", "300", "--samples", "3"],
    "flood": ["--seconds", "0.5", "--runs", "1", "--others-rate", "40", "--limit", "5"],
}


def main() -> int:
    argv = sys.argv[1:]
    suite = SMOKE if "--smoke" in argv else SUITE
    only = next((a.split("=", 1)[1] for a in argv if a.startswith("--only=")), None)
    names = [n for n in suite if only is None or n in only.split(",")]
    failed = 0
    for name in names:
        args, module = suite[name], name.partition(":")[0]  # "latency:batched": bench.latency
        print(f"# python -m bench.{module} {' '.join(args)}", flush=True)
        code = subprocess.call([sys.executable, "-m", f"bench.{module}", *args])
        if code:
            print(f"# bench.{module} failed with exit code {code}", flush=True)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
