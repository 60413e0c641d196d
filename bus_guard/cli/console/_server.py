"""The console as one async context manager: NATS connection, bus view, HTTP server.

:class:`Console` connects with the operator's options, subscribes (confirmed by the
server), starts the pollers and the HTTP server, and knows its :attr:`~Console.url` (with
the token). Leaving it stops the event streams, the HTTP server and the pollers, and
drains the connection, whatever happened on the way in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.cli._connect import NatsOptions, connect
from bus_guard.cli.console._bus import BusView, ConsoleSettings
from bus_guard.cli.console._web import Access, Listen, make_app
from bus_guard.errors import ConfigError

__all__ = ("Console",)

log = logging.getLogger(__name__)


class Console:
    """``async with Console(...) as console:`` the console runs; ``console.url`` is where,
    ``console.lost`` is set if the NATS connection closes under it."""

    def __init__(
        self,
        options: NatsOptions,
        listen: Listen,
        settings: ConsoleSettings | None = None,
        *,
        allow_remote: bool = False,
        key: Ed25519PrivateKey | None = None,
        approver: str | None = None,
    ) -> None:
        if not listen.loopback and not allow_remote:
            raise ConfigError(
                f"--listen {listen.host}:{listen.port} is not a loopback address: the console "
                "votes with your key; add --allow-remote to serve other hosts anyway"
            )
        self.options = options
        self.settings = settings or ConsoleSettings()
        self.access = Access(listen, allow_remote=allow_remote)
        self.key = key
        self.approver = approver
        self.lost = anyio.Event()
        self.port = listen.port
        self._stopping = anyio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self.view: BusView | None = None

    @property
    def url(self) -> str:
        """Where the console is, with its token: what to open in a browser."""
        host = self.access.listen.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/?token={self.access.token}"

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._running())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is not None:
            return await stack.__aexit__(exc_type, exc, tb)
        return None

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        closing = False

        async def on_closed() -> None:
            if not closing:  # closed under us, not by us
                self.lost.set()

        nc = await connect(self.options, name="bus-guard console", on_closed=on_closed)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    view = BusView(nc, self.settings, key=self.key, approver=self.approver)
                    self.view = view
                    await view.start(tg)
                    async with self._serving(view):
                        yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            closing = True
            with anyio.CancelScope(shield=True):
                if not nc.is_closed:
                    await nc.close()

    @contextlib.asynccontextmanager
    async def _serving(self, view: BusView) -> AsyncIterator[None]:
        app = make_app(view, self.access, nats_url=self.options.urls, stopping=self._stopping)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            listen = self.access.listen
            site = web.TCPSite(runner, listen.host, listen.port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"--listen {listen.host}:{listen.port}: {exc.strerror or exc}"
                ) from None
            self.port = _bound_port(runner, self.port)
            yield
        finally:
            with anyio.CancelScope(shield=True):
                self._stopping.set()
                view.hub.close()
                await runner.cleanup()


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback
