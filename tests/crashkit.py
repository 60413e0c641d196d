"""Gateways as real processes, killed and restarted; reconciling what the bus holds after.

Used by the S3 (crash) and S4 (redelivery race) scenarios. Counting follows SCENARIOS.md:

- lost: an intent with a PubAck that has no decision in the ledger after the drain;
- double: more than one exec message for one intent;
- divergent: more than one decision (besides replay denials) for one intent, e.g. an allow
  and a deny;
- invalid: an exec message whose artifact does not verify, or without an allow record;
- missing outputs: a recorded decision whose exec / deny / hold message is not stored.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from nats.aio.client import Client

from bus_guard.errors import VerificationError
from bus_guard.intake._jetstream import read
from bus_guard.ledger._audit import audit
from bus_guard.ledger._records import decode_record
from bus_guard.verify import Verifier, load_jwks, verify_message

from .conftest import POLICIES, ROOT


class GatewayProcess:
    """One gateway process; stderr is read in a thread and kept."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        ready = threading.Event()
        proc = subprocess.Popen(
            self.argv,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.proc = proc

        started = threading.Event()

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.lines.append(line.rstrip())
                if "ready on" in line:
                    started.set()
                    ready.set()
            ready.set()  # stderr closed: it is exiting

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        if not ready.wait(timeout_s) or not started.is_set() or proc.poll() is not None:
            raise AssertionError("gateway did not start:\n" + "\n".join(self.lines[-20:]))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._join()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM: drain, seal the chain, exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        finally:
            self.kill()
        return code

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)


def gateway_argv(nats_url: str, key: Path, *extra: str) -> list[str]:
    """``bus_guard run`` on the shipped policies, as a child process's argv."""
    return [
        sys.executable,
        "-m",
        "bus_guard",
        "run",
        "--nats",
        nats_url,
        "--policies",
        str(POLICIES),
        "--key",
        str(key),
        *extra,
    ]


def run_argv(nats_url: str, key: Path, gateway_id: str, *extra: str) -> list[str]:
    return gateway_argv(nats_url, key, "--gateway-id", gateway_id, *extra)


@dataclass
class Reconciliation:
    accepted: int
    decided: int = 0
    lost: int = 0
    double: int = 0
    divergent: int = 0
    invalid: int = 0
    missing_outputs: int = 0
    execs: int = 0
    batched_execs: int = 0  # exec messages whose artifact is batched (gb1~...)
    effects: collections.Counter[str] = field(default_factory=collections.Counter)
    ledger_problems: list[str] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"accepted={self.accepted} decided={self.decided} lost={self.lost} "
            f"double={self.double} divergent={self.divergent} invalid={self.invalid} "
            f"missing_outputs={self.missing_outputs} execs={self.execs} "
            f"batched_execs={self.batched_execs} "
            f"effects={dict(self.effects)} ledger_problems={len(self.ledger_problems)}"
        )


async def reconcile(nc: Client, accepted: set[tuple[str, str]], jwks_path: Path) -> Reconciliation:
    """Reconcile the intents accepted by the bus, as (principal, intent id), with the ledger
    and the output streams; and audit the ledger."""
    out = Reconciliation(accepted=len(accepted))
    ledger = [m async for m in read(nc, "GUARD_LEDGER", "guard.ledger.>")]
    report = audit(ledger, prefix="guard", jwks=load_jwks(jwks_path), require_sealed=True)
    out.ledger_problems = [str(p) for p in report.problems]
    out.chains = [str(c) for c in report.chains]
    decisions: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    by_id = {}
    for m in ledger:
        record = decode_record(m.data)
        if record.kind != "decision":
            continue
        by_id[record.decision_id] = record
        if record.reason != "replay":
            decisions[(record.principal, record.intent_id)].append(record.effect)
    out.decided = sum(1 for key in accepted if key in decisions)
    out.lost = len(accepted) - out.decided
    out.divergent = sum(1 for effects in decisions.values() if len(effects) > 1)
    for effects in decisions.values():
        out.effects.update(effects[:1])
    verifier = Verifier(load_jwks(jwks_path), leeway_s=3600)
    executed: collections.Counter[tuple[str, str]] = collections.Counter()
    seen_outputs: set[str] = set()
    async for m in read(nc, "GUARD_EXEC", "guard.exec.>"):
        out.execs += 1
        out.batched_execs += (m.headers or {}).get("Guard-Artifact", "").startswith("gb1~")
        try:
            claims = verify_message(verifier, subject=m.subject, headers=m.headers, payload=m.data)
        except VerificationError:
            out.invalid += 1
            continue
        recorded = by_id.get(claims.jti)
        if recorded is None or recorded.effect != "allow":
            out.invalid += 1
        executed[(claims.sub, claims.intent_id)] += 1
        seen_outputs.add(claims.jti)
    out.double = sum(1 for n in executed.values() if n > 1)
    for stream, subject in (("GUARD_DENY", "guard.deny.>"), ("GUARD_HOLD", "guard.hold.>")):
        async for m in read(nc, stream, subject):
            seen_outputs.add(msgspec.json.decode(m.data)["decision_id"])
    out.missing_outputs = sum(1 for did in by_id if did not in seen_outputs)
    return out
