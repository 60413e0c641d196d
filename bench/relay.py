"""End-to-end throughput: publisher -> relay process -> sink, through a real nats-server.

Runs, in the same process tree and on the same server with the same payloads:
  * ``bare``: a bare nats-py relay (subscribe -> republish, nothing else);
  * ``core``: ``bus-guard run --mode core`` with per-message signed artifacts.
Every intent is allowed by the example policies, so every one is authorized, signed and
forwarded. The publisher keeps at most ``--window`` intents in flight, so the numbers are
sustained rates, not buffer fills. Each variant runs ``--runs`` times, interleaved; the
medians and the ratio are printed as JSON.

    python -m bench.relay --count 20000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgspec
import nats
from nats.aio.msg import Msg

from bus_guard.keys import generate_key
from bus_guard.server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
_enc = msgspec.json.Encoder()


def _payloads(n: int) -> list[bytes]:
    now = time.time()  # the gateway runs with a wide --max-skew so reruns stay fresh
    return [
        _enc.encode(
            {
                "id": uuid.UUID(int=i).hex,
                "action": "tools.search",
                "resource": "tool:search",
                "params": {"q": f"query {i}", "n": i},
                "ts": now,
            }
        )
        for i in range(n)
    ]


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "ready on" in line:
            # Keep draining its output so a chatty process never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    raise RuntimeError(f"relay exited before ready: {cmd}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _drive(url: str, payloads: list[bytes], window: int) -> dict[str, float]:
    nc = await nats.connect(url)
    received = 0
    done = asyncio.Event()
    progress = asyncio.Event()
    n = len(payloads)

    async def sink(msg: Msg) -> None:
        nonlocal received
        received += 1
        progress.set()
        if received >= n:
            done.set()

    await nc.subscribe(
        "guard.exec.>", cb=sink, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
    )
    await nc.flush()
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        while i - received >= window:
            progress.clear()
            await nc.flush()
            await asyncio.wait_for(progress.wait(), 30)
        await nc.publish("guard.in.agent-1.tools.search", payload)
    await nc.flush()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    await nc.drain()
    return {"received": received, "elapsed_s": elapsed, "per_s": received / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=int, default=2000)
    args = p.parse_args()
    payloads = _payloads(args.count)
    results: dict[str, list[float]] = {"bare": [], "core": []}
    with NatsServer(jetstream=False) as server, tempfile.TemporaryDirectory() as tmp:
        key, _ = generate_key(Path(tmp))
        commands = {
            "bare": [sys.executable, "-m", "bench.bare_relay", "--nats", server.url],
            "core": [
                sys.executable,
                "-m",
                "bus_guard",
                "run",
                "--nats",
                server.url,
                "--policies",
                str(ROOT / "policies"),
                "--key",
                str(key),
                "--mode",
                "core",
                "--max-skew",
                "86400",
            ],
        }
        for _ in range(args.runs):
            for name, cmd in commands.items():
                proc = _start(cmd)
                try:
                    run = asyncio.run(_drive(server.url, payloads, args.window))
                finally:
                    _stop(proc)
                if run["received"] != args.count:
                    raise SystemExit(f"{name}: lost {args.count - run['received']} messages")
                results[name].append(run["per_s"])
    medians = {name: statistics.median(v) for name, v in results.items()}
    print(
        json.dumps(
            {
                "benchmark": "relay",
                "count": args.count,
                "runs": args.runs,
                "per_s": {k: [round(x) for x in v] for k, v in results.items()},
                "median_per_s": {k: round(v) for k, v in medians.items()},
                "ratio_core_vs_bare": round(medians["core"] / medians["bare"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
