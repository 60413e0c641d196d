"""The gateway's Prometheus metrics: one collector that reads the gateway's own counters at
scrape time (nothing is counted twice, and a decision costs nothing extra in
``prometheus_client``).

Names follow Prometheus conventions: a ``bus_guard_`` namespace, ``_total`` counters,
base units (``_seconds``), labels only with a small closed set of values (effect, reason,
queue): no principal, action or resource label, whose values agents choose (see the README,
"Operating bus_guard", for per-principal counts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bus_guard.intake._tally import LATENCY_BUCKETS_S

__all__ = ("COUNTERS", "GatewayCollector", "Snapshot")

# statistics() field -> (metric name without namespace and _total, help). Every field of
# GatewayStatistics but allowed/denied/held/would_deny (bus_guard_decisions_total and
# bus_guard_would_deny_total say it by reason) and lineage_waiting (a gauge).
COUNTERS: Final[dict[str, tuple[str, str]]] = {
    "received": ("intents_received", "Intents taken from NATS (core: delivered; stream: pulled)."),
    "internal_errors": ("internal_errors", "Handler, signing or publishing failures, each denied."),
    "publish_failures": ("publish_failures", "Outputs that could not be handed to NATS."),
    "replies_sent": ("replies_sent", "Decision records sent to an intent's reply subject."),
    "replies_refused": ("replies_refused", "Reply subjects refused (not the agent's inbox)."),
    "slow_consumer_drops": ("slow_consumer_drops", "Intents dropped undecided (slow consumer)."),
    "reconnects": ("reconnects", "Reconnections to NATS."),
    "batches": ("pulled_batches", "Stream mode: pulled batches decided."),
    "adopted": ("adopted", "Stream mode: redelivered intents that took their recorded decision."),
    "replays": ("replays", "New messages reusing a decided intent id (denied replay)."),
    "ledger_records": ("ledger_records", "Stream mode: ledger records stored."),
    "ledger_refusals": ("ledger_refusals", "Stream mode: ledger commits refused (ids taken)."),
    "ledger_in_doubt": ("ledger_in_doubt", "Stream mode: ledger commits without an answer."),
    "acks": ("acks", "Stream mode: intents acknowledged."),
    "naks": ("naks", "Stream mode: intents sent back undecided or with outputs not stored."),
    "duplicate_outputs": ("duplicate_outputs", "Stream mode: outputs stored before (kept once)."),
    "late_adoptions": ("late_adoptions", "Stream mode: adoptions past the retry horizon."),
    "undeliverable": ("undeliverable", "Stream mode: outputs refused for good (terminated)."),
    "artifact_batches": ("artifact_trees", "Batched artifacts: signed Merkle tree heads."),
    "forged_parents": (
        "forged_parents",
        "Parent records that claimed an allow and did not verify.",
    ),
    "lineage_waits": ("lineage_waits", "Naks of children waiting for a parent."),
    "votes": ("votes", "Approvers' votes recorded."),
    "votes_refused": ("votes_refused", "Approvers' votes refused (each recorded as a denial)."),
    "holds_released": ("holds_released", "Holds released at quorum."),
    "holds_rejected": ("holds_rejected", "Holds denied by a rejection."),
    "holds_expired": ("holds_expired", "Holds denied at their expiry."),
    "forged_resolutions": ("forged_resolutions", "Hold resolutions that did not verify."),
    "limit_failures": ("limit_failures", "Allows denied: the limit store could not say."),
    "limit_conflicts": ("limit_conflicts", "Limit compare-and-set writes lost (retried)."),
    "limit_cached_denials": ("limit_cached_denials", "Limits full in the cache: denied at once."),
    "intents_unretained": ("intents_unretained", "Decided intents whose bytes were not retained."),
}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape shows, taken on the gateway's event loop in one go."""

    status: dict[str, Any]  # the gateway's status document (bus_guard.intake._service)
    policy_age_s: float
    ready: bool
    why_not_ready: tuple[str, ...]


class GatewayCollector(Collector):
    """Metrics of one gateway from *snapshot* (called once per scrape)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        status = snap.status
        stats: dict[str, int] = status["statistics"]
        identity: dict[str, str] = status["identity"]

        info = InfoMetricFamily("bus_guard_gateway", "This gateway: identity and active policy.")
        info.add_metric([], identity)
        yield info

        decisions = CounterMetricFamily(
            "bus_guard_decisions",
            "Decisions that stood, by effect (allow, deny, hold) and reason code.",
            labels=["effect", "reason"],
        )
        for effect, reasons in sorted(status["decisions"].items()):
            for reason, n in sorted(reasons.items()):
                decisions.add_metric([effect, reason], n)
        yield decisions
        yield CounterMetricFamily(
            "bus_guard_would_deny",
            "Observe mode: allows that enforcement would have denied.",
            value=stats["would_deny"],
        )
        for field, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(f"bus_guard_{name}", doc, value=stats[field])

        latency = status["latency_s"]
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), latency["counts"], strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        histogram = HistogramMetricFamily(
            "bus_guard_decision_latency_seconds",
            "From deciding to the decision standing (core: outputs published; stream: "
            "recorded in the ledger).",
        )
        histogram.add_metric([], buckets, latency["sum"])
        yield histogram

        queues = GaugeMetricFamily(
            "bus_guard_queue_depth",
            "Intents taken and not yet decided (intake), children waiting for a parent "
            "(lineage_waiting).",
            labels=["queue"],
        )
        for queue, depth in sorted(status["queues"].items()):
            queues.add_metric([queue], depth)
        yield queues
        yield GaugeMetricFamily(
            "bus_guard_policy_age_seconds",
            "Seconds since the active policy set became active.",
            value=snap.policy_age_s,
        )
        yield GaugeMetricFamily(
            "bus_guard_ready", "1 when /readyz says ready, else 0.", value=int(snap.ready)
        )
