"""The command line: the only edge that reads argv, files, the environment and signals.

bus-guard run       the gateway
bus-guard demo      everything on one machine, live
bus-guard watch     live denials and holds
bus-guard keys      signing keys and the JWKS
bus-guard policy    check | test | explain | schema
bus-guard verify    check an artifact as an executor would
bus-guard ledger    verify the ledger's chains and checkpoints
bus-guard lineage   ancestors and descendants of a decision
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

from . import __version__
from .authorize import Checks
from .errors import GuardError

__all__ = ("main",)

log = logging.getLogger("bus_guard")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bus-guard",
        description="Pre-execution authorization gateway for agents on NATS. Agents publish "
        "intents to <prefix>.in.<principal>.<action>; approved ones are forwarded to "
        "<prefix>.exec.… with a signed artifact, others go to <prefix>.deny.… / .hold.….",
    )
    p.add_argument("--version", action="version", version=f"bus-guard {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        return int(_dispatch(args, out))
    except GuardError as exc:
        print(f"bus-guard: {exc}", file=sys.stderr)
        return EXIT_USAGE if _is_config_error(exc) else EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def _is_config_error(exc: GuardError) -> bool:
    from .errors import ConfigError, PolicyError

    return isinstance(exc, ConfigError | PolicyError)


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    match args.command:
        case "run":
            return _cmd_run(args)
        case "demo":
            from .demo import run_demo

            return anyio.run(
                lambda: run_demo(
                    count=args.count,
                    nats_url=args.nats,
                    policies_dir=args.policies,
                    rate_per_s=args.rate,
                    seed=args.seed,
                    quiet=args.quiet,
                    mode=args.mode,
                )
            )
        case "watch":
            from .watch import WatchFilter, watch

            filters = WatchFilter(args.principal, args.action, args.reason)
            return anyio.run(
                lambda: watch(
                    args.nats,
                    prefix=args.prefix,
                    filters=filters,
                    count=args.count,
                    as_json=args.json,
                )
            )
        case "keys":
            return _cmd_keys(args, out)
        case "ledger" | "lineage":
            return anyio.run(_cmd_ledger, args, out)
        case "policy":
            return _cmd_policy(args, out)
        case "verify":
            from .verify import main_verify

            return main_verify(
                jwks=args.jwks,
                subject=args.subject,
                payload=args.payload,
                artifact=args.artifact,
                out=out,
            )
    raise AssertionError(args.command)  # argparse only lets the commands above through


async def _cmd_ledger(args: argparse.Namespace, out: TextIO) -> int:
    import nats

    from .errors import GatewayError
    from .preflight import Streams

    stream = Streams(args.prefix).ledger
    jwks = None
    if args.command == "ledger":
        from .verify import load_jwks

        jwks = load_jwks(args.jwks)
    try:
        nc = await nats.connect(
            [u.strip() for u in args.nats.split(",") if u.strip()],
            user_credentials=args.creds,
            connect_timeout=2,
            max_reconnect_attempts=3,
        )
    except Exception as exc:
        raise GatewayError(f"cannot connect to {args.nats}: {exc}") from exc
    try:
        js = nc.jetstream()
        if jwks is not None:
            from .audit import audit_stream

            return await audit_stream(
                js,
                stream,
                prefix=args.prefix,
                jwks=jwks,
                require_sealed=args.require_sealed,
                out=out,
            )
        from .lineage import show

        return await show(js, stream, args.prefix, args.decision_id, out=out)
    except nats.js.errors.NotFoundError:
        raise GatewayError(f"no ledger stream {stream} on {args.nats}") from None
    finally:
        await nc.close()


def _cmd_keys(args: argparse.Namespace, out: TextIO) -> int:
    from . import keys

    match args.keys_command:
        case "new":
            key, jwks = keys.generate_key(args.out, overwrite=args.force)
            print(f"wrote {key} (private, mode 0600) and {jwks}", file=out)
        case "rotate":
            r = keys.rotate_key(args.dir, grace_s=args.grace)
            print(
                f"new key {r.new_kid} in {r.key_path}; old key {r.retired_kid} verifies until "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(r.not_after))} "
                f"(restart or reload gateways, publish {r.jwks_path} to verifiers first)",
                file=out,
            )
        case "revoke":
            keys.revoke_key(args.jwks, args.kid)
            print(f"revoked {args.kid} in {args.jwks}", file=out)
    return EXIT_OK


def _cmd_policy(args: argparse.Namespace, out: TextIO) -> int:
    from . import policytest
    from .policy import load_policies, policy_json_schema

    match args.policy_command:
        case "check":
            return policytest.check_policies(args.path, out=out)
        case "test":
            return policytest.run_policy_tests(args.path, args.tests, out=out)
        case "explain":
            policies = load_policies(args.policies)
            payload = _read_file(args.payload)
            now = time.time() if args.now is None else args.now
            return policytest.explain(policies, args.subject, payload, now=now, out=out)
        case "schema":
            text = json.dumps(policy_json_schema(), indent=2)
            if args.out is None:
                print(text, file=out)
            else:
                args.out.write_text(text + "\n")
            return EXIT_OK
    raise AssertionError(args.policy_command)


def _read_file(path: Path) -> bytes:
    from .errors import ConfigError

    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc


def _cmd_run(args: argparse.Namespace) -> int:
    from .artifacts import Signer
    from .keys import load_private_key
    from .ledger import CheckpointSigner
    from .policy import load_policies
    from .settings import Settings, StreamSettings

    settings_kw: dict[str, Any] = {}
    if args.gateway_id:
        settings_kw["gateway_id"] = args.gateway_id
    settings = Settings(
        nats_url=args.nats,
        prefix=args.prefix,
        queue=args.queue,
        mode=args.mode,
        creds_file=args.creds,
        artifact_ttl_s=args.artifact_ttl,
        max_payload_bytes=args.max_payload,
        checks=Checks(max_past_skew_s=args.max_skew),
        reconnect_wait_s=args.reconnect_wait,
        max_reconnect_attempts=args.max_reconnects,
        stream=StreamSettings(
            ack_wait_s=args.ack_wait,
            max_ack_pending=args.max_ack_pending,
            fetch_batch=args.batch,
            max_deliveries=args.max_deliveries,
            retry_horizon_s=args.retry_horizon,
            duplicate_window_s=args.dedup_window,
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            checkpoint_every=args.checkpoint_every,
            checkpoint_interval_s=args.checkpoint_interval,
            max_lineage_depth=args.max_lineage_depth,
        ),
        **settings_kw,
    )
    policies = load_policies(args.policies)
    key = load_private_key(args.key)
    signer = Signer(key, issuer=settings.gateway_id, ttl_s=settings.artifact_ttl_s)
    ledger_signer = CheckpointSigner(key)
    log.info(
        "policies %s (%s), %d rules, mode %s",
        policies.version,
        policies.digest,
        policies.rule_count,
        policies.mode,
    )
    return anyio.run(_serve, settings, policies, signer, ledger_signer)


async def _serve(settings: Any, policies: Any, signer: Any, ledger_signer: Any) -> int:
    from .gateway import Gateway

    stop = anyio.Event()
    stopped_by: list[str] = []

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                stopped_by.append(signal.Signals(signum).name)
                stop.set()
                return

    gateway = Gateway(settings, policies, signer, ledger_signer=ledger_signer)
    async with gateway, anyio.create_task_group() as tg:
        tg.start_soon(on_signals)

        async def on_lost() -> None:
            await gateway.closed.wait()
            stop.set()

        tg.start_soon(on_lost)
        await stop.wait()
        tg.cancel_scope.cancel()
    if not stopped_by:
        if gateway.failure is not None:
            log.error("stream intake failed (%s); exiting", gateway.failure)
        else:
            log.error("lost the NATS connection beyond the reconnect budget; exiting")
        return EXIT_FAIL
    log.info("stopped by %s after draining", stopped_by[0])
    return EXIT_OK
