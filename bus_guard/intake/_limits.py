"""Limits at run time: sliding windows in a JetStream key-value bucket, spent by
compare-and-set, so that every gateway replica sees and spends the same budget.

One key per (limit, value of its ``per``) holds that window's log: the spends of the last
``window_s`` seconds, each ``[t, amount, decision id]``. An intent fits when what the log
holds inside the window plus its own amount is at most the limit's ``max``; spending it
appends its entry and writes the log back with ``Nats-Expected-Last-Subject-Sequence`` =
the revision it was read at. The server takes exactly one of two concurrent writes; the
loser reads again and decides again. Nothing is allowed that a stored log does not hold:
that is what makes the count exact across replicas, not eventually.

* **Idempotent by decision id.** A spend is entered under the intent's decision id; an
  intent whose id is already in the log fits without spending again. A gateway that
  crashes after spending and before recording the decision leaves an entry that the
  redelivered intent finds (and keeps): no double spend, and nothing forgotten.
* **Several limits, several rules.** A rule's limits are spent together or not at all
  (an entry written for one whose sibling turns out full is taken out again); of several
  applicable allow rules, the first (by id) whose limits all have room is the one spent,
  and the intent's entries are taken out of the others.
* **Time.** Entries carry this gateway's clock, a monotonic clock anchored to the wall
  clock once at start (a jump of the wall clock later moves neither), and a log's time
  never runs backwards: a window is judged at ``max(now, newest entry)``.
* **Bounded.** A log keeps at most :data:`MAX_ENTRIES` entries: beyond that its oldest
  entries are merged into the later one (the amounts add up, the time is the later one's),
  which only ever counts a spend for longer, never shorter. The local cache of logs is a
  bounded LRU.
* **Fail closed.** A store that cannot be read or written within ``timeout_s`` (the whole
  spend, every round), or a log that keeps changing under us (:data:`MAX_ROUNDS` rounds),
  is :class:`Unavailable`: the intake
  denies ``internal_error`` (counted, logged); never an allow it could not check.

A log read from the local cache can only be behind the store (other gateways append;
entries leave only by time, which the cache applies too), so a limit full in the cache is
full in the store: such intents are denied without a round trip (a flood costs no I/O).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import msgspec
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, NotFoundError

from bus_guard.decision import Decision, LimitSpec, LimitUse, Lineage, Reason
from bus_guard.intent import Intent, Subject
from bus_guard.pipeline import PolicySetLike, deny, limited, request_of
from bus_guard.policy import limit_amount, limit_key

__all__ = (
    "MAX_ENTRIES",
    "MAX_ROUNDS",
    "Ask",
    "Fit",
    "LimitClock",
    "LimitLog",
    "LimitStore",
    "Limited",
    "Unavailable",
    "Usage",
    "ask_of",
    "ensure_bucket",
    "kv_key",
    "settle_logs",
)

log = logging.getLogger(__name__)

MAX_ENTRIES: Final = 256  # per log; beyond it the oldest entries are merged (conservative)
MAX_ROUNDS: Final = 16  # compare-and-set rounds before a batch's remaining intents fail
CACHE_KEYS: Final = 65536  # logs kept locally (LRU)
_WRONG_LAST: Final = (10071, 10164)  # JSStreamWrongLastSequence(Constant)Err
_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9_-]")


class Unavailable(Exception):
    """The limit store could not say (down, timed out, or contended beyond MAX_ROUNDS)."""


class LimitLog(msgspec.Struct, array_like=True):
    """One window's log as stored (JSON): what it limits, and the spends it holds."""

    limit: str
    rule: str
    kind: str
    max: float
    window_s: float
    per: str
    key: str  # the value of ``per`` (a principal, group, resource or lineage root)
    entries: list[tuple[float, float, str]] = []  # (t, amount, decision id), oldest first

    def newest(self) -> float:
        return self.entries[-1][0] if self.entries else 0.0

    def used(self, now: float, skip: str = "") -> float:
        """What the log holds inside the window ending at *now* (``skip``: not that id's)."""
        start = now - self.window_s
        return sum(a for t, a, d in self.entries if t > start and d != skip)

    def holds(self, decision_id: str, now: float) -> bool:
        start = now - self.window_s
        return any(d == decision_id and t > start for t, _, d in self.entries)

    def time_of(self, decision_id: str) -> float:
        """When *decision_id* was spent (0.0: it is not in the log)."""
        return next((t for t, _, d in self.entries if d == decision_id), 0.0)


