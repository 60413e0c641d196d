"""JetStream operations bus_guard needs beyond nats-py's: atomic commits, lookups, reads.

* :func:`commit` stores a list of messages all-or-nothing (an ADR-50 atomic batch; one
  message is a plain publish) and says whether it was stored, refused, or whether that
  cannot be known (a timeout or a lost connection: *in doubt*).
* :func:`first_by_subject` and :func:`last_by_subject` are direct gets of the first and
  the last message on a subject (wildcards allowed): how a decision record is found by its
  id (the first: see :mod:`bus_guard.intake._parents` for why).
* :func:`read` iterates over a stream's stored messages in order (batched direct gets: no
  consumer, so a reader needs no right to create one): how the ledger is audited and
  searched.
* :class:`Puller` keeps one pull request outstanding on a durable consumer and hands out
  what arrived, without waiting for a full batch; it re-issues the pull when the server
  ends it, when heartbeats stop (a lost request, e.g. across a reconnect) and on demand.
* :func:`find_msg_id` looks for a message with a given ``Nats-Msg-Id`` on one subject in a
  time range: whether an output was already published, when de-duplication can no longer
  tell.
"""

from __future__ import annotations

import base64
import collections
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final, NamedTuple

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from bus_guard.ledger._records import Stored
from bus_guard.pipeline import HeaderValue

__all__ = (
    "UNAVAILABLE",
    "CommitResult",
    "Committed",
    "FairQueue",
    "InDoubt",
    "Puller",
    "Rejected",
    "Stored",
    "commit",
    "find_by_msg_id",
    "find_msg_id",
    "first_by_subject",
    "first_seq_since",
    "last_by_subject",
    "read",
)

log = logging.getLogger(__name__)

_JS_API: Final = "$JS.API"
_HDR_LINE: Final = b"NATS/1.0\r\n"
# What a direct get adds to the stored headers (nats-server 2.11+).
_DIRECT_GET_HEADERS: Final = frozenset(
    {
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Sequence",
        "Nats-Time-Stamp",
        "Nats-Num-Pending",
        "Nats-Last-Sequence",
        "Nats-UpTo-Sequence",
    }
)
# JetStream error codes that mean "these exact messages cannot be stored as they are".
WRONG_LAST_SEQUENCE: Final = 10071
DUPLICATE_IN_BATCH: Final = 10201
# No stream (leader) answered: nothing was stored; during a leader election, for a while.
UNAVAILABLE: Final = 503
# Ours, not the server's: a PubAck marked duplicate (see commit).
DUPLICATE_MSG_ID: Final = -1


class Committed(NamedTuple):
    seq: int  # stream sequence of the last message stored


class Rejected(NamedTuple):
    """The server refused the messages; none of them was stored."""

    code: int
    description: str


class InDoubt(NamedTuple):
    """No answer: the messages may or may not have been stored."""

    reason: str


CommitResult = Committed | Rejected | InDoubt


async def commit(
    nc: Client,
    entries: Sequence[tuple[str, bytes, Mapping[str, str]]],
    *,
    batch_id: str,
    timeout_s: float,
) -> CommitResult:
    """Store *entries* atomically: all of them, in this order and contiguously, or none."""
    if not entries:
        raise ValueError("nothing to commit")
    try:
        *head, (subject, data, headers) = entries
        last = dict(headers)
        if head:
            bid = HeaderValue(batch_id)  # the same bytes, cheaper for nats-py to send
            for i, (s, d, h) in enumerate(head, 1):
                await nc.publish(
                    s,
                    d,
                    headers={**h, "Nats-Batch-Id": bid, "Nats-Batch-Sequence": HeaderValue(str(i))},
                )
            last.update(
                {
                    "Nats-Batch-Id": bid,
                    "Nats-Batch-Sequence": HeaderValue(str(len(entries))),
                    "Nats-Batch-Commit": HeaderValue("1"),
                }
            )
        reply = await nc.request(subject, data, headers=last, timeout=timeout_s)
    except nats.errors.NoRespondersError:
        return Rejected(UNAVAILABLE, "no stream is listening")  # nothing received it: none stored
    except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
        return InDoubt(f"{type(exc).__name__}: {exc}")
    except nats.errors.Error as exc:  # reconnecting, buffer full, ...: part may have gone out
        return InDoubt(f"{type(exc).__name__}: {exc}")
    try:
        answer = json.loads(reply.data)
    except ValueError:
        return InDoubt(f"unreadable answer {reply.data[:80]!r}")
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        # 503 (no stream leader: an election, a node down): nothing stored, try again.
        code = UNAVAILABLE if error.get("code") == UNAVAILABLE else int(error.get("err_code", 0))
        return Rejected(code, str(error.get("description", "")))
    if not isinstance(answer, dict) or not isinstance(answer.get("seq"), int):
        return InDoubt(f"unexpected answer {reply.data[:80]!r}")
    if answer.get("duplicate") is True:
        # The message id was seen before: *nothing* was stored by this request. An R1
        # stream refuses a create-only message on a taken subject first (10071), but an R3
        # stream answers a re-used id with the earlier message's seq and this flag (nats-
        # server 2.15.1), whatever the expected-sequence headers say: never a store.
        return Rejected(DUPLICATE_MSG_ID, f"message id already stored (seq {answer['seq']})")
    return Committed(answer["seq"])


