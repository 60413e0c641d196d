"""The baseline: a bare nats-py relay (subscribe -> republish), nothing else.

python -m bench.bare_relay --nats URL
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import nats
from nats.aio.msg import Msg

from bus_guard.subjects import DEFAULT_PREFIX, Subjects


async def relay(url: str, prefix: str) -> None:
    nc = await nats.connect(url)
    subjects = Subjects(prefix)
    # Subjects.output("exec", ...) by hand: the baseline does the least work per message.
    cut = len(subjects.root("in")) + 1
    out = subjects.root("exec") + "."

    async def on_msg(msg: Msg) -> None:
        await nc.publish(out + msg.subject[cut:], msg.data, headers=msg.headers)

    await nc.subscribe(
        subjects.wildcard("in"),
        queue="bare",
        cb=on_msg,
        pending_msgs_limit=65536,
        pending_bytes_limit=64 * 1024 * 1024,
    )
    await nc.flush()
    print("ready on", prefix, flush=True)  # the harness waits for this line
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nats", required=True)
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = p.parse_args()
    asyncio.run(relay(args.nats, args.prefix))


if __name__ == "__main__":
    main()
