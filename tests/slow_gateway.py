"""A stream-mode gateway process whose every evaluation takes ``--slow-s`` seconds: the
redelivery race of SCENARIOS S4 (ack wait shorter than the evaluation).

    python -m tests.slow_gateway --nats URL --key FILE --gateway-id ID --slow-s 0.15
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import anyio

from bus_guard.decision import Decision, Request
from bus_guard.policy._load import PolicySet, load_policies
from bus_guard.settings import Settings, StreamSettings
from bus_guard.verify import JwkEntry

from .conftest import POLICIES
from .streamkit import stream_gateway


class SlowPolicies:
    def __init__(self, inner: PolicySet, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s
        self.digest, self.version, self.mode = inner.digest, inner.version, inner.mode

    def evaluate(self, request: Request) -> Decision:
        time.sleep(self._delay_s)  # simulated slow evaluation (blocks, like CPU work)
        return self._inner.evaluate(request)

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return self._inner.approver_key(kid)


async def main(args: argparse.Namespace) -> int:
    settings = Settings(
        nats_url=args.nats,
        mode="stream",
        gateway_id=args.gateway_id,
        stream=StreamSettings(
            ack_wait_s=args.ack_wait,
            fetch_batch=4,
            fetch_timeout_s=0.5,
            heartbeat_s=0.2,
            nak_delay_s=0.2,
            checkpoint_interval_s=1.0,
        ),
    )
    policies = SlowPolicies(load_policies(POLICIES), args.slow_s)
    async with stream_gateway(settings, policies, Path(args.key)):  # type: ignore[arg-type]
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nats", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--gateway-id", required=True)
    p.add_argument("--slow-s", type=float, required=True)
    p.add_argument("--ack-wait", type=float, default=0.5)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(anyio.run(main, p.parse_args()))