class Usage(msgspec.Struct, frozen=True):
    """One key's use of its limit now (``bus-guard limits``)."""

    limit: str
    rule: str
    kind: str
    max: float
    window_s: float
    per: str
    key: str
    used: float  # inside the window now
    spends: int  # entries inside the window (merged ones count once)
    frees_in_s: float  # when the oldest of them leaves the window


_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.Decoder(LimitLog).decode


def kv_key(limit: str, key: str) -> str:
    """The bucket key of *limit*'s log for the ``per`` value *key*: readable where it can
    be (a KV key is ``[-/_=.A-Za-z0-9]``), and a digest of both so that no two collide."""
    digest = hashlib.sha256(f"{limit}\x00{key}".encode()).hexdigest()[:32]
    return f"{_KEY_CHARS.sub('_', limit)[:64]}.{digest}"


class LimitClock:
    """Seconds since the epoch from a monotonic clock, anchored once: a later jump of the
    wall clock (NTP step, an operator's ``date -s``) moves neither window end."""

    __slots__ = ("_anchor",)

    def __init__(self, wall: float | None = None) -> None:
        self._anchor = (time.time() if wall is None else wall) - time.monotonic()

    def __call__(self) -> float:
        return self._anchor + time.monotonic()


@dataclass(frozen=True, slots=True)
class Ask:
    """One allowed intent's limits: per applicable allow rule (in id order) the limits to
    spend, each with the key it counts against and this intent's amount."""

    decision_id: str
    groups: tuple[tuple[tuple[LimitSpec, str, float], ...], ...]
    cached_deny: bool = True  # may be denied from the local cache (not a redelivery)


class Limited(NamedTuple):
    """An allow that has limits to spend, with what its keys and amounts come from."""

    decision_id: str
    decision: Decision
    subject: Subject
    intent: Intent
    lineage: Lineage | None
    fresh: bool = True  # first delivery: may be denied from the local cache


def ask_of(item: Limited) -> Ask | str:
    """The :class:`Ask` of *item*, or why its amount cannot be spent (``malformed``)."""
    request = request_of(item.subject, item.intent, item.lineage)
    groups = []
    for group in item.decision.limits:
        specs = []
        for spec in group:
            amount = limit_amount(spec, request)
            if isinstance(amount, str):
                return amount
            specs.append((spec, limit_key(spec, request), amount))
        groups.append(tuple(specs))
    return Ask(item.decision_id, tuple(groups), item.fresh)


@dataclass(frozen=True, slots=True)
class Fit:
    """What the limits said of one :class:`Ask`: ``ok`` with what was spent, or the first
    limit that was full (``ok`` False)."""

    ok: bool
    uses: tuple[LimitUse, ...]


def _use(spec: LimitSpec, key: str, used: float, amount: float, at: float) -> LimitUse:
    return LimitUse(
        spec.name, spec.rule, spec.kind, spec.max, spec.window_s, spec.per, key, used, amount, at
    )


def _fresh(spec: LimitSpec, key: str) -> LimitLog:
    return LimitLog(spec.name, spec.rule, spec.kind, spec.max, spec.window_s, spec.per, key, [])


