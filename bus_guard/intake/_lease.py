"""One writer per chain: a lease on the gateway id, and the registry of gateway chains.

Two processes started with the same ``--gateway-id`` would both continue one ledger chain
and fork it. Each stream-mode gateway therefore holds a lease on its id in the key-value
bucket ``<prefix>-gateways`` (created by preflight), one key per gateway id:

* at start it creates the key, or takes it over with compare-and-set when the holder
  ended cleanly, its heartbeat is older than the lease, or it was a process of this host
  that is gone (a crash and restart); a live holder makes the new process refuse to start,
  naming the holder;
* while running it renews the lease (compare-and-set on the revision it wrote) every
  third of the lease; a renewal refused because the revision moved means another
  process took the id over: this one stops at once, loudly;
* the recorder asks :meth:`Lease.check` before every ledger commit: a gateway that could
  not renew for a whole lease (frozen, cut off from the bucket) writes nothing more;
* at clean shutdown the value says ``ended``.

The key's history (64 values) is the registry: which gateway chains exist, when each
started, by which host and process, and when it ended. Takeover relies on the two
processes' clocks agreeing within the margin (a heartbeat is a wall-clock time).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Final, Literal

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from bus_guard.errors import GatewayError

__all__ = ("Lease", "LeaseLost", "LeaseValue", "ensure_registry")

log = logging.getLogger(__name__)

REGISTRY_HISTORY: Final = 64  # values kept per gateway id: its starts and ends
RETRY_FIRST_S: Final = 0.25  # a failed renewal is retried after this, doubling


class LeaseLost(GatewayError):
    """Another process holds this gateway id now, or the lease could not be renewed for
    its whole length: this process must not write to the chain again."""


class LeaseValue(msgspec.Struct, frozen=True, kw_only=True):
    epoch: str  # the chain start this process wrote
    host: str
    pid: int
    started: float
    heartbeat: float
    state: Literal["live", "ended"] = "live"
    ended: float | None = None


def _decode(data: bytes | None) -> LeaseValue | None:
    if not data:
        return None
    try:
        return msgspec.json.decode(data, type=LeaseValue)
    except msgspec.DecodeError:
        return None


async def ensure_registry(js: JetStreamContext, bucket: str, *, replicas: int) -> None:
    """Create the gateway registry bucket if it is missing."""
    try:
        info = await js.stream_info(f"KV_{bucket}")
    except nats.js.errors.NotFoundError:
        pass
    else:
        if not info.config.allow_direct:  # made by an earlier version: a witness reads it
            info.config.allow_direct = True
            await js.update_stream(info.config)
            log.info("key-value bucket %s: direct gets allowed (for a witness)", bucket)
        return
    await js.create_key_value(
        KeyValueConfig(
            bucket=bucket,
            description="bus_guard: one lease per gateway id (one writer per chain), "
            "and the history of gateway chains",
            history=REGISTRY_HISTORY,
            replicas=replicas,
            storage=StorageType.FILE,
            max_value_size=4096,
            direct=True,  # a witness reads its history with direct gets (ledger._witness)
        )
    )
    log.info("created key-value bucket %s", bucket)


@dataclass
class Lease:
    js: JetStreamContext
    bucket: str
    gateway_id: str
    lease_s: float
    epoch: str
    _kv: KeyValue | None = None
    _revision: int = 0
    _value: LeaseValue | None = None
    _renewed_at: float = 0.0  # monotonic
    renewals: int = 0
    failures: int = 0
    lost: str = field(default="")

    async def acquire(self) -> None:
        """Hold the lease, or raise :class:`GatewayError` naming the live holder."""
        self._kv = kv = await self.js.key_value(self.bucket)
        now = time.time()
        value = LeaseValue(
            epoch=self.epoch,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=now,
            heartbeat=now,
        )
        data = msgspec.json.encode(value)
        held, revision = await self._leader_entry()
        try:
            if held is None:
                self._revision = await kv.create(self.gateway_id, data)
            else:
                age = now - held.heartbeat
                if held.state == "live" and age < self.lease_s and not _gone(held):
                    raise GatewayError(
                        f"gateway id {self.gateway_id!r} is held by a live gateway (host "
                        f"{held.host}, pid {held.pid}, started {_ago(now - held.started)}, "
                        f"last heartbeat {age:.1f} s ago): two processes with one id would "
                        "fork its ledger chain; give this one another --gateway-id"
                    )
                if held.state == "live":
                    log.warning(
                        "taking over gateway id %s: its holder (host %s, pid %d) has been "
                        "silent for %.1f s (lease %g s)",
                        self.gateway_id,
                        held.host,
                        held.pid,
                        age,
                        self.lease_s,
                    )
                self._revision = await kv.update(self.gateway_id, data, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise GatewayError(
                f"gateway id {self.gateway_id!r} was taken by another process while this one "
                "started; give this one another --gateway-id"
            ) from None
        self._value = value
        self._renewed_at = time.monotonic()

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process may still write to the chain."""
        if self.lost:
            raise LeaseLost(self.lost)
        if time.monotonic() - self._renewed_at >= self.lease_s:
            self.lost = (
                f"the lease on gateway id {self.gateway_id!r} was not renewed for "
                f"{self.lease_s:g} s: another process may hold it now"
            )
            raise LeaseLost(self.lost)

    async def renew(self) -> bool:
        """One renewal, True if it was stored; :class:`LeaseLost` when another process took
        the id over. A renewal that timed out may have been stored all the same (in doubt):
        the next one then finds the key moved, to a value of this very run (its epoch is
        unique), adopts its revision and renews on."""
        assert self._kv is not None and self._value is not None
        self.check()
        value = msgspec.structs.replace(self._value, heartbeat=time.time())
        try:
            # an attempt bounded to a sixth of the lease: several fit in what is left of it
            with anyio.fail_after(self.lease_s / 6):
                await self._update(value)
        except nats.js.errors.KeyWrongLastSequenceError:
            self.lost = f"gateway id {self.gateway_id!r} was taken over by another process"
            raise LeaseLost(self.lost) from None
        except (nats.errors.Error, TimeoutError) as exc:  # an election: try again soon
            self.failures += 1
            log.warning("renewing the lease on %s failed: %r", self.gateway_id, exc)
            return False
        self._value = value
        self._renewed_at = time.monotonic()
        self.renewals += 1
        return True

    async def _update(self, value: LeaseValue) -> None:
        assert self._kv is not None and self._value is not None
        try:
            self._revision = await self._kv.update(
                self.gateway_id, msgspec.json.encode(value), last=self._revision
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            held, revision = await self._leader_entry()
            if held is None or held.epoch != self._value.epoch:
                raise  # another run's value: taken over
            log.info("lease on %s: an earlier renewal in doubt was stored", self.gateway_id)
            try:
                self._revision = await self._kv.update(
                    self.gateway_id, msgspec.json.encode(value), last=revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                # moved again since the read: not known to be another run's; retry soon
                raise TimeoutError("the lease key moved while it was renewed") from None

    async def _leader_entry(self) -> tuple[LeaseValue | None, int]:
        """The key's lease value (None: none, deleted or not a lease) and revision, as the
        stream's leader has them: a direct get (nats-py's kv.get on a bucket that allows
        them, as the registry does for the witness) may be answered by a replica a moment
        behind, whose older revision would look like another process's write."""
        try:
            msg = await self.js.get_last_msg(
                f"KV_{self.bucket}", f"$KV.{self.bucket}.{self.gateway_id}", direct=False
            )
        except nats.js.errors.NotFoundError:
            return None, 0
        if (msg.headers or {}).get("KV-Operation"):  # a delete or purge marker
            return None, msg.seq or 0
        return _decode(msg.data), msg.seq or 0

    async def keep(self) -> None:
        """Renew every third of the lease until cancelled; raises :class:`LeaseLost`.
        After a failed renewal (a leader election, a node restarting) the next attempt
        comes soon, with backoff (0.25 s doubling, at most a tenth of the lease): one
        failure must not cost the lease, whose whole length is left for retries."""
        retry = RETRY_FIRST_S
        delay = self.lease_s / 3
        while True:
            await anyio.sleep(delay)
            if await self.renew():
                delay, retry = self.lease_s / 3, RETRY_FIRST_S
            else:
                delay, retry = retry, min(retry * 2, self.lease_s / 10)

    async def release(self) -> None:
        """At clean shutdown: the registry says this chain ended (best effort)."""
        if self._kv is None or self._value is None or self.lost:
            return
        now = time.time()
        value = msgspec.structs.replace(self._value, heartbeat=now, state="ended", ended=now)
        try:
            await self._kv.update(self.gateway_id, msgspec.json.encode(value), last=self._revision)
        except Exception as exc:  # shutting down: a later start sees a stale heartbeat
            log.warning("could not mark gateway id %s ended: %r", self.gateway_id, exc)


def _gone(held: LeaseValue) -> bool:
    """Whether the holder was a process of this host that is no longer running (a gateway
    restarted after a crash takes its id over at once, not a lease later). The same pid as
    ours on this host is an earlier life (a container restarted as pid 1 again)."""
    if held.host != socket.gethostname():
        return False
    if held.pid == os.getpid():
        return True
    try:
        os.kill(held.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"
