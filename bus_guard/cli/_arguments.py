"""The command line's arguments: every command, option and default, in one parser.

A default that is also a setting is not written here: each ``bus-guard run`` option names
the settings field it sets (:data:`RUN_OPTIONS`), its default is read from that field
(:func:`field_default`) and shown in ``--help``, and :func:`run_settings` builds the
:class:`Settings` from the parsed options. Where the command line departs from the
settings on purpose, it says so below, in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, get_args

from bus_guard import __version__
from bus_guard.cli._connect import NATS_URL_ENV, TOOL_RECONNECT_ATTEMPTS
from bus_guard.cli._console import add_console_command
from bus_guard.cli._safe import safe
from bus_guard.settings import (
    ArtifactMode,
    Checks,
    IntakeMode,
    LogDecisions,
    ReplyInbox,
    Settings,
    StreamSettings,
)
from bus_guard.signing._keys import DEFAULT_GRACE_S

__all__ = (
    "DEFAULT_LOG_LEVEL",
    "DEMO_LOG_LEVEL",
    "DURATION_UNITS",
    "EXAMPLE_POLICIES",
    "RUN_OPTIONS",
    "TOOL_RECONNECT_ATTEMPTS",
    "SettingOption",
    "duration",
    "field_default",
    "nats_options",
    "parser",
    "run_settings",
)

# --- where the command line departs from the settings' defaults, on purpose --------------
# * `run --nats` is required: Settings.nats_url's default (a local server) serves the
#   embedding API and tests; a deployed gateway names its servers.
# * `run --gateway-id` left out (or empty): Settings' own default, <hostname>-<pid>.
# * Logging is the command line's alone: info, but warning for `demo`, whose own output
#   tells the story.
# * `ledger verify`, `lineage`, `approve`, `reject` and `holds` give up after
#   TOOL_RECONNECT_ATTEMPTS reconnects, not the gateway's max_reconnect_attempts: a tool
#   does one thing and should fail fast.
# * `approve`, `reject` and `holds` default --nats to Settings.nats_url (a local server):
#   an approver runs them by hand, often next to the bus. Their other defaults (--wait 0,
#   --since 24h, --limit 100) are theirs alone: `open_holds` takes both bounds from its
#   caller.
DEFAULT_LOG_LEVEL: Final = "info"
DEMO_LOG_LEVEL: Final = "warning"
_HOLDS_WINDOW: Final = "24h"
_HOLDS_LIMIT: Final = 100

# Demo-only defaults (no setting holds them; `run_demo` takes them from here).
_DEMO_COUNT: Final = 300
_DEMO_RATE_PER_S: Final = 150.0
_DEMO_SEED: Final = 7
# The example policies, shipped in the package (bus_guard/examples/policies).
EXAMPLE_POLICIES: Final = Path(__file__).resolve().parent.parent / "examples" / "policies"

_SECTIONS: Final[dict[str, type[Any]]] = {
    "": Settings,
    "stream": StreamSettings,
    "checks": Checks,
}


def field_default(cls: type[Any], name: str) -> Any:
    """The default of the dataclass field *name* of *cls* (a ``default_factory`` is called)."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.init:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise LookupError(f"{cls.__name__}.{name} has no default")
    raise LookupError(f"{cls.__name__} has no field {name!r}")


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _with_default(text: str, value: object) -> str:
    """*text* with ``(default: X)`` where it says ``{default}``, else at its end (nothing
    for ``None``: not given means not used)."""
    if value is None:
        return text
    shown = _shown(value)
    return text.format(default=shown) if "{default}" in text else f"{text} (default: {shown})"


@dataclass(frozen=True, slots=True)
class SettingOption:
    """A ``bus-guard run`` option that sets one settings field, with that field's default."""

    flag: str
    field: str  # "artifact_ttl_s", "stream.ack_wait_s", "checks.max_past_skew_s"
    help: str  # "(default: X)" is appended, or put where it says "{default}"
    metavar: str | None = None
    choices: Sequence[str] | None = None
    required: bool = False
    # Shown instead of the default when the field's default is computed (default_factory):
    # the option is then None unless given, and Settings computes it.
    computed: str | None = None
    # An environment variable whose value, if set, is the default (then not required).
    env: str | None = None
    parse: Callable[[str], Any] | None = None  # default: the type of the field's default
    flag_only: bool = False  # a boolean setting: the flag alone turns it on

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def owner(self) -> type[Any]:
        return _SECTIONS[self.field.rpartition(".")[0]]

    @property
    def name(self) -> str:
        return self.field.rpartition(".")[2]

    @property
    def default(self) -> Any:
        """What the option holds when it is not given: the field's default (or None)."""
        return None if self.required or self.computed else field_default(self.owner, self.name)

    def add_to(self, group: argparse._ActionsContainer) -> None:
        value = self.default
        if self.flag_only:
            group.add_argument(
                self.flag,
                dest=self.dest,
                action="store_true",
                default=value,
                help=_with_default(self.help, value),
            )
            return
        kw: dict[str, Any] = {"dest": self.dest, "metavar": self.metavar}
        if self.env is not None and os.environ.get(self.env):
            kw.update(default=os.environ[self.env], help=f"{self.help} (default: ${self.env})")
        elif self.required:
            kw.update(required=True, help=self.help)
        elif self.computed:
            kw.update(default=None, help=_with_default(self.help, self.computed))
        else:
            kw.update(default=value, help=_with_default(self.help, value))
            if self.parse is not None:
                kw["type"] = self.parse
            elif isinstance(value, int | float) and not isinstance(value, bool):
                kw["type"] = type(value)
        if self.choices is not None:
            kw["choices"] = list(self.choices)
        group.add_argument(self.flag, **kw)


