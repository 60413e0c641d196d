"""A span per decision through OpenTelemetry (``bus-guard run --otel``; the ``otel`` extra).

Only the OpenTelemetry *API* is used: which SDK, exporter and endpoint receive the spans
is the operator's to configure, as for any instrumented program (``opentelemetry-instrument
bus-guard run …`` with the ``OTEL_*`` variables, or a tracer provider set up before the
gateway starts). Without a configured provider the API's tracer is a no-op.

Each span, named ``bus_guard decide``, runs from when deciding began (the decision's
``ts``) to when the decision stood (core: published; stream: recorded), is a child of the
agent's span when the intent carried a valid ``traceparent`` (the agent's trace shows the
gateway's decision under its own call), and carries the decision as attributes
(``bus_guard.*``: decision id, effect, reason, rules, principal, action, gateway, policy
digest). Off (the default), the gateway does not import OpenTelemetry at all.
"""

from __future__ import annotations

from typing import Any, Final

from bus_guard.errors import ConfigError
from bus_guard.pipeline import Standing

__all__ = ("DecisionSpans",)

_NS: Final = 1_000_000_000


class DecisionSpans:
    """Emits one span per decision that stands (:meth:`decided`)."""

    def __init__(self) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError(
                "--otel needs OpenTelemetry: pip install 'bus-guard[otel]' (and an SDK "
                "and exporter, e.g. opentelemetry-distro with opentelemetry-instrument)"
            ) from None
        from bus_guard import __version__

        self._tracer = trace.get_tracer("bus_guard", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._kind = trace.SpanKind.CONSUMER

    def decided(self, record: Standing, end_s: float) -> None:
        """The span of *record*, which stood at *end_s* (unix seconds)."""
        context: Any = None
        if record.traceparent:
            context = self._propagator.extract({"traceparent": record.traceparent})
        span = self._tracer.start_span(
            "bus_guard decide",
            context=context,
            kind=self._kind,
            start_time=int(record.ts * _NS),
            attributes={
                "bus_guard.decision_id": record.decision_id,
                "bus_guard.effect": record.effect,
                "bus_guard.reason": record.reason,
                "bus_guard.would_deny": record.would_deny,
                "bus_guard.rules": list(record.rules),
                "bus_guard.principal": record.principal,
                "bus_guard.action": record.action,
                "bus_guard.gateway": record.gateway,
                "bus_guard.policy_digest": record.policy_digest,
                "messaging.system": "nats",
                "messaging.destination.name": record.subject,
            },
        )
        span.end(end_time=int(max(end_s, record.ts) * _NS))
