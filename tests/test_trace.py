"""W3C trace context: an agent's ``traceparent`` is recorded in the deny/hold record, the
ledger and the artifact's claims; an invalid one is recorded nowhere and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.pipeline import traceparent_of
from bus_guard.policy._load import PolicySet
from bus_guard.settings import Settings
from bus_guard.signing._signer import Signer
from bus_guard.verify import Verifier, verify_message

from .helpers import Collector, intent
from .streamkit import eventually, ledger_decisions, stream_gateway, stream_settings

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def _hold() -> bytes:
    """A transfer the shipped policies hold (made when sent: its ts must be fresh)."""
    return intent("payments.transfer", "account:acct-1", {"amount": 5000, "currency": "USD"})


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        ({"traceparent": TRACE}, TRACE),
        ({"Traceparent": f"  {TRACE} "}, TRACE),
        ({"traceparent": TRACE.upper()}, ""),  # lower-case hex only
        ({"traceparent": "ff" + TRACE[2:]}, ""),  # version ff is invalid
        ({"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"}, ""),  # no trace id
        ({"traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01"}, ""),
        ({"traceparent": TRACE + "-extra"}, ""),  # version 00 has exactly four fields
        ({"traceparent": "01" + TRACE[2:] + "-future"}, "01" + TRACE[2:]),  # later: its 00 part
        ({"traceparent": "\x1b[2J"}, ""),
        ({"x-other": TRACE}, ""),
        (None, ""),
    ],
)
def test_only_a_valid_trace_context_is_taken(headers: dict[str, str] | None, want: str) -> None:
    assert traceparent_of(headers) == want


async def test_core_mode_records_and_signs_the_agents_trace(
    nats_url: str, policies: PolicySet, signer: Signer, keys: tuple[Path, Path]
) -> None:
    nc = await nats.connect(nats_url)
    execs = await Collector.on(nc, "guard.exec.>")
    denies = await Collector.on(nc, "guard.deny.>")
    holds = await Collector.on(nc, "guard.hold.>")
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
        # fresh intent ids each (a repeated one is a replay: denied)
        def search() -> bytes:
            return intent("tools.search", "tool:search", {"q": "x"})

        def shell() -> bytes:
            return intent("tools.shell", "tool:shell", {})

        await nc.publish("guard.in.agent-1.tools.search", search(), headers={"traceparent": TRACE})
        await nc.publish("guard.in.agent-1.tools.shell", shell(), headers={"traceparent": OTHER})
        await nc.publish(
            "guard.in.agent-9.payments.transfer", _hold(), headers={"traceparent": TRACE}
        )
        # an invalid one: decided as without it, recorded nowhere
        await nc.publish("guard.in.agent-1.tools.shell", shell(), headers={"traceparent": "bogus"})
        await nc.publish("guard.in.agent-1.tools.search", search(), headers={"traceparent": "x-y"})
        await round_trip(nc)
        await execs.wait_for(2)
        await denies.wait_for(2)
        await holds.wait_for(1)
    verifier = Verifier(keys[1])
    claims = [
        verify_message(verifier, subject=m.subject, headers=m.headers, payload=m.data)
        for m in execs.msgs
    ]
    assert sorted(c.traceparent for c in claims) == ["", TRACE]
    for m in execs.msgs:  # the agent's own header is forwarded too, as any header
        assert (m.headers or {}).get("traceparent") in (TRACE, "x-y")
    assert sorted(r.get("traceparent", "") for r in denies.records()) == ["", OTHER]
    assert [r["traceparent"] for r in holds.records()] == [TRACE]
    assert all(r["reason"] == "denied_by_rule" for r in denies.records())
    await nc.drain()


async def test_stream_mode_records_the_trace_in_the_ledger(
    nats_url: str, policies: PolicySet, keys: tuple[Path, Path]
) -> None:
    nc = await nats.connect(nats_url)
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        await nc.publish(
            "guard.in.agent-1.tools.shell",
            intent("tools.shell", "tool:shell", {}),
            headers={"traceparent": TRACE},
        )
        await nc.publish(
            "guard.in.agent-1.tools.search", intent("tools.search", "tool:search", {"q": "x"})
        )

        async def both() -> bool:
            return len(await ledger_decisions(nc)) == 2

        await eventually(both, what="two ledger records")
    records = {r.action: r for r in await ledger_decisions(nc)}
    assert records["tools.shell"].traceparent == TRACE
    assert records["tools.search"].traceparent == ""
    raw = [m for m in records.values() if not m.traceparent]
    assert b"traceparent" not in msgspec.json.encode(raw[0])  # absent, not empty: old bytes
    await nc.drain()


def _exporter() -> Any:
    """The SDK's in-memory exporter behind the global tracer provider (set once: the API
    allows one global provider per process)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    global _EXPORTER
    if _EXPORTER is None:
        _EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    return _EXPORTER


_EXPORTER: Any = None


async def test_otel_emits_a_span_per_decision_under_the_agents_trace(
    nats_url: str, policies: PolicySet, signer: Signer
) -> None:
    exporter = _exporter()
    nc = await nats.connect(nats_url)
    outputs = await Collector.on(nc, "guard.*.>")
    async with Gateway(Settings(nats_url=nats_url, mode="core", otel=True), policies, signer):
        await nc.publish(
            "guard.in.agent-1.tools.shell",
            intent("tools.shell", "tool:shell", {}),
            headers={"traceparent": TRACE},
        )
        await nc.publish(
            "guard.in.agent-1.tools.search", intent("tools.search", "tool:search", {"q": "x"})
        )
        await round_trip(nc)
        await outputs.wait_for(2)
    spans = {s.attributes["bus_guard.action"]: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["tools.search", "tools.shell"]
    shell, search = spans["tools.shell"], spans["tools.search"]
    assert shell.name == "bus_guard decide"
    assert shell.context.trace_id == int(TRACE.split("-")[1], 16)  # the agent's trace
    assert shell.parent is not None and shell.parent.span_id == int(TRACE.split("-")[2], 16)
    assert (shell.attributes["bus_guard.effect"], shell.attributes["bus_guard.reason"]) == (
        "deny",
        "denied_by_rule",
    )
    assert search.parent is None and search.context.trace_id != shell.context.trace_id
    assert search.attributes["bus_guard.effect"] == "allow"
    assert shell.end_time >= shell.start_time
    await nc.drain()


async def test_without_otel_no_span(nats_url: str, policies: PolicySet, signer: Signer) -> None:
    exporter = _exporter()
    nc = await nats.connect(nats_url)
    outputs = await Collector.on(nc, "guard.*.>")
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
        await nc.publish(
            "guard.in.agent-1.tools.shell",
            intent("tools.shell", "tool:shell", {}),
            headers={"traceparent": TRACE},
        )
        await round_trip(nc)
        await outputs.wait_for(1)
    assert exporter.get_finished_spans() == ()
    await nc.drain()
