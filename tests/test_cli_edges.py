"""What a new user ran into (issue 14), each through the real entry point: a subprocess
wherever pipes, the environment, the working directory or time bounds matter."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import nats
import pytest
from rich.console import Console

from bus_guard.cli._arguments import parser
from bus_guard.cli._watch import watch
from bus_guard.intake._gateway import Gateway
from bus_guard.policy._load import load_policies
from bus_guard.server import NatsServer
from bus_guard.settings import Settings
from bus_guard.signing._keys import generate_key
from bus_guard.signing._signer import Signer

from .conftest import POLICIES, ROOT
from .helpers import Collector, intent, make_signer
from .streamkit import eventually

_CMD = [sys.executable, "-m", "bus_guard"]
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DENY|HOLD) ")


def _cli(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_CMD, *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout_s,
    )


def _one_line_error(run: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert run.returncode == code, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


# -- packaged examples -------------------------------------------------------------------


def test_demo_works_from_another_directory(tmp_path: Path) -> None:
    """The example policies ship in the package: no policies/ in the working directory."""
    run = _cli("demo", "--count", "20", "--rate", "0", "--quiet", cwd=tmp_path, timeout_s=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS" in run.stdout
    assert not (tmp_path / "policies").exists()


def test_the_packaged_examples_are_the_repositorys_policies() -> None:
    from bus_guard.cli._arguments import EXAMPLE_POLICIES

    assert load_policies(EXAMPLE_POLICIES).digest == load_policies(POLICIES).digest
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pattern in ("examples/policies/*.yaml", "examples/policies/approvers/*.json"):
        assert pattern in pyproject  # shipped in the wheel, not only in a checkout


# -- broken pipes ------------------------------------------------------------------------


def _with_closed_stdout(*argv: str, timeout_s: float = 60) -> tuple[int, str, float]:
    """Run with stdout a pipe whose reader is already gone: the first write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    started = time.monotonic()
    try:
        run = subprocess.run(
            [*_CMD, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=timeout_s
        )
    finally:
        os.close(write_end)
    return run.returncode, run.stderr, time.monotonic() - started


def test_a_closed_pipe_ends_a_command_quietly() -> None:
    code, stderr, _ = _with_closed_stdout("policy", "schema")
    assert (code, stderr) == (141, "")


def test_a_closed_pipe_ends_the_demo_quietly_and_soon() -> None:
    code, stderr, took_s = _with_closed_stdout("demo", "--count", "300")
    assert code == 141
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert took_s < 30  # the demo's own run at its default rate is 2 s plus start-up


# -- unreachable servers, usage and configuration errors ---------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("watch",),
        ("demo", "--count", "5"),
        ("status",),
        ("holds",),
        ("ledger", "verify", "--jwks", "JWKS"),
        ("lineage", "01JD2Q5X3M7N8P9R0S1T2V3W4X"),
    ],
)
def test_an_unreachable_server_is_one_line_and_exit_1_within_a_bound(
    argv: tuple[str, ...], closed_port: int, keys: tuple[Path, Path]
) -> None:
    argv = tuple(str(keys[1]) if a == "JWKS" else a for a in argv)
    started = time.monotonic()
    run = _cli(*argv, "--nats", f"nats://127.0.0.1:{closed_port}", timeout_s=30)
    _one_line_error(run, 1, "cannot connect to", str(closed_port))
    assert time.monotonic() - started < 20


def test_no_jetstream_under_ledger_verify_is_one_line(keys: tuple[Path, Path]) -> None:
    with NatsServer(jetstream=False) as server:
        run = _cli("ledger", "verify", "--nats", server.url, "--jwks", str(keys[1]))
    _one_line_error(run, 1, "JetStream")


@pytest.mark.parametrize("url", ["nats://host:notaport", "http://127.0.0.1:4222", "nats://:4222"])
def test_a_malformed_url_is_a_usage_error(url: str) -> None:
    _one_line_error(_cli("watch", "--nats", url), 2, "--nats", "not a NATS server URL")


