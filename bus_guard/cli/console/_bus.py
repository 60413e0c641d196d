"""The console's side of the bus: what it reads, what it publishes, what it tells browsers.

:class:`BusView` holds one NATS connection (the operator's credentials) and keeps:

* the live feed: every record on ``<prefix>.deny.>`` and ``<prefix>.hold.>``, the last
  :attr:`ConsoleSettings.feed_size` kept for browsers that connect later;
* the open holds (:func:`~bus_guard.intake.open_holds`, as ``bus-guard holds``), read
  again when a hold, a vote or a resolution is recorded, and every few seconds (expiry);
* the gateways and the decision rates, from ``$SRV.STATS.bus-guard`` every
  :attr:`ConsoleSettings.interval_s` (:func:`~bus_guard.cli._status.gateway_stats`, as
  ``bus-guard status``);
* votes (:func:`~bus_guard.intake.approve` / ``reject``, as ``bus-guard approve``: the
  key stays in this process) and lineage trees (as ``bus-guard lineage``).

Browsers get it through :class:`Hub`: each has a bounded queue of events; one that falls
behind is dropped (its stream ends, the browser reconnects and starts from a snapshot),
so a slow tab never grows the console's memory.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
import msgspec
import nats.errors
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.cli._ledger import _caused_by
from bus_guard.cli._status import gateway_stats
from bus_guard.cli._watch import WatchFilter
from bus_guard.cli._watch import _replay as replay_streams
from bus_guard.cli.console._model import RateBook, feed_item, gateway_row
from bus_guard.errors import ApprovalRefused, GatewayError
from bus_guard.intake._approver import Vote, approve, open_holds, reject
from bus_guard.intake._gateway import round_trip
from bus_guard.intake._jetstream import read
from bus_guard.ledger._lineage import render_tree
from bus_guard.ledger._records import LedgerRecord, decode_record
from bus_guard.pipeline import DecisionRecord
from bus_guard.signing._keys import kid_for
from bus_guard.subjects import DEFAULT_PREFIX, Subjects

__all__ = ("BusView", "ConsoleSettings", "Event", "Hub")

log = logging.getLogger(__name__)

_decoder: Final = msgspec.json.Decoder(DecisionRecord)
_encoder: Final = msgspec.json.Encoder()
# Only a ledger record about a hold (a vote, a resolution) has this (see cli/_watch.py).
_HOLD_KEY: Final = b'"hold":"'
_GONE_AFTER_S: Final = 60.0  # a gateway not answering this long leaves the table
_HOLDS_EVERY_S: Final = 30.0  # and read again at least this often (the page ticks ages itself)
_HOLDS_DEBOUNCE_S: Final = 0.1
_FEED_BATCH_S: Final = 0.05
_LINEAGE_MAX_RECORDS: Final = 200_000


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """What ``bus-guard console`` was asked for (validated by the command line)."""

    prefix: str = DEFAULT_PREFIX
    interval_s: float = 2.0  # $SRV.STATS polls: one chart bucket each
    stats_wait_s: float = 0.5  # answers collected per poll
    window_s: float = 600.0  # the chart's span
    feed_size: int = 500  # feed rows kept for browsers that connect later
    holds_since_s: float = 86400.0  # holds older than this are not listed (as `holds`)
    holds_limit: int = 100
    vote_wait_s: float = 5.0  # how long a vote waits for the gateway's record of it
    queue_size: int = 1024  # events buffered per browser before it is dropped
    since_s: float | None = None  # first the deny and hold streams' records this far back


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: its name and its JSON data."""

    name: str
    data: bytes


