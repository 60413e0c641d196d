"""SCENARIOS S13: one principal floods at 20x its rate limit; do the others notice?

A gateway (``bus-guard run``, stream mode by default) runs a bench bundle: four
principals (``agent-1`` .. ``agent-4``) may call ``tools.search`` without limit, and
``flooder`` may call it ``--limit`` times per second. Each run has two phases of
``--seconds`` each, at the same offered load from the four others (``--others-rate``
intents per second in all, open loop):

* **unloaded**: the others alone;
* **flood**: the others, and ``flooder`` publishing ``--factor`` (20) times its limit.

For the others, each intent's time from publish to its arrival on ``guard.exec.>`` is
measured (publisher and sink share one clock) and what never arrives is counted as lost;
for the gateway, its resident memory at the start and the end of the flood; for the
flooder, how many intents were allowed in each one-second window (at most ``--limit``).
The baseline is the unloaded phase of the same run: the result is the ratio of the
others' p99 with the flood on to their p99 without it (S13: at most 2), the median over
``--runs`` runs, and the worst run.

    python -m bench.flood --seconds 5 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench import harness
from bench.common import emit, machine, percentile, table
from bus_guard.ledger._records import decode_record
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key

OTHERS = ("agent-1", "agent-2", "agent-3", "agent-4")
FLOODER = "flooder"
_BUNDLE = """\
bundle: flood-bench
version: "1"
mode: enforce
rules:
  - id: others-search
    effect: allow
    principals: [agent-1, agent-2, agent-3, agent-4]
    actions: [tools.search]
  - id: flooder-search
    effect: allow
    principals: [flooder]
    actions: [tools.search]
    limits:
      - {{count: {limit}, window: 1s}}
