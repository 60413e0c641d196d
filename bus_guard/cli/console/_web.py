"""The console's HTTP side (aiohttp): the page, its event stream, votes and lineage.

Security model (README, "The operator console"):

* **A token for everything.** Every request, the page, its script and style, the event
  stream and the API, needs the access token printed at start-up: ``?token=`` (the page
  then sets an HttpOnly, SameSite=Strict cookie and redirects to drop the token from the
  address bar), that cookie, or ``Authorization: token <token>``. Without it: 401.
  Compared with :func:`hmac.compare_digest`.
* **Loopback only**, unless ``--allow-remote``; on loopback the ``Host`` header must name
  a loopback address (a DNS-rebinding page's ``Host`` is its own name: 403).
* **Votes are POSTs with a CSRF guard**: the per-process CSRF token, which only the
  authenticated page carries, in an ``X-CSRF-Token`` header (a cross-site form cannot set
  one), an ``Origin`` equal to this server's, a JSON body; the cookie is SameSite=Strict.
* **Bus text is never markup**: the page puts every value into the DOM with
  ``textContent``; a Content-Security-Policy without inline script backs that up.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import importlib.resources
import ipaddress
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import msgspec
from aiohttp import web

from bus_guard.cli.console._bus import BusView, Event
from bus_guard.errors import ConfigError

__all__ = ("Access", "Listen", "make_app", "parse_listen", "shown_url")

log = logging.getLogger(__name__)

CSRF_HEADER: Final = "X-CSRF-Token"
_KEEPALIVE_S: Final = 15.0
_MAX_BODY_BYTES: Final = 4096
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC: Final = {
    "console.js": "text/javascript",
    "console.css": "text/css",
}
_UNAUTHORIZED: Final = (
    "401 Unauthorized: open the URL with ?token=... that `bus-guard console` printed\n"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any free one); ConfigError if not."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: not HOST:PORT (127.0.0.1:8470, [::1]:8470)")
    return Listen(host, int(port))


def shown_url(urls: str) -> str:
    """The NATS URLs without any user:password (the page shows where it is connected)."""
    out = []
    for url in urls.split(","):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.hostname is None:
            out.append(url.strip())
            continue
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        out.append(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    return ",".join(out)


@dataclass(frozen=True, slots=True)
class Access:
    """The access token, the CSRF token and where the cookie goes."""

    listen: Listen
    allow_remote: bool = False
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def cookie(self) -> str:
        """The cookie's name, per console process: consoles on one host (cookies do not
        tell ports apart) keep their own. Named after a hash of the token: nothing secret."""
        return f"bus-guard-console-{hashlib.sha256(self.token.encode()).hexdigest()[:12]}"

    def is_token(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(
            candidate.encode("utf-8", "surrogateescape"), self.token.encode()
        )

    def authenticated(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return (
            self.is_token(request.query.get("token"))
            or self.is_token(request.cookies.get(self.cookie))
            or (scheme.lower() in ("token", "bearer") and self.is_token(value.strip()))
        )

    def host_allowed(self, request: web.Request, port: int) -> bool:
        if self.allow_remote:
            return True
        allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        host = self.listen.host
        allowed.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return request.host in allowed

    def csrf_ok(self, request: web.Request) -> str | None:
        """Why a state-changing request is refused, or None."""
        origin = request.headers.get("Origin")
        if origin is None or origin != f"{request.scheme}://{request.host}":
            return "the Origin header is missing or not this console's"
        if request.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
            return "a cross-site request"
        candidate = request.headers.get(CSRF_HEADER)
        if candidate is None or not hmac.compare_digest(
            candidate.encode("utf-8", "surrogateescape"), self.csrf.encode()
        ):
            return f"the {CSRF_HEADER} header is missing or wrong"
        if request.content_type != "application/json":
            return "the body is not application/json"
        return None


def _static(name: str) -> bytes:
    return importlib.resources.files("bus_guard.cli.console").joinpath("static", name).read_bytes()


def _security_headers(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", "no-store")


def make_app(
    view: BusView, access: Access, *, nats_url: str, stopping: anyio.Event
) -> web.Application:
    """The console's application over *view*; *stopping* ends every event stream."""
    template = _static("index.html").decode()
    files = {name: _static(name) for name in _STATIC}

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sockname[1]) if sockname else access.listen.port
        if not access.host_allowed(request, port):
            response: web.StreamResponse = web.Response(
                status=403, text="403 Forbidden: not a loopback Host\n"
            )
        elif not access.authenticated(request):
            response = web.Response(
                status=401, text=_UNAUTHORIZED, headers={"WWW-Authenticate": "Token"}
            )
        elif request.method not in ("GET", "HEAD") and (why := access.csrf_ok(request)):
            response = web.json_response({"ok": False, "message": f"refused: {why}"}, status=403)
        else:
            response = await handler(request)
            if response.prepared:  # an event stream, sent with its headers and ended
                return response
            if access.is_token(request.query.get("token")):
                response.set_cookie(
                    access.cookie,
                    access.token,
                    httponly=True,
                    samesite="Strict",
                    path="/",
                )
        _security_headers(response)
        return response

    async def index(request: web.Request) -> web.StreamResponse:
        if "token" in request.query:  # the cookie is set: drop the token from the URL bar
            return web.Response(status=303, headers={"Location": "/"})
        ident = view.identity()
        page = (
            template.replace("{{csrf}}", html.escape(access.csrf))
            .replace("{{approver}}", html.escape(ident["approver"] or ""))
            .replace("{{kid}}", html.escape(ident["kid"] or ""))
            .replace("{{nats}}", html.escape(shown_url(nats_url)))
            .replace("{{prefix}}", html.escape(view.settings.prefix))
        )
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in files:
            return web.Response(status=404, text="404 Not Found\n")
        return web.Response(body=files[name], content_type=_STATIC[name], charset="utf-8")

    async def no_icon(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        _security_headers(response)
        with view.hub.subscribe() as queue:  # first: nothing published from here is missed
            await response.prepare(request)
            try:
                for event in view.snapshot():
                    await response.write(_sse(event))
                await response.write(b"event: ready\ndata: {}\n\n")
                while not stopping.is_set():
                    with anyio.move_on_after(_KEEPALIVE_S) as idle:
                        event = await queue.receive()
                    if idle.cancelled_caught:
                        await response.write(b": keep-alive\n\n")
                    else:
                        await response.write(_sse(event))
            except (anyio.EndOfStream, anyio.ClosedResourceError, ConnectionResetError):
                pass  # the console stops, the browser fell behind or went away
        return response

    async def vote(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if not isinstance(reason, str):
            return web.json_response(
                {"ok": False, "message": 'the body is {"reason": TEXT}'}, status=400
            )
        status, answer = await view.vote(
            request.match_info["decision_id"], request.match_info["verdict"], reason
        )
        return web.json_response(answer, status=status)

    async def lineage(request: web.Request) -> web.StreamResponse:
        status, answer = await view.lineage(request.match_info["decision_id"])
        return web.json_response(answer, status=status)

    app = web.Application(middlewares=[guard], client_max_size=_MAX_BODY_BYTES)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_get("/events", events)
    app.router.add_get("/api/lineage/{decision_id}", lineage)
    app.router.add_post("/api/holds/{decision_id}/{verdict}", vote)
    return app


def _sse(event: Event) -> bytes:
    # JSON has no raw newline: one data line per event
    return b"event: " + event.name.encode() + b"\ndata: " + event.data + b"\n\n"


async def _json_body(request: web.Request) -> Any:
    try:
        return msgspec.json.decode(await request.read())
    except (msgspec.DecodeError, web.HTTPRequestEntityTooLarge):
        return None
