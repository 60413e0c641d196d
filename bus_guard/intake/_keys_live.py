"""Signing keys that change while the gateway runs (README, "Keys live"; SCENARIOS S10).

A :class:`KeyKeeper` watches the gateway's key file (``--key``) and JWKS file (``--jwks``,
default ``jwks.json`` next to the key), every ``poll_s`` and on SIGHUP, and publishes the
JWKS to the ``<prefix>-jwks`` key-value bucket under ``jwks``
(:data:`~bus_guard.verify.JWKS_KEY`), where executors read it
(:class:`~bus_guard.verify.LiveVerifier`).

What a change does, in this order:

1. the JWKS file is read (one that does not load is logged and counted; the keys stay);
2. it is **merged** into the bucket by compare-and-set (:func:`~bus_guard.signing._keys.
   merge_jwks`: every gateway's keys; a key in several files keeps the earliest
   ``revoked_at`` and ``not_after``, so no gateway can undo another's revocation), with the
   signing key's public half always in it;
3. only once the bucket holds the new key does the gateway sign with it (``keys rotate``
   replaced the key file): the artifact signer and the ledger's checkpoint signer switch
   in one step on the event loop. A verifier that meets the new ``kid`` first refreshes
   and finds it; the old key verifies until its ``not_after`` (the rotation's grace);
4. parent decisions' artifacts are verified with the JWKS file (and the signing keys) as
   now read: what the operator trusts, never the bucket's merge of every gateway's.

A publish that fails leaves the gateway signing with the key it has (still in the bucket),
and is tried again at the next poll.

**Pruning.** A key refused (revoked or retired) for longer than ``prune_after_s`` (a day)
refuses every artifact anyway: it leaves the published JWKS, so that the bucket does not
grow with every rotation. Its kid is first written to the bucket's ``pruned`` key (a
tombstone, with when it was refused), and no gateway publishes a tombstoned kid again:
a gateway whose JWKS file predates the revocation cannot bring the key back as usable.
Parents are verified with the gateway's own JWKS file, which keeps every key.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from bus_guard.errors import ConfigError
from bus_guard.ledger._records import CheckpointSigner
from bus_guard.signing._keys import jwk_entry, kid_for, load_private_key, merge_jwks
from bus_guard.signing._signer import Signer
from bus_guard.verify import JWKS_KEY, Jwks, load_jwks

__all__ = ("KeyKeeper", "KeyStatistics", "ensure_jwks_bucket")

log = logging.getLogger(__name__)

_HISTORY: Final = 16
PRUNED_KEY: Final = "pruned"  # {kid: refused from (unix s)} of the keys left out of the JWKS
PRUNE_AFTER_S: Final = 86400.0  # how long a refused key stays published (reason revoked_kid)
_CAS_ATTEMPTS: Final = 10  # other gateways publishing at the same moment


async def ensure_jwks_bucket(js: nats.js.JetStreamContext, bucket: str, replicas: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=_HISTORY, replicas=replicas)
        )


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    kid: str  # the key the gateway signs with now
    published: int  # the bucket revision of the JWKS last published (0: never)
    rotations: int  # signing keys switched while running
    publishes: int  # JWKS merged into the bucket
    failures: int  # files that did not load, publishes that failed
    last_failure: str = ""


def _without(jwks: Jwks, kids: set[str]) -> Jwks:
    return Jwks(e for e in jwks.entries if e.kid not in kids) if kids else jwks


def _stat(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class KeyKeeper:
    """Keeps the signing key and the published JWKS current: see the module docstring."""

    def __init__(
        self,
        kv: KeyValue | None,
        *,
        key_path: Path,
        jwks_path: Path | None,
        signer: Signer,
        ledger_signer: CheckpointSigner | None = None,
        on_trust: Callable[[Jwks], None] | None = None,
        poll_s: float = 1.0,
        republish_s: float = 60.0,
        prune_after_s: float = PRUNE_AFTER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """*kv*: the JWKS bucket (``None``: no JetStream; the keys still reload)."""
        if not (math.isfinite(poll_s) and poll_s > 0):
            raise ConfigError("the key poll interval must be positive")
        self._kv = kv
        self.key_path = Path(key_path)
        self.jwks_path = jwks_path
        self._signer = signer
        self._ledger_signer = ledger_signer
        self.on_trust = on_trust  # called with the gateway's JWKS when its keys change
        self.trusted: Jwks | None = None  # the JWKS file with the signing keys, last read
        self.poll_s = poll_s
        self.republish_s = republish_s
        self.prune_after_s = prune_after_s
        self._clock = clock
        self._seen = (_stat(self.key_path), _stat(jwks_path))
        self._wake = anyio.Event()
        self._published = 0
        self._published_at = -math.inf
        self._rotations = 0
        self._publishes = 0
        self._failures = 0
        self._last_failure = ""
        self._lock = anyio.Lock()

    def statistics(self) -> KeyStatistics:
        return KeyStatistics(
            self._signer.kid,
            self._published,
            self._rotations,
            self._publishes,
            self._failures,
            self._last_failure,
        )

    def request_reload(self) -> None:
        """Look at the files now (SIGHUP)."""
        self._seen = (None, None)
        self._wake.set()

    async def start(self) -> Jwks:
        """Publish the JWKS (merged with the bucket's); the merged JWKS, or the local one
        when there is no bucket or it cannot be written now (logged)."""
        local = self._local()
        merged = await self._publish(local)
        self.trusted = local
        return merged or local

    @asynccontextmanager
    async def running(self) -> AsyncIterator[KeyKeeper]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def reload(self) -> bool:
        """Look at the files now; whether the signing key changed."""
        async with self._lock:
            return await self._reload()

    # -- inside ------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        self._failures += 1
        self._last_failure = message
        log.warning("keys: %s", message)

    def _local(self) -> Jwks:
        """The JWKS file (if any) with the signing key's public half in it."""
        own = Jwks([jwk_entry(self._signer.public_key())])
        if self.jwks_path is None or not self.jwks_path.exists():
            return own
        return merge_jwks(load_jwks(self.jwks_path), own)

    async def _reload(self) -> bool:
        seen = (_stat(self.key_path), _stat(self.jwks_path))
        due = time.monotonic() - self._published_at >= self.republish_s
        if seen == self._seen and not due:
            return False
        self._seen = seen
        try:
            key = load_private_key(self.key_path)
            jwks = load_jwks(self.jwks_path) if self.jwks_path and self.jwks_path.exists() else None
        except ConfigError as exc:
            self._fail(f"{exc}; signing with {self._signer.kid} still")
            self._seen = (None, None)  # try again at the next poll
            return False
        kid = kid_for(key)
        new = kid != self._signer.kid
        if new and jwks is not None and kid not in jwks:
            log.warning(
                "keys: the new signing key %s is not in %s: publishing it anyway (run "
                "`bus-guard keys rotate`, which retires the old key, rather than replacing "
                "the key file)",
                kid,
                self.jwks_path,
            )
        published = Jwks([jwk_entry(key.public_key())])
        if jwks is not None:
            published = merge_jwks(jwks, published)
        # The signing key so far stays published too (it may be retired, never dropped).
        published = merge_jwks(published, Jwks([jwk_entry(self._signer.public_key())]))
        merged = await self._publish(published)
        if self._kv is not None and merged is None:
            self._seen = (None, None)  # not in the bucket yet: do not sign with it yet
            return False
        if new:
            old = self._signer.kid
            self._signer.rekey(key)
            if self._ledger_signer is not None:
                self._ledger_signer.rekey(key)
            self._rotations += 1
            log.info("keys: signing with %s from now on (was %s)", kid, old)
        # Parents are verified with this gateway's own JWKS (its file and its keys), never
        # with the bucket's merge: --jwks is what the operator trusts (README, "Lineage").
        self.trusted = published
        if self.on_trust is not None:
            self.on_trust(self.trusted)
        own = (merged or published).entry(kid)
        if own is not None and not own.usable_at(time.time()):
            log.error(
                "keys: the signing key %s is revoked or retired: executors refuse "
                "its artifacts; rotate the key",
                kid,
            )
        return new

    async def _publish(self, local: Jwks) -> Jwks | None:
        """Merge *local* into the bucket by compare-and-set; the merged JWKS, or ``None``
        when there is no bucket or it could not be written (logged, counted)."""
        if self._kv is None:
            return None
        kv = self._kv
        try:
            for _ in range(_CAS_ATTEMPTS):
                try:
                    entry = await kv.get(JWKS_KEY)
                    current: Jwks | None = load_jwks(entry.value or b"")
                    last = entry.revision or 0
                except nats.js.errors.KeyNotFoundError:
                    current, last = None, 0
                except ConfigError as exc:  # a broken value: replaced by ours
                    log.warning("keys: the bucket's JWKS does not load (%s): replacing it", exc)
                    current, last = None, -1
                pruned = await self._pruned(kv, local, current)
                if pruned is None:
                    continue  # another gateway tombstoned keys meanwhile: read again
                local = _without(local, pruned)
                merged = local if current is None else merge_jwks(_without(current, pruned), local)
                if current is not None and merged.to_dict() == current.to_dict():
                    self._published, self._published_at = last, time.monotonic()
                    return merged
                try:
                    if last > 0:
                        revision = await kv.update(JWKS_KEY, merged.to_json(), last=last)
                    elif last == 0:
                        revision = await kv.create(JWKS_KEY, merged.to_json())
                    else:
                        revision = await kv.put(JWKS_KEY, merged.to_json())
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another gateway published meanwhile: merge again
                self._published, self._published_at = revision, time.monotonic()
                self._publishes += 1
                log.info("keys: JWKS with %d keys published (revision %d)", len(merged), revision)
                return merged
            self._fail("the JWKS bucket kept changing; publishing again at the next poll")
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            self._fail(f"JWKS not published: {exc!r}; publishing again at the next poll")
        return None

    async def _pruned(self, kv: KeyValue, local: Jwks, current: Jwks | None) -> set[str] | None:
        """The kids left out of the JWKS: the tombstones, with the keys refused for longer
        than ``prune_after_s`` added to them first (compare-and-set; ``None``: another
        gateway wrote them meanwhile). The signing key is never pruned."""
        try:
            entry = await kv.get(PRUNED_KEY)
            tombs: dict[str, float] = msgspec.json.decode(
                entry.value or b"{}", type=dict[str, float]
            )
            last = entry.revision or 0
        except nats.js.errors.KeyNotFoundError:
            tombs, last = {}, 0
        except msgspec.DecodeError:
            log.warning("keys: the bucket's %r does not decode: rewritten", PRUNED_KEY)
            tombs, last = {}, -1
        horizon = self._clock() - self.prune_after_s
        due = {
            e.kid: e.refused_from
            for jwks in (local, current)
            if jwks is not None
            for e in jwks.entries
            if e.refused_from < horizon and e.kid != self._signer.kid and e.kid not in tombs
        }
        if not due:
            return set(tombs)
        tombs.update(due)
        data = msgspec.json.encode(tombs)
        try:
            if last > 0:
                await kv.update(PRUNED_KEY, data, last=last)
            elif last == 0:
                await kv.create(PRUNED_KEY, data)
            else:
                await kv.put(PRUNED_KEY, data)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        log.info("keys: %d refused keys pruned from the JWKS: %s", len(due), ", ".join(due))
        return set(tombs)

    async def _watch(self) -> None:
        while True:
            with anyio.move_on_after(self.poll_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.reload()
            except Exception:  # never stops the gateway: its key stays
                log.exception("keys: reload failed")