def _prune(entries: list[tuple[float, float, str]], now: float, window_s: float) -> None:
    """Drop what left the window; merge the oldest beyond MAX_ENTRIES (in place)."""
    start = now - window_s
    first = 0
    while first < len(entries) and entries[first][0] <= start:
        first += 1
    if first:
        del entries[:first]
    while len(entries) > MAX_ENTRIES:
        (_, a0, _), (t1, a1, d1) = entries[0], entries[1]
        # The merged spend lasts as long as the later one: counted longer, never shorter.
        entries[0:2] = [(t1, a0 + a1, d1)]


def settle_logs(
    asks: Sequence[Ask], logs: dict[str, LimitLog], now: float
) -> tuple[list[Fit], set[str]]:
    """Decide every ask against *logs* (bucket key -> log; every key the asks name), in
    order, spending into the logs in place. Returns the fits and the keys written. Pure.

    The first group (rule) whose limits all have room (or already hold the ask's id) is
    spent; the ask's id is taken out of every other group's logs (an earlier attempt may
    have left it there)."""
    fits: list[Fit] = []
    dirty: set[str] = set()
    for ask in asks:
        chosen: int | None = None
        full: LimitUse | None = None
        spends: list[LimitUse] = []
        for g, group in enumerate(ask.groups):
            uses: list[LimitUse] = []
            for spec, key, amount in group:
                lg = logs[kv_key(spec.name, key)]
                at = max(now, lg.newest())
                if lg.holds(ask.decision_id, at):
                    spent_at = lg.time_of(ask.decision_id)
                    uses.append(_use(spec, key, lg.used(at, ask.decision_id), amount, spent_at))
                    continue
                used = lg.used(at)
                if used + amount > spec.max:
                    if full is None:
                        full = _use(spec, key, used, amount, at)
                    break
                uses.append(_use(spec, key, used, amount, at))
            else:
                chosen, spends = g, uses
                break
        for g, group in enumerate(ask.groups):
            for spec, key, amount in group:
                k = kv_key(spec.name, key)
                lg = logs[k]
                at = max(now, lg.newest())
                present = lg.holds(ask.decision_id, at)
                if g == chosen and not present:
                    lg.entries.append((at, amount, ask.decision_id))
                    _prune(lg.entries, at, lg.window_s)
                    dirty.add(k)
                elif g != chosen and present:
                    lg.entries[:] = [e for e in lg.entries if e[2] != ask.decision_id]
                    dirty.add(k)
        if chosen is not None:
            fits.append(Fit(True, tuple(spends)))
        else:
            assert full is not None
            fits.append(Fit(False, (full,)))
    return fits, dirty


async def ensure_bucket(js: JetStreamContext, bucket: str, *, replicas: int) -> None:
    """Create the limits bucket if it is missing (file storage, one value per key)."""
    try:
        await js.stream_info(f"KV_{bucket}")
        return
    except NotFoundError:
        pass
    await js.create_key_value(
        KeyValueConfig(
            bucket=bucket,
            description="bus_guard: sliding-window logs of rate limits and budgets",
            history=1,
            replicas=replicas,
            storage=StorageType.FILE,
            max_value_size=1 << 20,
            direct=True,
        )
    )
    log.info("created key-value bucket %s", bucket)