def test_policy_compile_errors_are_configuration_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "bundle: bad\nversion: '1'\nrules:\n  - id: r1\n    effect: maybe\n    actions: [x]\n"
    )
    check = _cli("policy", "check", str(tmp_path))
    assert check.returncode == 2 and "bad.yaml" in check.stdout and "r1" in check.stdout
    assert _cli("policy", "test", str(tmp_path)).returncode == 2
    key, _ = generate_key(tmp_path / "k")
    run = _cli(
        "run", "--nats", "nats://127.0.0.1:1", "--policies", str(tmp_path), "--key", str(key)
    )
    assert run.returncode == 2 and "bad.yaml" in run.stderr and "Traceback" not in run.stderr


def test_a_jwks_given_as_key_is_one_clear_line(keys: tuple[Path, Path]) -> None:
    jwks = keys[1]
    jwks.chmod(0o644)  # as keys new writes it: readable by others, and no warning about it
    run = _cli(
        "run", "--nats", "nats://127.0.0.1:1", "--policies", str(POLICIES), "--key", str(jwks)
    )
    _one_line_error(run, 2, str(jwks), "JWKS", "signing-key.pem")
    assert "chmod" not in run.stderr


def test_a_missing_artifact_file_is_named_without_an_errno(tmp_path: Path) -> None:
    _, jwks = generate_key(tmp_path)
    (tmp_path / "p").write_bytes(b"{}")
    missing = tmp_path / "nope.jws"
    run = _cli(
        "verify", "--jwks", str(jwks), "--subject", "guard.exec.a.b", "--payload",
        str(tmp_path / "p"), "--artifact", f"@{missing}",
    )  # fmt: skip
    assert run.returncode == 2
    assert f"{missing}: no such file or directory" in run.stdout and "Errno" not in run.stdout


def test_an_unreadable_creds_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.creds"
    run = _cli("watch", "--nats", "nats://127.0.0.1:1", "--creds", str(missing))
    _one_line_error(run, 2, str(missing), "credentials")


# -- options on every command ------------------------------------------------------------

_CONNECTING = (
    "run", "demo", "watch", "status", "ledger verify", "lineage", "approve", "reject",
    "holds", "limits", "policy explain", "maturity", "console", "replay", "policy impact",
)  # fmt: skip


