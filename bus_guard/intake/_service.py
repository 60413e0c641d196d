"""The gateway on the NATS micro service API: ``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``
(all services, ``.bus-guard`` for every gateway, ``.bus-guard.<id>`` for one), answered
by nats-py's own :mod:`nats.micro`.

* PING and INFO carry the gateway's identity in the service metadata (strings only, as the
  protocol says): gateway id, mode, artifacts, prefix, policy digest and version, key id.
* STATS carries the counters, as the ``data`` of the service's one endpoint, ``status``
  (``$SRV.STATUS.bus-guard.<id>``, under ``$SRV`` so that the permissions that let a
  gateway answer PING let it answer this too, ``compose/auth.conf``): a request to it
  gets the same document. See :func:`status_document` for its fields.

Nothing here decides or publishes a decision: a failure answering a request is nats.micro's
to count (the endpoint's ``num_errors``), never the intake's.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Protocol

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from bus_guard import __version__
from bus_guard.intake._tally import LATENCY_BUCKETS_S, TallySnapshot
from bus_guard.settings import Settings

__all__ = ("SERVICE_NAME", "STATUS_ENDPOINT", "GatewayService", "Observed", "status_document")

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "bus-guard"
STATUS_ENDPOINT: Final = "status"
_encode: Final = msgspec.json.Encoder().encode


class Observed(Protocol):
    """What the service reads of a gateway (:class:`~bus_guard.intake.Gateway`)."""

    settings: Settings

    @property
    def kid(self) -> str: ...
    def identity(self) -> dict[str, str]: ...
    def status(self) -> dict[str, Any]: ...


def status_document(
    identity: dict[str, str],
    statistics: dict[str, int],
    decisions: TallySnapshot,
    *,
    ready: bool,
    queues: dict[str, int],
    uptime_s: float,
) -> dict[str, Any]:
    """The ``status`` document (STATS ``data`` and the endpoint's answer): JSON values only.

    ``identity`` (the PING metadata), ``ready``, ``uptime_s``, ``statistics`` (every counter
    of :class:`~bus_guard.intake.GatewayStatistics`), ``decisions`` (``{effect: {reason:
    n}}``), ``queues`` (intents taken and not yet decided: ``intake``; children waiting for
    a parent: ``lineage_waiting``), ``batches`` (stream mode: pulled batches and their mean
    size; artifact tree heads and their mean size), ``latency_s`` (p50/p90/p99/max over the
    last 4,096 decisions, and the histogram: ``buckets`` upper bounds, ``counts``, ``sum``,
    ``count``)."""
    by_effect: dict[str, dict[str, int]] = {}
    for effect, reason, n in decisions.by_reason:
        by_effect.setdefault(effect, {})[reason] = n
    pulled = statistics.get("batches", 0)
    trees = statistics.get("artifact_batches", 0)
    return {
        "identity": identity,
        "ready": ready,
        "uptime_s": round(uptime_s, 3),
        "statistics": statistics,
        "decisions": by_effect,
        "queues": queues,
        "batches": {
            "pulled": pulled,
            "pulled_mean_size": round(statistics.get("received", 0) / pulled, 2) if pulled else 0,
            "artifact_trees": trees,
            "artifact_tree_mean_size": round(statistics.get("allowed", 0) / trees, 2)
            if trees
            else 0,
        },
        "latency_s": {
            **decisions.percentiles_s,
            "buckets": list(LATENCY_BUCKETS_S),
            "counts": list(decisions.latency_buckets),
            "sum": decisions.latency_sum_s,
            "count": decisions.latency_count,
        },
    }


class GatewayService:
    """One gateway's micro service on its own connection *nc*: :meth:`start` once the
    intake is ready, :meth:`refresh` when the identity changes (a policy swap),
    :meth:`stop` before the connection drains."""

    def __init__(self, nc: Client, gateway: Observed) -> None:
        self._nc = nc
        self._gateway = gateway
        # nats.micro answers PING and INFO with this very dict: refresh() updates it in
        # place, so a swapped policy set shows in the next answer.
        self._metadata: dict[str, str] = dict(gateway.identity())
        self._service: Service | None = None

    @property
    def id(self) -> str:
        if self._service is None:
            raise RuntimeError("the service is not started")
        return self._service.id

    async def start(self) -> None:
        service = await add_service(
            self._nc,
            name=SERVICE_NAME,
            version=__version__,
            description="bus_guard gateway: pre-execution authorization of agents' intents",
            metadata=self._metadata,
            stats_handler=self._stats,
        )
        try:
            await service.add_endpoint(
                name=STATUS_ENDPOINT,
                subject=f"$SRV.STATUS.{SERVICE_NAME}.{service.id}",
                handler=self._on_status,
                metadata={"description": "this gateway's status document (as STATS data)"},
            )
        except BaseException:
            await service.stop()
            raise
        self._service = service
        log.info("micro service %s %s answers $SRV.PING/INFO/STATS", SERVICE_NAME, service.id)

    def refresh(self) -> None:
        self._metadata.clear()
        self._metadata.update(self._gateway.identity())

    async def stop(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            await service.stop()

    def _stats(self, endpoint: EndpointStats) -> Any:
        return self._gateway.status()

    async def _on_status(self, request: Request) -> None:
        await request.respond(_encode(self._gateway.status()))
