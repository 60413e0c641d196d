"""The gateways' JWKS from the bus, kept fresh: what an executor verifies with when it has
no file copy of the keys (SPEC §6, §10 "Keys live"; SCENARIOS S10).

Every gateway merges its JWKS into the key ``jwks`` of the ``<prefix>-jwks`` key-value
bucket (:data:`JWKS_KEY`), at start and whenever its keys change (``bus-guard keys rotate``,
``keys revoke``). :class:`LiveVerifier` reads it with any object that has nats-py's
``KeyValue.get`` (this package imports no NATS client), builds a :class:`Verifier`, and
refreshes it every ``refresh_s`` and at once when an artifact names a key it does not know
yet (a rotation: the new key reaches the bucket before any artifact signed with it; such
refreshes at most once per ``min_refresh_s``, so tokens with made-up kids cannot make it
fetch more often). A revocation reaches the verifier within ``refresh_s``; a
retirement's ``not_after`` is enforced from the JWKS it already holds. A bucket that cannot
be read keeps the keys last read (logged, counted): verification never falls back to
accepting anything.

::

    js = nc.jetstream(prefix="JS.GUARD.API")     # an executor in the EXEC account
    live = LiveVerifier(await js.key_value("guard-jwks"), refresh_s=5)
    await live.refresh()                          # raises if there are no keys yet
    claims = await live.verify_message(subject=msg.subject, headers=msg.headers, payload=msg.data)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bus_guard.errors import ConfigError, VerificationError
from bus_guard.verify._format import ArtifactClaims, VerifyReason
from bus_guard.verify._jwks import Jwks, load_jwks
from bus_guard.verify._verifier import CreateOnly, Verifier, verify_message, verify_message_once

__all__ = ("JWKS_KEY", "JwksBucket", "LiveStatistics", "LiveVerifier")

log = logging.getLogger(__name__)

JWKS_KEY: Final = "jwks"  # the key the gateways' merged JWKS is stored under


class _Entry(Protocol):
    @property
    def value(self) -> bytes | None: ...
    @property
    def revision(self) -> int | None: ...


class JwksBucket(Protocol):
    """What :class:`LiveVerifier` needs of the JWKS bucket (nats-py ``KeyValue``)."""

    async def get(self, key: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class LiveStatistics:
    revision: int  # the bucket revision of the JWKS in use (0: none yet)
    kids: tuple[str, ...]  # the keys it holds
    refreshes: int  # JWKS fetched and changed
    failures: int  # fetches that failed (the keys last read stayed)


class LiveVerifier:
    """A :class:`Verifier` over the JWKS in the gateways' bucket, refreshed."""

    def __init__(
        self,
        bucket: JwksBucket,
        *,
        key: str = JWKS_KEY,
        refresh_s: float = 5.0,
        min_refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        **verifier: Any,
    ) -> None:
        """*verifier*: :class:`Verifier`'s keyword arguments (``leeway_s``, ``issuer``,
        ``seen``, ``max_cached_heads``), for every verifier built."""
        if not (math.isfinite(refresh_s) and refresh_s > 0 and min_refresh_s >= 0):
            raise ConfigError("refresh_s must be positive and min_refresh_s not negative")
        self._bucket = bucket
        self._key = key
        self.refresh_s = refresh_s
        self.min_refresh_s = min_refresh_s
        self._clock = clock
        self._options = verifier
        self._verifier: Verifier | None = None
        self._revision = 0
        self._fetched_at = -math.inf
        self._unknown_at = -math.inf  # the last refresh an unknown key asked for
        self._refreshes = 0
        self._failures = 0

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:
            raise ConfigError("no JWKS yet: await LiveVerifier.refresh() first")
        return self._verifier

    @property
    def jwks(self) -> Jwks:
        return self.verifier.jwks

    def statistics(self) -> LiveStatistics:
        kids = tuple(self._verifier.jwks) if self._verifier is not None else ()
        return LiveStatistics(self._revision, kids, self._refreshes, self._failures)

    async def refresh(self) -> bool:
        """Fetch the JWKS now; whether it changed. Raises :class:`ConfigError` only when
        there has never been one (an executor must not start without keys)."""
        self._fetched_at = self._clock()
        try:
            entry: _Entry = await self._bucket.get(self._key)
            revision = entry.revision or 0
            if revision == self._revision and self._verifier is not None:
                return False
            jwks = load_jwks(entry.value or b"")
        except Exception as exc:  # any client's errors; the keys last read stay in use
            self._failures += 1
            if self._verifier is None:
                raise ConfigError(f"no JWKS in the bucket under {self._key!r}: {exc!r}") from exc
            log.warning("JWKS not refreshed (keeping %d keys): %r", len(self.jwks), exc)
            return False
        self._verifier = Verifier(jwks, **self._options)
        self._revision = revision
        self._refreshes += 1
        log.info("JWKS revision %d: %d keys", revision, len(jwks))
        return True

    async def _current(self) -> Verifier:
        if self._verifier is None or self._clock() - self._fetched_at >= self.refresh_s:
            await self.refresh()
        return self.verifier

    async def _unknown_key(self, exc: VerificationError) -> bool:
        """After ``unknown_kid``: whether a refresh (if not too soon) brought new keys."""
        if exc.reason != VerifyReason.UNKNOWN_KID:
            return False
        now = self._clock()
        if now - self._unknown_at < self.min_refresh_s:
            return False  # tokens with made-up kids cannot make it fetch more often
        self._unknown_at = now
        return await self.refresh()

    async def verify(
        self, token: str, *, subject: str, payload: bytes, now: float | None = None
    ) -> ArtifactClaims:
        """:meth:`Verifier.verify` with the current keys."""
        verifier = await self._current()
        try:
            return verifier.verify(token, subject=subject, payload=payload, now=now)
        except VerificationError as exc:
            if not await self._unknown_key(exc):
                raise
        return self.verifier.verify(token, subject=subject, payload=payload, now=now)

    async def verify_message(
        self,
        *,
        subject: str,
        headers: Mapping[str, str] | None,
        payload: bytes,
        now: float | None = None,
    ) -> ArtifactClaims:
        """:func:`~bus_guard.verify.verify_message` with the current keys."""
        verifier = await self._current()
        try:
            return verify_message(
                verifier, subject=subject, headers=headers, payload=payload, now=now
            )
        except VerificationError as exc:
            if not await self._unknown_key(exc):
                raise
        return verify_message(
            self.verifier, subject=subject, headers=headers, payload=payload, now=now
        )

    async def verify_message_once(
        self,
        executed: CreateOnly,
        *,
        subject: str,
        headers: Mapping[str, str] | None,
        payload: bytes,
        now: float | None = None,
    ) -> ArtifactClaims:
        """:func:`~bus_guard.verify.verify_message_once` with the current keys."""
        verifier = await self._current()
        try:
            return await verify_message_once(
                verifier, executed, subject=subject, headers=headers, payload=payload, now=now
            )
        except VerificationError as exc:
            if not await self._unknown_key(exc):
                raise
        return await verify_message_once(
            self.verifier, executed, subject=subject, headers=headers, payload=payload, now=now
        )