async def last_by_subject(
    js: JetStreamContext, stream: str, subject: str, *, direct: bool = True
) -> Stored | None:
    """The last message on *subject* (wildcards allowed), or ``None``; a direct get (any
    replica answers), or with ``direct=False`` the stream leader's answer.

    Transport failures raise (``nats.errors.Error``): "could not look" is not "absent".
    """
    try:
        raw = await js.get_msg(stream, subject=subject, direct=direct)
    except nats.js.errors.NotFoundError:
        return None
    return _stored(raw, subject)


async def first_by_subject(
    js: JetStreamContext, stream: str, subject: str, *, direct: bool = True
) -> Stored | None:
    """The first message on *subject* (wildcards allowed), or ``None``; a direct get (any
    replica answers), or with ``direct=False`` the stream leader's answer.

    Transport failures raise (``nats.errors.Error``): "could not look" is not "absent".
    """
    try:
        raw = await js.get_msg(stream, seq=1, subject=subject, direct=direct, next=True)
    except nats.js.errors.NotFoundError:
        return None
    return _stored(raw, subject)


def _stored(raw: RawStreamMsg, subject: str) -> Stored:
    headers = {k: v for k, v in (raw.headers or {}).items() if not k.startswith("Nats-")}
    return Stored(raw.seq or 0, raw.subject or subject, raw.data or b"", headers)


async def read(
    nc: Client,
    stream: str,
    subject: str,
    *,
    api_prefix: str = _JS_API,
    start_seq: int = 1,
    batch: int = 512,
    timeout_s: float = 5.0,
) -> AsyncIterator[Stored]:
    """Every message on *subject* stored from *start_seq* on, as of the call, in order.

    Batched direct gets (``$JS.API.DIRECT.GET.<stream>`` with ``batch`` and
    ``next_by_subj``; the stream needs ``allow_direct``): each request is answered by up to
    *batch* messages and a status 204 "EOB", and the next one starts after the last
    sequence received. "As of the call": the first message's ``Nats-Num-Pending`` says how
    many more there were then, and the read stops after that many.

    Raises ``nats.js.errors.NotFoundError`` when nothing answers for *stream* (no such
    stream, or no direct get), ``nats.errors.TimeoutError`` when a batch stops arriving,
    ``nats.js.errors.APIError`` on any other status.
    """
    inbox = nc.new_inbox()
    # one request at a time: at most a batch and its EOB are ever pending
    sub = await nc.subscribe(inbox, pending_msgs_limit=batch + 8)
    try:
        seq = max(1, start_seq)
        remaining: int | None = None  # messages still to read; unknown until the first
        while remaining != 0:
            body = {"seq": seq, "batch": batch, "next_by_subj": subject}
            await nc.publish(
                f"{api_prefix}.DIRECT.GET.{stream}", json.dumps(body).encode(), reply=inbox
            )
            while True:
                msg = await sub.next_msg(timeout=timeout_s)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "204":  # EOB: this batch is complete
                    break
                if status == "404":  # nothing (more) on the subject from seq on
                    return
                if status == "503":
                    raise nats.js.errors.NotFoundError(
                        code=503,
                        description=f"no direct get for stream {stream} "
                        "(no such stream, or allow_direct is off)",
                        stream=stream,
                    )
                if status is not None:
                    raise nats.js.errors.APIError(
                        code=int(status), description=headers.get("Description"), stream=stream
                    )
                seq = int(headers["Nats-Sequence"])
                pending = int(headers["Nats-Num-Pending"])
                remaining = pending if remaining is None else remaining - 1
                yield Stored(
                    seq,
                    headers["Nats-Subject"],
                    msg.data,
                    {k: v for k, v in headers.items() if k not in _DIRECT_GET_HEADERS},
                )
                if remaining <= 0:
                    return  # the last one as of the call; newer ones are not ours
            seq += 1
    finally:
        await sub.unsubscribe()


