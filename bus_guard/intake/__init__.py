"""Intake: the only package that talks to NATS.

``_gateway`` (connect, start the intake, drain), ``_core`` (core mode: a queue-group
subscription), ``_stream`` (stream mode: pull, decide once, record, publish, ack) with
``_recorder`` (writes the gateway's ledger chain), ``_parents`` (lineage lookups: a parent
record counts once verified), ``_publisher`` (stores outputs), ``_jetstream`` (JetStream
requests nats-py lacks) and ``_preflight`` (creates or checks the streams and the
consumer). ``_approvals`` takes approvers' votes and resolves holds; ``_approver`` is the
approvers' side (list the open holds, vote on one). What is decided and what
is published is :mod:`bus_guard.pipeline`'s: this package only moves bytes.
"""

from bus_guard.intake._approver import Holds, OpenHold, Vote, approve, open_holds, reject
from bus_guard.intake._gateway import Gateway, GatewayStatistics, round_trip

__all__ = (
    "Gateway",
    "GatewayStatistics",
    "Holds",
    "OpenHold",
    "Vote",
    "approve",
    "open_holds",
    "reject",
    "round_trip",
)
