"""``bus-guard console`` in a real browser (Debian's headless Chromium, driven by Playwright)
against a real nats-server and real gateways: what an operator sees and does, and what a
page that is not the console's cannot do.

No sleeps: every wait is a Playwright expectation (it retries until true, or fails at its
timeout) or a wait on the bus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.js import JetStreamContext
from playwright.async_api import Browser, Page, async_playwright, expect

from bus_guard.cli._connect import NatsOptions
from bus_guard.cli.console import Console, ConsoleSettings, parse_listen
from bus_guard.cli.console._bus import Hub
from bus_guard.cli.console._model import RateBook
from bus_guard.decision import approval_decision_id, intent_decision_id, resolution_decision_id
from bus_guard.errors import ConfigError
from bus_guard.intake._gateway import Gateway
from bus_guard.policy._load import PolicySet
from bus_guard.server import NatsServer
from bus_guard.settings import Settings
from bus_guard.signing._keys import kid_for
from bus_guard.signing._signer import Signer
from bus_guard.verify import Verifier, verify_message

from .helpers import Collector, intent
from .streamkit import eventually, stored, stream_gateway, stream_settings
from .test_approvals import _Approving, _people
from .topology import credentials, local_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Polls fast enough that a test waits on the bus, not on the console's clock.
FAST = ConsoleSettings(interval_s=0.25, stats_wait_s=0.1, vote_wait_s=10.0)
SHELL = "guard.in.agent-9.tools.shell"  # denied by the shipped policies' rule no-shell
TRANSFER = "guard.in.agent-7.payments.transfer"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A client of the test's own (closed at teardown, whatever the test did)."""
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@contextlib.asynccontextmanager
async def _console(
    nats_url: str, settings: ConsoleSettings = FAST, **kw: Any
) -> AsyncIterator[Console]:
    listen = parse_listen("127.0.0.1:0")
    async with Console(NatsOptions(urls=nats_url), listen, settings, **kw) as console:
        yield console


@contextlib.asynccontextmanager
async def _browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def _page(console: Console) -> AsyncIterator[Page]:
    """The console's page, opened with its token, live (its event stream delivered the
    snapshot); page errors fail the test."""
    errors: list[str] = []
    async with _browser() as browser:
        page = await browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        response = await page.goto(console.url)
        assert response is not None and response.status == 200
        assert "token=" not in page.url  # the redirect dropped it from the address bar
        await expect(page.locator("#connection")).to_have_text("live")
        yield page
        assert errors == []


def _transfer(amount: float, **kw: Any) -> bytes:
    return intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": amount, "currency": "USD", "to": "account:acct-9"},
        **kw,
    )


def _core_gateway(nats_url: str, policies: PolicySet, signer: Signer) -> Gateway:
    return Gateway(Settings(nats_url=nats_url, mode="core", gateway_id="gw-core"), policies, signer)


# -- the feed ------------------------------------------------------------------------------


async def test_a_denial_shows_in_the_feed_within_a_second(
    nats_url: str, nc: Client, policies: PolicySet, signer: Signer
) -> None:
    denials = await Collector.on(nc, "guard.deny.>")
    marker = f"host:{uuid.uuid4().hex}"
    async with (
        _core_gateway(nats_url, policies, signer),
        _console(nats_url) as console,
        _page(console) as page,
    ):
        started = time.monotonic()
        await nc.publish(SHELL, intent("tools.shell", marker, {"cmd": "id"}))
        row = page.locator("#feed-table tbody tr", has_text=marker)
        await expect(row).to_have_count(1, timeout=1000)
        seen_after = time.monotonic() - started
        [denial] = (await denials.wait_for(1))[:1]
        record = denials.records()[0]
        assert seen_after < 1.0, seen_after
        assert await row.get_attribute("data-decision") == record["decision_id"]
        await expect(row.locator("td.principal")).to_have_text("agent-9")
        await expect(row.locator("td.action")).to_have_text("tools.shell")
        await expect(row.locator("td.reason")).to_have_text("denied_by_rule")
        await expect(row.locator("td.rules")).to_have_text("no-shell")
        await expect(row.locator(".effect")).to_have_text("deny")
        assert denial.subject == "guard.deny.agent-9.tools.shell"
        # the filters narrow the feed: another principal hides it, its own shows it
        await page.fill("#f-principal", "agent-7")
        await expect(row).to_have_count(0)
        await page.fill("#f-principal", "agent-9")
        await page.fill("#f-action", "tools.*")
        await expect(row).to_have_count(1)
        await page.fill("#f-reason", "rate_limited")
        await expect(row).to_have_count(0)
        for name in ("#f-principal", "#f-action", "#f-reason"):
            await page.fill(name, "")
        # paused, the table stays still while rows arrive (counted); resumed, they show
        await page.get_by_role("button", name="Pause").click()
        later = f"host:{uuid.uuid4().hex}"
        await nc.publish(SHELL, intent("tools.shell", later, {"cmd": "id"}))
        await expect(page.locator("#feed-count")).to_have_text("paused: 2 rows, newest not shown")
        assert await page.locator("#feed-table tbody tr", has_text=later).count() == 0
        await page.get_by_role("button", name="Resume").click()
        await expect(page.locator("#feed-table tbody tr", has_text=later)).to_have_count(1)