def _rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


async def first_seq_since(
    nc: Client, stream: str, subject: str, since: float, *, timeout_s: float = 5.0
) -> int:
    """The stream sequence of the first message on *subject* stored at or after *since*
    (unix seconds), 0 when there is none; a direct get. Raises ``nats.errors.Error`` when
    it cannot look (``APIError`` for an unexpected status)."""
    body = {"start_time": _rfc3339(since), "next_by_subj": subject}
    reply = await nc.request(
        f"{_JS_API}.DIRECT.GET.{stream}", json.dumps(body).encode(), timeout=timeout_s
    )
    headers = reply.headers or {}
    status = headers.get("Status")
    if status == "404":
        return 0
    if status is not None:
        raise nats.js.errors.APIError(
            code=int(status), description=headers.get("Description"), stream=stream
        )
    return int(headers["Nats-Sequence"])


async def find_msg_id(
    nc: Client,
    stream: str,
    subject: str,
    msg_id: str,
    *,
    since: float,
    until: float,
    timeout_s: float = 5.0,
) -> bool:
    """Whether *stream* holds a message with ``Nats-Msg-Id`` *msg_id* on *subject*, stored
    between *since* and *until* (unix seconds). Raises on transport failures."""
    found = await find_by_msg_id(
        nc, stream, subject, msg_id, since=since, until=until, timeout_s=timeout_s
    )
    return found is not None


async def find_by_msg_id(
    nc: Client,
    stream: str,
    subject: str,
    msg_id: str,
    *,
    since: float,
    until: float,
    timeout_s: float = 5.0,
) -> Stored | None:
    """The message of *stream* with ``Nats-Msg-Id`` *msg_id* on *subject*, stored between
    *since* and *until* (unix seconds), or ``None``. Raises on transport failures."""
    request: dict[str, Any] = {"start_time": _rfc3339(since), "next_by_subj": subject}
    while True:
        reply = await nc.request(
            f"{_JS_API}.STREAM.MSG.GET.{stream}", json.dumps(request).encode(), timeout=timeout_s
        )
        answer = json.loads(reply.data)
        if "error" in answer:
            if answer["error"].get("code") == 404:
                return None
            raise nats.js.errors.APIError.from_error(answer["error"])
        message = answer["message"]
        stored_at = datetime.datetime.fromisoformat(message["time"].replace("Z", "+00:00"))
        if stored_at.timestamp() > until:
            return None
        raw_headers = base64.b64decode(message.get("hdrs") or b"")
        if f"Nats-Msg-Id: {msg_id}\r\n".encode() in raw_headers.removeprefix(_HDR_LINE):
            return Stored(
                int(message["seq"]),
                message.get("subject", subject),
                base64.b64decode(message.get("data") or b""),
            )
        request = {"seq": int(message["seq"]) + 1, "next_by_subj": subject}


BURST_WAIT_S: Final = 0.005  # Puller.pull: the longest wait for the rest of a burst
RECENT_S: Final = 1.0  # a principal counts as active this long after its last intent


