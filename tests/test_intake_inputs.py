"""What an agent can send that nats-py would choke on, through a real nats-server, in both
intake modes: subjects and reply subjects that are not UTF-8, ``Status`` headers and inline
status lines, and outputs the server refuses for good. The gateway must decide each one
and go on deciding everyone else's intents."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js.api import StreamConfig

from bus_guard.intake import Gateway, round_trip
from bus_guard.intake._client import GuardClient
from bus_guard.pipeline import HeaderValue
from bus_guard.policy import PolicySet
from bus_guard.settings import IntakeMode, Settings
from bus_guard.signing import Signer
from bus_guard.verify import payload_digest

from .helpers import Collector, intent, outputs, sentinel
from .streamkit import drained, eventually, records, stored, stream_gateway, stream_settings

TRANSFER = "guard.in.agent-7.payments.transfer"


def _raw_publish(url: str, frames: list[bytes]) -> None:
    """Publish protocol frames byte for byte (nats-py cannot send a subject that is not
    UTF-8), then PING and wait for the PONG: the server has processed every frame."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.recv(65536)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        s.sendall(b"".join(frames) + b"PING\r\n")
        seen = b""
        while b"PONG\r\n" not in seen:
            chunk = s.recv(65536)
            assert chunk, "server closed the connection"
            assert b"-ERR" not in chunk, chunk
            seen += chunk


def _pub(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    reply_part = b" " + reply if reply else b""
    return b"PUB %s%s %d\r\n%s\r\n" % (subject, reply_part, len(payload), payload)


def _hpub(subject: bytes, header_block: bytes, payload: bytes) -> bytes:
    size = len(header_block)
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        subject,
        size,
        size + len(payload),
        header_block,
        payload,
    )


def _small(**kw: object) -> bytes:
    return intent(
        "payments.transfer",
        "account:acct-1",
        {"amount": 10, "currency": "USD", "to": "account:acct-9"},
        **kw,
    )


async def test_core_mode_survives_subjects_and_replies_that_are_not_utf8(
    nats_url: str, signer: Signer, policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer) as gw:
        bad = _small(id="bad-subject")
        _raw_publish(
            nats_url,
            [
                _pub(b"guard.in.agent-7.tools.\xff\xfe", bad),
                _pub(TRANSFER.encode(), _small(id="bad-reply"), reply=b"_INBOX.\xff"),
                _pub(TRANSFER.encode(), _small(id="after")),
            ],
        )
        await sentinel(nc, out, 1)  # the bad subject's denial, then the sentinel's
        stats = gw.statistics()
    # The bad subject is one denial on the invalid-subject token, its subject escaped.
    [denial] = [r for r in out.deny.records() if r.get("reason") == "bad_subject"]
    assert out.deny.msgs[0].subject == "guard.deny.~invalid"
    assert denial["subject"] == "guard.in.agent-7.tools.\\xff\\xfe"
    # The gateway read on: the bad reply's intent and the next one were decided.
    assert sorted(json.loads(m.data)["id"] for m in out.exec.msgs) == ["after", "bad-reply"]
    assert stats.replies_refused == 1 and stats.replies_sent == 0
    await nc.drain()


_SBAD = _small(id="s-bad")
_SSTATUS = _small(id="s-status")


def _digest(payload: bytes) -> str:
    return payload_digest(payload)


