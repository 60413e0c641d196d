"""Signed policy bundles on the bus: where ``bus-guard policy push`` stores them and how a
gateway reads them (README, "Policy distribution").

Two JetStream stores, named from the prefix (:mod:`bus_guard.subjects`):

* the key-value bucket ``<prefix>-policy``: under ``pointer.policy.<deployment>``, the
  current bundle's signed manifest (a compact JWS, :mod:`bus_guard.policy._bundle`), with
  the pointer's history (the bucket keeps 64 values per key); under
  ``status.<gateway id>``, what each gateway has active (:func:`publish_status`);
* the object store ``<prefix>-policy-sets``: bundle contents, named ``sha256-<hex>`` by
  their digest, so a set stays retrievable by digest.

A push stores the content, then moves the pointer by compare-and-set to the next
revision; a gateway (:class:`BusSource`) reads the pointer, verifies it with the trusted
publishers' keys, refuses what is not newer than its active set, fetches the content
(bounded in size and time), checks it against the signed digest and size, and compiles
and tests it in a worker thread. At start it takes the newest revision in the pointer's
history that verifies and compiles (so an older manifest written over a newer one is a
refused rollback at start too); with none, the gateway does not start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from bus_guard.errors import BundleRefused, ConfigError, GatewayError
from bus_guard.intake._control import control_connection
from bus_guard.intake._policy_source import ActiveSet, PolicyStatistics
from bus_guard.policy._bundle import (
    BundleKind,
    Manifest,
    check_compiled,
    check_content,
    compile_content,
    read_manifest,
)
from bus_guard.policy._constitution import CONSTITUTION_LAYER, check_constitution, read_constitution
from bus_guard.settings import PolicySourceSettings, Settings
from bus_guard.verify import Jwks, load_jwks

__all__ = (
    "POINTER_HISTORY",
    "BusSource",
    "PolicyStatus",
    "ensure_stores",
    "open_bus_source",
    "pointer_key",
    "publish_status",
    "read_statuses",
    "status_key",
)

log = logging.getLogger(__name__)

POINTER_HISTORY: Final = 64  # values kept per key: the most JetStream allows
_FETCH_TIMEOUT_S: Final = 30.0  # one bundle's content, at most


def pointer_key(deployment: str, kind: BundleKind = "policy") -> str:
    return f"pointer.{kind}.{deployment}"


def status_key(gateway_id: str) -> str:
    return f"status.{gateway_id}"


async def ensure_stores(
    js: JetStreamContext, policy_bucket: str, store: str, *, replicas: int = 1
) -> tuple[KeyValue, ObjectStore]:
    """The pointer bucket and the content store, created if missing (``policy push``)."""
    try:
        kv = await js.key_value(policy_bucket)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(
            KeyValueConfig(bucket=policy_bucket, history=POINTER_HISTORY, replicas=replicas)
        )
    try:
        objects = await js.object_store(store)
    except nats.js.errors.BucketNotFoundError:
        objects = await js.create_object_store(store, ObjectStoreConfig(replicas=replicas))
    return kv, objects


class Signed:
    """How a pointer is verified: by one trusted publisher key (``policy``), or by a
    quorum of constitution keys (``constitution``). The keys' file is re-read on SIGHUP: a
    key revoked there signs nothing more (a file that does not load keeps the keys, logged).
    """

    def __init__(
        self,
        keys_file: Path | None,
        *,
        deployment: str,
        kind: BundleKind = "policy",
        quorum: int = 1,
        keys: Jwks | None = None,
    ) -> None:
        if keys is None:
            if keys_file is None:
                raise ConfigError("the keys that sign bundles are needed")
            keys = load_jwks(keys_file)
        self.kind: BundleKind = kind
        self.keys_file = keys_file
        self.deployment = deployment
        self.quorum = quorum
        self.keys = keys
        if kind == "constitution" and not 1 <= quorum <= len(keys):
            raise ConfigError(
                f"the constitution quorum must be 1..{len(keys)} (the keys given), got {quorum}"
            )

    def read(self, token: bytes, now: float) -> Manifest:
        if self.kind == "constitution":
            return read_constitution(
                token, self.keys, quorum=self.quorum, now=now, deployment=self.deployment
            )
        return read_manifest(token, self.keys, now=now, deployment=self.deployment, kind=self.kind)

    def reload(self) -> None:
        if self.keys_file is None:
            return
        try:
            self.keys = load_jwks(self.keys_file)
        except ConfigError as exc:
            log.warning("the %s keys were not reloaded: %s", self.kind, exc)


class BusSource:
    """The policy source of a gateway started with ``--policies nats://`` (kind ``policy``),
    or the constitution's (kind ``constitution``)."""

    def __init__(
        self,
        kv: KeyValue,
        store: ObjectStore,
        *,
        bucket: str,
        signed: Signed,
        max_bundle_bytes: int,
        clock: Callable[[], float] = time.time,
        gateway_id: str = "",
    ) -> None:
        self._kv = kv
        self._gateway_id = gateway_id
        self._store = store
        self._bucket = bucket
        self._signed = signed
        self._deployment = signed.deployment
        self._max_bytes = max_bundle_bytes
        self._clock = clock
        self._kind: BundleKind = signed.kind
        self.key = pointer_key(signed.deployment, signed.kind)
        self._seen = 0  # the pointer's KV revision last looked at
        self._retrying = 0  # a pointer revision whose content could not be fetched yet

    @property
    def name(self) -> str:
        return f"bus {self._bucket}/{self.key}"

    async def report(self, statistics: PolicyStatistics) -> None:
        if self._gateway_id:
            await publish_status(
                self._kv,
                PolicyStatus(
                    gateway=self._gateway_id,
                    source=statistics.source,
                    digest=statistics.digest,
                    version=statistics.version,
                    revision=statistics.revision,
                    issued_at=statistics.issued_at,
                    stale=statistics.stale,
                    activations=statistics.activations,
                    refusals=statistics.refusals,
                    last_refusal=statistics.last_refusal,
                    updated_at=self._clock(),
                    kind=self._kind,
                ),
            )

    async def load(self) -> ActiveSet:
        try:
            history = await self._kv.history(self.key)
        except nats.js.errors.NoKeysError:
            raise GatewayError(
                f"no policy bundle at {self.name} (deployment {self._deployment!r}): push one "
                "with `bus-guard policy push DIR --nats URL --key PUBLISHER_KEY`"
            ) from None
        entries = [e for e in history if e.value and e.operation in (None, "PUT")]
        if not entries:
            raise GatewayError(f"the policy bundle pointer {self.name} was deleted")
        self._seen = max(e.revision or 0 for e in entries)
        verified: list[tuple[Manifest, int]] = []
        problems = []
        for entry in entries:
            try:
                manifest = self._signed.read(entry.value or b"", self._clock())
            except BundleRefused as exc:
                problems.append(f"pointer value {entry.revision}: {exc}")
                continue
            verified.append((manifest, entry.revision or 0))
        latest = max(entries, key=lambda e: e.revision or 0)
        by_revision = sorted(verified, key=lambda v: v[0].revision, reverse=True)
        if by_revision and by_revision[0][1] != latest.revision:
            log.warning(
                "%s: the latest pointer value is not the newest signed revision (%d): a "
                "rollback or a refused bundle; starting from the newest that loads",
                self.name,
                by_revision[0][0].revision,
            )
        for manifest, _ in by_revision:
            try:
                return await self._fetch(manifest)
            except BundleRefused as exc:
                problems.append(f"revision {manifest.revision}: {exc}")
                log.warning("%s: revision %d refused: %s", self.name, manifest.revision, exc)
        raise GatewayError(
            f"no policy bundle at {self.name} may become active: " + "; ".join(problems[-8:])
        )

    async def poll(self, active: ActiveSet, *, forced: bool) -> ActiveSet | None:
        if forced:
            self._signed.reload()
        try:
            entry = await self._kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            return None  # deleted: the running set stays (a push makes a new one)
        seq = entry.revision or 0
        if seq == self._seen and seq != self._retrying and not forced:
            return None
        first_look = seq != self._seen
        self._seen = seq
        manifest = self._signed.read(entry.value or b"", self._clock())
        if active.revision is not None and manifest.revision <= active.revision:
            if manifest.revision == active.revision and manifest.digest == active.policies.digest:
                return None  # the active one
            raise BundleRefused(
                "rollback",
                f"revision {manifest.revision} is not newer than the active {active.revision}",
            )
        try:
            found = await self._fetch(manifest)
        except BundleRefused as exc:
            if exc.reason != "store_unavailable":
                self._retrying = 0
                raise
            # Retried at every poll until it can be read; reported (counted) once.
            self._retrying = seq
            if first_look:
                raise
            return None
        self._retrying = 0
        return found

    async def _fetch(self, manifest: Manifest) -> ActiveSet:
        if manifest.size > self._max_bytes:
            raise BundleRefused(
                "too_large",
                f"revision {manifest.revision} is {manifest.size:,} bytes, more than "
                f"{self._max_bytes:,} (--policy-max-bytes)",
            )
        name = manifest.object_name
        try:
            with anyio.fail_after(_FETCH_TIMEOUT_S):
                info = await self._store.get_info(name)
                if (info.size or 0) > self._max_bytes:
                    raise BundleRefused(
                        "too_large", f"content {name} is {info.size:,} bytes in the store"
                    )
                data = (await self._store.get(name)).data or b""
        except nats.js.errors.ObjectNotFoundError:
            raise BundleRefused(
                "store_unavailable", f"content {name} of revision {manifest.revision} not found"
            ) from None
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BundleRefused(
                "store_unavailable", f"content {name} of revision {manifest.revision}: {exc!r}"
            ) from None
        content = check_content(manifest, data, max_bytes=self._max_bytes)
        constitution = self._kind == "constitution"
        compiled = await anyio.to_thread.run_sync(
            lambda: compile_content(
                content,
                revision=manifest.revision,
                base=name,
                layer=CONSTITUTION_LAYER if constitution else "",
            ),
            abandon_on_cancel=True,
        )
        check_compiled(manifest, compiled)
        if constitution:
            check_constitution(compiled)
        return ActiveSet(compiled, self.name, manifest.issued_at, manifest.revision)


