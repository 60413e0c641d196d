"""The command line: the only edge that reads argv, files, the environment and signals.

bus-guard run       the gateway
bus-guard demo      everything on one machine, live
bus-guard watch     live denials and holds
bus-guard keys      signing keys and the JWKS
bus-guard policy    check | test | explain | schema | push | sign | status | impact
bus-guard verify    check an artifact as an executor would
bus-guard ledger    verify the ledger's chains and checkpoints
bus-guard lineage   ancestors and descendants of a decision
bus-guard replay    decide a recorded decision again, under the set that made it
bus-guard approve   vote to release a held intent (reject: to deny it)
bus-guard holds     the open holds, with approvals so far
bus-guard limits    what rate limits and budgets have used, per key
bus-guard status    every running gateway, from the NATS micro service API
bus-guard maturity  where the deployment stands, observe -> enforce, from the ledger
bus-guard console   a live web console: rates, denials, holds with approve/reject

Exit codes: 0 success, 1 failure, 2 usage or configuration (one line naming the file,
field or rule), 130 interrupted, 141 the output pipe closed (quietly, like a tool killed by
SIGPIPE; the gateway's own sockets keep Python's SIGPIPE handling, so a broken connection
is an error to handle, not a dead process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import anyio
from pythonjsonlogger.json import JsonFormatter

from bus_guard.cli._arguments import (
    DEFAULT_LOG_LEVEL,
    DEMO_LOG_LEVEL,
    parser,
    run_settings,
)
from bus_guard.cli._output import PipeGuard
from bus_guard.cli._safe import safe, safe_json, safe_lines, safe_traceback, say
from bus_guard.errors import GuardError

__all__ = ("main",)

log = logging.getLogger("bus_guard")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141


class _TextFormatter(logging.Formatter):
    """Log lines with values escaped: the gateway logs subjects and ids agents chose."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return safe(super().formatMessage(record))

    def formatException(
        self, ei: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> str:
        if ei[1] is None:
            return super().formatException((None, None, None))
        return safe_traceback(ei[1])

    def formatStack(self, stack_info: str) -> str:
        return safe_lines(super().formatStack(stack_info))


class _JsonFormatter(JsonFormatter):
    """python-json-logger's formatter: ``ts``, ``level``, ``logger``, ``msg``, then every
    ``extra=`` field of the call (a decision's ``decision_id``, ``principal``, ``action``,
    ``reason`` ...) and the process's own (:class:`_Fields`: ``gateway``,
    ``policy_digest``) as JSON fields; escaped like every line the CLI prints."""

    def __init__(self) -> None:
        super().__init__(
            "%(created)s %(levelname)s %(name)s %(message)s",
            rename_fields={
                "created": "ts",
                "levelname": "level",
                "name": "logger",
                "message": "msg",
            },
            json_ensure_ascii=True,  # and safe_json below: DEL and the like too
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        log_data["ts"] = round(log_data["ts"], 6)
        log_data["level"] = log_data["level"].lower()
        if "exc_info" in log_data:
            log_data["exc"] = log_data.pop("exc_info")
        return log_data

    def format(self, record: logging.LogRecord) -> str:
        return safe_json(super().format(record))


class _Fields(logging.Filter):
    """Fields every log line of this process carries (``bus-guard run``: the gateway id and
    the policy digest), unless the call gave its own."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


_FIELDS = _Fields({})


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_FIELDS)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    pipe = PipeGuard(out or sys.stdout)
    try:
        args = parser().parse_args(argv)
        level = args.log_level or (DEMO_LOG_LEVEL if args.command == "demo" else DEFAULT_LOG_LEVEL)
        _setup_logging(level, args.log_format or "text")
        if hasattr(args, "context"):  # a command with the connection options
            from bus_guard.cli._connect import apply_context

            apply_context(args)
        code = int(_dispatch(args, pipe))
        pipe.flush()  # what is still buffered: a closed pipe shows here at the latest
        return EXIT_PIPE if pipe.broken else code
    except BrokenPipeError:
        pipe.broke()
    except GuardError as exc:
        say(sys.stderr, f"bus-guard: {exc}")
        return EXIT_USAGE if _is_config_error(exc) else EXIT_FAIL
    except OSError as exc:  # a file named on the command line (an output --out, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        say(sys.stderr, f"bus-guard: {where}{(exc.strerror or str(exc)).lower()}")
        return EXIT_USAGE if exc.filename else EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not _is_bus_error(exc):
            raise  # a bug: its traceback is the report
        say(sys.stderr, f"bus-guard: {_bus_error(exc)}")
        return EXIT_FAIL
    finally:
        pipe.flush_quietly()
    return EXIT_PIPE


def _is_bus_error(exc: Exception) -> bool:
    import nats.errors

    return isinstance(exc, nats.errors.Error | TimeoutError)


def _bus_error(exc: Exception) -> str:
    """One line for an error NATS gave a tool: what it means, not nats-py's frames."""
    import nats.errors
    import nats.js.errors

    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
        return "no JetStream on this server (start nats-server with -js, or check the account)"
    if isinstance(exc, nats.js.errors.NotFoundError):
        return f"not found on the server: {exc.description or exc}"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "the server did not answer in time"
    return f"NATS: {exc}"


def _is_config_error(exc: GuardError) -> bool:
    from bus_guard.errors import ConfigError, PolicyError

    return isinstance(exc, ConfigError | PolicyError)


def _dispatch(args: argparse.Namespace, pipe: PipeGuard) -> int:
    out = pipe.stream
    match args.command:
        case "run":
            return _cmd_run(args)
        case "demo":
            from rich.console import Console

            from bus_guard.cli._connect import NatsOptions
            from bus_guard.cli._demo import run_demo

            options = NatsOptions.from_args(args) if args.nats is not None else None
            console = Console(file=out, highlight=False)
            return anyio.run(
                pipe.until_broken,
                lambda: run_demo(
                    count=args.count,
                    nats_url=args.nats,
                    options=options,
                    policies_dir=args.policies,
                    rate_per_s=args.rate,
                    seed=args.seed,
                    quiet=args.quiet,
                    mode=args.mode,
                    artifacts=args.artifacts,
                    console=console,
                ),
            )
        case "watch":
            from rich.console import Console

            from bus_guard.cli._connect import NatsOptions
            from bus_guard.cli._watch import WatchFilter, watch

            filters = WatchFilter(args.principal, args.action, args.reason)
            console = Console(file=out, highlight=False)
            return anyio.run(
                pipe.until_broken,
                lambda: watch(
                    NatsOptions.from_args(args),
                    prefix=args.prefix,
                    filters=filters,
                    count=args.count,
                    as_json=args.json,
                    since_s=args.since,
                    console=console,
                ),
            )
        case "maturity":
            from bus_guard.cli._maturity import cmd_maturity

            return anyio.run(cmd_maturity, args, out)
        case "status":
            from bus_guard.cli._status import cmd_status

            return anyio.run(cmd_status, args, out)
        case "keys":
            return _cmd_keys(args, out)
        case "ledger" | "lineage":
            return anyio.run(_cmd_ledger, args, out)
        case "replay":
            from bus_guard.cli._replay import cmd_replay

            return anyio.run(cmd_replay, args, out)
        case "witness":
            from bus_guard.cli._witness import cmd_witness

            return anyio.run(cmd_witness, args, out)
        case "approve" | "reject":
            from bus_guard.cli._approve import cmd_vote

            return anyio.run(cmd_vote, args, out)
        case "holds":
            from bus_guard.cli._approve import cmd_holds

            return anyio.run(cmd_holds, args, out)
        case "console":
            from bus_guard.cli._console import cmd_console

            return anyio.run(cmd_console, args, out)
        case "limits":
            from bus_guard.cli._limits import cmd_limits

            return anyio.run(cmd_limits, args, out)
        case "policy":
            return _cmd_policy(args, out)
        case "verify":
            from bus_guard.cli._verify import main_verify

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

    from bus_guard.cli._connect import NatsOptions, connect
    from bus_guard.errors import GatewayError
    from bus_guard.subjects import Subjects

    stream = Subjects(args.prefix).streams.ledger
    jwks = None
    if args.command == "ledger":
        from bus_guard.verify import load_jwks

        jwks = load_jwks(args.jwks)
    nc = await connect(NatsOptions.from_args(args), name=f"bus-guard {args.command}")
    try:
        if jwks is not None:
            from bus_guard.cli._ledger import audit_stream

            witness = None
            if args.witness is not None:
                from bus_guard.errors import ConfigError
                from bus_guard.ledger._witness import load_witnessed

                if args.witness_jwks is None:
                    raise ConfigError("--witness needs --witness-jwks (the witness's jwks.json)")
                witness = load_witnessed(args.witness, load_jwks(args.witness_jwks))
            return await audit_stream(
                nc,
                stream,
                prefix=args.prefix,
                jwks=jwks,
                require_sealed=args.require_sealed,
                out=out,
                witnessed=witness,
            )
        from bus_guard.cli._ledger import show

        return await show(nc, stream, args.prefix, args.decision_id, out=out)
    except nats.js.errors.NotFoundError:
        raise GatewayError(f"no ledger stream {stream} on {args.nats}") from None
    finally:
        await nc.close()


def _cmd_keys(args: argparse.Namespace, out: TextIO) -> int:
    from bus_guard.signing import _keys as keys

    match args.keys_command:
        case "new":
            key, jwks = keys.generate_key(args.out, overwrite=args.force)
            say(out, f"wrote {key} (private, mode 0600) and {jwks}")
        case "rotate":
            r = keys.rotate_key(args.dir, grace_s=args.grace)
            say(
                out,
                f"new key {r.new_kid} in {r.key_path}; old key {r.retired_kid} verifies until "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(r.not_after))} "
                f"(running gateways sign with the new key within a second, after publishing "
                f"{r.jwks_path} to the JWKS bucket; verifiers on other copies of it need the "
                "new file)",
            )
        case "revoke":
            keys.revoke_key(args.jwks, args.kid)
            say(out, f"revoked {args.kid} in {args.jwks}")
    return EXIT_OK


