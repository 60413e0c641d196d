"""The optional HTTP listener of ``bus-guard run --http HOST:PORT``: ``/metrics``
(Prometheus text format), ``/healthz`` (alive), ``/readyz`` (ready to decide).

It runs the standard library's WSGI server on one thread of its own (a thread per
connection, all daemons), so that a slow scraper never touches the event loop. Every
answer is computed *on* the event loop (``run_coroutine_threadsafe``) within
``loop_timeout_s``: the numbers of one scrape are one consistent snapshot, and a loop that
cannot answer makes ``/healthz`` fail, which is what "alive" should mean for a process
whose work is all on that loop.

* ``/healthz``: 200 ``ok`` while the event loop answers; 503 otherwise.
* ``/readyz``: 200 ``ready`` when the gateway is connected, its subscription or consumer
  confirmed by the server, no intake task failed, not stopping, and the active policy set
  is younger than ``policy_max_age_s`` (if set); else 503 and one line per reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import asynccontextmanager
from socketserver import ThreadingMixIn
from typing import Any, Final, Protocol, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from anyio import AsyncContextManagerMixin
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from bus_guard.errors import ConfigError
from bus_guard.ops._metrics import GatewayCollector, Snapshot
from bus_guard.policy._bundle import StaleSet

__all__ = ("OpsServer", "Watched", "parse_listen")

log = logging.getLogger(__name__)

_TEXT: Final = ("Content-Type", "text/plain; charset=utf-8")


def _text() -> list[tuple[str, str]]:
    # A new list per response: wsgiref adds Content-Length to the list it is given.
    return [_TEXT]


class Watched(Protocol):
    """What the listener reads of a gateway (:class:`~bus_guard.intake.Gateway`)."""

    policies_since: float

    @property
    def ready(self) -> bool: ...
    @property
    def connected(self) -> bool: ...
    @property
    def failure(self) -> BaseException | None: ...
    @property
    def active_policies(self) -> object: ...
    @property
    def unready(self) -> dict[str, str]: ...
    def status(self) -> dict[str, Any]: ...


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) -> (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 <= number <= 65535:
        raise ConfigError(
            f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464 (0.0.0.0:9464 for every "
            "interface)"
        )
    return host, number


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s", format % args)


class OpsServer(AsyncContextManagerMixin):
    """``/metrics``, ``/healthz``, ``/readyz`` for *gateway*. An async context manager:
    listening on entry, closed on exit; ``port`` is the bound port."""

    def __init__(
        self,
        gateway: Watched,
        host: str,
        port: int,
        *,
        policy_max_age_s: float | None = None,
        loop_timeout_s: float = 2.0,
    ) -> None:
        self._gateway = gateway
        self._host = host
        self._port = port
        self._max_age_s = policy_max_age_s
        self._timeout_s = loop_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(GatewayCollector(self._snapshot_from_thread))
        ProcessCollector(registry=self._registry)  # process_* (CPU, memory, fds), Linux
        self.port = 0

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        self._loop = asyncio.get_running_loop()
        try:
            family = ipaddress.ip_address(self._host).version
        except ValueError:
            family = 4  # a name: resolved by the socket layer as IPv4
        try:
            server = make_server(
                self._host,
                self._port,
                self._app,
                server_class=_Server6 if family == 6 else _Server,
                handler_class=_Quiet,
            )
        except OSError as exc:
            raise ConfigError(f"--http {self._host}:{self._port}: {exc.strerror}") from None
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, name="bus-guard-http", daemon=True)
        thread.start()
        log.info(
            "http listener on %s:%d (/metrics, /healthz, /readyz)",
            self._host,
            self.port,
            extra={"http_port": self.port},
        )
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.shutdown)
                server.server_close()

    # -- on the event loop -------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """What a scrape shows now (call on the event loop)."""
        gateway = self._gateway
        age = time.monotonic() - gateway.policies_since
        reasons = []
        if not gateway.connected:
            reasons.append("not connected to NATS")
        if gateway.failure is not None:
            reasons.append(f"intake failed: {gateway.failure}")
        if not gateway.ready and not reasons:
            reasons.append("intake not started, or stopping")
        if isinstance(gateway.active_policies, StaleSet):  # denying every intent policy_stale
            stale = gateway.active_policies
            reasons.append(f"policy stale: {stale.version} is past its max age")
        for holder, why in gateway.unready.items():  # a canary with a wrong answer, ...
            reasons.append(f"{holder}: {why}")
        if self._max_age_s is not None and age > self._max_age_s:
            reasons.append(
                f"policy stale: active for {age:.0f}s, more than --policy-max-age "
                f"{self._max_age_s:g}s"
            )
        return Snapshot(gateway.status(), age, not reasons, tuple(reasons))

    # -- on the listener's threads -----------------------------------------------------

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """*fn*'s result, computed on the event loop; TimeoutError if it does not answer."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise TimeoutError("no event loop")

        async def call() -> Any:
            return fn()

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return future.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("the event loop did not answer") from None

    def _snapshot_from_thread(self) -> Snapshot:
        result: Snapshot = self._on_loop(self.snapshot)
        return result

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [*_text(), ("Allow", "GET, HEAD")])
            return [b"GET or HEAD only\n"]
        try:
            match path:
                case "/metrics":
                    encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
                    body = encoder(self._registry)
                    start_response("200 OK", [("Content-Type", content_type)])
                    return [body]
                case "/healthz":
                    self._on_loop(lambda: None)
                    start_response("200 OK", _text())
                    return [b"ok\n"]
                case "/readyz":
                    snap = self._snapshot_from_thread()
                    if snap.ready:
                        start_response("200 OK", _text())
                        return [b"ready\n"]
                    start_response("503 Service Unavailable", _text())
                    return ["".join(f"{r}\n" for r in snap.why_not_ready).encode()]
        except TimeoutError as exc:
            start_response("503 Service Unavailable", _text())
            return [f"{exc}\n".encode()]
        start_response("404 Not Found", _text())
        return [b"/metrics, /healthz or /readyz\n"]