def _commands(p: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                child_path = f"{path} {name}".strip()
                out[child_path] = child
                out.update(_commands(child, child_path))
    return out


def test_every_option_has_help_and_every_command_examples_and_exit_codes() -> None:
    commands = _commands(parser())
    leaves = {path: p for path, p in commands.items() if not any(
        isinstance(a, argparse._SubParsersAction) for a in p._actions
    )}  # fmt: skip
    assert len(leaves) >= 18
    for path, p in leaves.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"bus-guard {path}: {action.option_strings or action.dest}"
        assert p.epilog is not None and "examples:" in p.epilog, path
        assert re.search(r"exit codes:.*\b2\b", p.epilog, re.DOTALL), path
        assert f"bus-guard {path}" in p.epilog, path  # an example of this very command


def test_every_connecting_command_takes_the_connection_options() -> None:
    commands = _commands(parser())
    for path in _CONNECTING:
        flags = {f for a in commands[path]._actions for f in a.option_strings}
        assert {"--nats", "--creds", "--nkey", "--tls-cert", "--tls-key", "--tls-ca"} <= flags, path


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_options_are_accepted_before_and_after_the_command(where: str) -> None:
    log = ["--log-format", "json", "--log-level", "debug"]
    argv = [*log, "policy", "check", "p"] if where == "before" else ["policy", "check", "p", *log]
    args = parser().parse_args(argv)
    assert (args.log_format, args.log_level) == ("json", "debug")
    assert parser().parse_args(["policy", "check", "p"]).log_format == "text"


def test_nats_url_from_the_environment(nats_url: str, closed_port: int) -> None:
    run = _cli("holds", env={"NATS_URL": nats_url})
    assert run.returncode == 1 and "no hold stream" in run.stderr  # it reached the server
    bad = _cli("holds", env={"NATS_URL": f"nats://127.0.0.1:{closed_port}"})
    assert str(closed_port) in bad.stderr  # and that is the server it tried
    assert _cli("holds", "--nats", nats_url, env={"NATS_URL": "x:nope"}).returncode == 1


def test_tls_options_reach_the_connection(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    run = _cli("watch", "--nats", "tls://127.0.0.1:1", "--tls-ca", str(ca))
    _one_line_error(run, 2, str(ca), "TLS")
    run = _cli("watch", "--nats", "nats://127.0.0.1:1", "--tls-cert", str(ca))
    _one_line_error(run, 2, "--tls-cert and --tls-key")


# -- watch -------------------------------------------------------------------------------


async def test_watch_count_prints_exactly_n_during_a_burst(nats_url: str, signer: Signer) -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=300, color_system=None)
    ready = anyio.Event()
    nc = await nats.connect(nats_url)
    settings = Settings(nats_url=nats_url, mode="core")
    deny = await Collector.on(nc, "guard.deny.>")
    async with Gateway(settings, load_policies(POLICIES), signer), anyio.create_task_group() as tg:

        async def run_watch() -> None:
            await watch(nats_url, count=3, console=console, ready=ready)

        tg.start_soon(run_watch)
        await ready.wait()
        for _ in range(50):  # a burst: all of it is on its way before watch prints the third
            await nc.publish("guard.in.agent-1.tools.shell", intent("tools.shell", "t", {}))
        await deny.wait_for(50)
    await nc.drain()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert all(_TIMESTAMP.match(line) for line in lines), lines


async def test_watch_since_replays_then_goes_live_each_record_once(
    nats_url: str, tmp_path: Path
) -> None:
    """Stream mode: ``--since`` shows what was denied before watch started (oldest first),
    then live records, none twice; ``--json`` one object per line; exactly ``--count``."""
    key, _ = generate_key(tmp_path)
    settings = Settings(nats_url=nats_url, gateway_id="gw-w")
    nc = await nats.connect(nats_url)
    deny = await Collector.on(nc, "guard.deny.>")
    hold = await Collector.on(nc, "guard.hold.>")
    from bus_guard.ledger._records import CheckpointSigner
    from bus_guard.signing._keys import load_private_key

    gateway = Gateway(
        settings,
        load_policies(POLICIES),
        make_signer(key, issuer="gw-w"),
        ledger_signer=CheckpointSigner(load_private_key(key)),
    )
    async with gateway:
        before = [intent("tools.shell", f"before-{i}", {}) for i in range(4)]
        for data in before:
            await nc.publish("guard.in.agent-1.tools.shell", data)
        await nc.publish(
            "guard.in.agent-9.payments.transfer",
            intent("payments.transfer", "account:acct-1", {"amount": 5000, "currency": "USD"}),
        )
        await deny.wait_for(4)
        await hold.wait_for(1)
        buf = io.StringIO()
        console = Console(file=buf, width=300, color_system=None)
        ready = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def run_watch() -> None:
                await watch(
                    nats_url, count=7, as_json=True, since_s=3600, console=console, ready=ready
                )

            tg.start_soon(run_watch)
            await ready.wait()  # after the replay
            assert len(buf.getvalue().splitlines()) == 5
            for i in range(3):
                await nc.publish(
                    "guard.in.agent-1.tools.shell", intent("tools.shell", f"after-{i}", {})
                )

            async def all_stored() -> bool:
                return len(deny.msgs) >= 7

            await eventually(all_stored)
    await nc.drain()
    records = [msgspec.json.decode(line) for line in buf.getvalue().splitlines()]
    assert len(records) == 7
    ids = [r["decision_id"] for r in records]
    assert len(set(ids)) == 7  # none twice
    resources = [r["resource"] for r in records]
    assert sorted(resources[:5]) == sorted([*(f"before-{i}" for i in range(4)), "account:acct-1"])
    assert resources[5:] == ["after-0", "after-1"]  # live, after the replay, in order
    assert [r["ts"] for r in records[:5]] == sorted(r["ts"] for r in records[:5])


def test_watch_since_through_the_entry_point(nats_url: str, tmp_path: Path) -> None:
    """What the issue saw: ``watch --json --count 1`` printed 49 records of a burst."""
    key, _ = generate_key(tmp_path)
    gw = subprocess.Popen(
        [*_CMD, "run", "--nats", nats_url, "--policies", str(POLICIES), "--key", str(key)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert gw.stderr is not None
        for line in gw.stderr:
            if "ready on" in line:
                break
        anyio.run(_burst, nats_url, 30)
        run = _cli("watch", "--nats", nats_url, "--since", "1h", "--count", "1", "--json")
        assert run.returncode == 0, run.stderr
        (line,) = run.stdout.splitlines()
        assert json.loads(line)["reason"] == "denied_by_rule"
        text = _cli("watch", "--nats", nats_url, "--since", "1h", "--count", "30")
        lines = text.stdout.splitlines()
        assert len(lines) == 30 and all(_TIMESTAMP.match(line) for line in lines)
    finally:
        gw.terminate()
        gw.communicate(timeout=30)


async def _burst(nats_url: str, n: int) -> None:
    nc = await nats.connect(nats_url)
    deny = await Collector.on(nc, "guard.deny.>")
    for _ in range(n):
        await nc.publish("guard.in.agent-1.tools.shell", intent("tools.shell", "t", {}))
    await deny.wait_for(n)
    await nc.drain()


# -- the README --------------------------------------------------------------------------


def test_the_readme_documents_every_header_the_gateway_sets() -> None:
    readme = (ROOT / "README.md").read_text()
    source = "\n".join(p.read_text() for p in (ROOT / "bus_guard").rglob("*.py"))
    set_by_us = set(re.findall(r'"((?:Nats|Guard)-[A-Za-z-]+)"', source))
    read_only = {  # headers the server sets on what it delivers, which bus_guard only reads
        "Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Num-Pending",
        "Nats-Last-Sequence", "Nats-UpTo-Sequence",
    }  # fmt: skip
    assert {"Nats-Batch-Id", "Nats-Batch-Sequence", "Nats-Batch-Commit"} <= set_by_us
    for header in sorted(set_by_us - read_only):
        assert f"`{header}`" in readme, header


def test_policy_init_copies_the_examples_anywhere(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    assert _cli("policy", "init", str(target), cwd=tmp_path).returncode == 0
    assert load_policies(target).digest == load_policies(POLICIES).digest
    tested = _cli("policy", "test", str(target))
    assert tested.returncode == 0 and " 0 failed" in tested.stdout
    _one_line_error(_cli("policy", "init", str(target)), 2, str(target), "exists")


def test_a_nats_cli_context_gives_url_and_files(
    tmp_path: Path, nats_url: str, closed_port: int
) -> None:
    contexts = tmp_path / "nats" / "context"
    contexts.mkdir(parents=True)
    (contexts / "dev.json").write_text(json.dumps({"url": nats_url, "description": "test"}))
    env = {"XDG_CONFIG_HOME": str(tmp_path), "NATS_URL": ""}
    run = _cli("holds", "--context", "dev", env=env)
    assert run.returncode == 1 and "no hold stream" in run.stderr  # it reached nats_url
    # --nats wins over the context; $NATS_CONTEXT names it
    bad = _cli(
        "holds", "--nats", f"nats://127.0.0.1:{closed_port}", env={**env, "NATS_CONTEXT": "dev"}
    )
    assert str(closed_port) in bad.stderr
    missing = tmp_path / "missing.creds"
    (contexts / "creds.json").write_text(json.dumps({"url": nats_url, "creds": str(missing)}))
    _one_line_error(_cli("holds", "--context", "creds", env=env), 2, str(missing), "credentials")
    _one_line_error(_cli("holds", "--context", "nope", env=env), 2, "no such context")
    (contexts / "pw.json").write_text(json.dumps({"url": nats_url, "password": "s"}))
    _one_line_error(_cli("holds", "--context", "pw", env=env), 2, "password")
