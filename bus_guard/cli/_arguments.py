"""The command line's arguments: every command, option and default, in one parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from bus_guard import __version__

__all__ = ("parser",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bus-guard",
        description="Pre-execution authorization gateway for agents on NATS. Agents publish "
        "intents to <prefix>.in.<principal>.<action>; approved ones are forwarded to "
        "<prefix>.exec.… with a signed artifact, others go to <prefix>.deny.… / .hold.….",
    )
    p.add_argument("--version", action="version", version=f"bus-guard {__version__}")
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="default: info (warning for demo, whose own output tells the story)",
    )
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the gateway",
        description="Run the gateway: decide every intent published to <prefix>.in.>. "
        "Stream mode (default) consumes the intake stream with a durable consumer shared by "
        "every replica, decides each intent once and records it in the ledger; core mode "
        "subscribes in a queue group, at most once.",
    )
    run.add_argument(
        "--nats",
        required=True,
        metavar="URL[,URL...]",
        help="NATS server URL(s), comma-separated for a cluster",
    )
    run.add_argument(
        "--policies",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory of policy bundles (*.yaml)",
    )
    run.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="FILE",
        help="Ed25519 signing key (PEM), from 'bus-guard keys new'",
    )
    run.add_argument(
        "--mode",
        default="stream",
        choices=["core", "stream"],
        help="intake mode: stream = JetStream, decided once, ledger (default); "
        "core = queue subscription, at most once",
    )
    run.add_argument("--prefix", default="guard", help="subject prefix (default: guard)")
    run.add_argument("--queue", default="bus-guard", help="queue group (default: bus-guard)")
    run.add_argument(
        "--gateway-id", default=None, help="issuer id in artifacts (default: <hostname>-<pid>)"
    )
    run.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file")
    run.add_argument(
        "--artifact-ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="artifact lifetime (default: 60)",
    )
    run.add_argument(
        "--max-payload",
        type=int,
        default=65536,
        metavar="BYTES",
        help="largest intent accepted (default: 65536)",
    )
    run.add_argument(
        "--max-skew",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="oldest intent ts accepted (default: 300)",
    )
    run.add_argument(
        "--reconnect-wait",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait between reconnect attempts (default: 1)",
    )
    run.add_argument(
        "--max-reconnects",
        type=int,
        default=10,
        metavar="N",
        help="reconnect attempts before the gateway gives up and exits 1 "
        "(default: 10; the budget is N x --reconnect-wait)",
    )
    art = run.add_argument_group("artifacts")
    art.add_argument(
        "--artifacts",
        default="per-message",
        choices=["per-message", "batched"],
        help="per-message = one Ed25519 signature per artifact (default); batched = one "
        "signed Merkle tree head per batch, each artifact with its inclusion proof (faster; "
        "each message waits for its batch, artifacts are larger)",
    )
    art.add_argument(
        "--batch-max",
        type=int,
        default=256,
        metavar="N",
        help="batched: at most N artifacts per signed tree (default: 256)",
    )
    art.add_argument(
        "--batch-delay-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="batched, core mode: a batch is signed at the latest this long after its first "
        "intent; sooner when full or when no further intent is waiting (default: 2)",
    )
    st = run.add_argument_group("stream mode")
    st.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="redeliver an intent not acked within this (default: 30)",
    )
    st.add_argument(
        "--max-ack-pending",
        type=int,
        default=1024,
        metavar="N",
        help="intents in flight over all replicas (default: 1024)",
    )
    st.add_argument(
        "--batch",
        type=int,
        default=128,
        metavar="N",
        help="intents per pull and per ledger commit (default: 128)",
    )
    st.add_argument(
        "--max-deliveries",
        type=int,
        default=10,
        metavar="N",
        help="deny an intent still undecided after N deliveries (default: 10)",
    )
    st.add_argument(
        "--retry-horizon",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="outputs re-published relying on de-dup within this (default: 120)",
    )
    st.add_argument(
        "--dedup-window",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="de-dup window of the output and ledger streams created (default: 600)",
    )
    st.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="replicas of the streams created (default: 1; 3 on a cluster)",
    )
    st.add_argument(
        "--min-replicas",
        type=int,
        default=1,
        metavar="N",
        help="refuse to start on streams with fewer replicas (default: 1)",
    )
    st.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        metavar="N",
        help="signed ledger checkpoint every N records (default: 1000) ...",
    )
    st.add_argument(
        "--checkpoint-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="... or every so many seconds (default: 10)",
    )
    st.add_argument(
        "--max-lineage-depth",
        type=int,
        default=32,
        metavar="N",
        help="deny intents deeper in a chain of decisions (default: 32)",
    )

    demo = sub.add_parser("demo", help="run the live demo on an embedded nats-server")
    demo.add_argument("--count", type=int, default=300, help="intents to send (default: 300)")
    demo.add_argument(
        "--nats", default=None, metavar="URL", help="use this server instead of an embedded one"
    )
    demo.add_argument("--policies", type=Path, default=Path("policies"), metavar="DIR")
    demo.add_argument(
        "--rate",
        type=float,
        default=150.0,
        metavar="PER_S",
        help="intents per second the agents send (0 = as fast as possible)",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--mode", default="stream", choices=["core", "stream"], help="intake mode (default: stream)"
    )
    demo.add_argument(
        "--artifacts",
        default="per-message",
        choices=["per-message", "batched"],
        help="the gateway's artifacts (default: per-message; see `bus-guard run --help`)",
    )
    demo.add_argument("--quiet", action="store_true", help="only print the summary")

    watch = sub.add_parser("watch", help="live view of denials and holds")
    watch.add_argument("--nats", required=True, metavar="URL")
    watch.add_argument("--prefix", default="guard")
    watch.add_argument("--principal", default=None, help="only this principal")
    watch.add_argument(
        "--action", default=None, help="only this action (NATS wildcards allowed: payments.*)"
    )
    watch.add_argument("--reason", default=None, help="only this reason code")
    watch.add_argument("--count", type=int, default=None, help="exit after N records")
    watch.add_argument("--json", action="store_true", help="print raw JSON records")

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    new = keys.add_parser("new", help="write DIR/signing-key.pem (0600) and DIR/jwks.json")
    new.add_argument("--out", required=True, type=Path, metavar="DIR")
    new.add_argument("--force", action="store_true", help="overwrite an existing key")
    rotate = keys.add_parser(
        "rotate",
        help="new DIR/signing-key.pem; the old key verifies for --grace seconds more",
    )
    rotate.add_argument("--dir", required=True, type=Path, metavar="DIR")
    rotate.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long the old key still verifies (default: 3600)",
    )
    revoke = keys.add_parser("revoke", help="refuse a key id from now on (key compromise)")
    revoke.add_argument("--jwks", required=True, type=Path, metavar="FILE")
    revoke.add_argument("kid")

    pol = sub.add_parser("policy", help="check, test and explain policies").add_subparsers(
        dest="policy_command", required=True, metavar="ACTION"
    )
    check = pol.add_parser("check", help="validate and compile a policy directory")
    check.add_argument("path", type=Path)
    ptest = pol.add_parser("test", help="run YAML test cases (intent -> expected decision)")
    ptest.add_argument("path", type=Path, help="policy directory")
    ptest.add_argument(
        "--tests", type=Path, default=None, help="test file or directory (default: <path>/tests)"
    )
    explain = pol.add_parser("explain", help="show why an intent gets its decision")
    explain.add_argument("--policies", required=True, type=Path, metavar="DIR")
    explain.add_argument("--subject", required=True, help="e.g. guard.in.agent-7.payments.transfer")
    explain.add_argument("--payload", required=True, type=Path, metavar="FILE")
    explain.add_argument("--now", type=float, default=None, help="evaluation time (unix s)")
    schema = pol.add_parser("schema", help="print the JSON Schema of policy bundles")
    schema.add_argument("--out", type=Path, default=None, metavar="FILE")

    ledger = sub.add_parser("ledger", help="the decision ledger").add_subparsers(
        dest="ledger_command", required=True, metavar="ACTION"
    )
    lv = ledger.add_parser(
        "verify",
        help="check every gateway's chain and signed checkpoints; exit 1 naming the first "
        "bad record if anything was deleted, changed, reordered or cut off",
    )
    lv.add_argument("--nats", required=True, metavar="URL[,URL...]")
    lv.add_argument("--jwks", required=True, type=Path, metavar="FILE")
    lv.add_argument("--prefix", default="guard")
    lv.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file")
    lv.add_argument(
        "--require-sealed",
        action="store_true",
        help="every chain must end with a final checkpoint (all gateways stopped cleanly)",
    )
    lin = sub.add_parser("lineage", help="ancestors and descendants of a decision, as trees")
    lin.add_argument("decision_id")
    lin.add_argument("--nats", required=True, metavar="URL[,URL...]")
    lin.add_argument("--prefix", default="guard")
    lin.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file")

    ver = sub.add_parser("verify", help="verify an authorization artifact")
    ver.add_argument("--jwks", required=True, type=Path, metavar="FILE")
    ver.add_argument("--subject", required=True, help="the exec subject the message arrived on")
    ver.add_argument("--payload", required=True, type=Path, metavar="FILE")
    ver.add_argument("--artifact", required=True, help="the JWS, or @FILE")
    return p
