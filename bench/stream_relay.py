"""Stream mode throughput next to a bare JetStream relay, on the same server, same streams.

* ``bare``: pull from the intake consumer -> publish to the exec stream with a
  ``Nats-Msg-Id`` (waiting for the PubAcks) -> ack. Nothing else.
* ``stream``: ``bus-guard run`` (stream mode): decode, authorize, sign, commit the ledger
  record, publish the exec message, ack.
* ``stream-batched``: the same with ``--artifacts batched`` (one signed Merkle tree head
  per recorded batch); ``--no-batched`` skips it.

Each run starts from the same backlog: ``--count`` intents stored in the intake stream
(allowed by the example policies, so every one is authorized, signed, recorded and
forwarded) before the relay starts; the rate is measured from the first to the last exec
message stored. Streams and the consumer are created by bus_guard's own preflight for both
variants, so they run against identical configurations. Variants are interleaved,
``--runs`` times each; medians and the ratio are printed as JSON.

* with ``--scale``: ``stream-batched x2``, two gateway processes sharing the consumer.

    python -m bench.stream_relay --count 20000 --runs 3 [--no-batched] [--scale]
    python -m bench.stream_relay --relay --nats URL     # the bare relay process itself
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from bench import harness
from bench.common import emit, machine, table
from bus_guard.intake._preflight import ensure
from bus_guard.server import NatsServer
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key
from bus_guard.subjects import ROLES

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = harness.SUBJECT
DEFAULTS = Settings(gateway_id="bench")  # the gateway's defaults: prefix, queue
_TEMPLATE = (
    '{"id":"%032x","action":"tools.search","resource":"tool:search",'
    '"params":{"q":"query %d","n":%d},"ts":%.3f}'
)


async def bare_relay(url: str) -> None:
    """pull -> publish with msg id (PubAcks awaited) -> ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    subjects = DEFAULTS.subjects
    sub = await js.pull_subscribe_bind(DEFAULTS.queue, stream=subjects.streams.intake)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready on", subjects.wildcard("in"), file=sys.stderr, flush=True)
    while not stop.is_set():
        try:
            msgs: list[Msg] = await sub.fetch(128, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        acks = [
            await js.publish_async(
                subjects.output("exec", m.subject),
                m.data,
                headers={"Nats-Msg-Id": str(m.metadata.sequence.stream)},
            )
            for m in msgs
        ]
        await asyncio.gather(*acks)
        for m in msgs:
            await m.ack()
    await nc.drain()


async def _reset_and_load(url: str, count: int) -> None:
    """Fresh streams (bus_guard's preflight creates them), then a backlog of *count*."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    streams = DEFAULTS.subjects.streams
    for role in ROLES:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(streams.name(role))
    await ensure(js, Settings(nats_url=url, mode="stream"))
    now = time.time()
    for start in range(0, count, 1000):
        acks = [
            await js.publish_async(SUBJECT, (_TEMPLATE % (i, i, i, now)).encode())
            for i in range(start, min(count, start + 1000))
        ]
        await asyncio.gather(*acks)
    await nc.close()


async def _measure(url: str, count: int, ready: asyncio.Event, timeout_s: float = 300) -> float:
    """Intents per second from the first to the last exec message stored."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    first = last = 0.0
    done = asyncio.Event()
    seen = 0

    async def on_exec(msg: Msg) -> None:
        nonlocal first, last, seen
        seen += 1
        last = time.perf_counter()
        if seen == 1:
            first = last
        if seen >= count:
            done.set()

    await nc.subscribe(harness.EXEC, cb=on_exec, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    await nc.flush()
    ready.set()
    await asyncio.wait_for(done.wait(), timeout_s)
    # Subscribers see a message as it is published, the stream stores it a moment later
    # (for an atomic batch: at its commit). The run ends when all are stored.
    deadline = time.monotonic() + 30
    while (stored := (await js.stream_info("GUARD_EXEC")).state.messages) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{stored} exec messages stored for {count} intents")
        await asyncio.sleep(0.005)
    last = time.perf_counter()
    await nc.close()
    if stored != count:
        raise SystemExit(f"{stored} exec messages stored for {count} intents")
    return (count - 1) / (last - first)


async def _run_one(url: str, count: int, cmds: list[list[str]]) -> float:
    await _reset_and_load(url, count)
    ready = asyncio.Event()
    measuring = asyncio.create_task(_measure(url, count, ready))
    await ready.wait()
    relays = [await asyncio.to_thread(harness.Relay, cmd) for cmd in cmds]
    try:
        return await measuring
    finally:
        for relay in relays:
            await asyncio.to_thread(relay.stop)


def variants(url: str, key: Path, *, batched: bool, scale: bool) -> dict[str, list[list[str]]]:
    """name -> the command of each relay process of that variant."""
    out = {
        "bare": [[sys.executable, "-m", "bench.stream_relay", "--relay", "--nats", url]],
        "stream": [harness.guard_cmd(url, key, mode="stream")],
    }
    if batched:
        out["stream-batched"] = [harness.guard_cmd(url, key, mode="stream", artifacts="batched")]
    if scale:  # two gateways sharing the durable consumer, each its own ledger chain
        out["stream-batched x2"] = [
            harness.guard_cmd(url, key, mode="stream", artifacts="batched", gateway_id=f"gw{i}")
            for i in (1, 2)
        ]
    return out


def run(
    url: str, key: Path, count: int, runs: int, *, batched: bool = True, scale: bool = False
) -> dict[str, Any]:
    """Every variant ``runs`` times, interleaved; medians and ratios to ``bare``."""
    results: dict[str, list[float]] = {}
    plan = variants(url, key, batched=batched or scale, scale=scale)
    for _ in range(runs):
        for name, cmds in plan.items():
            results.setdefault(name, []).append(asyncio.run(_run_one(url, count, cmds)))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {f"{k}_vs_bare": v / med["bare"] for k, v in med.items() if k != "bare"}
    if "stream-batched x2" in med:
        ratios["stream_batched_x2_vs_x1"] = med["stream-batched x2"] / med["stream-batched"]
    return {"per_s": results, "median_per_s": med, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--relay", action="store_true", help="run the bare relay (internal)")
    p.add_argument("--nats", default=None)
    p.add_argument("--no-batched", action="store_true", help="skip the batched variant")
    p.add_argument("--scale", action="store_true", help="also two batched gateways, one consumer")
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    if args.relay:
        asyncio.run(bare_relay(args.nats))
        return
    with NatsServer() as server, tempfile.TemporaryDirectory() as tmp:
        key, _ = generate_key(Path(tmp))
        res = run(
            server.url, key, args.count, args.runs, batched=not args.no_batched, scale=args.scale
        )
    med = res["median_per_s"]
    rows = [
        [
            name,
            v,
            ", ".join(f"{x:,.0f}" for x in res["per_s"][name]),
            "baseline" if name == "bare" else f"{v / med['bare']:.2f}",
        ]
        for name, v in med.items()
    ]
    lines = [
        f"## stream_relay: intents/s end to end (JetStream), {args.count} intents,"
        f" medians of {args.runs}",
        table(["variant", "median/s", "runs", "vs bare"], rows),
    ]
    if "stream_batched_x2_vs_x1" in res["ratios"]:
        lines.append(f"two gateways vs one: {res['ratios']['stream_batched_x2_vs_x1']:.2f}")
    emit(
        {
            "benchmark": "stream_relay",
            "machine": machine(),
            "count": args.count,
            "runs": args.runs,
            **res,
        },
        "\n".join(lines),
        json_only=args.json,
    )


if __name__ == "__main__":
    main()