def _cmd_policy(args: argparse.Namespace, out: TextIO) -> int:
    from bus_guard.cli import _policy as policytest
    from bus_guard.policy._load import load_policies, policy_json_schema

    match args.policy_command:
        case "check":
            return policytest.check_policies(args.path, out=out, exit_invalid=EXIT_USAGE)
        case "test":
            return policytest.run_policy_tests(
                args.path, args.tests, out=out, exit_invalid=EXIT_USAGE
            )
        case "explain":
            policies = load_policies(args.policies)
            payload = _read_file(args.payload)
            now = time.time() if args.now is None else args.now
            lineage = None
            if args.lineage is not None:
                text = _read_file(args.lineage).decode("utf-8", "replace")
                lineage = policytest.read_lineage(args.lineage, text)
            state = None
            if args.nats is not None:  # what each limit has used now, from the bucket
                from bus_guard.cli._limits import limit_state

                pairs = policytest.limits_of(
                    policies, args.subject, payload, now=now, lineage=lineage
                )
                state = anyio.run(limit_state, args.nats, args.creds, args.prefix, pairs)
            return policytest.explain(
                policies,
                args.subject,
                payload,
                now=now,
                out=out,
                lineage=lineage,
                limit_state=state,
            )
        case "init":
            import shutil

            from bus_guard.cli._arguments import EXAMPLE_POLICIES
            from bus_guard.errors import ConfigError

            if args.dir.exists():
                raise ConfigError(f"{args.dir}: exists; policy init writes a new directory")
            shutil.copytree(EXAMPLE_POLICIES, args.dir)
            say(out, f"wrote the example policies to {args.dir} (bundles, tests/, approvers/)")
            return EXIT_OK
        case "impact":
            from bus_guard.cli._replay import cmd_impact

            return anyio.run(cmd_impact, args, out)
        case "push" | "sign" | "status":
            from bus_guard.cli import _push

            commands = {"push": _push.cmd_push, "sign": _push.cmd_sign, "status": _push.cmd_status}
            return anyio.run(commands[args.policy_command], args, out)
        case "schema":
            text = json.dumps(policy_json_schema(), indent=2)
            if args.out is None:
                print(text, file=out)
            else:
                args.out.write_text(text + "\n")
            return EXIT_OK
    raise AssertionError(args.policy_command)