async def test_since_fills_the_feed_with_what_the_streams_hold(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    earlier = f"host:{uuid.uuid4().hex}"
    js = nc.jetstream()
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]):
        await js.publish(SHELL, intent("tools.shell", earlier, {"cmd": "id"}))
        await eventually(lambda: _stored_one(js, "GUARD_DENY"), what="the denial stored")
        async with (
            _console(nats_url, dataclasses.replace(FAST, since_s=3600.0)) as console,
            _page(console) as page,
        ):
            row = page.locator("#feed-table tbody tr", has_text=earlier)
            await expect(row).to_have_count(1)
            await expect(row.locator("td.reason")).to_have_text("denied_by_rule")


async def _stored_one(js: JetStreamContext, stream: str) -> bool:
    return (await js.stream_info(stream)).state.messages == 1


async def test_bus_text_is_shown_as_text_and_a_script_in_it_never_runs(
    nats_url: str, nc: Client, policies: PolicySet, signer: Signer
) -> None:
    script = "<script>window.__pwned = 1</script>"
    image = '<img src=x onerror="window.__pwned = 2">'
    resource = f"host:<b>bold</b><u>{uuid.uuid4().hex}</u>"
    async with (
        _core_gateway(nats_url, policies, signer),
        _console(nats_url) as console,
        _page(console) as page,
    ):
        await nc.publish(SHELL, intent("tools.shell", resource, {"cmd": script + image}))
        row = page.locator("#feed-table tbody tr", has_text=resource)
        await expect(row).to_have_count(1)
        await expect(row.locator("td.resource")).to_have_text(resource)  # literally
        await expect(row.locator(".payload-text")).to_contain_text(
            script + image.replace('"', '\\"')
        )
        assert (
            await page.locator(
                "#feed-table script, #feed-table img, #feed-table b, #feed-table u"
            ).count()
            == 0
        )
        assert await page.evaluate("typeof window.__pwned") == "undefined"
        # and a page reload (the snapshot path) renders it the same way
        await page.reload()
        await expect(page.locator("#connection")).to_have_text("live")
        await expect(page.locator("#feed-table tbody td.resource")).to_have_text(resource)
        assert await page.evaluate("typeof window.__pwned") == "undefined"


# -- rates and gateways --------------------------------------------------------------------


