"""``bus-guard witness``: follow the ledger and countersign its sound chain heads."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import TextIO

import anyio
import nats.errors
import nats.js.errors

from bus_guard.cli._safe import say
from bus_guard.intake._jetstream import read

__all__ = ("cmd_witness",)

log = logging.getLogger(__name__)


async def cmd_witness(args: argparse.Namespace, out: TextIO) -> int:
    """Read the ledger from the start (a restarted witness re-checks what it countersigned
    before), then every ``--interval`` what is new; until SIGINT/SIGTERM, or once."""
    from bus_guard.cli._connect import TOOL_RECONNECT_ATTEMPTS, NatsOptions, connect
    from bus_guard.ledger._witness import Witness
    from bus_guard.signing._keys import load_private_key
    from bus_guard.subjects import Subjects
    from bus_guard.verify import load_jwks

    witness = Witness(args.dir, load_private_key(args.key), load_jwks(args.jwks), args.prefix)
    subjects = Subjects(args.prefix)
    stream, everything = subjects.streams.ledger, subjects.ledger().all
    nc = await connect(
        NatsOptions.from_args(args),
        name="bus-guard witness",
        reconnect_attempts=TOOL_RECONNECT_ATTEMPTS if args.once else -1,
    )
    registry = subjects.streams.gateways_bucket
    registry_stream, registry_subject = f"KV_{registry}", f"$KV.{registry}."
    stop = anyio.Event()
    refused = 0
    fed = 0
    registry_fed = 0

    async def follow_registry() -> None:
        """The gateway registry's new values: each run countersigned (Witness.register)."""
        nonlocal registry_fed
        try:
            async for stored in read(
                nc, registry_stream, registry_subject + ">", start_seq=registry_fed + 1
            ):
                registry_fed = stored.seq
                run = witness.register(stored.subject.removeprefix(registry_subject), stored.data)
                if run is not None:
                    say(
                        out,
                        f"registered {run.gateway} run {run.epoch}"
                        f"{' (ended)' if run.final else ''}",
                    )
        except nats.js.errors.NotFoundError:
            # no registry yet (no stream-mode gateway started), or one without direct gets
            log.debug("witness: no readable gateway registry %s", registry_stream)

    async def follow() -> None:
        nonlocal fed, refused
        while True:
            try:
                async for stored in read(nc, stream, everything, start_seq=fed + 1):
                    fed = stored.seq
                    signed = witness.feed(stored)
                    if signed is not None:
                        say(
                            out,
                            f"countersigned {signed.gateway} seq {signed.seq} ({signed.kind}"
                            f"{', final' if signed.final else ''})",
                        )
                    for line in witness.refused[refused:]:
                        say(out, f"REFUSED {line}")
                    refused = len(witness.refused)
                await follow_registry()
            except (nats.errors.Error, TimeoutError) as exc:
                if args.once:
                    raise
                # a leader election or a node restarting: read on from the same record
                log.warning("witness: reading the ledger failed (%r); retrying", exc)
            if args.once:
                stop.set()
                return
            await anyio.sleep(args.interval)  # polling the ledger's tail

    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def on_signals() -> None:
                    async for _ in signals:
                        stop.set()
                        return

                tg.start_soon(on_signals)
                tg.start_soon(follow)
                await stop.wait()
                tg.cancel_scope.cancel()
    finally:
        await nc.close()
    say(
        out,
        f"witness: {witness.countersigned} countersigned, {len(witness.refused)} refused, "
        f"{len(witness.heads)} chain(s) followed, {witness.registered} gateway run(s) "
        "registered",
    )
    return 1 if witness.refused else 0