def _read_file(path: Path) -> bytes:
    from bus_guard.errors import ConfigError

    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc


def _cmd_run(args: argparse.Namespace) -> int:
    from bus_guard.cli._push import policy_source_settings
    from bus_guard.ledger._records import CheckpointSigner
    from bus_guard.signing._keys import load_private_key
    from bus_guard.signing._signer import Signer

    settings = run_settings(args)
    http = None
    if args.http is not None:
        from bus_guard.ops import parse_listen

        http = parse_listen(args.http)
    source = policy_source_settings(args)
    key = load_private_key(args.key)
    _FIELDS.fields.update(gateway=settings.gateway_id)
    signer = Signer(key, issuer=settings.gateway_id, ttl_s=settings.artifact_ttl_s)
    ledger_signer = CheckpointSigner(key)
    trusted = _trusted_keys(args.jwks, args.key)
    files = (args.key, _jwks_file(args.jwks, args.key))
    return anyio.run(_serve, settings, source, signer, ledger_signer, trusted, files, http)


async def _serve_until_stopped(
    settings: Any,
    source: Any,
    signer: Any,
    ledger_signer: Any,
    trusted: Any,
    key_path: Path,
    jwks_path: Path | None,
    signals: Any,
    hangups: Any,
    stopped_by: list[str],
    http: tuple[str, int] | None = None,
) -> Any:
    """The gateway with its policies, keys and canaries, until a signal (recorded in
    *stopped_by*) or the bus is lost; the gateway."""
    from bus_guard.intake._archive import archiving
    from bus_guard.intake._control import control_connection, open_keys
    from bus_guard.intake._gateway import Gateway
    from bus_guard.intake._policy_source import open_policies

    # Every connection before the gateway starts: a bus that is not there is a refusal to
    # start, never a crash of a running gateway.
    async with contextlib.AsyncExitStack() as stack:
        keeper = await stack.enter_async_context(open_policies(settings, source))
        # From here on every log line names the active set (a reload renames it).
        _FIELDS.fields.update(policy_digest=keeper.active.policies.digest)
        keeper.ordinary.on_activation(
            lambda active: _FIELDS.fields.update(policy_digest=active.policies.digest)
        )
        keys = await stack.enter_async_context(
            open_keys(
                settings,
                key_path=key_path,
                jwks_path=jwks_path,
                signer=signer,
                ledger_signer=ledger_signer,
            )
        )
        canary_nc = await stack.enter_async_context(control_connection(settings, purpose="canary"))
        # Every set activated is archived by its digest, for `bus-guard replay`.
        archive_nc = await stack.enter_async_context(
            control_connection(settings, purpose="policy archive")
        )
        policies = keeper.active.policies
        log.info(
            "policies %s (%s), %d rules, mode %s; artifacts %s",
            policies.version,
            policies.digest,
            policies.rule_count,
            policies.mode,
            settings.artifacts,
        )
        gateway = Gateway(
            settings, keeper.current, signer, ledger_signer=ledger_signer, trusted_keys=trusted
        )
        keys.on_trust = gateway.trust_keys
        ops: Any = contextlib.nullcontext()
        if http is not None:  # listening first: /healthz answers, /readyz says why not yet
            from bus_guard.ops import OpsServer

            ops = OpsServer(gateway, *http, policy_max_age_s=source.max_age_s)
        async with (
            ops,
            gateway,
            keeper.running(gateway.swap_policies),
            archiving(archive_nc, settings, keeper),
            keys.running(),
            await _canaries(canary_nc, settings, source, gateway, signer, keeper),
            anyio.create_task_group() as tg,
        ):

            async def on_hangup() -> None:  # reload the policies (and keys) now
                async for _ in hangups:
                    log.info("SIGHUP: reloading the policies and the keys")
                    keeper.request_reload()
                    keys.request_reload()

            tg.start_soon(on_hangup)
            stop = anyio.Event()

            async def on_signals() -> None:
                async for signum in signals:
                    stopped_by.append(signal.Signals(signum).name)
                    stop.set()
                    return

            tg.start_soon(on_signals)

            async def on_lost() -> None:
                await gateway.closed.wait()
                stop.set()

            tg.start_soon(on_lost)
            await stop.wait()
            tg.cancel_scope.cancel()
    return gateway