class FairQueue:
    """Pulled intents waiting to be decided, one FIFO per principal, served fairly.

    :meth:`take` fills a batch round-robin over the principals with intents waiting, each
    at most ``quantum`` per batch while another principal waits too (one alone gets the
    whole batch). A principal flooding the intake thus adds at most ``quantum`` intents to
    each batch that also holds other principals' intents, and those are decided in the
    next batch rather than behind the flood (SCENARIOS S13). Each principal's own intents
    keep their order. The principal is the subject token after *subject_prefix*
    (``guard.in.``); a subject without one is its own group ("").
    """

    __slots__ = ("_by", "_len", "_prefix", "_pruned", "_quantum", "_recent")

    def __init__(self, subject_prefix: str, *, quantum: int = 0) -> None:
        self._prefix = subject_prefix
        self._quantum = quantum  # 0: no cap (strict FIFO over everyone)
        self._by: dict[str, collections.deque[Msg]] = {}
        self._len = 0
        # principal -> when an intent of theirs last arrived (monotonic), for RECENT_S
        self._recent: dict[str, float] = {}
        self._pruned = 0.0

    def __len__(self) -> int:
        return self._len

    def add(self, msg: Msg) -> None:
        subject, prefix = msg.subject, self._prefix
        key = ""
        if self._quantum and subject.startswith(prefix):
            key = subject[len(prefix) :].partition(".")[0]
            self._recent[key] = time.monotonic()
        queue = self._by.get(key)
        if queue is None:
            queue = self._by[key] = collections.deque()
        queue.append(msg)
        self._len += 1

    def _shared(self) -> bool:
        """Whether more than one principal sent intents within the last RECENT_S."""
        recent = self._recent
        if len(recent) < 2:
            return False
        now = time.monotonic()
        if now - self._pruned > RECENT_S:
            self._pruned = now
            for key in [k for k, t in recent.items() if now - t > RECENT_S]:
                del recent[key]
        return len(recent) > 1

    def drain(self) -> list[Msg]:
        """Every queued intent, whoever sent it (stopping: they go back at once)."""
        out = [msg for queue in self._by.values() for msg in queue]
        self._by.clear()
        self._len = 0
        return out

    def take(self, max_n: int) -> list[Msg]:
        """Up to *max_n* intents, fairly (see the class)."""
        by = self._by
        if not self._quantum or not self._shared():
            out: list[Msg] = []
            for key in list(by):
                queue = by[key]
                while queue and len(out) < max_n:
                    out.append(queue.popleft())
                if not queue:
                    del by[key]
            self._len -= len(out)
            return out
        out = []
        quantum = max(1, self._quantum)
        for key in list(by):  # oldest principal first; each at most its share
            queue = by[key]
            # A queue that keeps growing gets a larger share (an eighth of it), so that a
            # flood beyond what quantum-sized batches decide cannot fill the read-ahead
            # and stop it (then everyone waits behind the flood in the stream).
            share = max(quantum, len(queue) >> 3)
            for _ in range(min(share, len(queue), max_n - len(out))):
                out.append(queue.popleft())
            if queue:  # to the back: the next batch starts with someone else
                del by[key]
                by[key] = queue
            else:
                del by[key]
            if len(out) >= max_n:
                break
        self._len -= len(out)
        return out