async def test_stream_mode_decides_non_utf8_subjects_and_status_headers(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with stream_gateway(stream_settings(nats_url), policies, keys[0]) as gw:
        _raw_publish(
            nats_url,
            [
                _pub(b"guard.in.agent-7.tools.\xff\xfe", _SBAD),
                # an inline status line, as a server writes one
                _hpub(TRANSFER.encode(), b"NATS/1.0 503 Bad\r\nX-A: v\r\n\r\n", _small(id="s-in")),
            ],
        )
        await js.publish(TRANSFER, _SSTATUS, headers={"Status": "503"})
        await js.publish(TRANSFER, _small(id="s-ok"))
        await eventually(lambda: drained(js), what="every intent decided and acked")
        stats = gw.statistics()
    deny = records(await stored(nc, "GUARD_DENY"))
    assert sorted((r["reason"], r["payload_sha256"]) for r in deny) == sorted(
        [("bad_subject", _digest(_SBAD)), ("malformed", _digest(_SSTATUS))]
    )
    assert "reserved" in next(r["message"] for r in deny if r["reason"] == "malformed")
    # JetStream delivers the stored inline-status message without its status line: an
    # ordinary intent then, decided like one.
    execs = sorted(json.loads(m.data)["id"] for m in await stored(nc, "GUARD_EXEC"))
    assert execs == ["s-in", "s-ok"]
    assert stats.acks == 4 and stats.received == 4
    await nc.close()


@pytest.mark.parametrize("mode", ["core", "stream"])
async def test_other_agents_are_decided_after_each_hostile_message(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet, mode: IntakeMode
) -> None:
    """One message of each kind, then one ordinary intent: the ordinary one is forwarded."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    execs = await Collector.on(nc, "guard.exec.>")
    settings = (
        stream_settings(nats_url) if mode == "stream" else Settings(nats_url=nats_url, mode="core")
    )
    # Each hostile message carries an intent that is denied (its action is not the
    # subject's): whatever happens to it, nothing of it may reach exec.
    shell = intent("tools.shell", "tool:shell", {})
    hostile = [
        _pub(b"guard.in.agent-7.\xc3\x28", shell),
        _pub(TRANSFER.encode(), shell, reply=b"_INBOX.\xed\xa0\x80"),
        _hpub(TRANSFER.encode(), b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", shell),
        _hpub(TRANSFER.encode(), b"NATS/1.0\r\nX(1): v\r\n\r\n", shell),
        _hpub(TRANSFER.encode(), b"NATS/1.0\r\nX-A: \xff\xfe\r\n\r\n", shell),
    ]
    async with stream_gateway(settings, policies, keys[0]):
        for i, frame in enumerate(hostile):
            _raw_publish(nats_url, [frame])
            if mode == "stream":
                await js.publish(TRANSFER, _small(id=f"victim-{i}"))
            else:
                await nc.publish(TRANSFER, _small(id=f"victim-{i}"))
            await execs.wait_for(i + 1)
        await round_trip(nc)
    ids = [json.loads(m.data)["id"] for m in execs.msgs]
    assert ids == [f"victim-{i}" for i in range(len(hostile))]
    await nc.close()


async def test_outputs_the_server_refuses_end_after_max_deliveries(
    nats_url: str, keys: tuple[Path, Path], policies: PolicySet
) -> None:
    """An allow whose exec message the exec stream refuses for good (here: too large for
    it) is not redelivered forever: after max_deliveries it is terminated and denied on
    the deny stream; the other intents go on."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    settings = stream_settings(nats_url, max_deliveries=3)
    async with stream_gateway(settings, policies, keys[0]) as gw:
        info = await js.stream_info("GUARD_EXEC")
        config: StreamConfig = info.config
        config.max_msg_size = 64  # every exec message is larger: refused for good
        await js.update_stream(config)
        await js.publish(TRANSFER, _small(id="big"))
        await js.publish("guard.in.agent-1.tools.shell", intent("tools.shell", "tool:shell", {}))
        await eventually(lambda: drained(js), what="the refused allow terminated")
        stats = gw.statistics()
    assert stats.undeliverable == 1 and stats.allowed == 1
    assert await stored(nc, "GUARD_EXEC") == []
    deny = records(await stored(nc, "GUARD_DENY"))
    assert sorted(r["reason"] for r in deny) == ["denied_by_rule", "internal_error"]
    [gave_up] = [r for r in deny if r["reason"] == "internal_error"]
    assert gave_up["decision_id"].endswith("-undeliverable")
    assert msgspec.json.decode(gave_up["payload"])["id"] == "big"
    await nc.close()


async def test_an_output_nats_py_will_not_send_fails_alone(nats_url: str) -> None:
    """One output with a header name nats-py refuses to write is refused for good (never
    retried as if in doubt); the other outputs of the same call are stored."""
    from bus_guard.intake._publisher import OutputPublisher
    from bus_guard.pipeline import Output

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="OUT", subjects=["out.>"], allow_direct=True))
    publisher = OutputPublisher(nc, js, name="t", timeout_s=5)
    good: Output = ("exec", "out.a", b"a", {"Nats-Msg-Id": "a"})
    bad: Output = ("exec", "out.b", b"b", {"X(1)": "v"})
    over: Output = ("exec", "nowhere.c", b"c", {})  # no stream: in doubt, not refused
    published = await publisher.publish([[good], [bad], [over]])
    assert published.stored == [True, False, False]
    assert published.refused == [False, True, False]
    assert [m.subject for m in await stored(nc, "OUT")] == ["out.a"]
    await nc.close()


