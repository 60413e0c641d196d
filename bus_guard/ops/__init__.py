"""Operating a gateway: Prometheus metrics and health checks over HTTP.

``_metrics`` (a collector over the gateway's own counters), ``_http`` (the listener of
``bus-guard run --http``: ``/metrics``, ``/healthz``, ``/readyz``). The gateway's micro
service (``$SRV.PING/INFO/STATS``) is NATS I/O and lives in :mod:`bus_guard.intake`.
"""

from bus_guard.ops._http import OpsServer, parse_listen
from bus_guard.ops._metrics import GatewayCollector, Snapshot

__all__ = ("GatewayCollector", "OpsServer", "Snapshot", "parse_listen")
