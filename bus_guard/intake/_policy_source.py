"""The active policy set, kept current while the gateway runs (README, "Policy reload").

A :class:`PolicyKeeper` holds the set the gateway decides with and replaces it, whole,
when its source has a newer one:

* a **directory** (:class:`DirectorySource`): re-read on ``SIGHUP`` (the CLI calls
  :meth:`PolicyKeeper.request_reload`) and when a file under it changes (its names, sizes,
  modification times and inodes are compared every ``poll_s``);
* the **bus** (:class:`~bus_guard.intake._policy_bus.BusSource`): a signed bundle pointer
  in a key-value bucket, looked at every ``poll_s``.

A candidate is compiled and its test cases run in a worker thread, off the event loop
that decides intents; only a set that compiled, passed its cases and (from the bus)
verified and is newer than the active one becomes active, in one assignment through the
gateway's :meth:`~bus_guard.intake._gateway.Gateway.swap_policies`. The intake reads the
active set once per intent (core mode) or once per batch (stream mode), so an intent is
decided entirely under one set, and every decision names its digest and version (with
``;rev=N`` for a bundle from the bus). Anything else is refused: logged, counted by
reason (:class:`PolicyStatistics`), and the running set stays.

Freshness: with ``max_age_s``, a set is fresh until ``issued_at + max_age_s`` (a bundle's
signed ``issued_at``; a directory's time of reading, so a SIGHUP or a change re-affirms
it). Past it the keeper swaps in a :class:`~bus_guard.policy._bundle.StaleSet`, which
denies everything ``policy_stale``, until a fresh set arrives.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import anyio

from bus_guard.errors import BundleRefused, PolicyError
from bus_guard.pipeline import PolicySetLike
from bus_guard.policy._bundle import (
    REFUSALS,
    Compiled,
    StaleSet,
    compile_directory,
)
from bus_guard.policy._cases import Case, Suite
from bus_guard.policy._constitution import LayeredSet
from bus_guard.policy._evaluator import PolicySet
from bus_guard.settings import PolicySourceSettings, Settings

__all__ = (
    "ActiveSet",
    "DirectorySource",
    "Layers",
    "PolicyKeeper",
    "PolicySource",
    "PolicyStatistics",
    "open_keeper",
    "open_policies",
)

log = logging.getLogger(__name__)

# A directory's fingerprint covers at most this many entries (a policy directory has tens).
_MAX_WATCHED_FILES: Final = 10_000


@dataclass(frozen=True, slots=True)
class ActiveSet:
    """A policy set that became (or may become) active, and where it came from."""

    compiled: Compiled
    source: str  # "dir /etc/policies", "bus guard-policy/policy"
    issued_at: float  # unix seconds: freshness counts from here
    revision: int | None = None  # a bundle's revision; a directory has none

    @property
    def policies(self) -> PolicySet:
        return self.compiled.policies

    @property
    def canaries(self) -> tuple[tuple[Suite, Case], ...]:
        return self.compiled.cases.canaries

    def describe(self) -> str:
        rev = "" if self.revision is None else f" revision {self.revision}"
        return f"{self.policies.version} ({self.policies.digest}){rev}"


class PolicySource(Protocol):
    """Where policy sets come from."""

    @property
    def name(self) -> str: ...

    async def load(self) -> ActiveSet:
        """The set to start with; raises (``GatewayError``, ``PolicyError``,
        ``BundleRefused``) when there is none to start with."""
        ...

    async def poll(self, active: ActiveSet, *, forced: bool) -> ActiveSet | None:
        """A newer set than *active*, ``None`` when there is nothing new, or
        :class:`~bus_guard.errors.BundleRefused`. *forced*: re-read even if nothing seems
        to have changed (SIGHUP)."""
        ...

    async def report(self, statistics: PolicyStatistics) -> None:
        """Make the keeper's state visible (the bus: ``bus-guard policy status``)."""
        ...


@dataclass(frozen=True, slots=True)
class PolicyStatistics:
    """The keeper's state and counters (a snapshot)."""

    source: str
    digest: str
    version: str
    revision: int | None
    issued_at: float
    fresh_until: float  # inf without a maximum age
    stale: bool
    activations: int  # sets that replaced the active one
    refusals: int  # candidates refused (each reason below)
    refused: dict[str, int] = field(default_factory=dict)  # by reason (REFUSALS)
    last_refusal: str = ""  # "<reason>: <why>"
    source_errors: int = 0  # polls that failed for another reason (logged)


