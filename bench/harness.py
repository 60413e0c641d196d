"""End-to-end harness: relay processes on a real nats-server, and the drivers that load them.

A relay is a separate process (the bare nats-py relay or ``bus-guard run``) that prints a
line containing ``ready on`` once subscribed. Drivers publish intents to
``guard.in.agent-1.tools.search`` (allowed by the example policies, so every intent is
authorized, signed and forwarded) and count what arrives on ``guard.exec.>``.

Intents are generated on the fly (``payload(i)``): a million of them would otherwise cost
the driver a quarter of a gigabyte. Their ``id`` is the index in hex at a fixed offset, so
the sink finds each message's send time without decoding JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import nats
from nats.aio.msg import Msg

from bus_guard.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = Subjects()
SUBJECT = SUBJECTS.intent("agent-1", "tools.search")
EXEC = SUBJECTS.wildcard("exec")
_TEMPLATE = (
    b'{"id":"%032x","action":"tools.search","resource":"tool:search",'
    b'"params":{"q":"query %d","n":%d},"ts":%.3f}'
)
_ID = slice(7, 39)  # where the hex id sits in every payload


# Each driver call (a warm-up, a run) takes ids of its own: a core-mode gateway denies an
# intent id it decided in the last few minutes as a replay. The index is the low 64 bits.
_RUNS = itertools.count(random.getrandbits(32) << 8)
_INDEX_BITS: Final = (1 << 64) - 1


def new_run() -> int:
    return next(_RUNS) << 64


def payload(i: int, ts: float, run: int = 0) -> bytes:
    return _TEMPLATE % (run | i, i, i, ts)


def index_of(data: bytes) -> int:
    return int(data[_ID], 16) & _INDEX_BITS


def bare_cmd(url: str) -> list[str]:
    return [sys.executable, "-m", "bench.bare_relay", "--nats", url]


def guard_cmd(
    url: str,
    key: Path,
    *,
    artifacts: str | None = None,
    gateway_id: str = "gw",
    mode: str = "core",
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "bus_guard",
        "--log-level",
        "info",  # the harness waits for the "ready on" line; nothing is logged per intent
        "run",
        "--nats",
        url,
        "--policies",
        str(ROOT / "policies"),
        "--key",
        str(key),
        "--mode",
        mode,
        "--max-skew",
        "86400",
        "--gateway-id",
        gateway_id,
    ]
    if artifacts is not None:
        cmd += ["--artifacts", artifacts]
    return cmd


def prototype_cmd(url: str, key: Path) -> list[str]:
    """The bench-only batched stand-in (:mod:`bench.batched_prototype`)."""
    return [
        sys.executable,
        "-m",
        "bench.batched_prototype",
        "--nats",
        url,
        "--policies",
        str(ROOT / "policies"),
        "--key",
        str(key),
    ]


def supports_artifacts_flag() -> bool:
    """Whether ``bus-guard run --artifacts per-message|batched`` exists yet."""
    out = subprocess.run(
        [sys.executable, "-m", "bus_guard", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout
    return "--artifacts" in out


class Relay:
    """A relay process, started and confirmed ready; a context manager that stops it."""

    def __init__(self, cmd: list[str], *, ready_timeout_s: float = 30.0) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self._drain: threading.Thread | None = None
        deadline = time.monotonic() + ready_timeout_s
        for line in self.proc.stdout:
            if "ready on" in line:
                # Keep draining its output so a chatty process never blocks on a full pipe.
                self._drain = threading.Thread(target=self.proc.stdout.read, daemon=True)
                self._drain.start()
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"relay did not become ready: {cmd}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float | None:
        """CPU seconds the relay process has used so far (every thread, nanosecond
        resolution, from ``/proc/<pid>/task/*/schedstat``); ``None`` where that is not
        there. On a machine the relay shares with the server and the load driver, CPU per
        intent says what the relay costs; the rate says who got the CPU."""
        total = 0
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return total / 1e9

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drain is not None:
            self._drain.join(5)  # the pipe reaches EOF once the process has exited
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def throughput(
    url: str,
    count: int,
    *,
    window: int = 2000,
    ts: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 0,
    timeout_s: float = 120.0,
) -> dict[str, float]:
    """Publish *count* intents keeping at most *window* in flight; sustained rate."""
    ts = time.time() if ts is None else ts
    pub = await nats.connect(url)
    sub_nc = await nats.connect(url)
    received = 0
    done = asyncio.Event()
    progress = asyncio.Event()

    async def sink(msg: Msg) -> None:
        nonlocal received
        received += 1
        progress.set()
        if progress_every and on_progress is not None and received % progress_every == 0:
            on_progress(received)
        if received >= count:
            done.set()

    await sub_nc.subscribe(EXEC, cb=sink, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await sub_nc.flush()
    start = time.perf_counter()
    run = new_run()
    for i in range(count):
        while i - received >= window:
            progress.clear()
            await pub.flush()
            await asyncio.wait_for(progress.wait(), timeout_s)
        await pub.publish(SUBJECT, payload(i, ts, run))
    await pub.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout_s)
    elapsed = time.perf_counter() - start
    await pub.close()
    await sub_nc.close()
    return {"received": received, "elapsed_s": elapsed, "per_s": received / elapsed}


async def paced(
    url: str, rate_per_s: float, count: int, *, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Open loop: publish *count* intents at *rate_per_s*; per-message latency in µs."""
    ts = time.time()
    pub = await nats.connect(url)
    sub_nc = await nats.connect(url)
    sent = [0.0] * count
    lat: list[float] = []
    clock = time.perf_counter
    done = asyncio.Event()

    async def sink(msg: Msg) -> None:
        lat.append(clock() - sent[index_of(msg.data)])
        if len(lat) >= count:
            done.set()

    await sub_nc.subscribe(EXEC, cb=sink, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await sub_nc.flush()
    start = clock()
    i = 0
    run = new_run()
    while i < count:
        due = min(count, int((clock() - start) * rate_per_s) + 1)
        while i < due:
            sent[i] = clock()
            await pub.publish(SUBJECT, payload(i, ts, run))
            i += 1
        await asyncio.sleep(0.0002)
    offered_s = clock() - start
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout_s)
    await pub.close()
    await sub_nc.close()
    lat.sort()
    return {
        "offered_per_s": rate_per_s,
        "achieved_send_per_s": count / offered_s,
        "received": len(lat),
        "lat_us": [x * 1e6 for x in lat],
    }
