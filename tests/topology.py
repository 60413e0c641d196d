"""Run the shipped compose/ NATS configs as local processes on loopback, for the tests.

The files in compose/ are written for containers: fixed ports (4222 clients, 6222 routes,
8222 monitoring), ``store_dir: /data/jetstream``, routes to the hosts ``nats-1..3``. To run
*the same* configuration here, :func:`render_config` copies a shipped file into a temporary
tree that mirrors compose/ and changes only what is host-specific:

- ``store_dir`` becomes a temporary directory. (It cannot be overridden from the command line:
  nats-server 2.15 rejects ``--store_dir`` together with a ``store_dir`` in the file as a
  "Duplicate 'store_dir' configuration".)
- ``http`` (monitoring) becomes ``127.0.0.1:-1`` (a random port).
- the cluster ``listen`` port and each route URL ``nats://user:pass@nats-N:6222`` become
  loopback ports reserved up front with :func:`reserve_port`. (JetStream clustering refuses to
  start without configured routes, so the nodes cannot learn their peers' random ports one
  after another; all three are chosen first.)
- ``include``d files (``auth.conf``) are symlinked, not copied: the users, accounts and
  permissions under test are byte-for-byte the shipped ones.

The client port needs no rendering: :class:`bus_guard.server.NatsServer` passes
``--port -1 --addr 127.0.0.1``, which override the file's ``port``.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bus_guard.server import NatsServer

__all__ = (
    "AUTH_CONF",
    "CLUSTER_CONFIGS",
    "COMPOSE",
    "SINGLE_CONFIG",
    "LocalCluster",
    "credentials",
    "local_cluster",
    "local_server",
    "render_config",
    "reserve_port",
)

COMPOSE: Final = Path(__file__).resolve().parent.parent / "compose"
SINGLE_CONFIG: Final = COMPOSE / "nats-server.conf"
AUTH_CONF: Final = COMPOSE / "auth.conf"
CLUSTER_CONFIGS: Final = tuple(COMPOSE / "cluster" / f"nats-{i}.conf" for i in (1, 2, 3))

_LOOPBACK_RANDOM: Final = '"127.0.0.1:-1"'
_INCLUDE_RE: Final = re.compile(r'^\s*include\s+"?([^"\s]+)"?\s*$', re.MULTILINE)
_STORE_DIR_RE: Final = re.compile(r"^(\s*store_dir\s*[:=]\s*).*$", re.MULTILINE)
_HTTP_RE: Final = re.compile(r"^(\s*http\s*[:=]\s*).*$", re.MULTILINE)
_LISTEN_RE: Final = re.compile(r"^(\s*listen\s*[:=]\s*).*$", re.MULTILINE)
_ROUTE_LINE_RE: Final = re.compile(
    r"^(?P<indent>\s*)nats://(?P<creds>[^@\s]+@)?(?P<host>[\w.-]+):(?P<port>\d+)\s*,?\s*\n",
    re.MULTILINE,
)
_CLUSTER_RE: Final = re.compile(r"^\s*cluster\s*[:=]?\s*\{", re.MULTILINE)
_USER_RE: Final = re.compile(r'user:\s*"?([\w-]+)"?\s*,\s*password:\s*"([^"]+)"')


def credentials(path: Path = AUTH_CONF) -> dict[str, str]:
    """The demo ``user -> password`` pairs of a shipped auth file (one source of truth)."""
    found = dict(_USER_RE.findall(path.read_text()))
    if not found:
        raise ValueError(f"no users found in {path}")
    return found


def _sub_exactly_once(pattern: re.Pattern[str], repl: str, text: str, what: str) -> str:
    new, n = pattern.subn(lambda m: m.group(1) + repl, text)
    if n != 1:
        raise ValueError(f"expected exactly one {what} line, found {n}")
    return new


def render_config(
    src: Path,
    dest_root: Path,
    *,
    store_dir: Path,
    route_ports: Mapping[str, int] | None = None,
) -> Path:
    """Write a loopback copy of the shipped config ``src`` under ``dest_root``; return its path.

    ``route_ports`` maps each cluster node's host name (``nats-1``) to its local route port;
    required for cluster configs (the node's own entry is its listen port).
    """
    src = src.resolve()
    dest = dest_root / src.relative_to(COMPOSE)
    text = src.read_text()
    text = _sub_exactly_once(_STORE_DIR_RE, json.dumps(str(store_dir)), text, "store_dir")
    text = _sub_exactly_once(_HTTP_RE, _LOOPBACK_RANDOM, text, "http")

    if _CLUSTER_RE.search(text):
        ports = route_ports or {}
        own = ports.get(src.stem)
        if own is None:
            raise ValueError(f"no route port given for {src.stem}")
        text = _sub_exactly_once(_LISTEN_RE, f'"127.0.0.1:{own}"', text, "cluster listen")

        def route(m: re.Match[str]) -> str:
            port = ports.get(m["host"])
            if port is None:
                raise ValueError(f"no route port given for {m['host']}")
            return f"{m['indent']}nats://{m['creds'] or ''}127.0.0.1:{port}\n"

        text, n = _ROUTE_LINE_RE.subn(route, text)
        if n != len(ports):
            raise ValueError(f"{src.name}: {n} routes, expected one per node ({len(ports)})")

    for include in _INCLUDE_RE.findall(text):
        target = (src.parent / include).resolve()
        link = dest_root / target.relative_to(COMPOSE)  # ValueError if it leaves compose/
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


def reserve_port(host: str = "127.0.0.1") -> int:
    """A free TCP port that stays free for a while (the ephemeral-port-reserve technique).

    The port is left in TIME_WAIT: the kernel will not hand it out for ``bind(port 0)`` for
    about a minute, while nats-server, which binds with SO_REUSEADDR, can take it at once.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        port: int = listener.getsockname()[1]
        with socket.create_connection((host, port)):
            accepted, _ = listener.accept()
            accepted.close()  # server side closes first: it is the side left in TIME_WAIT
    return port


@contextmanager
def local_server(tmp: Path, config: Path = SINGLE_CONFIG) -> Iterator[NatsServer]:
    """The shipped single-node config as a local process (loopback, random ports)."""
    rendered = render_config(config, tmp / "conf", store_dir=tmp / "jetstream")
    # jetstream=False: the file enables JetStream itself; NatsServer's --store_dir would clash
    with NatsServer(config=rendered, jetstream=False) as server:
        yield server


@dataclass(frozen=True, slots=True)
class LocalCluster:
    """The three nodes (in order nats-1..3) and their loopback route ports by host name."""

    servers: list[NatsServer]
    route_ports: dict[str, int]


@contextmanager
def local_cluster(tmp: Path) -> Iterator[LocalCluster]:
    """The three shipped cluster configs as local processes."""
    route_ports = {config.stem: reserve_port() for config in CLUSTER_CONFIGS}
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                NatsServer(
                    config=render_config(
                        config,
                        tmp / "conf" / config.stem,
                        store_dir=tmp / config.stem / "jetstream",
                        route_ports=route_ports,
                    ),
                    jetstream=False,
                )
            )
            for config in CLUSTER_CONFIGS
        ]
        yield LocalCluster(servers, route_ports)