async def test_the_chart_counts_match_the_gateway_stats(
    nats_url: str, nc: Client, policies: PolicySet, signer: Signer
) -> None:
    sent = {("allow", "allowed_by_rule"): 3, ("deny", "denied_by_rule"): 2}
    sent[("hold", "escalated_by_rule")] = 1
    async with (
        _core_gateway(nats_url, policies, signer) as gw,
        _console(nats_url) as console,
        _page(console) as page,
    ):
        gateway = page.locator('#gateways-table tr[data-gateway="gw-core"]')
        await expect(gateway).to_have_count(1)  # answering: its counters are the baseline
        await expect(gateway.locator("td.kid")).to_have_text(signer.kid)
        await expect(gateway.locator("td.policy-digest")).to_have_attribute(
            "title", policies.digest
        )
        await expect(gateway.locator("td.policy-version")).to_have_text(policies.version)
        await expect(gateway).to_contain_text("core/per-message")
        await expect(gateway).to_contain_text("ok")
        for _ in range(3):
            await nc.publish(TRANSFER, _transfer(100))
        for _ in range(2):
            await nc.publish(SHELL, intent("tools.shell", "host:a", {"cmd": "id"}))
        await nc.publish(TRANSFER, _transfer(25000))
        table = page.locator("#rates-table tbody")
        for (effect, reason), n in sent.items():
            row = table.locator(f'tr[data-effect="{effect}"][data-reason="{reason}"]')
            await expect(row.locator("td.total")).to_have_text(str(n))
            await expect(row.locator("td.window")).to_have_text(str(n))
        await expect(table.locator("tr")).to_have_count(len(sent))
        stats = gw.status()["decisions"]
        assert {(e, r): n for e, reasons in stats.items() for r, n in reasons.items()} == sent
        # the bars add up to the same counts, by effect and, regrouped, by reason
        for (effect, _), n in sent.items():
            bars = page.locator(f'#chart rect.bar[data-group="{effect}"]')
            assert sum(int(c or 0) for c in await _attributes(bars, "data-count")) == n
        await page.select_option("#group-by", "reason")
        for (_, reason), n in sent.items():
            bars = page.locator(f'#chart rect.bar[data-group="{reason}"]')
            await expect(bars.first).to_be_attached()
            assert sum(int(c or 0) for c in await _attributes(bars, "data-count")) == n
        await expect(gateway.locator("td.decided")).to_have_text(str(sum(sent.values())))


async def _attributes(locator: Any, name: str) -> list[str | None]:
    return [await locator.nth(i).get_attribute(name) for i in range(await locator.count())]


# -- holds: approve by clicking, and a refusal shown with the gateway's reason --------------


async def _held(nc: Client, page: Page) -> str:
    """Publish a transfer the policies hold; its hold id once the page lists it."""
    intent_id = uuid.uuid4().hex
    await nc.publish(TRANSFER, _transfer(25000, id=intent_id))  # the intake stream stores it
    hold_id = intent_decision_id("guard", "agent-7", intent_id)
    await expect(page.locator(f'#holds-table tr[data-decision="{hold_id}"]')).to_have_count(1)
    return hold_id