@dataclass
class LimitStore:
    """The logs of one bucket, spent by compare-and-set (see the module docstring)."""

    js: JetStreamContext
    bucket: str
    clock: Callable[[], float] = field(default_factory=LimitClock)
    timeout_s: float = 2.0
    replicas: int = 1  # of the bucket, when this store creates it
    # (log, revision) per bucket key: revision 0 means "no such key yet"
    _cache: OrderedDict[str, tuple[LimitLog, int]] = field(default_factory=OrderedDict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conflicts: int = 0  # compare-and-set writes that lost to another writer
    failures: int = 0  # batches denied because the store could not say
    cached_denials: int = 0  # asks denied from the local cache, without a round trip
    ready: bool = False  # the bucket is known to exist (preflight); else found on first use

    @property
    def _stream(self) -> str:
        return f"KV_{self.bucket}"

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def read(self, key: str, *, leader: bool = False) -> tuple[LimitLog | None, int]:
        """The stored log of bucket key *key* and its revision (``None, 0``: none yet)."""
        try:
            msg = await self.js.get_msg(self._stream, subject=self._subject(key), direct=not leader)
        except NotFoundError:
            return None, 0
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None, msg.seq or 0
        try:
            return _decode(msg.data or b""), msg.seq or 0
        except msgspec.ValidationError as exc:  # a log we did not write: start over on it
            log.error("limits bucket key %s holds no log (%s): replaced", key, exc)
            return None, msg.seq or 0

    async def _write(self, key: str, lg: LimitLog, revision: int) -> int | None:
        """Write *lg* if the key is still at *revision*; its new revision, or None (lost)."""
        try:
            ack = await self.js.publish(
                self._subject(key),
                _encode(lg),
                timeout=self.timeout_s,
                headers={_EXPECTED_LAST: str(revision)},
            )
        except APIError as exc:
            if exc.err_code in _WRONG_LAST:
                return None
            raise
        return int(ack.seq)

    def _remember(self, key: str, lg: LimitLog, revision: int) -> None:
        cache = self._cache
        cache[key] = (lg, revision)
        cache.move_to_end(key)
        while len(cache) > CACHE_KEYS:
            cache.popitem(last=False)

    async def spend(self, asks: Sequence[Ask]) -> list[Fit]:
        """Decide and spend *asks* in order; :class:`Unavailable` if the store cannot say."""
        async with self._lock:  # one batch at a time: the cache is ours alone meanwhile
            try:
                async with asyncio.timeout(self.timeout_s):  # the whole spend: every round
                    if not self.ready:  # core mode: found or created on first use
                        await ensure_bucket(self.js, self.bucket, replicas=self.replicas)
                        self.ready = True
                    return await self._spend(asks)
            except Unavailable:
                raise
            except (TimeoutError, NatsError, OSError) as exc:
                raise Unavailable(f"{type(exc).__name__}: {exc}") from exc

    def _from_cache(self, ask: Ask, now: float) -> Fit | None:
        """A denial the cache alone proves (every group has a full limit), else None."""
        full: LimitUse | None = None
        for group in ask.groups:
            for spec, key, amount in group:
                cached = self._cache.get(kv_key(spec.name, key))
                if cached is None:
                    continue
                lg = cached[0]
                at = max(now, lg.newest())
                if lg.holds(ask.decision_id, at):
                    return None
                used = lg.used(at)
                if used + amount > spec.max:
                    full = full or _use(spec, key, used, amount, at)
                    break
            else:
                return None
        return Fit(False, (full,)) if full is not None else None

    async def _spend(self, asks: Sequence[Ask]) -> list[Fit]:
        now = self.clock()
        results: list[Fit | None] = [None] * len(asks)
        todo: list[int] = []
        for i, ask in enumerate(asks):
            fit = self._from_cache(ask, now) if ask.cached_deny else None
            if fit is not None:
                self.cached_denials += 1
                results[i] = fit
            else:
                todo.append(i)
        stale: set[str] = set()  # keys whose cached log lost a write: read from the leader
        for _ in range(MAX_ROUNDS):
            if not todo:
                break
            keys = {
                kv_key(spec.name, key): (spec, key)
                for i in todo
                for group in asks[i].groups
                for spec, key, _ in group
            }
            missing = [k for k in keys if k not in self._cache or k in stale]
            read = await asyncio.gather(*(self.read(k, leader=k in stale) for k in missing))
            for k, (stored, revision) in zip(missing, read, strict=True):
                spec, key = keys[k]
                self._remember(k, stored or _fresh(spec, key), revision)
            # Work on copies: only a write that lands changes what the cache holds.
            working = {
                k: msgspec.structs.replace(
                    self._cache[k][0], entries=list(self._cache[k][0].entries)
                )
                for k in keys
            }
            fits, dirty = settle_logs([asks[i] for i in todo], working, now)
            order = sorted(dirty)
            written = await asyncio.gather(
                *(self._write(k, working[k], self._cache[k][1]) for k in order)
            )
            lost: set[str] = set()
            for k, landed in zip(order, written, strict=True):
                if landed is None:
                    lost.add(k)
                    self.conflicts += 1
                else:
                    self._remember(k, working[k], landed)
            stale = lost
            again = []
            for i, fit in zip(todo, fits, strict=True):
                mine = {kv_key(s.name, k) for g in asks[i].groups for s, k, _ in g}
                if mine & lost:
                    again.append(i)
                else:
                    results[i] = fit
            todo = again
        if todo:
            raise Unavailable(f"limit logs kept changing for {MAX_ROUNDS} rounds")
        return [r for r in results if r is not None]

    async def settle(self, todo: Sequence[Limited], policies: PolicySetLike) -> list[Decision]:
        """The decision that stands for each allow of *todo* once its limits are spent:
        the allow (with what it spent), ``rate_limited`` / ``budget_exceeded``,
        ``malformed`` (an amount that is not a finite number >= 0), or ``internal_error``
        when the store cannot say. Never raises (but for cancellation)."""
        out: list[Decision | None] = [None] * len(todo)
        asks: list[Ask] = []
        where: list[int] = []
        for i, item in enumerate(todo):
            ask = ask_of(item)
            if isinstance(ask, str):
                out[i] = deny(Reason.MALFORMED, ask, policies)
            else:
                asks.append(ask)
                where.append(i)
        if asks:
            try:
                fits = await self.spend(asks)
            except Unavailable as exc:
                self.failures += 1
                log.warning("limits unavailable (%d intents denied): %s", len(asks), exc)
                for i in where:
                    out[i] = deny(Reason.INTERNAL_ERROR, f"limits unavailable: {exc}", policies)
            except Exception as exc:  # a bug: fail closed
                self.failures += 1
                log.exception("spending limits failed")
                for i in where:
                    out[i] = deny(Reason.INTERNAL_ERROR, f"limits failed: {exc}", policies)
            else:
                for i, fit in zip(where, fits, strict=True):
                    out[i] = limited(todo[i].decision, fit.uses, fit.ok, policies)
        return [d for d in out if d is not None]

    async def used_now(self, spec: LimitSpec, key: str) -> float:
        """What *spec*'s window for *key* holds now (``policy explain --nats``)."""
        stored, _ = await self.read(kv_key(spec.name, key), leader=True)
        if stored is None:
            return 0.0
        return stored.used(max(self.clock(), stored.newest()))

    async def usage(self, principal: str | None = None) -> list[Usage]:
        """What every key with spends in its window has used now (``bus-guard limits``);
        *principal*: only keys that are that principal (per principal or lineage root)."""
        now = self.clock()
        out = []
        for lg in await self.logs():
            if principal is not None and (
                lg.per not in ("principal", "lineage_root") or lg.key != principal
            ):
                continue
            at = max(now, lg.newest())
            start = at - lg.window_s
            live = [(t, a) for t, a, _ in lg.entries if t > start]
            if not live:
                continue
            frees = live[0][0] + lg.window_s - at
            out.append(
                Usage(
                    lg.limit,
                    lg.rule,
                    lg.kind,
                    lg.max,
                    lg.window_s,
                    lg.per,
                    lg.key,
                    sum(a for _, a in live),
                    len(live),
                    round(frees, 3),
                )
            )
        return sorted(out, key=lambda u: (u.limit, u.key))

    async def logs(self) -> list[LimitLog]:
        """Every stored log (for ``bus-guard limits``): read from the leader."""
        try:
            kv = await self.js.key_value(self.bucket)
            keys = await kv.keys()
        except NotFoundError:  # no bucket (nothing spent yet), or no keys
            return []
        out = []
        for key in keys:
            stored, _ = await self.read(key, leader=True)
            if stored is not None:
                out.append(stored)
        return out
