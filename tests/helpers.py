"""Test helpers: collect what arrives on a subject, and build intents."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.gateway import round_trip

_enc = msgspec.json.Encoder()


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