def _compile(path: Path) -> Compiled:
    """Compile and test a directory: any failure is a refusal naming every problem."""
    try:
        return compile_directory(path)
    except PolicyError as exc:
        raise BundleRefused("broken", "; ".join(exc.problems)) from None


class DirectorySource:
    """Policies from a directory, re-read when asked (SIGHUP) or when a file changed."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock
        self._seen: tuple[tuple[str, int, int, int], ...] | None = None

    @property
    def name(self) -> str:
        return f"dir {self.path}"

    def fingerprint(self) -> tuple[tuple[str, int, int, int], ...]:
        """(relative path, size, mtime ns, inode) of every file under the directory."""
        found = []
        for root, dirs, files in os.walk(self.path):
            dirs.sort()
            for name in sorted(files):
                file = os.path.join(root, name)
                try:
                    st = os.stat(file)
                except OSError:  # gone between the listing and now: the next poll sees it
                    continue
                found.append(
                    (os.path.relpath(file, self.path), st.st_size, st.st_mtime_ns, st.st_ino)
                )
                if len(found) >= _MAX_WATCHED_FILES:
                    return tuple(found)
        return tuple(found)

    async def load(self) -> ActiveSet:
        self._seen = self.fingerprint()
        try:
            compiled = await anyio.to_thread.run_sync(compile_directory, self.path)
        except BundleRefused as exc:  # its test cases fail: refuse to start, naming them
            raise PolicyError([f"{self.path}: {exc}"], file=str(self.path)) from None
        return ActiveSet(compiled, self.name, self._clock())

    async def report(self, statistics: PolicyStatistics) -> None:
        """Nothing to publish to: the gateway's logs (and its stats) tell."""

    async def poll(self, active: ActiveSet, *, forced: bool) -> ActiveSet | None:
        seen = self.fingerprint()
        if not forced and seen == self._seen:
            return None
        # Remembered before compiling: a file written meanwhile changes it again, and is
        # read by the next poll. A half-written file fails to compile and is refused.
        self._seen = seen
        compiled = await anyio.to_thread.run_sync(_compile, self.path, abandon_on_cancel=True)
        return ActiveSet(compiled, self.name, self._clock())


