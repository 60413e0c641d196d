"""The command line, through ``main(argv)`` and, for the long-running gateway, as a process."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from bus_guard.cli._arguments import RUN_OPTIONS, field_default, parser, run_settings
from bus_guard.cli._main import main
from bus_guard.cli._safe import safe
from bus_guard.intake._gateway import round_trip
from bus_guard.server import NatsServer
from bus_guard.settings import Checks, Settings, StreamSettings
from bus_guard.signing._keys import DEFAULT_GRACE_S

from .conftest import POLICIES
from .crashkit import gateway_argv
from .helpers import HOSTILE, Collector, intent, make_signer, terminal_safe


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_keys_new_writes_private_key_0600_and_jwks(tmp_path: Path) -> None:
    code, text = _run("keys", "new", "--out", str(tmp_path))
    assert code == 0 and "signing-key.pem" in text
    assert (tmp_path / "signing-key.pem").stat().st_mode & 0o777 == 0o600
    jwks = json.loads((tmp_path / "jwks.json").read_text())
    assert jwks["keys"][0]["crv"] == "Ed25519" and "d" not in jwks["keys"][0]
    # A second run refuses to overwrite the key (exit 2: a usage/config problem).
    code, _ = _run("keys", "new", "--out", str(tmp_path))
    assert code == 2


def test_policy_check_test_and_schema_on_shipped_policies() -> None:
    code, text = _run("policy", "check", str(POLICIES))
    assert code == 0 and "sha256:" in text
    code, text = _run("policy", "test", str(POLICIES))
    assert code == 0 and " 0 failed" in text
    code, text = _run("policy", "schema")
    assert code == 0 and json.loads(text)["type"] == "object"


def test_policy_check_reports_bad_bundle_with_file_and_rule(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "bundle: bad\nversion: '1'\nrules:\n"
        "  - id: r1\n    effect: allow\n    principals: ['group:nope']\n    actions: ['x']\n"
    )
    code, text = _run("policy", "check", str(tmp_path))
    assert code != 0
    assert "bad.yaml" in text and "r1" in text and "nope" in text


def test_policy_explain_names_the_rule(tmp_path: Path) -> None:
    payload = tmp_path / "intent.json"
    payload.write_bytes(intent("tools.shell", "tool:shell", {"cmd": "id"}, ts=1000.0))
    code, text = _run(
        "policy",
        "explain",
        "--policies",
        str(POLICIES),
        "--subject",
        "guard.in.agent-1.tools.shell",
        "--payload",
        str(payload),
        "--now",
        "1000",
    )
    assert code == 0 and "deny" in text and "denied_by_rule" in text


def test_verify_cli_accepts_a_gateway_artifact_and_rejects_a_tampered_payload(
    tmp_path: Path,
) -> None:
    from bus_guard.signing._keys import generate_key
    from bus_guard.signing._signer import payload_digest
    from bus_guard.verify import ArtifactClaims

    key, jwks = generate_key(tmp_path)
    payload = b'{"hello": "world"}'
    import time

    now = int(time.time())
    token = make_signer(key, issuer="gw").sign(
        ArtifactClaims(
            iss="gw",
            sub="agent-7",
            aud="guard.exec.agent-7.x",
            iat=now,
            nbf=now,
            exp=now + 60,
            jti="D1",
            action="x",
            resource="r",
            intent_id="i1",
            payload_sha256=payload_digest(payload),
            policy_digest="sha256:0",
            policy_version="v",
            rules=("r1",),
            mode="enforce",
        )
    )
    (tmp_path / "p.bin").write_bytes(payload)
    (tmp_path / "tok").write_text(token)
    code, text = _run(
        "verify",
        "--jwks",
        str(jwks),
        "--subject",
        "guard.exec.agent-7.x",
        "--payload",
        str(tmp_path / "p.bin"),
        "--artifact",
        f"@{tmp_path / 'tok'}",
    )
    assert code == 0 and '"jti": "D1"' in text
    (tmp_path / "p.bin").write_bytes(payload + b" ")
    code, text = _run(
        "verify",
        "--jwks",
        str(jwks),
        "--subject",
        "guard.exec.agent-7.x",
        "--payload",
        str(tmp_path / "p.bin"),
        "--artifact",
        token,
    )
    assert code == 1 and "payload_mismatch" in text


def test_help_lists_every_command() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


RUN = ["run", "--nats", "nats://bus:4222", "--policies", "p", "--key", "k"]


def test_run_defaults_are_the_settings_defaults() -> None:
    """`bus-guard run` with nothing but what it requires runs on the settings' defaults: the
    parser holds no default of its own (every run option is a settings option), so a second
    copy of a default cannot drift from the first."""
    args = parser().parse_args(RUN)
    not_settings = {"command", "log_level", "log_format", "policies", "key", "jwks", "http"}
    # the policy source's options: PolicySourceSettings (test_policy_reload.py pins them)
    not_settings |= {"policy_keys", "deployment", "policy_max_age", "policy_poll"}
    not_settings |= {"policy_max_bytes", "canary_interval"}
    not_settings |= {"constitution_keys", "constitution_quorum"}
    assert set(vars(args)) == not_settings | {option.dest for option in RUN_OPTIONS}
    settings = run_settings(args)
    assert settings == Settings(nats_url="nats://bus:4222", gateway_id=settings.gateway_id)
    assert settings.stream == StreamSettings() and settings.checks == Checks()
    assert settings.gateway_id == Settings().gateway_id  # Settings' own <hostname>-<pid>
    owners = {"": Settings(), "stream": StreamSettings(), "checks": Checks()}
    for option in RUN_OPTIONS:
        if option.required:
            assert getattr(args, option.dest) == "nats://bus:4222", option.flag
        elif option.computed:
            assert getattr(args, option.dest) is None, option.flag
        else:
            section, _, name = option.field.rpartition(".")
            assert getattr(args, option.dest) == getattr(owners[section], name), option.flag


def test_the_other_commands_default_to_the_settings_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from bus_guard.cli._connect import apply_context

    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("NATS_CONTEXT", raising=False)
    p = parser()
    demo = p.parse_args(["demo"])
    assert (demo.mode, demo.artifacts) == (Settings().mode, Settings().artifacts)
    for argv in (
        ["watch", "--nats", "u"],
        ["ledger", "verify", "--nats", "u", "--jwks", "j"],
        ["lineage", "d-1", "--nats", "u"],
        ["approve", "d-1", "--key", "k"],
        ["reject", "d-1", "--key", "k"],
        ["holds"],
    ):
        assert p.parse_args(argv).prefix == Settings().prefix == "guard", argv
    for argv in (["approve", "d-1", "--key", "k"], ["holds"]):
        args = p.parse_args(argv)
        apply_context(args)  # as main() does: --nats, $NATS_URL, the context, the default
        assert args.nats == Settings().nats_url, argv
    assert p.parse_args(["keys", "rotate", "--dir", "d"]).grace == DEFAULT_GRACE_S


def test_run_help_shows_each_default_from_the_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapped help text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    # one entry per option: its line, and the help argparse puts on the next when the
    # option itself is long
    entries = re.split(r"\n(?=  -)", capsys.readouterr().out)
    lines = [" ".join(entry.split()) for entry in entries]
    for option in RUN_OPTIONS:
        (line,) = [x for x in lines if x.startswith(f"{option.flag} ")]
        if option.required:
            assert "(default" not in line
        elif option.computed:
            assert "(default: <hostname>-<pid>)" in line
        elif option.default is None:
            assert "(default" not in line, line  # --creds: not given, not used
        else:
            value = field_default(option.owner, option.name)
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"(default: {shown}" in line, line
    assert any("--ack-wait SECONDS" in x and "(default: 30)" in x for x in lines)
    assert any("--max-payload BYTES" in x and "(default: 65536)" in x for x in lines)


def test_every_run_option_sets_its_setting() -> None:
    """Flag names and meanings are unchanged: each one lands in the field it always set."""
    argv = [
        *RUN,
        *("--mode", "core", "--prefix", "a.b", "--queue", "q", "--gateway-id", "gw-9"),
        *("--creds", "c.creds", "--artifact-ttl", "61", "--max-payload", "1000"),
        *("--max-skew", "301", "--reconnect-wait", "1.5", "--max-reconnects", "11"),
        *("--artifacts", "batched", "--batch-max", "257", "--batch-delay-ms", "3"),
        *("--ack-wait", "31", "--max-ack-pending", "1025", "--batch", "129"),
        *("--max-deliveries", "12", "--retry-horizon", "121", "--dedup-window", "601"),
        *("--replicas", "3", "--min-replicas", "2", "--checkpoint-every", "1001"),
        *("--checkpoint-interval", "11", "--max-lineage-depth", "33"),
        *("--lineage-wait", "31", "--lineage-retry", "0.5", "--lineage-max-waiting", "99"),
        *("--hold-sweep", "7"),
    ]
    assert run_settings(parser().parse_args(argv)) == Settings(
        nats_url="nats://bus:4222",
        mode="core",
        prefix="a.b",
        queue="q",
        gateway_id="gw-9",
        creds_file="c.creds",
        artifact_ttl_s=61.0,
        max_payload_bytes=1000,
        checks=Checks(max_past_skew_s=301.0),
        reconnect_wait_s=1.5,
        max_reconnect_attempts=11,
        artifacts="batched",
        batch_max=257,
        batch_delay_ms=3.0,
        stream=StreamSettings(
            ack_wait_s=31.0,
            max_ack_pending=1025,
            fetch_batch=129,
            max_deliveries=12,
            retry_horizon_s=121.0,
            duplicate_window_s=601.0,
            replicas=3,
            min_replicas=2,
            checkpoint_every=1001,
            checkpoint_interval_s=11.0,
            max_lineage_depth=33,
            lineage_wait_s=31.0,
            lineage_nak_delay_s=0.5,
            lineage_max_waiting=99,
            hold_sweep_s=7.0,
        ),
    )
    # An empty --gateway-id leaves it to Settings, as before.
    args = parser().parse_args([*RUN, "--gateway-id", ""])
    assert run_settings(args).gateway_id == Settings().gateway_id


@pytest.mark.parametrize("artifacts", ["per-message", "batched"])
def test_demo_passes_end_to_end(artifacts: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--count", "120", "--rate", "0", "--quiet", "--artifacts", artifacts])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"artifacts={artifacts}" in out
    executed = re.search(r"executed \(artifact verified\)\D*(\d+)", out)
    batched = re.search(r"of which batched artifacts\D*(\d+)", out)
    assert executed is not None and batched is not None, out
    assert int(executed[1]) > 0  # the executor verified artifacts of the kind asked for
    assert int(batched[1]) == (int(executed[1]) if artifacts == "batched" else 0)
    # the approvers at work (stream mode, the default): both treasury leads release the
    # first hold, the second is rejected; the release is executed with a verified artifact
    released = re.search(r"holds: released\D*(\d+)", out)
    rejected = re.search(r"holds: rejected\D*(\d+)", out)
    assert released is not None and rejected is not None, out
    assert (int(released[1]), int(rejected[1])) == (1, 1)
    assert "RELEASED" in out and "APPROVED   alice" in out and "APPROVED   bob" in out


# -- the gateway as a real process -------------------------------------------------------


def _gateway_process(nats_url: str, key: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        gateway_argv(nats_url, key, *extra),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # readiness is the log line written after the SUB is confirmed
        if "ready on" in line:
            return proc
    raise AssertionError(f"gateway exited before ready: {proc.wait()}")


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
def key(tmp_path: Path) -> Iterator[Path]:
    from bus_guard.signing._keys import generate_key

    yield generate_key(tmp_path)[0]


async def test_run_decides_intents_and_drains_on_sigterm(nats_url: str, key: Path) -> None:
    proc = _gateway_process(nats_url, key, "--mode", "core")  # core: decisions as replies
    try:
        nc = await nats.connect(nats_url, inbox_prefix="_INBOX.agent-1")
        execs = await Collector.on(nc, "guard.exec.>")
        reply = await nc.request(
            "guard.in.agent-1.tools.search",
            intent("tools.search", "tool:search", {"q": "x"}),
            timeout=10,
        )
        assert json.loads(reply.data)["effect"] == "allow"
        await execs.wait_for(1)
        for _ in range(200):
            await nc.publish(
                "guard.in.agent-1.tools.search", intent("tools.search", "tool:search", {"q": "y"})
            )
        await round_trip(nc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        await execs.wait_for(201)
        assert len(execs.msgs) == 201
        await nc.drain()
    finally:
        _reap(proc)


def test_run_exits_nonzero_when_the_bus_is_gone_beyond_the_reconnect_budget(key: Path) -> None:
    """SCENARIOS S6: never hangs silently; exits 1 when reconnects are exhausted."""
    server = NatsServer(jetstream=False).start()
    try:
        proc = _gateway_process(
            server.url, key, "--mode", "core", "--reconnect-wait", "0.2", "--max-reconnects", "3"
        )
    finally:
        server.stop()
    try:
        assert proc.wait(timeout=30) == 1
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        assert "reconnect budget" in stderr
        # the bus went away (not our own close): that is worth a warning
        assert "WARNING" in stderr.split("disconnected from NATS; reconnecting")[0].splitlines()[-1]
    finally:
        _reap(proc)


def test_run_refuses_a_missing_key_with_a_clear_error(tmp_path: Path, nats_url: str) -> None:
    code, _ = _run(
        "run",
        "--nats",
        nats_url,
        "--policies",
        str(POLICIES),
        "--key",
        str(tmp_path / "absent.pem"),
    )
    assert code == 2


def test_keys_rotate_keeps_the_old_key_valid_for_the_grace_period(tmp_path: Path) -> None:
    from bus_guard.signing._keys import kid_for, load_private_key
    from bus_guard.verify import load_jwks

    assert _run("keys", "new", "--out", str(tmp_path))[0] == 0
    old_kid = kid_for(load_private_key(tmp_path / "signing-key.pem").public_key())
    code, text = _run("keys", "rotate", "--dir", str(tmp_path), "--grace", "600")
    assert code == 0 and old_kid in text
    new_kid = kid_for(load_private_key(tmp_path / "signing-key.pem").public_key())
    assert new_kid != old_kid
    jwks = load_jwks(tmp_path / "jwks.json")
    old = jwks.entry(old_kid)
    assert old is not None and old.not_after is not None
    assert set(jwks) == {old_kid, new_kid}
    # "--": a kid may start with "-" (base64url), which argparse would take for an option.
    code, _ = _run("keys", "revoke", "--jwks", str(tmp_path / "jwks.json"), "--", old_kid)
    revoked = load_jwks(tmp_path / "jwks.json").entry(old_kid)
    assert code == 0 and revoked is not None and revoked.revoked_at is not None


def test_run_refuses_a_max_payload_the_server_cannot_carry(nats_url: str, key: Path) -> None:
    """A 1 MiB intent could not be forwarded with its artifact by a 1 MiB server: refuse."""
    code, _ = _run(
        "run",
        "--nats",
        nats_url,
        "--policies",
        str(POLICIES),
        "--key",
        str(key),
        "--mode",
        "core",
        "--max-payload",
        str(1024 * 1024),
    )
    assert code == 2


# -- what agents wrote reaches the operator escaped ---------------------------------------


def _artifact(tmp_path: Path, **claims: Any) -> tuple[Path, Path, str]:
    """(jwks, payload file, token): an artifact over the payload, with *claims* changed."""
    import time

    from bus_guard.signing._keys import generate_key
    from bus_guard.signing._signer import payload_digest
    from bus_guard.verify import ArtifactClaims

    key, jwks = generate_key(tmp_path)
    payload = tmp_path / "p.bin"
    payload.write_bytes(b'{"hello": "world"}')
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": "gw",
        "sub": "agent-7",
        "aud": "guard.exec.agent-7.x",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": "D1",
        "action": "x",
        "resource": "r",
        "intent_id": "i1",
        "payload_sha256": payload_digest(payload.read_bytes()),
        "policy_digest": "sha256:0",
        "policy_version": "v",
        "rules": ("r1",),
        "mode": "enforce",
    }
    token = make_signer(key, issuer="gw").sign(ArtifactClaims(**{**base, **claims}))
    return jwks, payload, token


def test_verify_prints_an_agents_claims_escaped_as_the_same_json(tmp_path: Path) -> None:
    jwks, payload, token = _artifact(tmp_path, action=HOSTILE, resource=HOSTILE, rules=(HOSTILE,))
    argv = ["verify", "--jwks", str(jwks), "--payload", str(payload), "--artifact", token]
    code, text = _run(*argv, "--subject", "guard.exec.agent-7.x")
    assert code == 0, text
    terminal_safe(text)
    claims = json.loads(text)
    assert claims["action"] == claims["resource"] == HOSTILE and claims["rules"] == [HOSTILE]
    assert "\\u001b" in text and "\\u009b" in text and "\\u202e" in text
    code, text = _run(*argv, "--subject", f"guard.exec.agent-7.x{HOSTILE}\udcff")
    assert code == 1 and "wrong_audience" in terminal_safe(text, 1)[0]


def test_errors_on_stderr_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / f"intent{HOSTILE}.json"
    argv = ["policy", "explain", "--policies", str(POLICIES), "--subject", "s"]
    code, _ = _run(*argv, "--payload", str(missing))
    assert code == 2
    (line,) = terminal_safe(capsys.readouterr().err, 1)
    assert line.startswith("bus-guard: ") and safe(str(missing)) in line


def test_usage_errors_quote_arguments_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["policy", HOSTILE])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert safe(HOSTILE) in terminal_safe(err)[-1]


def test_log_lines_are_escaped_text_and_json() -> None:
    import logging
    import sys

    from bus_guard.cli._main import _JsonFormatter, _TextFormatter

    try:
        raise ValueError(f"bad intent {HOSTILE}\x7f")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "bus_guard.intake", logging.ERROR, __file__, 1, "handler failed for %s", (HOSTILE,), None
    )
    text = _TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert terminal_safe(text + "\n", 1) == [
        f"ERROR bus_guard.intake: handler failed for {safe(HOSTILE)}"
    ]
    record.exc_info, record.exc_text = exc_info, None
    lines = terminal_safe(_TextFormatter().format(record) + "\n")
    assert lines[-1] == f"ValueError: bad intent {safe(HOSTILE)}\\x7f"
    record.exc_text = None
    (line,) = terminal_safe(_JsonFormatter().format(record) + "\n", 1)
    logged = json.loads(line)
    assert logged["msg"] == f"handler failed for {HOSTILE}" and HOSTILE in logged["exc"]
