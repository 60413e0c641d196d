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
from typing import Final

from nats.aio.client import Client
from nats.aio.msg import Msg

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