async def test_a_hold_approved_by_clicking_is_released_with_an_artifact_naming_the_vote(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    [alice] = _people("alice")
    wrapped = _Approving(policies, [alice], quorum=1)
    async with (
        stream_gateway(stream_settings(nats_url), wrapped, keys[0]),  # type: ignore[arg-type]
        _console(nats_url, key=alice.key) as console,
        _page(console) as page,
    ):
        hold_id = await _held(nc, page)
        row = page.locator(f'#holds-table tr[data-decision="{hold_id}"]')
        await expect(row.locator("td.approvals")).to_contain_text("0/1")
        await expect(row.locator("td.principal")).to_have_text("agent-7")
        # a POST from this very page without the CSRF header is refused, and votes nothing
        forged = await page.evaluate(
            """async (id) => {
                const r = await fetch(`/api/holds/${id}/approve`, {method: "POST",
                    headers: {"Content-Type": "application/json"}, body: '{"reason": "x"}'});
                return [r.status, (await r.json()).message];
            }""",
            hold_id,
        )
        assert forged[0] == 403 and "X-CSRF-Token" in forged[1], forged
        assert (await nc.jetstream().stream_info("GUARD_APPROVE")).state.last_seq == 0
        await row.get_by_label(f"reason for hold {hold_id}").fill("checked with the payee")
        await row.get_by_role("button", name=f"approve hold {hold_id}").click()
        result = page.locator("#vote-result")
        await expect(result).to_contain_text("released (approved)", timeout=15_000)
        await expect(result).to_have_attribute("data-ok", "true")
        await expect(row).to_have_count(0)  # no longer open
        [released] = await stored(nc, "GUARD_EXEC")
        vote_id = approval_decision_id("guard", hold_id, "alice")
        assert released.subject == "guard.exec.agent-7.payments.transfer"
        claims = verify_message(
            Verifier(keys[1]),
            subject=released.subject,
            headers=released.headers,
            payload=released.data,
        )
        assert claims.hold == hold_id and list(claims.approvals) == [vote_id]
        # a second vote, from the page as its buttons send it: refused from the ledger,
        # with the reason, and nothing published
        again = await page.evaluate(
            """async (id) => {
                const csrf = document.querySelector('meta[name="csrf-token"]').content;
                const r = await fetch(`/api/holds/${id}/approve`, {method: "POST",
                    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                    body: '{"reason": "again"}'});
                return [r.status, (await r.json()).message];
            }""",
            hold_id,
        )
        assert again[0] == 409 and again[1].startswith("refused: hold_resolved: "), again
        assert (await nc.jetstream().stream_info("GUARD_APPROVE")).state.last_seq == 1
        # the hold's lineage, one click away: the vote and the release descend from it
        feed_row = page.locator(f'#feed-table tr[data-decision="{hold_id}"]')
        await feed_row.get_by_role("button", name=f"lineage of decision {hold_id}").click()
        descendants = page.locator("#lineage-descendants")
        await expect(descendants).to_contain_text(vote_id)
        await expect(descendants).to_contain_text(resolution_decision_id("guard", hold_id))
        await expect(page.locator("#lineage-ancestors")).to_contain_text(hold_id)


async def test_a_vote_the_gateway_refuses_shows_its_reason(
    nats_url: str, nc: Client, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    wrapped = _Approving(policies, _people("alice"), quorum=1)
    stranger = Ed25519PrivateKey.generate()  # a key the policy does not name
    async with (
        stream_gateway(stream_settings(nats_url), wrapped, keys[0]),  # type: ignore[arg-type]
        _console(nats_url, key=stranger) as console,
        _page(console) as page,
    ):
        hold_id = await _held(nc, page)
        await expect(page.locator("#voter")).to_contain_text(kid_for(stranger.public_key()))
        row = page.locator(f'#holds-table tr[data-decision="{hold_id}"]')
        await row.get_by_role("button", name=f"approve hold {hold_id}").click()
        result = page.locator("#vote-result")
        await expect(result).to_contain_text(
            "refused by the gateway: approver_not_allowed", timeout=15_000
        )
        await expect(result).to_have_attribute("data-ok", "false")
        await expect(row.locator("td.approvals")).to_contain_text("0/1")  # still open
        assert await stored(nc, "GUARD_EXEC") == []


# -- access: the token, the CSRF guard, loopback ------------------------------------------

_PATHS = (
    "/",
    "/static/console.js",
    "/static/console.css",
    "/events",
    "/api/lineage/01JD2Q5X3M7N8P9R0S1T2V3W4X",
    "/favicon.ico",
    "/no-such-page",
)


async def test_without_the_token_every_request_is_401(nats_url: str) -> None:
    async with (
        _console(nats_url) as console,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        base = f"http://127.0.0.1:{console.port}"
        token = console.access.token
        for path in _PATHS:
            for query in ("", "?token=", f"?token={token[:-1]}", f"?token={token}x"):
                async with http.get(base + path + query, allow_redirects=False) as r:
                    assert r.status == 401, (path, query, r.status)
            async with http.get(base + path, headers={"Authorization": "token nope"}) as r:
                assert r.status == 401, path
        async with http.post(base + "/api/holds/X/approve", json={"reason": ""}) as r:
            assert r.status == 401
        assert len(http.cookie_jar) == 0  # and nothing was handed out
        # with it: the page (the token leaves the URL for a cookie), its assets, the API
        async with http.get(console.url, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
            assert (
                "HttpOnly" in r.headers["Set-Cookie"]
                and "SameSite=Strict" in (r.headers["Set-Cookie"])
            )
        for path in ("/", "/static/console.js", "/static/console.css"):
            async with http.get(base + path) as r:
                assert r.status == 200, path
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with http.get(
            base + "/static/console.js", headers={"Authorization": f"token {token}"}
        ) as r:
            assert r.status == 200
        # a DNS-rebinding page reaches the loopback port under its own name: refused even
        # with the token
        rebound = {"Host": f"rebound.example:{console.port}"}
        async with http.get(console.url, headers=rebound, allow_redirects=False) as r:
            assert r.status == 403
    # and in the browser: the page itself is refused
    async with _console(nats_url) as console, _browser() as browser:
        page = await browser.new_page()
        response = await page.goto(f"http://127.0.0.1:{console.port}/")
        assert response is not None and response.status == 401
        assert await page.locator("#feed-table").count() == 0


async def test_a_post_without_the_csrf_guard_is_refused(nats_url: str, nc: Client) -> None:
    votes = await Collector.on(nc, "guard.approve.>")
    key = Ed25519PrivateKey.generate()
    async with (
        _console(nats_url, key=key) as console,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        base = f"http://127.0.0.1:{console.port}"
        async with http.get(console.url) as r:  # a session: the cookie
            assert r.status == 200
        path = base + "/api/holds/01JD2Q5X3M7N8P9R0S1T2V3W4X/approve"
        good = {"Origin": base, "X-CSRF-Token": console.access.csrf}
        refused = [
            ({"Origin": base}, "json"),  # no CSRF token
            ({**good, "X-CSRF-Token": "guess"}, "json"),
            ({**good, "Origin": "http://evil.example"}, "json"),
            ({"X-CSRF-Token": console.access.csrf}, "json"),  # no Origin
            ({**good, "Sec-Fetch-Site": "cross-site"}, "json"),
            (good, "form"),  # what a cross-site <form> can send
        ]
        for headers, kind in refused:
            body: dict[str, Any] = (
                {"json": {"reason": "x"}} if kind == "json" else {"data": {"reason": "x"}}
            )
            async with http.post(path, headers=headers, **body) as r:
                assert r.status == 403, (headers, kind)
                assert (await r.json())["message"].startswith("refused:")
        # the same request with the guard's headers gets through to the vote (no such hold)
        async with http.post(path, headers=good, json={"reason": "x"}) as r:
            assert r.status in (409, 502) and "refused: the" not in (await r.json())["message"]
    assert votes.msgs == []


def test_a_non_loopback_listen_needs_allow_remote(nats_url: str) -> None:
    with pytest.raises(ConfigError, match="--allow-remote"):
        Console(NatsOptions(urls=nats_url), parse_listen("0.0.0.0:0"))
    Console(NatsOptions(urls=nats_url), parse_listen("[::1]:0"))  # loopback: fine
    started = time.monotonic()
    refused = subprocess.run(
        [sys.executable, "-m", "bus_guard", "console", "--nats", nats_url, "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
    assert refused.stdout == "" and time.monotonic() - started < 10
    for listen in ("8470", "host:port", "127.0.0.1:99999"):
        bad = subprocess.run(
            [sys.executable, "-m", "bus_guard", "console", "--nats", nats_url, "--listen", listen],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 2 and "HOST:PORT" in bad.stderr, listen


async def test_the_command_serves_with_allow_remote_after_a_warning_and_stops_on_sigterm(
    nats_url: str,
) -> None:
    argv = [sys.executable, "-m", "bus_guard", "console", "--nats", nats_url]
    argv += ["--listen", "0.0.0.0:0", "--allow-remote"]
    async with await anyio.open_process(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = b""
        with anyio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive(1)
        url = line.decode().split(": ", 1)[1].strip()
        assert url.startswith("http://0.0.0.0:") and "?token=" in url
        port = url.split(":")[2].split("/")[0]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            token = url.split("token=")[1]
            async with http.get(f"http://127.0.0.1:{port}/?token={token}") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            code = await proc.wait()
        stderr = (await proc.stderr.receive(65536)).decode()
    assert code == 0
    assert "WARNING" in stderr and "not loopback" in stderr


# -- the rate book (pure) ------------------------------------------------------------------


def _stats(service: str, uptime_s: float, **counts: int) -> dict[str, Any]:
    decisions: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        effect, reason = key.split("__")
        decisions.setdefault(effect, {})[reason] = n
    status = {"identity": {"gateway": service}, "uptime_s": uptime_s, "decisions": decisions}
    return {"id": service, "endpoints": [{"name": "status", "data": status}]}


def test_the_rate_book_counts_growth_from_a_baseline_and_survives_restarts() -> None:
    book = RateBook(interval_s=1.0, window_s=10.0)
    book.observe(100.0, [_stats("a", 500.0, allow__ok=40)])  # the console starts: baseline
    assert book.window() == {} and book.totals == {("allow", "ok"): 40}
    book.observe(101.0, [_stats("a", 501.0, allow__ok=43, deny__bad=2)])
    assert book.window() == {("allow", "ok"): 3, ("deny", "bad"): 2}
    # a gateway that starts while the console watches counts from zero; an old one seen
    # late is a baseline; a counter that went down is a restart (from zero again)
    book.observe(
        102.0,
        [
            _stats("a", 502.0, allow__ok=1),
            _stats("b", 1.5, allow__ok=4),
            _stats("c", 9000.0, allow__ok=70),
        ],
    )
    assert book.window() == {("allow", "ok"): 3 + 1 + 4, ("deny", "bad"): 2}
    assert book.totals == {("allow", "ok"): 75}  # the stats' own numbers, summed
    book.observe(112.5, [_stats("a", 512.0, allow__ok=1)])  # 101 and 102 left the window
    assert book.window() == {}
    rows = book.snapshot()["rows"]
    assert rows == [{"effect": "allow", "reason": "ok", "window": 0, "total": 1}]


# -- as the shipped operator -----------------------------------------------------------------


async def test_the_console_works_with_the_shipped_operator_permissions(
    tmp_path: Path, keys: tuple[Path, Path], policies: PolicySet, caplog: pytest.LogCaptureFixture
) -> None:
    """compose/auth.conf as a real server: the gateway as `gateway`, an agent as `agent-7`,
    the console as `operator` (its account has no JetStream of its own: deny/hold/ledger
    imported, $SRV, direct gets and approve as services). Feed, gateways, holds, a vote by
    click and the lineage all work, with no permission error on the console's connection
    and the operator's password nowhere on the page."""
    caplog.set_level(logging.DEBUG, logger="bus_guard.cli._connect")
    users = credentials()
    [alice] = _people("alice")
    wrapped = _Approving(policies, [alice], quorum=1)

    def as_user(url: str, user: str) -> str:
        return url.replace("nats://", f"nats://{user}:{users[user]}@")

    with local_server(tmp_path / "nats") as server:
        agent = await nats.connect(as_user(server.url, "agent-7"))
        executor = await nats.connect(as_user(server.url, "executor"))
        execs = await Collector.on(executor, "guard.exec.>")
        settings = stream_settings(as_user(server.url, "gateway"))
        try:
            async with (
                stream_gateway(settings, wrapped, keys[0]),  # type: ignore[arg-type]
                _console(as_user(server.url, "operator"), key=alice.key) as console,
                _page(console) as page,
            ):
                assert users["operator"] not in await page.locator("header").inner_text()
                await expect(page.locator('#gateways-table tr[data-gateway="gw-1"]')).to_have_count(
                    1
                )
                await agent.publish(
                    "guard.in.agent-7.tools.shell", intent("tools.shell", "host:x", {})
                )
                await expect(
                    page.locator("#feed-table tbody tr", has_text="no-shell")
                ).to_have_count(1)
                hold_id = await _held(agent, page)
                row = page.locator(f'#holds-table tr[data-decision="{hold_id}"]')
                await row.get_by_role("button", name=f"approve hold {hold_id}").click()
                await expect(page.locator("#vote-result")).to_contain_text(
                    "released (approved)", timeout=15_000
                )
                [released] = await execs.wait_for(1)
                assert released.subject == TRANSFER.replace(".in.", ".exec.")
                await page.locator(f'#feed-table tr[data-decision="{hold_id}"] button').click()
                await expect(page.locator("#lineage-descendants")).to_contain_text(
                    resolution_decision_id("guard", hold_id)
                )
        finally:
            await agent.close()
            await executor.close()
    violations = [r.getMessage() for r in caplog.records if "ermission" in r.getMessage()]
    assert violations == []


async def test_the_command_exits_1_when_the_bus_is_lost() -> None:
    with NatsServer() as server:
        argv = [sys.executable, "-m", "bus_guard", "console", "--nats", server.url]
        argv += ["--listen", "127.0.0.1:0"]
        async with await anyio.open_process(argv) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            line = b""
            with anyio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await proc.stdout.receive(1)
            assert line.startswith(b"bus_guard console: http://127.0.0.1:")
            server.stop()
            with anyio.fail_after(30):  # the tools' reconnect budget: a few seconds
                code = await proc.wait()
            stderr = (await proc.stderr.receive(65536)).decode()
    assert code == 1 and "lost the connection to NATS" in stderr, stderr


async def test_a_browser_that_falls_behind_is_dropped_not_buffered() -> None:
    hub = Hub(size=2)
    with hub.subscribe() as slow, hub.subscribe() as keeping_up:
        for n in range(3):
            hub.publish("feed", [n])
            if n < 2:
                assert (await keeping_up.receive()).data == f"[{n}]".encode()
        assert hub.dropped == 1  # the slow one: its two events, then its stream ends
        assert [(await slow.receive()).data for _ in range(2)] == [b"[0]", b"[1]"]
        with pytest.raises(anyio.EndOfStream):
            await slow.receive()
        assert (await keeping_up.receive()).data == b"[2]"
