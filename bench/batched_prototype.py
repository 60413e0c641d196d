"""A bench-only stand-in for core intake with batched artifacts (NOT the product path).

The product path is ``bus-guard run --mode core --artifacts batched`` (the ``core-batched``
variant of :mod:`bench.relay`); this stand-in is kept as a reference for what the bare
design reaches: subscribe to ``guard.in.>``, queue each message, and per micro-batch (``--batch``
intents or ``--delay-ms``, whichever first) run the same pure pipeline as the gateway
(``bus_guard.pipeline.evaluate``), build :class:`~bus_guard.verify.ArtifactClaims` for the
allowed ones, sign them with one :meth:`~bus_guard.signing._batch.BatchSigner.sign_batch` and
publish to ``guard.exec.…`` with the three headers; anything else is published as a
minimal deny record. It has none of the gateway's counters, replies, or failure
handling beyond failing the batch closed.

    python -m bench.batched_prototype --nats URL --policies DIR --key FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from bus_guard.decision import Effect, new_decision_id
from bus_guard.errors import SigningError
from bus_guard.pipeline import evaluate
from bus_guard.policy._load import load_policies
from bus_guard.settings import Settings
from bus_guard.signing._batch import BatchSigner
from bus_guard.signing._keys import load_private_key
from bus_guard.signing._signer import Signer
from bus_guard.verify import ArtifactClaims, payload_digest


async def serve(args: argparse.Namespace) -> None:
    policies = load_policies(args.policies)
    signer = Signer(load_private_key(args.key), issuer="gw-prototype")
    batcher = BatchSigner(signer)
    nc = await nats.connect(args.nats)
    pending: list[Msg] = []
    wake = asyncio.Event()
    settings = Settings()  # the gateway's defaults: prefix, queue
    subjects = settings.subjects

    async def on_msg(msg: Msg) -> None:
        pending.append(msg)
        if len(pending) >= args.batch:
            wake.set()

    async def flush_loop() -> None:
        delay = args.delay_ms / 1000
        while True:
            if len(pending) < args.batch:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
            if not pending:
                continue
            batch = pending[: args.batch]
            del pending[: args.batch]
            now = time.time()
            allowed: list[tuple[Msg, str, ArtifactClaims]] = []
            for msg in batch:
                ev = evaluate(msg.subject, msg.data, None, policies, now=now)
                decision_id = new_decision_id()
                if ev.decision.effect is Effect.ALLOW and ev.intent and ev.subject:
                    exec_subject = subjects.output("exec", msg.subject)
                    d = ev.decision
                    allowed.append(
                        (
                            msg,
                            exec_subject,
                            ArtifactClaims(
                                iss=signer.issuer,
                                sub=ev.subject.principal,
                                aud=exec_subject,
                                iat=int(now),
                                nbf=int(now),
                                exp=int(now + signer.ttl_s),
                                jti=decision_id,
                                action=ev.subject.action,
                                resource=ev.intent.resource,
                                intent_id=ev.intent.id,
                                payload_sha256=payload_digest(msg.data),
                                policy_digest=d.policy_digest,
                                policy_version=d.policy_version,
                                rules=d.rules,
                                mode=d.mode,
                                parents=ev.intent.parents,
                                lineage_root=ev.subject.principal,
                            ),
                        )
                    )
                else:
                    record = b'{"decision_id":"%s","reason":"%s"}' % (
                        decision_id.encode(),
                        str(ev.decision.reason).encode(),
                    )
                    await nc.publish(subjects.output("deny", msg.subject), record)
            try:
                tokens = batcher.sign_batch([c for _, _, c in allowed], now=now)
            except SigningError:
                continue  # fail closed: nothing of the batch is forwarded
            for (msg, subject, claims), token in zip(allowed, tokens, strict=True):
                headers = {
                    "Guard-Artifact": token,
                    "Guard-Decision": claims.jti,
                    "Nats-Msg-Id": claims.jti,
                }
                await nc.publish(subject, msg.data, headers=headers)

    await nc.subscribe(
        subjects.wildcard("in"),
        queue=settings.queue,
        cb=on_msg,
        pending_msgs_limit=65536,
        pending_bytes_limit=64 * 1024 * 1024,
    )
    await nc.flush()
    task = asyncio.create_task(flush_loop())
    print("ready on guard (batched prototype)", flush=True)  # the harness waits for this
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    task.cancel()
    await nc.drain()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nats", required=True)
    p.add_argument("--policies", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--delay-ms", type=float, default=2.0)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
