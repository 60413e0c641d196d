"""``bus-guard console``: the operator's web console (:mod:`bus_guard.cli.console`), run until
Ctrl-C or SIGTERM (0) or until the NATS connection is lost (1)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Final, TextIO

import anyio

from bus_guard.cli._connect import NatsOptions
from bus_guard.cli._safe import safe, say
from bus_guard.errors import ConfigError

__all__ = ("CONSOLE_EPILOG", "add_console_command", "cmd_console")

DEFAULT_LISTEN: Final = "127.0.0.1:8470"

CONSOLE_EPILOG: Final = """\
examples:
  bus-guard console                                  # $NATS_URL, http://127.0.0.1:8470/?token=...
  bus-guard console --nats nats://127.0.0.1:4222 --approver-key approvers/alice.pem
  bus-guard console --context ops --listen 127.0.0.1:0     # any free port
  bus-guard console --listen 10.0.0.5:8470 --allow-remote  # other hosts: read the warning

It prints one URL with a random access token (as Jupyter does): open it in a browser on
this machine. Every request needs the token (the page keeps it in a SameSite=Strict
cookie), else 401. Approve and Reject sign in this process with --approver-key, as
`bus-guard approve` does; the key never leaves it. README, "The operator console".

exit codes:
  0  stopped (Ctrl-C, SIGTERM)
  1  NATS unreachable, or the connection was lost
  2  usage or configuration: a non-loopback --listen without --allow-remote, an address
     that cannot be bound, an unreadable key or credentials, the console extra missing
"""


def add_console_command(sub: argparse._SubParsersAction[Any]) -> None:
    """The ``console`` subcommand (its connection options are added by the caller)."""
    from bus_guard.cli._arguments import _prefix_option, _seconds, duration, nats_options

    con = sub.add_parser(
        "console",
        help="a live web console on this machine: rates, denials, holds with approve/reject",
        description="A local web page, live: decision rates by effect and reason, the feed of\n"
        "denials and holds, the open holds with Approve and Reject (with --approver-key),\n"
        "every gateway's identity and health, and a decision's lineage.",
        epilog=CONSOLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nats_options(con)
    _prefix_option(con)
    con.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve the page (default: {DEFAULT_LISTEN}; port 0: any free port)",
    )
    con.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --listen address other than loopback (plain HTTP: anyone on the path "
        "sees the token)",
    )
    con.add_argument(
        "--approver-key",
        default=None,
        metavar="FILE",
        help="the approver's Ed25519 key (PEM): Approve and Reject buttons (default: none, "
        "read-only)",
    )
    con.add_argument(
        "--approver",
        default=None,
        metavar="ID",
        help="the approver claim of the votes (default: the key's kid, as `bus-guard approve`)",
    )
    con.add_argument(
        "--interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="ask the gateways for their stats this often: one chart bar each (default: 2)",
    )
    con.add_argument(
        "--since",
        type=duration,
        default=None,
        metavar="DURATION",
        help="first fill the feed with the denials and holds stored this far back: 15m, 1h "
        "(the deny and hold streams, as `watch --since`; default: live only)",
    )
    con.add_argument(
        "--window",
        type=duration,
        default=duration("10m"),
        metavar="DURATION",
        help="the chart's span: 5m, 30m, 1h (default: 10m)",
    )


async def cmd_console(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from bus_guard.cli.console import Console, ConsoleSettings, parse_listen
    except ImportError as exc:  # aiohttp: the console extra
        raise ConfigError(
            f"bus-guard console needs the console extra (pip install 'bus-guard[console]'): {exc}"
        ) from None
    from bus_guard.signing._keys import load_private_key

    listen = parse_listen(args.listen)
    if not listen.loopback and args.allow_remote:  # without the flag, Console refuses it
        say(
            sys.stderr,
            f"bus-guard: WARNING: serving the console on {args.listen}, not loopback: plain "
            "HTTP, anyone who can reach it and read the token can see the bus and vote with "
            "your key",
        )
    if args.interval <= 0:
        raise ConfigError("--interval must be more than 0 seconds")
    key = load_private_key(args.approver_key) if args.approver_key else None
    settings = ConsoleSettings(
        prefix=args.prefix,
        interval_s=args.interval,
        stats_wait_s=min(0.5, args.interval / 2),
        window_s=args.window,
        since_s=args.since,
    )
    console = Console(
        NatsOptions.from_args(args),
        listen,
        settings,
        allow_remote=args.allow_remote,
        key=key,
        approver=args.approver,
    )
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with console, anyio.create_task_group() as tg:
            print(f"bus_guard console: {safe(console.url)}", file=out, flush=True)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

            async def stop_when_lost() -> None:
                await console.lost.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_on_signal)
            tg.start_soon(stop_when_lost)
    if console.lost.is_set():
        say(sys.stderr, f"bus-guard: lost the connection to NATS ({args.nats})")
        return 1
    return 0
