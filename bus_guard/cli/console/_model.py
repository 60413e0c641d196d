"""What the console shows, as JSON-ready values: pure, no I/O, no clock of its own.

* :class:`RateBook`: decision counts per poll of the gateways' ``$SRV`` stats, by effect
  and reason, over a sliding window (the chart and the table under it);
* :func:`feed_item`: a deny or hold record as one row of the live feed;
* :func:`gateway_row`: one gateway's identity and health from its STATS answer.

Every string here came from the bus (agents chose most of them): the page only ever puts
them into the DOM as text (``textContent``), never as markup.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from bus_guard.cli._status import _status_of as status_of
from bus_guard.pipeline import DecisionRecord

__all__ = ("MAX_PAYLOAD_CHARS", "RateBook", "feed_item", "gateway_row", "status_of")

MAX_PAYLOAD_CHARS: Final = 2048
"""The most of a record's payload a feed row carries (the rest is cut, and says so)."""

Key = tuple[str, str]  # (effect, reason)


def _counts(status: Mapping[str, Any]) -> dict[Key, int]:
    """``{(effect, reason): n}`` of a status document's ``decisions``, malformed entries
    skipped (a STATS answer is anyone's on the bus who can answer ``$SRV``)."""
    out: dict[Key, int] = {}
    decisions = status.get("decisions")
    if not isinstance(decisions, dict):
        return out
    for effect, reasons in decisions.items():
        if not isinstance(reasons, dict):
            continue
        for reason, n in reasons.items():
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                out[(str(effect), str(reason))] = n
    return out


@dataclass
class RateBook:
    """Decision counts by (effect, reason), one bucket per poll, over *window_s*.

    Each poll (:meth:`observe`) takes every answering gateway's cumulative counters and
    adds what grew since that gateway's previous answer to a new bucket. A gateway first
    seen at the console's first poll, or later with an uptime beyond *baseline_after_s*,
    is a baseline (its past is not this window's); one that starts while the console
    watches counts from zero. A counter that went down is a restarted gateway: a new
    baseline. ``totals`` is the sum of the last answers' counters: what ``bus-guard
    status`` shows.
    """

    interval_s: float
    window_s: float
    baseline_after_s: float = 10.0
    _last: dict[str, dict[Key, int]] = field(default_factory=dict)
    _buckets: collections.deque[tuple[float, dict[Key, int]]] = field(
        default_factory=collections.deque
    )
    _polls: int = 0
    totals: dict[Key, int] = field(default_factory=dict)

    def observe(self, now: float, answers: Iterable[dict[str, Any]]) -> None:
        bucket: dict[Key, int] = {}
        totals: dict[Key, int] = {}
        for stats in answers:
            service = str(stats.get("id", ""))
            status = status_of(stats)
            counts = _counts(status)
            for key, n in counts.items():
                totals[key] = totals.get(key, 0) + n
            previous = self._last.get(service)
            uptime = status.get("uptime_s")
            if previous is None:
                fresh = isinstance(uptime, int | float) and uptime <= self.baseline_after_s
                previous = {} if self._polls and fresh else counts
            if any(n < previous.get(key, 0) for key, n in counts.items()):
                previous = {}  # restarted under the same id: count it from zero
            for key, n in counts.items():
                grown = n - previous.get(key, 0)
                if grown > 0:
                    bucket[key] = bucket.get(key, 0) + grown
            self._last[service] = counts
        self._polls += 1
        self.totals = totals
        self._buckets.append((now, bucket))
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._buckets.popleft()

    def window(self) -> dict[Key, int]:
        """The counts of every bucket in the window, added up."""
        out: dict[Key, int] = {}
        for _, bucket in self._buckets:
            for key, n in bucket.items():
                out[key] = out.get(key, 0) + n
        return out

    def snapshot(self) -> dict[str, Any]:
        """The chart's data: ``points`` ``[t, {"effect/reason": n}]`` oldest first, and per
        (effect, reason) the window's count and the stats' total."""
        window = self.window()
        keys = sorted(set(window) | set(self.totals))
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "points": [
                [round(t, 3), {f"{e}/{r}": n for (e, r), n in sorted(b.items())}]
                for t, b in self._buckets
            ],
            "rows": [
                {
                    "effect": e,
                    "reason": r,
                    "window": window.get((e, r), 0),
                    "total": self.totals.get((e, r), 0),
                }
                for e, r in keys
            ],
        }


def feed_item(record: DecisionRecord) -> dict[str, Any]:
    """One row of the feed: when, who, what, why, which rule, the decision id, and the
    payload as text (cut at :data:`MAX_PAYLOAD_CHARS`)."""
    payload = record.payload if record.payload is not None else record.payload_b64 or ""
    cut = record.payload_truncated or len(payload) > MAX_PAYLOAD_CHARS
    return {
        "decision_id": record.decision_id,
        "effect": "would-deny" if record.would_deny else record.effect,
        "reason": record.reason,
        "message": record.message,
        "principal": record.principal,
        "action": record.action,
        "resource": record.resource,
        "subject": record.subject,
        "rules": list(record.rules),
        "ts": record.ts,
        "gateway": record.gateway,
        "intent_id": record.intent_id,
        "hold": record.hold,
        "payload": payload[:MAX_PAYLOAD_CHARS],
        "payload_cut": cut,
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def gateway_row(stats: dict[str, Any], *, seen: float, now: float) -> dict[str, Any]:
    """One gateway: identity, policy, key, readiness and health, as ``bus-guard status``
    reads them from its STATS answer (*seen*: when it last answered)."""
    status = status_of(stats)
    identity = _dict(status.get("identity"))
    counters = _dict(status.get("statistics"))
    latency = _dict(status.get("latency_s"))
    queues = _dict(status.get("queues"))
    errors = 0
    for name in ("internal_errors", "publish_failures"):
        value = counters.get(name, 0)
        errors += value if isinstance(value, int) else 0
    ready = status.get("ready") is True
    stale = now - seen
    if stale > 0:
        health = "not answering"
    elif not ready:
        health = "not ready"
    elif errors:
        health = "errors"
    else:
        health = "ok"
    return {
        "service_id": str(stats.get("id", "?")),
        "gateway": str(identity.get("gateway", "?")),
        "mode": str(identity.get("mode", "?")),
        "artifacts": str(identity.get("artifacts", "?")),
        "policy_digest": str(identity.get("policy_digest", "?")),
        "policy_version": str(identity.get("policy_version", "?")),
        "policy_revision": str(identity.get("policy_revision", "")),
        "policy_mode": str(identity.get("policy_mode", "")),
        "kid": str(identity.get("kid", "?")),
        "version": str(identity.get("version", "")),
        "ready": ready,
        "health": health,
        "uptime_s": _number(status.get("uptime_s")),
        "decided": sum(_counts(status).values()),
        "errors": errors,
        "queued": _number(queues.get("intake")),
        "p50_s": _number(latency.get("p50")),
        "p99_s": _number(latency.get("p99")),
        "seen": seen,
    }
