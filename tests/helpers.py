"""Test helpers: collect what arrives on a subject, build intents, sign, and the sentinel
that proves a core-mode gateway published everything sent before it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.intake._gateway import round_trip
from bus_guard.signing._keys import load_private_key
from bus_guard.signing._signer import Signer

_enc = msgspec.json.Encoder()

SENTINEL = b'{"not": "an intent"}'


def make_signer(key: Path, issuer: str = "test-gw") -> Signer:
    """A signer over the private key at *key* (artifacts valid for 60 s)."""
    return Signer(load_private_key(key), issuer=issuer, ttl_s=60)


def intent(action: str, resource: str, params: dict[str, Any] | None = None, **kw: Any) -> bytes:
    body: dict[str, Any] = {
        "id": kw.pop("id", uuid.uuid4().hex),
        "action": action,
        "resource": resource,
        "params": params or {},
        "ts": kw.pop("ts", time.time()),
        **kw,
    }
    return _enc.encode(body)


class Collector:
    """Every message on a subject, in arrival order; ``wait_for`` blocks until n arrived."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self._changed = anyio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.msgs.append(msg)
        self._changed.set()

    async def wait_for(self, n: int, timeout_s: float = 10.0) -> list[Msg]:
        with anyio.fail_after(timeout_s):
            while len(self.msgs) < n:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.msgs

    @classmethod
    async def on(cls, nc: Client, subject: str) -> Collector:
        collector = cls()
        await nc.subscribe(subject, cb=collector.on_msg)
        await round_trip(nc)
        return collector

    def records(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(m.data) for m in self.msgs]


class Outputs:
    def __init__(self, exec_: Collector, deny: Collector, hold: Collector) -> None:
        self.exec, self.deny, self.hold = exec_, deny, hold


async def outputs(nc: Client) -> Outputs:
    """Collectors on the three core-mode output subjects: exec, deny, hold."""
    return Outputs(
        await Collector.on(nc, "guard.exec.>"),
        await Collector.on(nc, "guard.deny.>"),
        await Collector.on(nc, "guard.hold.>"),
    )


async def sentinel(nc: Client, out: Outputs, denies_before: int) -> None:
    """Send the malformed sentinel and wait for its denial, the (denies_before + 1)-th: the
    gateway decides one subscription in order, so everything sent before it is published.
    The sentinel's own denial is removed, leaving the counts of what the test sent."""
    await nc.publish("guard.in.sentinel.done", SENTINEL)
    msgs = await out.deny.wait_for(denies_before + 1)
    assert json.loads(msgs[-1].data)["subject"] == "guard.in.sentinel.done"
    del out.deny.msgs[-1]


# What an agent could write to take over an operator's terminal: clear the screen, set the
# window title, write the clipboard (OSC 52), draw a line of its own, reorder text (bidi),
# an 8-bit CSI and a line separator.
HOSTILE = "\x1b[2J\x1b]0;all clear\x07\x1b]52;c;cm0gLXJmIH4=\x07\r\nALLOW agent-7 \u202e\x9b\u2028"


def terminal_safe(text: str, lines: int | None = None) -> list[str]:
    """The lines of CLI output *text*, asserting each is printable (no control, format,
    separator or surrogate character) and none is a line an agent drew."""
    assert text.endswith("\n"), ascii(text)
    out = text[:-1].split("\n")
    if lines is not None:
        assert len(out) == lines, text
    for line in out:
        assert line.isprintable(), ascii(line)
        assert not line.startswith("ALLOW"), line
    return out