class Puller:
    """Pulls from a durable consumer through one inbox subscription (see the module doc).

    At most one pull request of ``batch`` messages is outstanding, so a gateway never holds
    more undecided intents than it is about to decide (each one's ack wait is running).
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        *,
        batch: int,
        expires_s: float,
        heartbeat_s: float,
        subject_prefix: str = "",
        quantum: int = 0,
        read_ahead: int = 0,
    ) -> None:
        self._nc = nc
        self._next_subject = f"{_JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._expires_s = expires_s
        self._heartbeat_s = heartbeat_s
        self._inbox = nc.new_inbox()
        self._queue = FairQueue(subject_prefix, quantum=quantum)
        self._capacity = max(batch, read_ahead)
        self._arrived = anyio.Event()
        self._outstanding = 0  # messages requested and not yet delivered, by the live request
        self._request_ends = 0.0  # monotonic time at which the live request expires
        self._last_heard = 0.0
        self._sub: Subscription | None = None
        self.requests = 0
        self.warnings = 0  # 409s and other unexpected statuses
        self._failures = 0  # unexpected statuses in a row
        self._retry_at = 0.0  # monotonic: no request before (backoff)

    @property
    def queued(self) -> int:
        """Intents read ahead and not yet taken (the fair queue's length)."""
        return len(self._queue)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._on_msg, pending_msgs_limit=self._batch * 4 + 64
        )

    async def stop(self) -> None:
        """Unsubscribe; intents pulled but not handed out go back at once (nak)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for msg in self._queue.drain():
            await msg.nak()

    def reset(self) -> None:
        """Forget the live request (after a reconnect the server may have dropped it)."""
        self._outstanding = 0

    async def _on_msg(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        # A delivery is told by its ack subject, never by its headers: an agent can put a
        # Status header (even an inline status line) on an intent, and a delivery taken
        # for a status message would be neither decided nor acked, pinning the consumer.
        if msg.reply.startswith("$JS.ACK."):
            self._queue.add(msg)
            self._outstanding = max(0, self._outstanding - 1)
            self._failures = 0
            self._arrived.set()
            return
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100":
            pass  # idle heartbeat: the request is alive
        elif status in ("404", "408"):
            self._outstanding = 0  # the request ended (expired, or nothing to wait for)
            self._failures = 0
        else:  # 503 during a leader election, 409s...: back off, and say so now and then
            self._outstanding = 0
            self.warnings += 1
            self._failures += 1
            self._retry_at = self._last_heard + min(0.05 * 2 ** min(self._failures, 6), 2.0)
            if self._failures in (1, 4) or self._failures % 32 == 0:
                reason = (msg.headers or {}).get("Description")
                log.warning(
                    "pull request ended: %s %s (%d in a row; retrying with backoff)",
                    status,
                    reason,
                    self._failures,
                )
        self._arrived.set()

    async def _request(self) -> None:
        # Read ahead up to the capacity (for the fair queue to choose from), one request
        # outstanding at a time.
        want = min(self._batch, self._capacity - len(self._queue))
        body = {
            "batch": want,
            "expires": int(self._expires_s * 1e9),
            "idle_heartbeat": int(self._heartbeat_s * 1e9),
        }
        await self._nc.publish(self._next_subject, json.dumps(body).encode(), reply=self._inbox)
        now = time.monotonic()
        self._outstanding = want
        self._request_ends = now + self._expires_s
        self._last_heard = now
        self.requests += 1

    def _request_alive(self) -> bool:
        now = time.monotonic()
        return (
            self._outstanding > 0
            and now < self._request_ends
            and now - self._last_heard < 2 * self._heartbeat_s + 0.5
        )

    async def pull(self, max_n: int, timeout_s: float) -> list[Msg]:
        """What has arrived, up to *max_n*; waits at most *timeout_s* for the first."""
        deadline = time.monotonic() + timeout_s
        if (
            len(self._queue) + self._batch <= self._capacity
            and not self._request_alive()
            and time.monotonic() >= self._retry_at
        ):
            await self._request()  # read ahead while what is queued is being decided
        while not self._queue:
            if not self._request_alive():
                now = time.monotonic()
                if now < self._retry_at:  # backing off after a failed request
                    if now >= deadline:
                        return []
                    await anyio.sleep(min(self._retry_at, deadline) - now)
                    continue
                await self._request()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._arrived = anyio.Event()
            with anyio.move_on_after(min(left, self._heartbeat_s * 2)):
                await self._arrived.wait()
        # A burst is arriving (a pull's batch is delivered back to back): take it whole
        # rather than a sliver, waiting while messages keep coming less than 1 ms apart,
        # for at most BURST_WAIT_S (a steady stream 1 ms apart is not a burst: waiting for
        # a full batch of it would add its whole arrival time to everyone's latency).
        deadline = min(deadline, time.monotonic() + BURST_WAIT_S)
        while len(self._queue) < max_n and self._outstanding and time.monotonic() < deadline:
            quiet = self._last_heard + 0.001 - time.monotonic()
            if quiet <= 0:
                break
            self._arrived = anyio.Event()
            with anyio.move_on_after(quiet):
                await self._arrived.wait()
        return self._queue.take(max_n)
