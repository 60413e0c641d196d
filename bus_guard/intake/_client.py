"""The NATS client the gateway connects with: nats-py's, made total on what agents send.

NATS subjects are bytes; any agent allowed ``guard.in.<itself>.>`` may publish a subject or
a reply subject that is not UTF-8 (the server does not check). nats-py 2.16 decodes both
with ``bytes.decode()`` while building the message, inside its read loop: a
``UnicodeDecodeError`` there ends the loop, the process stays up and decides nothing more,
for anyone (reported upstream as: "_build_message: invalid UTF-8 in a subject or reply
subject kills the read loop; decode with errors='surrogateescape'").

:class:`GuardClient` decodes them with ``surrogateescape`` instead: every byte survives as
itself or as a lone surrogate (U+DC80..U+DCFF), so the message is delivered, its subject
does not parse as an intent subject (``bad_subject``, on ``<prefix>.deny.~invalid``), and a
reply subject with surrogates is refused.

Headers likewise: nats-py's parser is lossy where an agent is hostile (a header name
with a space or a byte that is not UTF-8 makes it drop *every* header of the message; a
value that is not UTF-8 is forwarded with U+FFFD in place of its bytes). The gateway
must not forward headers other than the ones it was sent, so :class:`GuardClient` checks
the raw header block first and, when nats-py would not read it faithfully, adds
:data:`~bus_guard.pipeline.UNREADABLE_HEADERS` with the reason: the pipeline denies the
intent ``malformed``.

These are the only places where bus_guard overrides nats-py (private methods, because
nats-py offers no public hook before it decodes); ``tests/test_layout.py`` and
``tests/test_intake_inputs.py`` fail if a nats-py release changes what they override.
"""

from __future__ import annotations

import re
from typing import Any, Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol.command import hpub_cmd

from bus_guard.pipeline import UNREADABLE_HEADERS

__all__ = ("GuardClient",)


class GuardClient(Client):
    """nats-py's :class:`~nats.aio.client.Client`, total on non-UTF-8 subjects."""

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        # nats-py's own, but the header block is built by _header_block: the same bytes,
        # without two Python-level calls per value (see _header_block).
        if headers is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if subject == "":
            raise nats.errors.BadSubjectError
        pub_cmd = hpub_cmd(subject, reply, _header_block(headers), payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(pub_cmd)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None  # as nats-py's own, without a second coroutine per message
        problem = _unreadable(headers)
        if problem is not None:
            # Not handed to nats-py at all: its parser raises on some such blocks (a status
            # line that is not UTF-8), inside the read loop.
            return {UNREADABLE_HEADERS: problem}
        try:
            parsed: dict[str, str] | None = await super()._process_headers(headers)
        except Exception as exc:  # defence in depth: a reader that raises stops reading
            return {UNREADABLE_HEADERS: f"headers nats-py cannot read: {exc!r}"[:200]}
        return parsed


_HEADER_KEY: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's _HEADER_KEY_RE
_NEWLINES: Final = str.maketrans({"\r": " ", "\n": " "})  # nats-py's _HEADER_VALUE_NEWLINES


# Header names as _header_block writes them (stripped, checked, encoded), by the name as
# given: the gateway sends the same three names on every exec message, so their strip,
# regex and encode calls are made once (callgrind, core mode: ~1.5k instructions and ~40
# L1 misses less per intent). Bounded: inbound names pass through too.
_NAMES_MAX: Final = 256
_names: dict[str, bytes] = {}


def _header_block(headers: dict[str, Any]) -> bytearray:
    """The header block nats-py 2.16's ``_send_publish`` builds for *headers*, byte for
    byte (keys and values stripped, empty keys skipped, a key that is no RFC 7230 token
    refused with ``BadHeaderError``, CR/LF in a value turned into spaces), but a value that
    needs none of that (the gateway's own: decision ids, artifacts) is taken as it is,
    checked with C-level string methods instead of ``strip()`` and ``translate()`` calls.
    ``tests/test_intake_inputs.py`` compares it with nats-py's on generated headers."""
    hdr = bytearray(b"NATS/1.0\r\n")
    for k, v in headers.items():
        name = _names.get(k)
        if name is None:
            key = k.strip()
            if not key:
                continue
            if _HEADER_KEY.fullmatch(key) is None:
                raise nats.errors.BadHeaderError(key)
            name = key.encode()
            if type(k) is str:  # a subclass could strip or encode otherwise
                if len(_names) >= _NAMES_MAX:
                    _names.clear()
                _names[k] = name
        hdr += name
        hdr += b": "
        clean = (
            isinstance(v, str)
            and v
            and not v[0].isspace()
            and not v[-1].isspace()
            and "\r" not in v
            and "\n" not in v
        )
        if not clean:
            v = v.strip().translate(_NEWLINES)
        hdr += v.encode()
        hdr += b"\r\n"
    hdr += b"\r\n"
    return hdr


# "NATS/1.0", an optional status (code and description), CRLF; then "Name: value" lines.
_STATUS_LINE: Final = re.compile(rb"NATS/1\.0(?: [0-9]{3}(?: [^\r\n]*)?)?\r\n")
_NAME: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _unreadable(block: bytes) -> str | None:
    """Why nats-py would not read the raw header *block* faithfully; ``None`` if it would."""
    head = _STATUS_LINE.match(block)
    if head is None:
        return "header block does not start with NATS/1.0"
    try:
        block[: head.end()].decode("ascii")
    except UnicodeDecodeError:
        return "header status line is not ASCII"
    for line in block[head.end() :].split(b"\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or _NAME.fullmatch(name) is None:
            return f"header line {line[:64]!r} has no RFC 7230 token name"
        if _BAD_VALUE.search(value) is not None:
            return f"header {name.decode()!r} has a control character in its value"
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return f"header {name.decode()!r} has a value that is not UTF-8"
    return None