@pytest.mark.parametrize("atomic_stream", [True, False])
async def test_outputs_go_as_one_atomic_batch_only_when_many(
    nats_url: str, atomic_stream: bool
) -> None:
    """OUTPUT_ATOMIC_MIN outputs of a role go out as one atomic batch (stored with its
    batch headers), fewer one by one (a flood's medium batches: no staging store); a
    stream that refuses atomic batches gets them one by one, every one stored."""
    from bus_guard.intake._publisher import OUTPUT_ATOMIC_MIN, OutputPublisher
    from bus_guard.pipeline import Output

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = StreamConfig(name="OUT", subjects=["out.>"], allow_direct=True)
    config.allow_atomic = atomic_stream
    await js.add_stream(config)
    publisher = OutputPublisher(nc, js, name="t", timeout_s=5)

    def group(n: int, tag: str) -> list[list[Output]]:
        return [[("exec", f"out.{tag}.{i}", b"x", {"Nats-Msg-Id": f"{tag}{i}"})] for i in range(n)]

    few = await publisher.publish(group(OUTPUT_ATOMIC_MIN - 1, "few"))
    many = await publisher.publish(group(OUTPUT_ATOMIC_MIN, "many"))
    assert all(few.stored) and all(many.stored)
    msgs = await stored(nc, "OUT")
    assert len(msgs) == 2 * OUTPUT_ATOMIC_MIN - 1
    batched = {m.subject.split(".")[1] for m in msgs if "Nats-Batch-Id" in (m.headers or {})}
    assert batched == ({"many"} if atomic_stream else set())
    await nc.close()


@pytest.mark.parametrize(
    "block",
    [
        b"NATS/1.0\r\nX Y: v\r\ntraceparent: t\r\n\r\n",  # nats-py drops every header
        b"NATS/1.0\r\nX-\xc3\xa9: v\r\n\r\n",  # a name that is not ASCII
        b"NATS/1.0\r\nX-A: \xff\xfe\r\n\r\n",  # nats-py forwards U+FFFD instead
        b"NATS/1.0\r\nno colon\r\n\r\n",
        b"NATS/1.0 503 \xff\xfe\r\nX-A: v\r\n\r\n",  # nats-py raises in its reader on these
        b"NATS/1.0 \xff\xfe\xfd Bad\r\n\r\n",
    ],
)
async def test_headers_nats_py_would_not_read_faithfully_are_denied(
    nats_url: str, signer: Signer, policies: PolicySet, block: bytes
) -> None:
    """An allowed intent whose header block nats-py would drop or rewrite is denied
    malformed: the gateway never forwards other headers than the ones it was sent."""
    nc = await nats.connect(nats_url)
    out = await outputs(nc)
    async with Gateway(Settings(nats_url=nats_url, mode="core"), policies, signer):
        _raw_publish(nats_url, [_hpub(TRANSFER.encode(), block, _small())])
        await sentinel(nc, out, 1)
    assert out.exec.msgs == []
    [record] = [r for r in out.deny.records() if r.get("subject") == TRANSFER]
    assert record["reason"] == "malformed" and "header" in record["message"]
    await nc.close()


# --- the client's header block: nats-py's bytes, fewer calls ----------------------------

_HEADER_TEXT = st.text(
    alphabet=st.sampled_from([*"ab-_.:/ \t\r\n\u00e9\u2028", "\x0b", "\x1c", "\u3000"]),
    max_size=12,
)


async def _pub_cmd(client: Client, headers: dict[str, Any]) -> bytes | type[Exception]:
    """What *client*'s ``_send_publish`` hands to ``_send_command`` (or the error class)."""
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(bytes(cmd))

    client._send_command = capture  # type: ignore[method-assign]
    client._flush_queue = None
    try:
        await client._send_publish("guard.exec.a.b", "", b"{}", 2, headers)
    except Exception as exc:
        return type(exc)
    [cmd] = sent
    return cmd


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(_HEADER_TEXT, st.sampled_from(["Guard-Artifact", "traceparent", " x "])),
        st.one_of(_HEADER_TEXT, st.builds(HeaderValue, _HEADER_TEXT)),
        max_size=4,
    )
)
def test_the_clients_header_block_is_nats_pys(headers: dict[str, str]) -> None:
    """GuardClient builds the header block without nats-py's per-value strip/translate
    calls when they change nothing: the published bytes (or the error) must be exactly
    nats-py's for any headers, the gateway's own HeaderValues and agents' values alike."""

    async def both() -> tuple[object, object]:
        return await _pub_cmd(Client(), headers), await _pub_cmd(GuardClient(), headers)

    ours_theirs = asyncio.run(both())
    assert ours_theirs[1] == ours_theirs[0]