def _retention(text: str) -> float:
    """``--intent-retention``: a duration (``7d``, ``24h``, ``3600``), or ``0`` / ``off``."""
    return 0.0 if text.strip() in ("0", "0s", "off") else duration(text)


_GATEWAY: Final = (
    SettingOption(
        "--nats",
        "nats_url",
        "NATS server URL(s), comma-separated for a cluster; required unless $NATS_URL is set",
        metavar="URL[,URL...]",
        required=True,
        env=NATS_URL_ENV,
    ),
    SettingOption(
        "--mode",
        "mode",
        "intake mode: stream = JetStream, decided once, ledger; "
        "core = queue subscription, at most once",
        choices=get_args(IntakeMode),
    ),
    SettingOption("--prefix", "prefix", "subject prefix"),
    SettingOption("--queue", "queue", "queue group"),
    SettingOption(
        "--gateway-id", "gateway_id", "issuer id in artifacts", computed="<hostname>-<pid>"
    ),
    SettingOption("--creds", "creds_file", "NATS credentials file (JWT)", metavar="FILE"),
    SettingOption("--nkey", "nkey_file", "NATS nkey seed file", metavar="FILE"),
    SettingOption("--tls-cert", "tls_cert_file", "TLS client certificate (PEM)", metavar="FILE"),
    SettingOption("--tls-key", "tls_key_file", "TLS client certificate's key", metavar="FILE"),
    SettingOption("--tls-ca", "tls_ca_file", "CA of the server's certificate", metavar="FILE"),
    SettingOption("--artifact-ttl", "artifact_ttl_s", "artifact lifetime", metavar="SECONDS"),
    SettingOption(
        "--reply-inbox",
        "reply_inbox",
        "core mode: send a decision to an intent's reply subject only if it is the principal's "
        "own inbox (_INBOX.<principal>.) or the server's cross-account alias (_R_.); any = "
        "every _INBOX. subject",
        choices=get_args(ReplyInbox),
    ),
    SettingOption("--max-payload", "max_payload_bytes", "largest intent accepted", metavar="BYTES"),
    SettingOption(
        "--max-skew", "checks.max_past_skew_s", "oldest intent ts accepted", metavar="SECONDS"
    ),
    SettingOption(
        "--reconnect-wait",
        "reconnect_wait_s",
        "wait between reconnect attempts",
        metavar="SECONDS",
    ),
    SettingOption(
        "--log-decisions",
        "log_decisions",
        "log each decision (logger bus_guard.decisions; with --log-format json its fields "
        "are JSON fields): off, denied (denials, holds, would-deny) or all",
        choices=get_args(LogDecisions),
    ),
    SettingOption(
        "--intent-retention",
        "intent_retention_s",
        "keep every decided intent's bytes this long, by decision id, in the key-value "
        "bucket <prefix>-intents, for 'bus-guard replay' and 'policy impact' (a duration: "
        "7d, 24h, 3600; 0: off) (default: {default} s, 7 days)",
        metavar="DURATION",
        parse=_retention,
    ),
    SettingOption(
        "--otel",
        "otel",
        "emit a span per decision through OpenTelemetry, a child of the agent's span when "
        "its intent carries a traceparent (needs the otel extra; exporter and endpoint from "
        "the standard OTEL_* settings, e.g. opentelemetry-instrument bus-guard run ...)",
        flag_only=True,
    ),
    SettingOption(
        "--max-reconnects",
        "max_reconnect_attempts",
        "reconnect attempts before the gateway gives up and exits 1 "
        "(default: {default}; the budget is N x --reconnect-wait)",
        metavar="N",
    ),
)
_ARTIFACTS: Final = (
    SettingOption(
        "--artifacts",
        "artifacts",
        "per-message = one Ed25519 signature per artifact; batched = one signed Merkle tree "
        "head per batch, each artifact with its inclusion proof (faster; each message waits "
        "for its batch, artifacts are larger)",
        choices=get_args(ArtifactMode),
    ),
    SettingOption(
        "--batch-max", "batch_max", "batched: at most N artifacts per signed tree", metavar="N"
    ),
    SettingOption(
        "--batch-delay-ms",
        "batch_delay_ms",
        "batched, core mode: a batch is signed at the latest this long after its first "
        "intent; sooner when full or when no further intent is waiting",
        metavar="MS",
    ),
)
_STREAM: Final = (
    SettingOption(
        "--ack-wait",
        "stream.ack_wait_s",
        "redeliver an intent not acked within this",
        metavar="SECONDS",
    ),
    SettingOption(
        "--max-ack-pending",
        "stream.max_ack_pending",
        "intents in flight over all replicas",
        metavar="N",
    ),
    SettingOption(
        "--batch", "stream.fetch_batch", "intents per pull and per ledger commit", metavar="N"
    ),
    SettingOption(
        "--fair-quantum",
        "stream.fair_quantum",
        "while several principals are active, each adds at most N intents to a batch "
        "(0: arrival order)",
        metavar="N",
    ),
    SettingOption(
        "--read-ahead",
        "stream.read_ahead",
        "intents pulled ahead of deciding them, for the fair queue to choose from",
        metavar="N",
    ),
    SettingOption(
        "--max-deliveries",
        "stream.max_deliveries",
        "deny an intent still undecided after N deliveries",
        metavar="N",
    ),
    SettingOption(
        "--retry-horizon",
        "stream.retry_horizon_s",
        "outputs re-published relying on de-dup within this",
        metavar="SECONDS",
    ),
    SettingOption(
        "--dedup-window",
        "stream.duplicate_window_s",
        "de-dup window of the output and ledger streams created",
        metavar="SECONDS",
    ),
    SettingOption(
        "--replicas",
        "stream.replicas",
        "replicas of the streams created (default: {default}, one server; 3 on a 3-node cluster)",
        metavar="N",
    ),
    SettingOption(
        "--min-replicas",
        "stream.min_replicas",
        "refuse to start on streams with fewer replicas",
        metavar="N",
    ),
    SettingOption(
        "--checkpoint-every",
        "stream.checkpoint_every",
        "signed ledger checkpoint every N records (default: {default}) ...",
        metavar="N",
    ),
    SettingOption(
        "--checkpoint-interval",
        "stream.checkpoint_interval_s",
        "... or every so many seconds",
        metavar="SECONDS",
    ),
    SettingOption(
        "--lease",
        "stream.lease_s",
        "the gateway id's lease (one process per ledger chain): another process takes the id "
        "over only when this one was silent that long (default: {default})",
        metavar="SECONDS",
    ),
    SettingOption(
        "--max-lineage-depth",
        "stream.max_lineage_depth",
        "deny intents deeper in a chain of decisions",
        metavar="N",
    ),
    SettingOption(
        "--lineage-wait",
        "stream.lineage_wait_s",
        "a child whose parent is not decided yet, or held, waits this long after it was "
        "stored; then it is denied lineage_violation (0: never wait)",
        metavar="SECONDS",
    ),
    SettingOption(
        "--lineage-retry",
        "stream.lineage_nak_delay_s",
        "a waiting child is looked at again every so often",
        metavar="SECONDS",
    ),
    SettingOption(
        "--lineage-max-waiting",
        "stream.lineage_max_waiting",
        "at most N children wait at once (per gateway; beyond, they are decided now); "
        "waiting children hold ack-pending slots, so keep N x replicas below "
        "--max-ack-pending",
        metavar="N",
    ),
    SettingOption(
        "--hold-sweep",
        "stream.hold_sweep_s",
        "every SECONDS, deny the unresolved holds past their expiry (reason expired)",
        metavar="SECONDS",
    ),
)
# Every `bus-guard run` option that is a setting, in --help's order and groups.
RUN_OPTIONS: Final = _GATEWAY + _ARTIFACTS + _STREAM