async def _canaries(
    nc: Any, settings: Any, source: Any, gateway: Any, signer: Any, keeper: Any
) -> Any:
    """The canaries on a schedule (``--canary-interval``; 0: none)."""
    from contextlib import nullcontext

    from bus_guard.intake._canary import canary_on

    if not source.canary_interval_s:
        return nullcontext()
    canary = await canary_on(
        nc,
        settings,
        gateway,
        signer,
        lambda: keeper.canaries,
        interval_s=source.canary_interval_s,
    )
    return canary.running()


def _jwks_file(jwks: Path | None, key: Path) -> Path | None:
    """The JWKS file the gateway keeps published: ``--jwks``, else ``jwks.json`` next to
    the key (if there is one)."""
    from bus_guard.signing._keys import JWKS_FILENAME

    if jwks is not None:
        return jwks
    beside = key.parent / JWKS_FILENAME
    return beside if beside.exists() else None


def _trusted_keys(jwks: Path | None, key: Path) -> Any:
    """The JWKS parents are verified with: ``--jwks``, else ``jwks.json`` next to the key
    if there is one, else ``None`` (the signing key alone)."""
    from bus_guard.signing._keys import JWKS_FILENAME
    from bus_guard.verify import load_jwks

    if jwks is None:
        jwks = key.parent / JWKS_FILENAME
        if not jwks.exists():
            log.info("no %s: parents verify with the signing key alone", jwks)
            return None
    return load_jwks(jwks)


async def _serve(
    settings: Any,
    source: Any,
    signer: Any,
    ledger_signer: Any,
    trusted: Any,
    files: Any,
    http: tuple[str, int] | None = None,
) -> int:
    stopped_by: list[str] = []
    key_path, jwks_path = files
    # The handlers first: a signal that arrives while the gateway starts is kept, and stops
    # it once started (it drains).
    with (
        anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        anyio.open_signal_receiver(signal.SIGHUP) as hangups,
    ):
        gateway = await _serve_until_stopped(
            settings,
            source,
            signer,
            ledger_signer,
            trusted,
            key_path,
            jwks_path,
            signals,
            hangups,
            stopped_by,
            http,
        )
    if not stopped_by:
        if gateway.failure is not None:
            log.error("intake failed (%s); exiting", gateway.failure)
        else:
            log.error("lost the NATS connection beyond the reconnect budget; exiting")
        return EXIT_FAIL
    log.info("stopped by %s after draining", stopped_by[0])
    return EXIT_OK
