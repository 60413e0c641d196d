"""Run the benchmark suite: ``python -m bench [--smoke]``. Each program prints JSON."""

from __future__ import annotations

import subprocess
import sys

SUITE = {
    "decide": ["--count", "50000", "--runs", "5"],
    "relay": ["--count", "20000", "--runs", "3"],
}
SMOKE = {"decide": ["--count", "500", "--runs", "1"], "relay": ["--count", "300", "--runs", "1"]}


def main() -> int:
    suite = SMOKE if "--smoke" in sys.argv[1:] else SUITE
    failed = 0
    for name, args in suite.items():
        print(f"# bench.{name} {' '.join(args)}", flush=True)
        failed |= subprocess.call([sys.executable, "-m", f"bench.{name}", *args])
    return failed


if __name__ == "__main__":
    sys.exit(main())
