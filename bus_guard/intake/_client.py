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
reply subject with surrogates is refused. It is the one place where bus_guard overrides
nats-py (a private method, because nats-py offers no public hook before the decode);
``tests/test_client.py`` fails if a nats-py release changes what it overrides.
"""

from __future__ import annotations

from nats.aio.client import Client
from nats.aio.msg import Msg

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
