"""Every policy set a gateway activates stays retrievable by the digest its decisions name.

``bus-guard replay`` decides a recorded intent again under the set that decided it, and
a decision names only that set's *policy* digest (``policy_digest``). A set pushed to the
bus is stored under its *content* digest; a directory's set is stored nowhere. So each
gateway archives every set it activates (at start, on a reload, on a push; the ordinary
set and the constitution alike) in the object store ``<prefix>-policy-sets`` (the one
``policy push`` writes) under ``set-sha256-<hex of the policy digest>``: the bundle
content (the same msgpack :class:`~bus_guard.policy._bundle.BundleContent` as a push),
with a description naming the kind, the revision and the version. Create-only: a name
that exists is left alone (the same digest is the same set).

Off the hot path: activations are queued (bounded) and written by a task of its own, on
a connection of its own; a failure is logged and retried at the next activation, and
never touches deciding.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, Literal

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import ObjectReceiveStream
from nats.aio.client import Client
from nats.js.api import ObjectMeta, ObjectStoreConfig
from nats.js.object_store import ObjectStore

from bus_guard.intake._policy_source import ActiveSet, Layers
from bus_guard.policy._bundle import encode_content
from bus_guard.settings import Settings

__all__ = ("ArchivedSet", "archive_name", "archiving", "decode_archived", "store_set")

log = logging.getLogger(__name__)

_QUEUE: Final = 64  # activations waiting to be archived (a reload storm beyond: dropped)
_TIMEOUT_S: Final = 30.0
_DRAIN_S: Final = 10.0  # at the end: how long queued sets may take to be written

SetKind = Literal["policy", "constitution"]


class ArchivedSet(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The description of an archived set: how to compile it back to the same digest."""

    kind: SetKind
    digest: str
    version: str
    revision: int | None = None


_meta_decoder: Final = msgspec.json.Decoder(ArchivedSet)


def archive_name(digest: str) -> str:
    """``set-sha256-<hex>`` for the policy digest ``sha256:<hex>``."""
    return "set-" + digest.replace(":", "-")


def decode_archived(description: str | None) -> ArchivedSet:
    """The description of an archived set; ``ValueError`` if it is not one."""
    try:
        return _meta_decoder.decode((description or "").encode())
    except msgspec.DecodeError as exc:
        raise ValueError(f"not an archived policy set: {exc}") from None


async def _store(nc: Client, settings: Settings) -> ObjectStore:
    js = nc.jetstream(timeout=settings.connect_timeout_s)
    bucket = settings.subjects.streams.policy_store
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        config = ObjectStoreConfig(replicas=settings.stream.replicas)
        return await js.create_object_store(bucket, config)


async def store_set(store: ObjectStore, active: ActiveSet, kind: SetKind) -> bool:
    """Archive *active* under its policy digest unless it is there; whether it was
    written."""
    policies = active.policies
    name = archive_name(policies.digest)
    try:
        await store.get_info(name)
        return False
    except nats.js.errors.ObjectNotFoundError:
        pass
    described = ArchivedSet(
        kind=kind, digest=policies.digest, version=policies.version, revision=active.revision
    )
    meta = ObjectMeta(name=name, description=msgspec.json.encode(described).decode())
    await store.put(name, encode_content(active.compiled.content), meta=meta)
    log.info("archived policy set %s (%s) as %s", policies.version, policies.digest, name)
    return True


async def _archive(
    nc: Client,
    settings: Settings,
    queue: ObjectReceiveStream[tuple[ActiveSet, SetKind]],
    done: anyio.Event,
) -> None:
    store: ObjectStore | None = None
    async with queue:
        async for active, kind in queue:
            try:
                with anyio.fail_after(_TIMEOUT_S):
                    if store is None:
                        store = await _store(nc, settings)
                    await store_set(store, active, kind)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                store = None  # looked up again next time
                log.warning(
                    "policy set %s not archived (%r): bus-guard replay cannot fetch it",
                    active.policies.digest,
                    exc,
                )
    done.set()


@asynccontextmanager
async def archiving(nc: Client, settings: Settings, layers: Layers) -> AsyncIterator[None]:
    """Archive the sets active now and every set activated until the block ends."""
    send, receive = anyio.create_memory_object_stream[tuple[ActiveSet, SetKind]](_QUEUE)

    def queue(kind: SetKind) -> Callable[[ActiveSet], None]:
        def put(active: ActiveSet) -> None:
            try:
                send.send_nowait((active, kind))
            except anyio.WouldBlock:
                log.warning("policy archive queue full: %s not archived", active.describe())
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                # activated while the gateway stops, after the archive did: the next start
                # archives the set it starts with
                log.warning("policy archive closed: %s not archived", active.describe())

        return put

    layers.ordinary.on_activation(queue("policy"))
    queue("policy")(layers.ordinary.active)
    if layers.constitution is not None:
        layers.constitution.on_activation(queue("constitution"))
        queue("constitution")(layers.constitution.active)
    async with anyio.create_task_group() as tg:
        done = anyio.Event()
        tg.start_soon(_archive, nc, settings, receive, done)
        try:
            yield
        finally:
            # What is queued is written first (a set activated just before a stop is
            # still archived), within a bound.
            send.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(_DRAIN_S):
                await done.wait()
            tg.cancel_scope.cancel()