class Hub:
    """The browsers' event streams: a bounded queue each."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._queues: set[MemoryObjectSendStream[Event]] = set()
        self.dropped = 0  # browsers dropped for falling behind

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[MemoryObjectReceiveStream[Event]]:
        """A browser's events from now on, until it leaves (or is dropped: then the stream
        ends)."""
        send, receive = anyio.create_memory_object_stream[Event](self._size)
        self._queues.add(send)
        try:
            with receive:
                yield receive
        finally:
            self._queues.discard(send)
            send.close()

    def publish(self, name: str, data: Any) -> None:
        event = Event(name, _encoder.encode(data))
        for queue in list(self._queues):
            try:
                queue.send_nowait(event)
            except anyio.WouldBlock:  # too far behind: it starts over from a snapshot
                self.dropped += 1
                self._queues.discard(queue)
                queue.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._queues.discard(queue)
                queue.close()

    def close(self) -> None:
        for queue in self._queues:
            queue.close()
        self._queues.clear()


class BusView:
    """The console's state, kept current from the bus (see the module docstring)."""

    def __init__(
        self,
        nc: Client,
        settings: ConsoleSettings,
        *,
        key: Ed25519PrivateKey | None = None,
        approver: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.key = key
        self.approver = approver
        self.kid = kid_for(key.public_key()) if key is not None else None
        self.hub = Hub(settings.queue_size)
        self._clock = clock
        self._subjects = Subjects(settings.prefix)
        self._feed: collections.deque[dict[str, Any]] = collections.deque(maxlen=settings.feed_size)
        self._rates = RateBook(settings.interval_s, settings.window_s)
        self._answers: dict[str, tuple[dict[str, Any], float]] = {}
        self._gateways: list[dict[str, Any]] = []
        self._holds: dict[str, Any] = {"holds": [], "more": False, "error": None}
        self._holds_due = anyio.Event()
        # Feed rows not yet sent to browsers: sent together every _FEED_BATCH_S, so that a
        # flood of denials is a few events a second, not one each (the newest feed_size).
        self._unsent: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=settings.feed_size
        )
        self._feed_due = anyio.Event()

    # --- what a browser gets first -------------------------------------------------------

    def snapshot(self) -> list[Event]:
        """The events that bring a new browser up to date, in the order to apply them."""
        return [
            Event("feed-snapshot", _encoder.encode(list(self._feed))),
            Event("holds", _encoder.encode(self._holds)),
            Event("gateways", _encoder.encode(self._gateways)),
            Event("rates", _encoder.encode(self._rates.snapshot())),
        ]

    def identity(self) -> dict[str, Any]:
        """Who votes from this console (None: no key, no buttons)."""
        if self.kid is None:
            return {"approver": None, "kid": None}
        return {"approver": self.approver or self.kid, "kid": self.kid}

    # --- running -------------------------------------------------------------------------

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Subscribe (confirmed by the server before this returns), then poll in *tg*."""
        subjects = self._subjects
        for kind in ("deny", "hold"):
            await self.nc.subscribe(subjects.wildcard(kind), cb=self._on_decision)
        await self.nc.subscribe(subjects.ledger().any_decision("*"), cb=self._on_ledger)
        await round_trip(self.nc)
        if self.settings.since_s is not None:
            await self._replay(self.settings.since_s)
        await self._poll_stats()
        await self._read_holds()
        tg.start_soon(self._stats_loop)
        tg.start_soon(self._feed_loop)
        tg.start_soon(self._holds_loop)

    async def _replay(self, since_s: float) -> None:
        """The deny and hold streams' records of the last *since_s* seconds (as ``watch
        --since``), merged with what arrived live meanwhile: the newest feed_size, each
        once, oldest first. Before any browser connects."""
        replayed: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.settings.feed_size
        )
        records = replay_streams(self.nc, self.settings.prefix, WatchFilter(), since_s)
        try:
            async with contextlib.aclosing(records):
                async for _, data in records:
                    try:
                        replayed.append(feed_item(_decoder.decode(data)))
                    except msgspec.DecodeError:
                        continue
        except GatewayError as exc:
            log.warning("%s", exc)
        merged = {item["decision_id"]: item for item in [*replayed, *self._feed]}
        self._feed.clear()
        self._feed.extend(sorted(merged.values(), key=lambda item: float(item["ts"])))

    async def _on_decision(self, msg: Msg) -> None:
        try:
            record = _decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.debug("not a decision record on %s; ignored", msg.subject)
            return
        item = feed_item(record)
        self._feed.append(item)
        self._unsent.append(item)
        self._feed_due.set()
        if record.effect == "hold" or record.hold:
            self._holds_due.set()

    async def _on_ledger(self, msg: Msg) -> None:
        if _HOLD_KEY in msg.data:  # a vote or a resolution: the open holds changed
            self._holds_due.set()

    async def _feed_loop(self) -> None:
        while True:
            await self._feed_due.wait()
            await anyio.sleep(_FEED_BATCH_S)
            self._feed_due = anyio.Event()
            rows = list(self._unsent)
            self._unsent.clear()
            self.hub.publish("feed", rows)

    async def _stats_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.interval_s)
            await self._poll_stats()

    async def _poll_stats(self) -> None:
        try:
            answers = await gateway_stats(self.nc, wait_s=self.settings.stats_wait_s)
        except nats.errors.Error as exc:
            log.warning("$SRV.STATS: %s", exc)
            answers = []
        now = self._clock()
        self._rates.observe(now, answers)
        for stats in answers:
            self._answers[str(stats.get("id", ""))] = (stats, now)
        for service, (_, seen) in list(self._answers.items()):
            if seen < now - _GONE_AFTER_S:
                del self._answers[service]
        self._gateways = sorted(
            (gateway_row(stats, seen=seen, now=now) for stats, seen in self._answers.values()),
            key=lambda row: (row["gateway"], row["service_id"]),
        )
        self.hub.publish("gateways", self._gateways)
        self.hub.publish("rates", self._rates.snapshot())

    async def _holds_loop(self) -> None:
        while True:
            with anyio.move_on_after(_HOLDS_EVERY_S):
                await self._holds_due.wait()
            await anyio.sleep(_HOLDS_DEBOUNCE_S)  # a burst of records: one read
            await self._read_holds()

    async def _read_holds(self) -> None:
        self._holds_due = anyio.Event()
        try:
            found = await open_holds(
                self.nc,
                prefix=self.settings.prefix,
                since=self._clock() - self.settings.holds_since_s,
                limit=self.settings.holds_limit,
            )
        except (GatewayError, nats.errors.Error) as exc:
            self._holds = {"holds": [], "more": False, "error": str(exc)}
        else:
            self._holds = {
                "holds": [msgspec.to_builtins(h) for h in found.holds],
                "more": found.more,
                "error": None,
            }
        self.hub.publish("holds", self._holds)

    # --- what browsers ask for -----------------------------------------------------------

    async def vote(self, hold_id: str, verdict: str, reason: str) -> tuple[int, dict[str, Any]]:
        """Sign and store a vote as ``bus-guard approve --wait`` does: an HTTP status and
        what to show (``ok``, ``message``, and the gateway's ``reason`` when it refused)."""
        if self.key is None:
            return 403, {"ok": False, "message": "this console has no --approver-key"}
        if verdict not in ("approve", "reject"):
            return 400, {"ok": False, "message": "the verdict is approve or reject"}
        cast = approve if verdict == "approve" else reject
        try:
            vote = await cast(
                self.nc,
                hold_id,
                self.key,
                approver=self.approver,
                reason=reason,
                prefix=self.settings.prefix,
                wait_s=self.settings.vote_wait_s,
            )
        except ValueError as exc:
            return 400, {"ok": False, "message": str(exc)}
        except ApprovalRefused as exc:
            message = f"refused: {exc.reason}: {exc}"
            return 409, {"ok": False, "reason": exc.reason, "message": message}
        except (GatewayError, nats.errors.Error) as exc:
            return 502, {"ok": False, "message": str(exc)}
        finally:
            self._holds_due.set()
        return _reported(vote, verdict, self.settings.vote_wait_s)

    async def lineage(self, decision_id: str) -> tuple[int, dict[str, Any]]:
        """The ancestors and descendants of *decision_id* as tree lines (``bus-guard
        lineage``), from the ledger's decision records."""
        stream = self._subjects.streams.ledger
        records: dict[str, LedgerRecord] = {}
        children: dict[str, list[str]] = collections.defaultdict(list)
        cut = False
        try:
            async for stored in read(self.nc, stream, self._subjects.ledger().decision("*")):
                if len(records) >= _LINEAGE_MAX_RECORDS:
                    cut = True
                    break
                try:
                    record = decode_record(stored.data)
                except msgspec.DecodeError:
                    continue
                records[record.decision_id] = record
                for parent in _caused_by(record):
                    children[parent].append(record.decision_id)
        except nats.errors.NoRespondersError:
            return 502, {"found": False, "message": f"no ledger stream {stream} answers"}
        except nats.errors.Error as exc:
            return 502, {"found": False, "message": f"cannot read the ledger {stream}: {exc!r}"}
        if decision_id not in records:
            return 404, {
                "found": False,
                "message": f"{decision_id}: no such decision in the ledger {stream}",
            }
        ancestors = {rid: _caused_by(r) for rid, r in records.items()}
        return 200, {
            "found": True,
            "decision_id": decision_id,
            "ancestors": render_tree(decision_id, ancestors, records),
            "descendants": render_tree(decision_id, children, records),
            "cut": cut,
        }


def _reported(vote: Vote, verdict: str, wait_s: float) -> tuple[int, dict[str, Any]]:
    recorded = vote.recorded
    stored = f"{verdict} vote stored ({vote.stream} seq {vote.seq})"
    if recorded is None:
        return 202, {
            "ok": False,
            "message": f"{stored}, not recorded by a gateway within {wait_s:g}s",
        }
    detail = f": {recorded.message}" if recorded.message else ""
    if recorded.effect not in ("approve", "reject"):
        return 409, {
            "ok": False,
            "reason": recorded.reason,
            "message": f"refused by the gateway: {recorded.reason}{detail}",
        }
    message = f"{stored}; counted as decision {recorded.decision_id}"
    resolution = vote.resolution
    if resolution is not None:
        what = "released" if resolution.effect == "allow" else "denied"
        message += f"; hold {what} ({resolution.reason}) as decision {resolution.decision_id}"
    return 200, {"ok": True, "reason": recorded.reason, "message": message}