def run_settings(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` of a parsed ``bus-guard run``: each option into its field."""
    sections: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for option in RUN_OPTIONS:
        value = getattr(args, option.dest)
        if option.computed and not value:
            continue  # the field's own default_factory computes it
        sections[option.field.rpartition(".")[0]][option.name] = value
    return Settings(
        **sections[""],
        stream=StreamSettings(**sections["stream"]),
        checks=Checks(**sections["checks"]),
    )


def _prefix_option(p: argparse.ArgumentParser) -> None:
    prefix = field_default(Settings, "prefix")
    p.add_argument("--prefix", default=prefix, help=_with_default("subject prefix", prefix))


class _Parser(argparse.ArgumentParser):
    """Usage errors quote the arguments: escaped like everything else the CLI prints."""

    def error(self, message: str) -> NoReturn:
        super().error(safe(message))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bus-guard",
        description="Pre-execution authorization gateway for agents on NATS. Agents publish "
        "intents to <prefix>.in.<principal>.<action>; approved ones are forwarded to "
        "<prefix>.exec.… with a signed artifact, others go to <prefix>.deny.… / .hold.….",
    )
    p.add_argument("--version", action="version", version=f"bus-guard {__version__}")
    _log_options(p, default=None)
    p.set_defaults(log_format="text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the gateway",
        description="Run the gateway: decide every intent published to <prefix>.in.>. "
        "Stream mode (default) consumes the intake stream with a durable consumer shared by "
        "every replica, decides each intent once and records it in the ledger; core mode "
        "subscribes in a queue group, at most once.",
    )
    for option in _GATEWAY[:1]:  # --nats first, then the files, then the rest
        option.add_to(run)
    run.add_argument(
        "--policies",
        required=True,
        metavar="DIR|nats://",
        help="directory of policy bundles (*.yaml), or nats:// for signed bundles from the bus "
        "(see 'policy source and reload' below)",
    )
    run.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="FILE",
        help="Ed25519 signing key (PEM), from 'bus-guard keys new'",
    )
    run.add_argument(
        "--jwks",
        type=Path,
        default=None,
        metavar="FILE",
        help="stream mode: the JWKS whose keys' artifacts make a parent decision's ledger "
        "record count (every gateway's keys, rotated ones included; default: jwks.json next "
        "to --key if there is one, else the signing key alone)",
    )
    run.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on HOST:PORT, e.g. "
        "127.0.0.1:9464 (port 0: any free port, logged); default: no HTTP listener",
    )
    for option in _GATEWAY[1:]:
        option.add_to(run)
    art = run.add_argument_group("artifacts")
    for option in _ARTIFACTS:
        option.add_to(art)
    st = run.add_argument_group("stream mode")
    for option in _STREAM:
        option.add_to(st)
    from bus_guard.cli import _push  # imports this module: late

    _push.add_run_options(run)

    demo = sub.add_parser("demo", help="run the live demo on an embedded nats-server")
    demo.add_argument(
        "--count",
        type=int,
        default=_DEMO_COUNT,
        help=_with_default("intents to send", _DEMO_COUNT),
    )
    nats_options(demo, optional="use this server instead of an embedded one")
    demo.add_argument(
        "--policies",
        type=Path,
        default=EXAMPLE_POLICIES,
        metavar="DIR",
        help="policy bundles (default: the example policies shipped with bus_guard)",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=_DEMO_RATE_PER_S,
        metavar="PER_S",
        help=_with_default(
            "intents per second the agents send (0 = as fast as possible)", _DEMO_RATE_PER_S
        ),
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=_DEMO_SEED,
        help=_with_default("random seed of the agents' mix", _DEMO_SEED),
    )
    mode = field_default(Settings, "mode")
    demo.add_argument(
        "--mode",
        default=mode,
        choices=get_args(IntakeMode),
        help=_with_default("intake mode", mode),
    )
    artifacts = field_default(Settings, "artifacts")
    demo.add_argument(
        "--artifacts",
        default=artifacts,
        choices=get_args(ArtifactMode),
        help=_with_default("the gateway's artifacts; see `bus-guard run --help`", artifacts),
    )
    demo.add_argument("--quiet", action="store_true", help="only print the summary")

    watch = sub.add_parser(
        "watch",
        help="live view of denials and holds, and of approvers' votes and hold resolutions",
        description="Live view, one line per record: denials and holds (narrowed on the "
        "server by --principal / --action), and from the ledger the approvers' votes "
        "(counted or refused) and the holds' resolutions (released, rejected, expired), "
        "filtered here by the principal, action and reason they name.",
    )
    nats_options(watch)
    _prefix_option(watch)
    watch.add_argument("--principal", default=None, help="only this principal")
    watch.add_argument(
        "--action", default=None, help="only this action (NATS wildcards allowed: payments.*)"
    )
    watch.add_argument("--reason", default=None, help="only this reason code")
    watch.add_argument(
        "--count", type=_positive, default=None, metavar="N", help="exit after exactly N records"
    )
    watch.add_argument(
        "--since",
        type=duration,
        default=None,
        metavar="DURATION",
        help="first replay the denials and holds stored in the deny and hold streams this "
        "far back (90s, 30m, 24h, 7d), then go live",
    )
    watch.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line (JSON Lines): the record as received",
    )

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    new = keys.add_parser("new", help="write DIR/signing-key.pem (0600) and DIR/jwks.json")
    new.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="where to write them (created)"
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing key")
    rotate = keys.add_parser(
        "rotate",
        help="new DIR/signing-key.pem; the old key verifies for --grace seconds more",
    )
    rotate.add_argument(
        "--dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the directory of signing-key.pem and jwks.json ('keys new --out')",
    )
    rotate.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help=_with_default("how long the old key still verifies", DEFAULT_GRACE_S),
    )
    revoke = keys.add_parser("revoke", help="refuse a key id from now on (key compromise)")
    revoke.add_argument(
        "--jwks", required=True, type=Path, metavar="FILE", help="the JWKS to mark the key in"
    )
    # A kid is base64url: about one in 64 starts with "-", which argparse would read as an
    # option; "--" before it (or --kid=KID) always works, and the help says so.
    revoke.add_argument(
        "kid", help="the key id to revoke; one that starts with '-' goes after '--'"
    )

    pol = sub.add_parser("policy", help="check, test and explain policies").add_subparsers(
        dest="policy_command", required=True, metavar="ACTION"
    )
    check = pol.add_parser("check", help="validate and compile a policy directory")
    check.add_argument("path", type=Path, metavar="DIR", help="policy directory (*.yaml)")
    ptest = pol.add_parser("test", help="run YAML test cases (intent -> expected decision)")
    ptest.add_argument("path", type=Path, help="policy directory")
    ptest.add_argument(
        "--tests", type=Path, default=None, help="test file or directory (default: <path>/tests)"
    )
    explain = pol.add_parser("explain", help="show why an intent gets its decision")
    explain.add_argument(
        "--policies", required=True, type=Path, metavar="DIR", help="policy directory"
    )
    explain.add_argument("--subject", required=True, help="e.g. guard.in.agent-7.payments.transfer")
    explain.add_argument(
        "--payload", required=True, type=Path, metavar="FILE", help="the intent's payload bytes"
    )
    explain.add_argument("--now", type=float, default=None, help="evaluation time (unix s)")
    explain.add_argument(
        "--lineage",
        type=Path,
        default=None,
        metavar="FILE",
        help="the intent's lineage as the ledger would give it (YAML/JSON: depth, root, "
        "labels, parents: [{id, action, resource, scope}]; the shape of a test case's "
        "`lineage:`); default: a root intent",
    )
    nats_options(
        explain,
        optional="also show what each limit the intent would spend has used now (read from "
        "the gateways' limits bucket); default: no bus, the policy alone",
    )
    _prefix_option(explain)
    init = pol.add_parser(
        "init", help="copy the example policies (and their tests) into a new directory"
    )
    init.add_argument("dir", type=Path, metavar="DIR", help="the directory to create")
    schema = pol.add_parser("schema", help="print the JSON Schema of policy bundles")
    schema.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="write it here (default: stdout)"
    )
    _push.add_policy_commands(pol)
    from bus_guard.cli import _replay  # imports this module: late

    _replay.add_commands(sub, pol)

    ledger = sub.add_parser("ledger", help="the decision ledger").add_subparsers(
        dest="ledger_command", required=True, metavar="ACTION"
    )
    lv = ledger.add_parser(
        "verify",
        help="check every gateway's chain and signed checkpoints; exit 1 naming the first "
        "bad record if anything was deleted, changed, reordered or cut off",
    )
    nats_options(lv)
    lv.add_argument(
        "--jwks",
        required=True,
        type=Path,
        metavar="FILE",
        help="the gateways' public keys (jwks.json from 'bus-guard keys new')",
    )
    _prefix_option(lv)
    lv.add_argument(
        "--require-sealed",
        action="store_true",
        help="every chain must end with a final checkpoint (all gateways stopped cleanly)",
    )
    lv.add_argument(
        "--witness",
        type=Path,
        default=None,
        metavar="DIR",
        help="also check the ledger holds every chain head this witness countersigned "
        "('bus-guard witness --dir DIR'): finds a rebuilt, truncated or pruned ledger, a "
        "dropped chain, a rewritten checkpoint",
    )
    lv.add_argument(
        "--witness-jwks",
        type=Path,
        default=None,
        metavar="FILE",
        help="the witness's public key (jwks.json beside its key); needed with --witness",
    )
    wit = sub.add_parser(
        "witness",
        help="follow the ledger and countersign every sound checkpoint into a directory "
        "of its own (run it apart from the gateways, with its own key)",
        description="Audits the ledger as it grows (every SECONDS) and appends a "
        "countersigned line to DIR/witnessed.jsonl for every chain start and checkpoint "
        "that extends a sound chain; refuses (and says why) past a gap, a fork or a head that "
        "differs from one it witnessed. Example: bus-guard witness --nats "
        "nats://auditor:...@host --dir /var/lib/bus-guard-witness --key witness/signing-key.pem "
        "--jwks keys/jwks.json",
    )
    nats_options(wit)
    wit.add_argument(
        "--dir", required=True, type=Path, metavar="DIR", help="where the witness keeps its log"
    )
    wit.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="FILE",
        help="the witness's own Ed25519 key ('bus-guard keys new --out witness/')",
    )
    wit.add_argument(
        "--jwks",
        required=True,
        type=Path,
        metavar="FILE",
        help="the gateways' public keys (checkpoint signatures are checked)",
    )
    wit.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the ledger is read for new records (default: 1)",
    )
    wit.add_argument(
        "--once", action="store_true", help="read what the ledger holds now, countersign, exit"
    )
    _prefix_option(wit)
    lin = sub.add_parser("lineage", help="ancestors and descendants of a decision, as trees")
    lin.add_argument("decision_id", metavar="DECISION_ID", help="a decision id (a ULID)")
    nats_options(lin)
    _prefix_option(lin)

    status = sub.add_parser(
        "status",
        help="every running gateway: identity, policy, readiness and counters",
        description="Ask every gateway on the bus ($SRV.STATS.bus-guard, the NATS micro "
        "service API) and show one row per gateway: id, mode, policy version and digest, "
        "key id, ready, uptime, decisions by effect, errors, queue depth, latency p50/p99.",
    )
    nats_options(status)
    status.add_argument(
        "--wait",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="collect answers for this long (default: 1; every gateway answers at once)",
    )
    status.add_argument(
        "--json", action="store_true", help="each gateway's status document, one per line"
    )

    _approval_commands(sub)
    add_console_command(sub)

    mat = sub.add_parser(
        "maturity",
        help="where this deployment stands, observe -> enforce, from the ledger's evidence",
        description="Read the ledger's decision records of the window and say: the share "
        "decided in enforce vs observe mode, what observe mode would have denied (per "
        "action), actions only observed, actions no rule names, holds and how long they "
        "took to resolve, artifacts per kind, whether the ledger verifies (--jwks), and the "
        "next concrete steps.",
    )
    nats_options(mat)
    _prefix_option(mat)
    mat.add_argument(
        "--since",
        type=duration,
        default=duration("24h"),
        metavar="DURATION",
        help="the window: 90s, 30m, 24h, 7d (default: 24h)",
    )
    mat.add_argument(
        "--jwks",
        type=Path,
        default=None,
        metavar="FILE",
        help="also verify the ledger with the gateways' keys (default: not checked)",
    )
    mat.add_argument("--json", action="store_true", help="the assessment as one JSON object")

    ver = sub.add_parser("verify", help="verify an authorization artifact")
    ver.add_argument(
        "--jwks", required=True, type=Path, metavar="FILE", help="the gateways' public keys"
    )
    ver.add_argument("--subject", required=True, help="the exec subject the message arrived on")
    ver.add_argument(
        "--payload", required=True, type=Path, metavar="FILE", help="the message's payload bytes"
    )
    ver.add_argument(
        "--artifact", required=True, help="the Guard-Artifact header's JWS, or @FILE holding it"
    )
    _finish(p)
    return p


# --- approvals ---------------------------------------------------------------------------

DURATION_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``24h`` or ``7d`` (argparse type)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        value = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (90, 90s, 30m, 24h, 7d)"
        ) from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be 0 or more")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def nats_options(p: argparse.ArgumentParser, *, optional: str | None = None) -> None:
    """``--nats`` (default ``$NATS_URL``, else a local server), ``--creds``, ``--nkey``,
    ``--tls-cert``, ``--tls-key``, ``--tls-ca``. *optional*: ``--nats`` defaults to None
    (not connecting), and this says what that means."""
    g = p.add_argument_group("connection")
    if optional is not None:
        g.add_argument(
            "--nats", default=None, metavar="URL[,URL...]", help=f"NATS server URL(s); {optional}"
        )
    else:
        g.add_argument(
            "--nats",
            default=None,
            metavar="URL[,URL...]",
            help="NATS server URL(s), comma-separated (default: $NATS_URL, else the "
            f"context's url, else {field_default(Settings, 'nats_url')})",
        )
        g.add_argument(
            "--context",
            default=None,
            metavar="NAME",
            help="a NATS CLI context (~/.config/nats/context/NAME.json; default: "
            "$NATS_CONTEXT): its url, creds, nkey and TLS files where no option gives them",
        )
    g.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file (JWT)")
    g.add_argument("--nkey", default=None, metavar="FILE", help="NATS nkey seed file")
    g.add_argument("--tls-cert", default=None, metavar="FILE", help="TLS client certificate")
    g.add_argument("--tls-key", default=None, metavar="FILE", help="its private key")
    g.add_argument(
        "--tls-ca", default=None, metavar="FILE", help="CA of the server's TLS certificate"
    )


def _connection_options(p: argparse.ArgumentParser) -> None:
    nats_options(p)
    _prefix_option(p)


_VOTE_DESCRIPTION: Final = """\
{what}: sign a vote ({verb}) with the approver's key and store it on
<prefix>.approve.<DECISION_ID> (a JetStream publish: exit 0 means the approve stream holds
it). The gateway checks the vote against the approvers the policy names, records it in the
ledger as a decision whose parent is the hold, and releases the held intent once its quorum
approved, or denies it on a rejection.
"""

_VOTE_EPILOG: Final = """\
examples:
  bus-guard holds                                   # the open holds, with their decision ids
  bus-guard {verb} 5QF3J8RZ0T7W2M4K9XH6B1N0CD --key approvers/alice/signing-key.pem \\
      --reason "{example}"
  bus-guard {verb} 5QF3J8RZ0T7W2M4K9XH6B1N0CD --key alice.pem --approver alice --wait 10

The token is a compact JWS (EdDSA, typ guard-approval+jwt, kid of the key) over the hold's
decision id and the held payload's SHA-256, the approver, the verdict, the reason and the
time (README, "Approvals"). Nothing is published for a decision that is no open hold.

exit codes:
  0  the vote is stored in the approve stream (--wait: and the gateway counted it)
  1  refused: no such decision, not a hold, already resolved or expired, already voted,
     not an approver of the hold; NATS unreachable, no ledger or approve stream, no
     acknowledgement; --wait: the gateway refused the vote, or did not record it in time
  2  usage or configuration: unreadable key or credentials, a malformed decision id,
     --approver or --reason
"""

_LIMITS_EPILOG: Final = """\
examples:
  bus-guard limits --nats nats://127.0.0.1:4222
  bus-guard limits --principal agent-7
  bus-guard limits --json | jq 'select(.used >= .max)'

One line per limit key with spends inside its window now: the limit (its name, the rule),
the key it counts against (a principal, group, resource or lineage root), what is used of
it, its window, and when the oldest spend leaves the window. Read from the guard-limits
key-value bucket that every gateway spends from (README, "Limits"). --principal: only keys
that are that principal (or its lineage root). --json: one object per line with limit, rule,
kind, max, window_s, per, key, used, spends, frees_in_s.

exit codes: 0 listed (none is not an error), 1 NATS unreachable, 2 bad arguments
"""

_HOLDS_EPILOG: Final = """\
examples:
  bus-guard holds --nats nats://127.0.0.1:4222
  bus-guard holds --principal agent-9 --action 'payments.*' --since 7d
  bus-guard holds --json | jq -r .decision_id

One line per open hold, oldest first: decision id, age, principal, action, resource, the
rules that held it, approvals so far / quorum (and who), rejections, expiry. A hold with a
resolution in the ledger (released, rejected, expired) is not open. --json: one object per
line (JSON Lines) with decision_id, subject, principal, action, resource, rules, ts,
payload_sha256, approvers, quorum, expires, approved_by, rejected_by, in_ledger.

exit codes: 0 listed (none is not an error), 1 NATS unreachable or no hold / ledger
stream, 2 usage.
"""


def _approval_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    verbs = {
        "approve": ("vote to release a held intent", "invoice 4711 checked with the customer"),
        "reject": ("vote to deny a held intent", "not ordered by finance"),
    }
    for verb, (what, example) in verbs.items():
        vote = sub.add_parser(
            verb,
            help=f"{what} (a signed vote on its hold)",
            description=_VOTE_DESCRIPTION.format(what=what.capitalize(), verb=verb),
            epilog=_VOTE_EPILOG.format(verb=verb, example=example),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        vote.add_argument("decision_id", metavar="DECISION_ID", help="the hold's decision id")
        vote.add_argument(
            "--key",
            required=True,
            type=Path,
            metavar="FILE",
            help="the approver's Ed25519 key (PEM), from 'bus-guard keys new'",
        )
        vote.add_argument(
            "--reason", default="", metavar="TEXT", help="why (in the token and the ledger)"
        )
        vote.add_argument(
            "--approver",
            default=None,
            metavar="ID",
            help="the approver claim: your id in the policy (default: the key's kid, which "
            "the gateway maps to the approver the policy names)",
        )
        vote.add_argument(
            "--wait",
            type=_seconds,
            default=0.0,
            metavar="SECONDS",
            help="then wait this long for the gateway's record of the vote and say whether "
            "it was counted or refused, and why (default: 0, do not wait)",
        )
        _connection_options(vote)

    holds = sub.add_parser(
        "holds",
        help="list the open holds, with approvals so far",
        description="List the holds that wait for approvers: the hold stream within --since,\n"
        "with each hold's ledger record (approvers, quorum, expiry) and its votes.",
        epilog=_HOLDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(holds)
    holds.add_argument("--principal", default=None, help="only this principal's holds")
    holds.add_argument(
        "--action", default=None, help="only this action (NATS wildcards allowed: payments.*)"
    )
    holds.add_argument(
        "--since",
        type=duration,
        default=duration(_HOLDS_WINDOW),
        metavar="DURATION",
        help=f"only holds from this far back: 90s, 30m, 24h, 7d (default: {_HOLDS_WINDOW})",
    )
    holds.add_argument(
        "--limit",
        type=_positive,
        default=_HOLDS_LIMIT,
        metavar="N",
        help=_with_default("show at most N holds", _HOLDS_LIMIT),
    )
    holds.add_argument("--json", action="store_true", help="one JSON object per line")

    limits = sub.add_parser(
        "limits",
        help="current usage of rate limits and budgets, per key",
        description="Show what every limit key has used of its window now, as the gateways\n"
        "see it (the guard-limits key-value bucket).",
        epilog=_LIMITS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(limits)
    limits.add_argument(
        "--principal", default=None, help="only keys that are this principal (or lineage root)"
    )
    limits.add_argument("--json", action="store_true", help="one JSON object per line")


# --- every command: the log options, examples and exit codes in --help -----------------

_EXIT_CODES: Final = """\
exit codes:
  0  success
  1  failure: {fail}
  2  usage or configuration error (the message names the file, field or rule)
  130 interrupted (Ctrl-C); 141 the output pipe closed (`| head`): quietly
"""

# command path -> (examples, what exit 1 means); commands with an epilog of their own
# (approve, reject, holds, limits) keep it.
_HELP_TAIL: Final[dict[str, tuple[str, str]]] = {
    "run": (
        "bus-guard run --nats nats://127.0.0.1:4222 --policies policies/ \\\n"
        "      --key keys/signing-key.pem\n"
        "  NATS_URL=tls://nats.internal:4222 bus-guard run --policies /etc/bus-guard/policies \\\n"
        "      --key /etc/bus-guard/signing-key.pem --creds gateway.creds --tls-ca ca.pem \\\n"
        "      --http 127.0.0.1:9464 --log-format json --log-decisions denied\n"
        "  bus-guard run --policies policies/ --key k.pem --mode core --artifacts batched",
        "the bus was lost beyond the reconnect budget, or the intake failed",
    ),
    "demo": (
        "bus-guard demo\n  bus-guard demo --count 50 --quiet\n"
        "  bus-guard demo --nats nats://127.0.0.1:4222 --mode core --artifacts batched --rate 0",
        "an executed action lacked a valid artifact, or something denied was executed; "
        "the bus could not be reached",
    ),
    "watch": (
        "bus-guard watch\n  bus-guard watch --principal agent-7 --since 1h\n"
        "  bus-guard watch --action 'payments.*' --reason denied_by_rule --count 10\n"
        "  bus-guard watch --json --since 24h --count 100 | jq -r .reason",
        "the bus could not be reached, or was lost",
    ),
    "status": (
        "bus-guard status\n  bus-guard status --nats nats://127.0.0.1:4222 --wait 2\n"
        "  bus-guard status --json | jq '.statistics.internal_errors'",
        "no gateway answered, or the bus could not be reached",
    ),
    "keys new": (
        "bus-guard keys new --out keys/\n  bus-guard keys new --out keys/ --force",
        "-",
    ),
    "keys rotate": ("bus-guard keys rotate --dir keys/ --grace 86400", "-"),
    "keys revoke": (
        "bus-guard keys revoke --jwks keys/jwks.json 2Hq0eA1w\n"
        "  bus-guard keys revoke --jwks keys/jwks.json -- -Zk3fQ",
        "-",
    ),
    "policy check": ("bus-guard policy check policies/", "-"),
    "policy init": ("bus-guard policy init policies/ && bus-guard policy test policies/", "-"),
    "policy test": (
        "bus-guard policy test policies/\n"
        "  bus-guard policy test policies/ --tests policies/tests/payments.yaml",
        "a test case failed, or there was none",
    ),
    "policy explain": (
        "bus-guard policy explain --policies policies/ --subject "
        "guard.in.agent-7.payments.transfer --payload intent.json\n"
        "  bus-guard policy explain --policies policies/ --subject guard.in.agent-7.x "
        "--payload i.json --now 1767225600 --lineage lineage.yaml --nats nats://127.0.0.1:4222",
        "the bus could not be reached (--nats)",
    ),
    "policy schema": (
        "bus-guard policy schema --out bundle.schema.json\n  bus-guard policy schema | jq .",
        "-",
    ),
    "ledger verify": (
        "bus-guard ledger verify --jwks keys/jwks.json\n"
        "  bus-guard ledger verify --nats nats://127.0.0.1:4222 --jwks keys/jwks.json "
        "--require-sealed",
        "a chain or checkpoint does not verify (the first bad record is named); no ledger "
        "stream or JetStream; the bus could not be reached",
    ),
    "lineage": (
        "bus-guard lineage 01JD2Q5X3M7N8P9R0S1T2V3W4X",
        "no such decision; no ledger stream or JetStream; the bus could not be reached",
    ),
    "maturity": (
        "bus-guard maturity\n  bus-guard maturity --since 7d --jwks keys/jwks.json\n"
        "  bus-guard maturity --json | jq .next_steps",
        "no ledger stream; the bus could not be reached",
    ),
    "policy sign": (
        "bus-guard policy sign --nats nats://127.0.0.1:4222 --key constitution/alice.pem",
        "the bundle could not be signed or stored (the reason is printed)",
    ),
    "policy status": (
        "bus-guard policy status --nats nats://127.0.0.1:4222 --json",
        "the bus could not be read",
    ),
    "witness": (
        "bus-guard witness --nats nats://auditor:...@host:4222 --dir /var/lib/bus-guard-witness "
        "--key witness/signing-key.pem --jwks keys/jwks.json",
        "the witness refused to countersign a head (a gap, a fork, a rewritten checkpoint)",
    ),
    "verify": (
        "bus-guard verify --jwks keys/jwks.json --subject guard.exec.agent-7.payments.transfer "
        "--payload body.json --artifact @artifact.jws",
        "the artifact is invalid (the reason is printed)",
    ),
}


def _finish(p: argparse.ArgumentParser) -> None:
    """Every command takes --log-level and --log-format after its name too, and its --help
    ends with examples and the exit codes."""
    for path, command in _commands(p):
        if not any("--log-format" in a.option_strings for a in command._actions):
            _log_options(command, default=argparse.SUPPRESS)
        tail = _HELP_TAIL.get(path)
        if tail is not None and command.epilog is None:
            examples, fail = tail
            command.epilog = f"examples:\n  {examples}\n\n" + _EXIT_CODES.format(
                fail=fail if fail != "-" else "(none: such a command succeeds or is misused)"
            )
            command.formatter_class = argparse.RawDescriptionHelpFormatter
        elif command.epilog is not None and "exit codes" not in command.epilog:
            command.epilog += "\n" + _EXIT_CODES.format(fail="see above")


def _commands(
    p: argparse.ArgumentParser, path: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command parser below *p* with its path ("policy check")."""
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                child_path = f"{path} {name}".strip()
                out.append((child_path, child))
                out += _commands(child, child_path)
    return out


def _log_options(p: argparse.ArgumentParser, *, default: Any) -> None:
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help=f"default: {DEFAULT_LOG_LEVEL} ({DEMO_LOG_LEVEL} for demo, whose own output tells "
        "the story)",
    )
    g.add_argument(
        "--log-format",
        default=default,
        choices=["text", "json"],
        help="text (default) or json: one JSON object per line, with fields (gateway, "
        "policy_digest, and for a decision decision_id, principal, action, reason ...)",
    )
