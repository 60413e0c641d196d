"""Publishing the outputs of a batch of decisions, and knowing which were stored.

The outputs for each stream (exec, deny, hold) go out as one atomic batch: one request,
one answer, and JetStream stores all of them or none. Atomic batches refuse a message
whose ``Nats-Msg-Id`` was seen before -- exactly what happens when redelivered intents
adopt decisions whose outputs were already stored -- and some streams may not allow them;
then, and when the answer is in doubt, each output is published on its own and
de-duplication keeps the ones stored before. Either way the caller learns, per intent,
whether all of its outputs are stored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus_guard.intake._jetstream import Committed, Rejected, commit
from bus_guard.pipeline import Output

__all__ = ("OutputPublisher", "Published")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Published:
    stored: list[bool]  # per group: every output of the group is stored
    duplicates: int  # outputs JetStream already had


class OutputPublisher:
    def __init__(self, nc: Client, js: JetStreamContext, *, name: str, timeout_s: float) -> None:
        self._nc = nc
        self._js = js
        self._name = name
        self._timeout_s = timeout_s
        self._batches = itertools.count()
        self._atomic: dict[str, bool] = {}  # per role: False once a stream refused batches

    async def publish(self, groups: Sequence[Sequence[Output]]) -> Published:
        """Publish every output of every group; which groups are entirely stored."""
        by_role: dict[str, list[tuple[int, Output]]] = {}
        for g, outs in enumerate(groups):
            for out in outs:
                by_role.setdefault(out.role, []).append((g, out))
        ok = [True] * len(groups)
        duplicates = 0
        results = await asyncio.gather(*(self._role(role, outs) for role, outs in by_role.items()))
        for placed, (stored, dups) in zip(by_role.values(), results, strict=True):
            duplicates += dups
            for (g, _), good in zip(placed, stored, strict=True):
                ok[g] = ok[g] and good
        return Published(ok, duplicates)

    async def _role(self, role: str, outs: list[tuple[int, Output]]) -> tuple[list[bool], int]:
        if self._atomic.get(role, True) and len(outs) > 1:
            entries = [(o.subject, o.data, o.headers) for _, o in outs]
            batch_id = f"{self._name}-{role}-{next(self._batches)}"
            result = await commit(self._nc, entries, batch_id=batch_id, timeout_s=self._timeout_s)
            if isinstance(result, Committed):
                return [True] * len(outs), 0
            if isinstance(result, Rejected) and "disabled" in result.description:
                log.info("%s stream refuses atomic batches; publishing one by one", role)
                self._atomic[role] = False
        return await self._one_by_one([o for _, o in outs])

    async def _one_by_one(self, outs: list[Output]) -> tuple[list[bool], int]:
        futures = [
            await self._js.publish_async(o.subject, o.data, headers=dict(o.headers)) for o in outs
        ]
        with anyio.move_on_after(self._timeout_s):
            await asyncio.gather(*futures, return_exceptions=True)
        stored = []
        duplicates = 0
        for f in futures:
            good = _stored_ok(f)
            stored.append(good)
            if good and f.result().duplicate:
                duplicates += 1
            elif not f.done():
                f.cancel()
        return stored, duplicates


def _stored_ok(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