"""
_TEMPLATE = (
    b'{"id":"%032x","action":"tools.search","resource":"tool:search",'
    b'"params":{"q":"query %d"},"ts":%.3f}'
)
_ID = slice(7, 39)


def bundle(limit: int) -> str:
    """The bench bundle: the others unlimited, the flooder *limit* a second."""
    return _BUNDLE.format(limit=limit)


def max_in_window(times: list[float], window_s: float) -> int:
    """The most of *times* inside any half-open window of *window_s* (a sliding window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _publish_at(
    nc: Client, rate: float, seconds: float, each: Any, clock: Any = time.perf_counter
) -> None:
    """Publish ``int(rate * seconds)`` intents, open loop: *each(i)* gives subject, payload."""
    n = int(rate * seconds)
    start, i = clock(), 0
    while i < n:
        due = min(n, int((clock() - start) * rate) + 1)
        while i < due:
            subject, payload = each(i)
            await nc.publish(subject, payload)
            i += 1
        await asyncio.sleep(0.0005)
    await nc.flush()


async def _flooder(url: str, *, rate: float, seconds: float, base: int) -> dict[str, Any]:
    """The flooder, in a process of its own as a real one would be: publishes, then counts
    what came of it (allowed, denied, and when each allow spent its limit)."""
    nc = await nats.connect(url)
    allowed: list[float] = []
    spent: list[float] = []
    denied = 0
    n = int(rate * seconds)
    done = asyncio.Event()

    def check() -> None:
        if len(allowed) + denied >= n:
            done.set()

    async def on_exec(msg: Msg) -> None:
        allowed.append(time.time())
        check()

    async def on_deny(msg: Msg) -> None:
        nonlocal denied
        denied += 1
        check()

    async def on_record(msg: Msg) -> None:  # stream mode: when each allow spent its limit
        record = decode_record(msg.data)
        if record.principal == FLOODER and record.effect == "allow" and record.limits:
            spent.append(record.limits[0].at)

    await nc.subscribe(f"guard.exec.{FLOODER}.>", cb=on_exec, pending_msgs_limit=-1)
    await nc.subscribe(f"guard.deny.{FLOODER}.>", cb=on_deny, pending_msgs_limit=-1)
    await nc.subscribe("guard.ledger.*.d.*", cb=on_record, pending_msgs_limit=-1)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
    ts = time.time()
    subject = f"guard.in.{FLOODER}.tools.search"
    await _publish_at(nc, rate, seconds, lambda i: (subject, _TEMPLATE % (base + i, base + i, ts)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 30.0)
    await nc.drain()
    return {
        "flood_sent": n,
        "flood_allowed": len(allowed),
        "flood_denied": denied,
        # in any one-second window, by the time each allow spent its limit (stream mode:
        # from the ledger records; core mode keeps none: by arrival on exec, approximate)
        "flood_allowed_max_per_1s_window": max_in_window(spent or allowed, 1.0),
    }


async def _phase(
    url: str, *, seconds: float, others_rate: float, flood_rate: float, base: int, pid: int
) -> dict[str, Any]:
    """One phase: the others at *others_rate*, from this process, and the flooder at
    *flood_rate* (if > 0) from a process of its own (sharing this process's event loop
    or connection would make the others wait behind the flood in the bench, not in the
    gateway)."""
    flooder = None
    if flood_rate > 0:
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.flood",
            "--flooder",
            url,
            "--rate",
            str(flood_rate),
            "--seconds",
            str(seconds),
            "--base",
            str(base + 10_000_000),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert flooder.stdout is not None and flooder.stdin is not None
        if (await flooder.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the flooder process did not start")
    pub = await nats.connect(url)
    sink_nc = await nats.connect(url)
    clock = time.perf_counter
    sent: dict[int, float] = {}
    lat: list[float] = []
    all_in = asyncio.Event()
    published_all = False

    async def on_exec(msg: Msg) -> None:
        t = sent.pop(int(msg.data[_ID], 16), None)
        if t is not None:
            lat.append(clock() - t)
            if not sent and published_all:
                all_in.set()

    for principal in OTHERS:
        await sink_nc.subscribe(f"guard.exec.{principal}.>", cb=on_exec, pending_msgs_limit=-1)
    await sink_nc.flush()
    ts = time.time()
    rss_start = _rss_kib(pid)
    rss_mid = 0

    async def sample_mid() -> None:
        nonlocal rss_mid
        await asyncio.sleep(seconds / 2)
        rss_mid = _rss_kib(pid)

    def other(i: int) -> tuple[str, bytes]:
        k = base + i
        sent[k] = clock()
        return f"guard.in.{OTHERS[i % len(OTHERS)]}.tools.search", _TEMPLATE % (k, k, ts)

    if flooder is not None:
        assert flooder.stdin is not None
        flooder.stdin.write(b"go\n")
        await flooder.stdin.drain()
    mid = asyncio.create_task(sample_mid())
    await _publish_at(pub, others_rate, seconds, other, clock)
    published_all = True
    if sent:  # the others' intents still on their way: until the last arrives (or 30 s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 30.0)
    await mid
    flood: dict[str, Any] = {
        "flood_sent": 0,
        "flood_allowed": 0,
        "flood_denied": 0,
        "flood_allowed_max_per_1s_window": 0,
    }
    if flooder is not None:
        out, _ = await flooder.communicate()
        if flooder.returncode != 0:
            raise RuntimeError(f"the flooder process failed ({flooder.returncode})")
        flood = json.loads(out)
    rss_end = _rss_kib(pid)
    with contextlib.suppress(Exception):
        await pub.close()
        await sink_nc.close()
    lat.sort()
    return {
        "others_sent": int(others_rate * seconds),
        "others_received": len(lat),
        "others_lost": len(sent),
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        **flood,
        "rss_kib_start": rss_start,
        "rss_kib_mid": rss_mid,
        "rss_kib_end": rss_end,
    }


def run(
    url: str,
    key: Path,
    policies: Path,
    *,
    seconds: float,
    others_rate: float,
    limit: int,
    factor: float,
    runs: int,
    mode: str,
    gateway_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    cmd = harness.guard_cmd(url, key, mode=mode) + list(gateway_args)
    cmd[cmd.index("--policies") + 1] = str(policies)
    out: list[dict[str, Any]] = []
    with harness.Relay(cmd) as relay:
        asyncio.run(  # warm-up
            _phase(url, seconds=1.0, others_rate=others_rate, flood_rate=0, base=0, pid=relay.pid)
        )
        for r in range(runs):
            base = (r + 1) * 100_000_000
            quiet = asyncio.run(
                _phase(
                    url,
                    seconds=seconds,
                    others_rate=others_rate,
                    flood_rate=0,
                    base=base,
                    pid=relay.pid,
                )
            )
            flood = asyncio.run(
                _phase(
                    url,
                    seconds=seconds,
                    others_rate=others_rate,
                    flood_rate=limit * factor,
                    base=base + 50_000_000,
                    pid=relay.pid,
                )
            )
            out.append(
                {"unloaded": quiet, "flood": flood, "p99_ratio": flood["p99_ms"] / quiet["p99_ms"]}
            )
    ratios = [r["p99_ratio"] for r in out]
    return {
        "mode": mode,
        "gateway_args": list(gateway_args),
        "seconds": seconds,
        "others_rate_per_s": others_rate,
        "flooder_limit_per_s": limit,
        "flood_rate_per_s": limit * factor,
        "p99_unloaded_ms": statistics.median(r["unloaded"]["p99_ms"] for r in out),
        "p99_flood_ms": statistics.median(r["flood"]["p99_ms"] for r in out),
        "p99_ratio_median": statistics.median(ratios),
        "p99_ratio_worst": max(ratios),
        "others_lost": sum(r["flood"]["others_lost"] + r["unloaded"]["others_lost"] for r in out),
        "flood_allowed_max_per_1s_window": max(
            r["flood"]["flood_allowed_max_per_1s_window"] for r in out
        ),
        "rss_growth_kib_max": max(
            r["flood"]["rss_kib_end"] - r["flood"]["rss_kib_start"] for r in out
        ),
        # flat: what the second half of each flood added (the first fills bounded caches)
        "rss_growth_second_half_kib_max": max(
            r["flood"]["rss_kib_end"] - r["flood"]["rss_kib_mid"] for r in out
        ),
        "rss_kib_end_last": out[-1]["flood"]["rss_kib_end"],
        "runs": out,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per phase")
    p.add_argument("--others-rate", type=float, default=200.0, help="the four others, in all")
    p.add_argument("--limit", type=int, default=100, help="the flooder's limit per second")
    p.add_argument("--factor", type=float, default=20.0, help="the flood, times the limit")
    p.add_argument("--runs", type=int, default=3, help="runs (medians reported)")
    p.add_argument("--mode", default="stream", choices=["stream", "core"])
    p.add_argument(
        "--gateway-args",
        default="",
        help="extra `bus-guard run` arguments, space-separated (e.g. '--fair-quantum 0')",
    )
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    p.add_argument("--flooder", metavar="URL", help=argparse.SUPPRESS)  # the flood process
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--base", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flooder:
        res = asyncio.run(
            _flooder(args.flooder, rate=args.rate, seconds=args.seconds, base=args.base)
        )
        print(json.dumps(res), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "policies").mkdir()
        (root / "policies" / "bench.yaml").write_text(bundle(args.limit))
        key, _ = generate_key(root)
        with NatsServer(store_dir=root / "js") as server:
            res = run(
                server.url,
                key,
                root / "policies",
                seconds=args.seconds,
                others_rate=args.others_rate,
                limit=args.limit,
                factor=args.factor,
                runs=args.runs,
                mode=args.mode,
                gateway_args=tuple(args.gateway_args.split()),
            )
    rows = [
        [
            i + 1,
            f"{r['unloaded']['p50_ms']:.2f}",
            f"{r['flood']['p50_ms']:.2f}",
            f"{r['unloaded']['p99_ms']:.2f}",
            f"{r['flood']['p99_ms']:.2f}",
            f"{r['p99_ratio']:.2f}",
            r["flood"]["others_lost"],
            r["flood"]["flood_allowed_max_per_1s_window"],
            r["flood"]["rss_kib_end"] - r["flood"]["rss_kib_start"],
        ]
        for i, r in enumerate(res["runs"])
    ]
    text = "\n".join(
        [
            f"## S13 flood, {args.mode} mode: others {args.others_rate:g}/s, flooder "
            f"{args.limit * args.factor:g}/s against a limit of {args.limit}/s; "
            f"p99 ratio median {res['p99_ratio_median']:.2f}, worst {res['p99_ratio_worst']:.2f}",
            table(
                [
                    "run",
                    "p50 ms alone",
                    "p50 ms flood",
                    "p99 ms alone",
                    "p99 ms flood",
                    "ratio",
                    "lost",
                    "flood max/1s",
                    "ΔRSS KiB",
                ],
                rows,
            ),
        ]
    )
    emit({"benchmark": "flood", "machine": machine(), **res}, text, json_only=args.json)
    sys.exit(0)


if __name__ == "__main__":
    main()
