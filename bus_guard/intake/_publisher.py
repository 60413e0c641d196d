"""Publishing the outputs of a batch of decisions, and knowing which were stored.

The outputs for each stream (exec, deny, hold) go out as one atomic batch when there are
:data:`OUTPUT_ATOMIC_MIN` or more of them: one request, one answer, and JetStream stores all of
them or none; fewer go out one by one, concurrently. Atomic batches refuse a message
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
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from bus_guard.intake._jetstream import Committed, Rejected, commit, find_msg_id
from bus_guard.pipeline import Output

__all__ = ("ATOMIC_MIN", "OUTPUT_ATOMIC_MIN", "OutputPublisher", "Published", "not_yet_published")

log = logging.getLogger(__name__)

# Fewer outputs of a role than this go out one by one, concurrently (each its own PubAck).
# An atomic batch on a file-backed stream costs the server a staging store on disk (a
# directory, files, three fsyncs: ~2.6 ms on this machine, measured with strace and a
# memory-backed stream for contrast) whatever its size; a PubAck costs the client ~40 µs.
# Small batches -- a gateway at moderate load, or the others' intents beside a flood
# (SCENARIOS S13) -- thus go out in a fraction of the time; large ones save CPU.
ATOMIC_MIN: Final = 8
# Outputs need no atomicity across intents, only fewer PubAcks: an atomic batch pays off
# in client CPU only when large (a full batch at throughput), while under a flood
# (SCENARIOS S13) medium batches published one by one are stored ~2x faster and, unlike
# an atomic batch, do not hold up other publishes to the same stream for its staging.
OUTPUT_ATOMIC_MIN: Final = 64


@dataclass(frozen=True, slots=True)
class Published:
    stored: list[bool]  # per group: every output of the group is stored
    refused: list[bool]  # per group: an output was refused for good (not in doubt)
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
                by_role.setdefault(out[0], []).append((g, out))  # by its role
        ok = [True] * len(groups)
        refused = [False] * len(groups)
        duplicates = 0
        results = await asyncio.gather(*(self._role(role, outs) for role, outs in by_role.items()))
        for placed, (stored, no, dups) in zip(by_role.values(), results, strict=True):
            duplicates += dups
            for (g, _), good, bad in zip(placed, stored, no, strict=True):
                ok[g] = ok[g] and good
                refused[g] = refused[g] or bad
        return Published(ok, refused, duplicates)

    async def _role(
        self, role: str, outs: list[tuple[int, Output]]
    ) -> tuple[list[bool], list[bool], int]:
        if self._atomic.get(role, True) and len(outs) >= OUTPUT_ATOMIC_MIN:
            entries = [(subject, data, headers) for _, (_, subject, data, headers) in outs]
            batch_id = f"{self._name}-{role}-{next(self._batches)}"
            result = await commit(self._nc, entries, batch_id=batch_id, timeout_s=self._timeout_s)
            if isinstance(result, Committed):
                return [True] * len(outs), [False] * len(outs), 0
            if isinstance(result, Rejected) and "disabled" in result.description:
                log.info("%s stream refuses atomic batches; publishing one by one", role)
                self._atomic[role] = False
        return await self._one_by_one([o for _, o in outs])

    async def _one_by_one(self, outs: list[Output]) -> tuple[list[bool], list[bool], int]:
        """Publish each output on its own, concurrently: (stored, refused for good,
        duplicates). One output that nats-py or the server refuses (a message over a
        stream's limit) fails alone: the others are still published and stored.

        ``js.publish`` rather than ``publish_async``: nats-py 2.16's ``publish_async``
        never resolves the future of a PubAck that carries an error (``APIError.from_error``
        raises inside its reply callback), so a refusal would look like a timeout."""
        results = await asyncio.gather(*(self._publish(o) for o in outs))
        stored = [isinstance(r, PubAck) for r in results]
        refused = [isinstance(r, nats.js.errors.BadRequestError | _Unsendable) for r in results]
        duplicates = sum(1 for r in results if isinstance(r, PubAck) and r.duplicate)
        return stored, refused, duplicates

    async def _publish(self, out: Output) -> PubAck | BaseException:
        _, subject, data, headers = out
        try:
            return await self._js.publish(subject, data, timeout=self._timeout_s, headers=headers)
        except nats.js.errors.BadRequestError as exc:  # 400: the same message, the same answer
            log.error("the server refused an output on %s: %s", subject, exc)
            return exc
        except _UNSENDABLE as exc:  # refused by nats-py itself: it never left, and never will
            log.error("output on %s cannot be published: %r", subject, exc)
            return _Unsendable(repr(exc))
        except nats.errors.Error as exc:  # timeouts, no responders, 503s: worth another try
            return exc


# What nats-py raises before a message leaves the client (a header name it will not write,
# a subject with whitespace, a payload over max_payload): publishing it again gives the same.
_UNSENDABLE: Final = (
    nats.errors.BadHeaderError,
    nats.errors.BadSubjectError,
    nats.errors.MaxPayloadError,
    ValueError,
    TypeError,
)


class _Unsendable(Exception):
    """nats-py refused to send an output: sending it again gives the same."""


async def not_yet_published(
    nc: Client,
    exec_stream: str,
    decision_id: str,
    decided_at: float,
    outs: Sequence[Output],
    *,
    now: float,
) -> list[Output]:
    """*outs* without the exec message the exec stream already holds for *decision_id*:
    beyond the retry horizon de-duplication cannot tell, so the stream is searched for a
    copy stored since the decision (allowing a minute of clock difference)."""
    kept = []
    for out in outs:
        role, subject, _, _ = out
        if role == "exec" and await find_msg_id(
            nc, exec_stream, subject, decision_id, since=decided_at - 60.0, until=now + 60.0
        ):
            continue
        kept.append(out)
    return kept