@asynccontextmanager
async def open_bus_source(
    settings: Settings,
    source: PolicySourceSettings,
    *,
    clock: Callable[[], float] = time.time,
    kind: BundleKind = "policy",
) -> AsyncIterator[BusSource]:
    """A bus source on a control connection of its own, open until the block ends.
    Refuses (:class:`~bus_guard.errors.GatewayError`) when the bus, JetStream or the
    stores cannot be reached: the gateway must not start without policies."""
    deployment = source.deployment or settings.prefix
    if kind == "constitution":
        assert source.constitution_keys_file is not None  # PolicySourceSettings checks it
        signed = Signed(
            source.constitution_keys_file,
            deployment=deployment,
            kind=kind,
            quorum=source.constitution_quorum,
        )
    else:
        assert source.publishers_file is not None  # PolicySourceSettings checks it
        signed = Signed(source.publishers_file, deployment=deployment)
    url = source.nats_url or settings.nats_url
    s = settings.subjects.streams
    async with control_connection(
        settings,
        purpose=f"{kind} source",
        url=url,
        unreachable="refusing to start without "
        + ("policies" if kind == "policy" else "its constitution"),
    ) as nc:
        js = nc.jetstream(timeout=max(settings.connect_timeout_s, 2.0))
        try:
            kv = await js.key_value(s.policy_bucket)
            store = await js.object_store(s.policy_store)
        except nats.js.errors.BucketNotFoundError:
            raise GatewayError(
                f"policy source: no bucket {s.policy_bucket} / object store {s.policy_store} "
                f"at {url}: push a bundle first (`bus-guard policy push`)"
            ) from None
        except Exception as exc:
            raise GatewayError(
                f"policy source: JetStream at {url} did not answer: {exc!r}; refusing to start"
            ) from None
        yield BusSource(
            kv,
            store,
            bucket=s.policy_bucket,
            signed=signed,
            max_bundle_bytes=source.max_bundle_bytes,
            clock=clock,
            # Each kind reports on its own key (`policy status` lists both per gateway).
            gateway_id=settings.gateway_id,  # the constitution on its own key (kind)
        )


