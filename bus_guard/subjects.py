"""Every subject, stream and bucket name bus_guard uses, derived from one prefix. Pure.

With the default prefix ``guard`` (what README, ``compose/`` and the tests use)::

    family   subjects                                     stream
    in       guard.in.<principal>.<action...>             GUARD_IN   (intake)
    exec     guard.exec.<principal>.<action...>           GUARD_EXEC
    deny     guard.deny.<principal>.<action...>           GUARD_DENY
             guard.deny.~invalid  (intent on a malformed subject)
    hold     guard.hold.<principal>.<action...>           GUARD_HOLD
    ledger   guard.ledger.<gateway>.d.<decision id>       GUARD_LEDGER
             guard.ledger.<gateway>.c  (chain starts and checkpoints)
    approve  guard.approve.<hold decision id>             GUARD_APPROVE (approvers' votes)
    canary   guard.canary.<gateway id>                    (none: a gateway's canaries)

    bucket          stream              holds
    guard-jwks      KV_guard-jwks       the JWKS executors look keys up in
    guard-executed  KV_guard-executed   executors' consume-once markers (in EXEC's JetStream)
    guard-policy    KV_guard-policy     signed policy bundle pointers, gateways' policy status
    guard-policy-sets  OBJ_guard-policy-sets  policy bundle contents, by content digest

An output keeps the *tail* of its intent's subject: ``guard.in.agent-7.payments.transfer``
is forwarded to ``guard.exec.agent-7.payments.transfer`` (or denied on ``guard.deny.…``,
held on ``guard.hold.…``); an intent whose subject does not parse is denied on
``guard.deny.~invalid`` (``~`` cannot appear in a principal, so no agent owns that subject).

Stream names are the prefix upper-cased with dots as underscores (``a.b`` → ``A_B_IN``),
bucket names the prefix with dots as dashes (``a.b`` → ``a-b-jwks``). The prefix itself is
validated where it is configured (:class:`bus_guard.settings.Settings`); this module only
names things. No NATS here: executors, the CLI and the pure core import it alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal

__all__ = (
    "DEFAULT_PREFIX",
    "FAMILIES",
    "INVALID_TOKEN",
    "ROLES",
    "Family",
    "LedgerSubjects",
    "OutputKind",
    "Role",
    "Streams",
    "Subjects",
)

DEFAULT_PREFIX: Final = "guard"  # Settings.prefix's default
INVALID_TOKEN: Final = "~invalid"  # deny-subject token for intents on a malformed subject

Family = Literal["in", "exec", "deny", "hold", "ledger", "approve", "canary"]
FAMILIES: Final[tuple[Family, ...]] = (
    "in",
    "exec",
    "deny",
    "hold",
    "ledger",
    "approve",
    "canary",  # a gateway's canaries' own outputs (no stream)
)
OutputKind = Literal["exec", "deny", "hold"]  # the families a decision is published on
# A stream's role (preflight).
Role = Literal["intake", "exec", "deny", "hold", "ledger", "approve"]
ROLES: Final[tuple[Role, ...]] = ("intake", "exec", "deny", "hold", "ledger", "approve")

_ROLE_FAMILY: Final[dict[Role, Family]] = {
    "intake": "in",
    "exec": "exec",
    "deny": "deny",
    "hold": "hold",
    "ledger": "ledger",
    "approve": "approve",
}


def _wildcard(prefix: str, family: Family) -> str:
    return f"{prefix}.{family}.>"


@dataclass(frozen=True, slots=True)
class Streams:
    """JetStream names for a prefix: ``guard`` → ``GUARD_IN``, ``GUARD_EXEC``, ... and the
    key-value buckets ``guard-jwks`` and ``guard-executed``."""

    prefix: str

    def name(self, role: Role) -> str:
        """The stream of *role*: ``GUARD_IN`` for ``intake``, ``GUARD_EXEC``, ..."""
        base = self.prefix.upper().replace(".", "_")
        return f"{base}_{_ROLE_FAMILY[role].upper()}"

    def subject(self, role: Role) -> str:
        """What the stream of *role* must hold: ``guard.in.>``, ``guard.exec.>``, ..."""
        return _wildcard(self.prefix, _ROLE_FAMILY[role])

    @property
    def intake(self) -> str:
        return self.name("intake")

    @property
    def exec(self) -> str:
        return self.name("exec")

    @property
    def deny(self) -> str:
        return self.name("deny")

    @property
    def hold(self) -> str:
        return self.name("hold")

    @property
    def ledger(self) -> str:
        return self.name("ledger")

    @property
    def approve(self) -> str:
        return self.name("approve")

    @property
    def jwks_bucket(self) -> str:
        """The key-value bucket executors look the JWKS up in."""
        return self._bucket("jwks")

    @property
    def executed_bucket(self) -> str:
        """Executors' consume-once bucket (README, "Executors")."""
        return self._bucket("executed")

    @property
    def limits_bucket(self) -> str:
        """The gateways' sliding-window logs of rate limits and budgets (README, "Limits")."""
        return self._bucket("limits")

    @property
    def gateways_bucket(self) -> str:
        """One lease per gateway id (one writer per chain) and the registry of chains."""
        return self._bucket("gateways")

    @property
    def policy_bucket(self) -> str:
        """The signed policy bundle pointers and the gateways' policy status (README,
        "Policy distribution")."""
        return self._bucket("policy")

    @property
    def policy_store(self) -> str:
        """The object store of policy bundle contents, by content digest."""
        return self._bucket("policy-sets")

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The stream behind a key-value bucket (what permissions name): ``KV_<bucket>``."""
        return f"KV_{bucket}"

    def _bucket(self, what: str) -> str:
        return f"{self.prefix.replace('.', '-')}-{what}"


@dataclass(frozen=True, slots=True)
class LedgerSubjects:
    """Where a gateway's ledger records go (``gateway`` ``*`` for every gateway's).

    ``<prefix>.ledger.<gateway>.d.<decision id>`` holds one decision record,
    ``<prefix>.ledger.<gateway>.c`` the gateway's chain starts and checkpoints.
    """

    CHAIN: ClassVar[str] = "c"  # the token after the gateway on chain records
    DECISION: ClassVar[str] = "d"  # ... and on decision records, before the id

    prefix: str
    gateway: str

    @property
    def root(self) -> str:
        """``<prefix>.ledger``: every record's subject starts with it and a dot."""
        return f"{self.prefix}.ledger"

    @property
    def all(self) -> str:
        return _wildcard(self.prefix, "ledger")

    @property
    def own(self) -> str:
        return f"{self.root}.{self.gateway}.>"

    @property
    def chain(self) -> str:
        return f"{self.root}.{self.gateway}.{self.CHAIN}"

    def decision(self, decision_id: str) -> str:
        """The record of *decision_id* (``*``: a filter over every decision record)."""
        return f"{self.root}.{self.gateway}.{self.DECISION}.{decision_id}"

    def any_decision(self, decision_id: str) -> str:
        """The subject filter over every gateway's record of *decision_id*."""
        return f"{self.root}.*.{self.DECISION}.{decision_id}"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Every name bus_guard uses under one subject prefix; built once, used per message.

    >>> s = Subjects("guard")
    >>> s.output("exec", "guard.in.agent-7.payments.transfer")
    'guard.exec.agent-7.payments.transfer'
    >>> s.streams.ledger, s.wildcard("in"), s.deny_invalid
    ('GUARD_LEDGER', 'guard.in.>', 'guard.deny.~invalid')
    """

    prefix: str = DEFAULT_PREFIX
    streams: Streams = field(init=False, repr=False, compare=False)
    deny_invalid: str = field(init=False, repr=False, compare=False)
    # "<prefix>.<family>." per family, and where an intake subject's tail starts: the
    # message path slices and concatenates, it formats nothing.
    _dotted: dict[Family, str] = field(init=False, repr=False, compare=False)
    _tail_at: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        dotted = {family: f"{self.prefix}.{family}." for family in FAMILIES}
        object.__setattr__(self, "_dotted", dotted)
        object.__setattr__(self, "_tail_at", len(dotted["in"]))
        object.__setattr__(self, "streams", Streams(self.prefix))
        object.__setattr__(self, "deny_invalid", dotted["deny"] + INVALID_TOKEN)

    def root(self, family: Family) -> str:
        """``<prefix>.<family>``: ``guard.exec``."""
        return self._dotted[family][:-1]

    def wildcard(self, family: Family) -> str:
        """Every subject of *family*: ``guard.exec.>``."""
        return _wildcard(self.prefix, family)

    def subject(self, family: Family, token: str, *tokens: str) -> str:
        """``<prefix>.<family>.<token>[.<token>...]``; tokens may be NATS wildcards."""
        return self._dotted[family] + ".".join((token, *tokens))

    def intent(self, principal: str, action: str) -> str:
        """Where *principal* publishes an intent to do *action*: ``guard.in.agent-7.x.y``."""
        return self._dotted["in"] + f"{principal}.{action}"

    def tail(self, intake_subject: str) -> str:
        """``<principal>.<action...>`` of an intake subject; :class:`ValueError` if it is not
        under ``<prefix>.in.`` (only whole-subject parsing, ``parse_subject``, says it is valid)."""
        if len(intake_subject) <= self._tail_at or not intake_subject.startswith(
            self._dotted["in"]
        ):
            raise ValueError(f"{intake_subject!r} is not under {self._dotted['in']!r}")
        return intake_subject[self._tail_at :]

    def output(self, kind: OutputKind, intake_subject: str) -> str:
        """The *kind* subject of an intent on *intake_subject*, same tail:
        ``guard.in.a.b`` → ``guard.exec.a.b``. An intent whose subject does not parse goes
        to :attr:`deny_invalid` instead (its tail could be anything, or nothing)."""
        # tail()'s check inline: twice per allowed intent on the gateway's path.
        tail_at = self._tail_at
        if len(intake_subject) > tail_at and intake_subject.startswith(self._dotted["in"]):
            return self._dotted[kind] + intake_subject[tail_at:]
        return self._dotted[kind] + self.tail(intake_subject)  # raises ValueError

    def ledger(self, gateway: str = "*") -> LedgerSubjects:
        """The ledger subjects of *gateway* (default ``*``: every gateway's)."""
        return LedgerSubjects(self.prefix, gateway)
