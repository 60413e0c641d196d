"""Helpers for the policy reload and distribution tests: policy directories to edit, a
steady load of intents, and one collector of every decision with the set that made it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.intake._gateway import round_trip
from bus_guard.verify import ARTIFACT_HEADER, Verifier

from .helpers import intent

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"

SEARCH = "guard.in.agent-1.tools.search"  # allowed by the shipped policies
SHELL = "guard.in.agent-1.tools.shell"  # denied by them (no-shell)


def policy_dir(tmp_path: Path, name: str = "policies") -> Path:
    """A copy of the shipped policies (with their tests) to edit."""
    target = tmp_path / name
    shutil.copytree(POLICIES, target)
    return target


def bump_version(directory: Path, version: str) -> None:
    """A new digest, the same decisions: the tools bundle's version changes."""
    file = directory / "tools.yaml"
    text = file.read_text()
    assert 'version: "1.2.0"' in text
    file.write_text(text.replace('version: "1.2.0"', f'version: "{version}"', 1))


def break_search(directory: Path) -> None:
    """A set that compiles but answers wrongly: search is denied for all (the shipped
    test cases expect it allowed, so the set fails them)."""
    file = directory / "tools.yaml"
    text = file.read_text()
    marker = "  - id: search-for-all\n    effect: allow\n"
    assert marker in text
    file.write_text(text.replace(marker, "  - id: search-for-all\n    effect: deny\n", 1))


@dataclass(frozen=True, slots=True)
class Seen:
    """One decision as it arrived: where, what, and the set that made it."""

    subject: str
    effect: str
    reason: str
    digest: str
    version: str
    at: float  # monotonic arrival time
    gateway: str = ""


@dataclass
class Decisions:
    """Every exec and deny message on one subscription, in arrival order (the gateway's
    publishes on one connection arrive in the order it made them), each with the policy
    digest and version it names (an exec message's from its verified artifact)."""

    verifier: Verifier
    seen: list[Seen] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @classmethod
    async def on(cls, nc: Client, verifier: Verifier) -> Decisions:
        decisions = cls(verifier)
        await nc.subscribe("guard.exec.>", cb=decisions._on_msg)
        await nc.subscribe("guard.deny.>", cb=decisions._on_msg)
        await round_trip(nc)
        return decisions

    async def _on_msg(self, msg: Msg) -> None:
        now = time.monotonic()
        if msg.subject.startswith("guard.exec."):
            assert msg.headers is not None
            claims = self.verifier.verify(
                msg.headers[ARTIFACT_HEADER], subject=msg.subject, payload=msg.data
            )
            self.seen.append(
                Seen(
                    msg.subject,
                    "allow",
                    "",
                    claims.policy_digest,
                    claims.policy_version,
                    now,
                    claims.iss,
                )
            )
        else:
            record: dict[str, Any] = json.loads(msg.data)
            self.seen.append(
                Seen(
                    msg.subject,
                    record["effect"],
                    record["reason"],
                    record.get("policy_digest", ""),
                    record.get("policy_version", ""),
                    now,
                    record.get("gateway", ""),
                )
            )
        self._changed.set()

    async def wait_until(
        self, check: Callable[[list[Seen]], bool], *, timeout_s: float = 20.0, what: str = ""
    ) -> None:
        try:
            with anyio.fail_after(timeout_s):
                while not check(self.seen):
                    self._changed = anyio.Event()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what or check}") from None


class Load:
    """Intents at a steady pace until stopped: a search (allowed) and a shell (denied) in
    turn, from agent-1. ``sent`` counts them."""

    def __init__(self, nc: Client, *, per_s: float = 400.0) -> None:
        self.nc = nc
        self.per_s = per_s
        self.sent = 0
        self._stop = anyio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            subject, action = (
                (SEARCH, "tools.search") if self.sent % 2 == 0 else (SHELL, "tools.shell")
            )
            await self.nc.publish(subject, intent(action, "tool:x", {"q": "x"}))
            self.sent += 1
            ahead = self.sent / self.per_s - (time.monotonic() - start)
            if ahead > 0:  # pacing, not synchronisation: the test waits on conditions
                with anyio.move_on_after(ahead):
                    await self._stop.wait()
        await round_trip(self.nc)


async def wait_for(check: Callable[[], bool], *, timeout_s: float = 20.0, what: str = "") -> None:
    """Poll an in-process condition (a counter, a flag) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await anyio.sleep(0.02)