# --- status: what each gateway has active ----------------------------------------------


class PolicyStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What one gateway decides with, as it wrote it (``bus-guard policy status``)."""

    gateway: str
    source: str
    digest: str
    version: str
    revision: int | None = None
    issued_at: float = 0.0
    stale: bool = False
    activations: int = 0
    refusals: int = 0
    last_refusal: str = ""
    updated_at: float = 0.0
    # "policy", or "constitution": a gateway with a constitution reports it on its own key
    # (``status.<gateway id>.constitution``), beside its ordinary set's.
    kind: str = "policy"


_STATUS_DECODER: Final = msgspec.json.Decoder(PolicyStatus)


async def publish_status(kv: KeyValue, status: PolicyStatus) -> None:
    key = status_key(status.gateway)
    if status.kind != "policy":
        key = f"{key}.{status.kind}"
    await kv.put(key, msgspec.json.encode(status))


async def read_statuses(kv: KeyValue) -> list[PolicyStatus]:
    try:
        keys = await kv.keys()  # (filters: nats-py warns about servers before 2.10 each time)
    except nats.js.errors.NoKeysError:
        return []
    out = []
    for key in sorted(k for k in keys if k.startswith(status_key(""))):
        try:
            entry = await kv.get(key)
            out.append(_STATUS_DECODER.decode(entry.value or b""))
        except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError):
            continue
    return out