class PolicyKeeper:
    """Keeps the gateway's policy set current: see the module docstring.

    ``await keeper.load()`` gets the first set (the gateway is built with
    :attr:`current`); ``async with keeper.running(gateway.swap_policies)`` then watches
    the source and the set's age until the block ends.
    """

    def __init__(
        self,
        source: PolicySource,
        *,
        max_age_s: float | None = None,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        report_every_s: float = 30.0,
    ) -> None:
        if max_age_s is not None and not (math.isfinite(max_age_s) and max_age_s > 0):
            raise ValueError(f"max_age_s must be a positive number, got {max_age_s!r}")
        if not (math.isfinite(poll_s) and poll_s > 0):
            raise ValueError(f"poll_s must be a positive number, got {poll_s!r}")
        self.source = source
        self.max_age_s = max_age_s
        self.poll_s = poll_s
        self._clock = clock
        self._active: ActiveSet | None = None
        self._current: PolicySetLike | None = None
        self._swap: Callable[[PolicySetLike], None] | None = None
        self._lock = anyio.Lock()
        self._wake = anyio.Event()
        self._forced = False
        self._activated = anyio.Event()
        self._activations = 0
        self._refused: dict[str, int] = {}
        self._last_refusal = ""
        self._source_errors = 0
        self._listeners: list[Callable[[ActiveSet], None]] = []
        self.report_every_s = report_every_s
        self._reported_at = -math.inf  # monotonic time of the last report

    # -- what the gateway reads --------------------------------------------------------

    @property
    def active(self) -> ActiveSet:
        if self._active is None:
            raise RuntimeError("PolicyKeeper.load() first")
        return self._active

    @property
    def current(self) -> PolicySetLike:
        """What intents are decided with now: the active set, or its stale stand-in."""
        if self._current is None:
            raise RuntimeError("PolicyKeeper.load() first")
        return self._current

    @property
    def stale(self) -> bool:
        return isinstance(self._current, StaleSet)

    @property
    def fresh_until(self) -> float:
        if self.max_age_s is None:
            return math.inf
        return self.active.issued_at + self.max_age_s

    def on_activation(self, listener: Callable[[ActiveSet], None]) -> None:
        """Call *listener* with every set that becomes active from now on."""
        self._listeners.append(listener)

    def statistics(self) -> PolicyStatistics:
        active = self.active
        return PolicyStatistics(
            source=active.source,
            digest=active.policies.digest,
            version=active.policies.version,
            revision=active.revision,
            issued_at=active.issued_at,
            fresh_until=self.fresh_until,
            stale=self.stale,
            activations=self._activations,
            refusals=sum(self._refused.values()),
            refused=dict(self._refused),
            last_refusal=self._last_refusal,
            source_errors=self._source_errors,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> PolicySetLike:
        """The first set, from the source; raises when there is none (the gateway must
        not start: no silent empty policy)."""
        active = await self.source.load()
        self._active = active
        self._current = active.policies
        # DEBUG: the caller says which set it starts with (the CLI, with the digest as a
        # field of every line from then on).
        log.debug("policies %s from %s", active.describe(), active.source)
        if self._clock() >= self.fresh_until:
            self._go_stale()
        return self.current

    @asynccontextmanager
    async def running(self, swap: Callable[[PolicySetLike], None]) -> AsyncIterator[PolicyKeeper]:
        """Watch the source and the set's age, handing every new set to *swap*."""
        self.active  # noqa: B018 - loaded first, or RuntimeError
        self._swap = swap
        swap(self.current)  # a set that went stale in between
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                tg.start_soon(self._keep_fresh)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._swap = None

    def request_reload(self) -> None:
        """Re-read the source now, even if nothing seems changed (SIGHUP). Returns at
        once; the reload happens in the keeper's task."""
        self._forced = True
        self._wake.set()

    async def reload(self, *, forced: bool = True) -> bool:
        """One look at the source now; whether a new set became active."""
        async with self._lock:
            active = self.active
            try:
                candidate = await self.source.poll(active, forced=forced)
            except BundleRefused as exc:
                self._refuse(exc)
                return False
            except Exception as exc:  # the source's I/O: the running set stays
                self._source_errors += 1
                log.warning(
                    "policy source %s: %r; keeping %s", self.source.name, exc, active.describe()
                )
                return False
            if candidate is None:
                return False
            if (
                candidate.revision is not None
                and active.revision is not None
                and candidate.revision <= active.revision
            ):
                self._refuse(
                    BundleRefused(
                        "rollback",
                        f"revision {candidate.revision} is not newer than the active "
                        f"{active.revision}",
                    )
                )
                return False
            self._activate(candidate)
            return True

    # -- inside ------------------------------------------------------------------------

    def _refuse(self, exc: BundleRefused) -> None:
        reason = exc.reason if exc.reason in REFUSALS else "broken"
        self._refused[reason] = self._refused.get(reason, 0) + 1
        self._last_refusal = str(exc)
        self._reported_at = -math.inf
        log.warning(
            "policy set from %s refused (%s); keeping %s",
            self.source.name,
            exc,
            self.active.describe(),
        )

    def _activate(self, candidate: ActiveSet) -> None:
        previous = self.active
        self._active = candidate
        self._activations += 1
        for listener in self._listeners:  # first: a log field may name the new set
            listener(candidate)
        same = previous.policies.digest == candidate.policies.digest
        log.info(
            "policies %s active, from %s%s",
            candidate.describe(),
            candidate.source,
            " (same digest: re-affirmed)" if same else "",
        )
        if self._clock() >= self.fresh_until:  # arrived already too old: never decides
            self._go_stale()
        else:
            self._current = candidate.policies
            if self._swap is not None:
                self._swap(candidate.policies)
        self._activated.set()
        self._reported_at = -math.inf  # report the new set at once

    def _go_stale(self) -> None:
        active = self.active
        age = self._clock() - active.issued_at
        message = (
            f"policy set {active.describe()} is {age:.0f}s old, older than the maximum age "
            f"{self.max_age_s:g}s; waiting for a fresh one"
        )
        self._current = StaleSet(active.policies, message)
        if self._swap is not None:
            self._swap(self._current)
        self._reported_at = -math.inf
        self._wake.set()  # report it now
        log.warning("%s: denying every intent policy_stale", message)

    async def _watch(self) -> None:
        while True:
            with anyio.move_on_after(self.poll_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            forced, self._forced = self._forced, False
            await self.reload(forced=forced)
            if time.monotonic() - self._reported_at >= self.report_every_s:
                await self._report()

    async def _report(self) -> None:
        self._reported_at = time.monotonic()
        try:
            await self.source.report(self.statistics())
        except Exception as exc:  # visibility only: deciding goes on
            log.debug("policy status not reported: %r", exc)

    async def _keep_fresh(self) -> None:
        while True:
            activated = self._activated = anyio.Event()
            left = self.fresh_until - self._clock()
            if left > 0 or self.stale:
                with anyio.move_on_after(left if not self.stale else math.inf):
                    await activated.wait()
            else:
                self._go_stale()


@asynccontextmanager
async def open_keeper(
    settings: Settings, source: PolicySourceSettings, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[PolicyKeeper]:
    """A keeper with its first set loaded (and, for the bus, its connection open until
    the block ends). Raises, so that the gateway does not start, when there is no set:
    a directory that does not compile or whose cases fail, a bus that cannot be reached,
    no bundle or none that may become active."""
    if source.directory is not None:
        keeper = PolicyKeeper(
            DirectorySource(source.directory, clock=clock),
            max_age_s=source.max_age_s,
            poll_s=source.poll_s,
            clock=clock,
        )
        await keeper.load()
        yield keeper
        return
    from bus_guard.intake._policy_bus import open_bus_source

    async with open_bus_source(settings, source, clock=clock) as bus:
        keeper = PolicyKeeper(bus, max_age_s=source.max_age_s, poll_s=source.poll_s, clock=clock)
        await keeper.load()
        yield keeper


class Layers:
    """What the gateway decides with: the ordinary set's keeper and, when one is
    configured, the constitution's over it (:class:`~bus_guard.policy._constitution.
    LayeredSet`). Either one changing swaps the combination in whole."""

    def __init__(self, ordinary: PolicyKeeper, constitution: PolicyKeeper | None) -> None:
        self.ordinary = ordinary
        self.constitution = constitution

    @property
    def active(self) -> ActiveSet:
        return self.ordinary.active

    @property
    def current(self) -> PolicySetLike:
        if self.constitution is None:
            return self.ordinary.current
        return LayeredSet(self.constitution.current, self.ordinary.current)

    @property
    def canaries(self) -> tuple[tuple[Suite, Case], ...]:
        """The known answers of both layers, checked through the combination."""
        below = self.ordinary.active.canaries
        return below if self.constitution is None else below + self.constitution.active.canaries

    def request_reload(self) -> None:
        self.ordinary.request_reload()
        if self.constitution is not None:
            self.constitution.request_reload()

    @asynccontextmanager
    async def running(self, swap: Callable[[PolicySetLike], None]) -> AsyncIterator[Layers]:
        def both(_: PolicySetLike) -> None:
            swap(self.current)

        async with self.ordinary.running(both):
            if self.constitution is None:
                yield self
                return
            async with self.constitution.running(both):
                yield self


@asynccontextmanager
async def open_policies(
    settings: Settings, source: PolicySourceSettings, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[Layers]:
    """The ordinary set (:func:`open_keeper`) and, when ``constitution_keys_file`` is set,
    the constitution from the bus: configured but missing, not signed by the quorum or
    not valid, the gateway does not start (:class:`~bus_guard.errors.GatewayError`)."""
    async with open_keeper(settings, source, clock=clock) as ordinary:
        if source.constitution_keys_file is None:
            yield Layers(ordinary, None)
            return
        from bus_guard.intake._policy_bus import open_bus_source

        async with open_bus_source(settings, source, clock=clock, kind="constitution") as bus:
            constitution = PolicyKeeper(bus, poll_s=source.poll_s, clock=clock)
            await constitution.load()
            yield Layers(ordinary, constitution)
