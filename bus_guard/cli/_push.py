"""Policies on the bus, from the command line: ``bus-guard policy push`` and ``policy
status``, and ``bus-guard run``'s options for where its policies come from and how they
are kept (README, "Policy distribution", "Policy reload", "Freshness").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from bus_guard.cli._arguments import duration, field_default
from bus_guard.cli._safe import say
from bus_guard.errors import BundleRefused, ConfigError, GatewayError
from bus_guard.settings import PolicySourceSettings
from bus_guard.subjects import Subjects

if TYPE_CHECKING:  # the parser is built for every command: NATS and policies load lazily
    from nats.js import JetStreamContext

    from bus_guard.intake._policy_bus import PolicyStatus

__all__ = (
    "BUS_SCHEMES",
    "add_policy_commands",
    "add_run_options",
    "cmd_push",
    "cmd_sign",
    "cmd_status",
    "policy_source_settings",
)

BUS_SCHEMES: Final = ("nats:", "tls:")  # --policies nats:// (the gateway's bus), or a URL
_PUSH_ATTEMPTS: Final = 5  # compare-and-set races with another publisher, then give up
_MAX_HISTORY: Final = 64  # the pointer bucket keeps this many values per key

_PUSH_EPILOG: Final = """\
examples:
  bus-guard keys new --out publisher/                 # the publisher's key (keep it offline)
  bus-guard policy push policies/ --nats nats://127.0.0.1:4222 --key publisher/signing-key.pem
  bus-guard run --nats URL --policies nats:// --policy-keys publisher/jwks.json --key ...

The directory is compiled and its test cases (DIR/tests/*.yaml) run first: nothing is
pushed unless every case passes. The content goes to the object store <prefix>-policy-sets
(named by its SHA-256); the pointer pointer.policy.<deployment> in the bucket
<prefix>-policy moves to the next revision by compare-and-set, as a manifest signed with
the publisher's key: kind, deployment, revision, policy digest and version, content digest
and size, number of test cases, time of issue. Gateways trusting the key switch within
their --policy-poll interval.

exit codes: 0 pushed, 1 a test case failed or NATS refused, 2 the policies do not compile,
or an unreadable key
"""


def add_run_options(run: argparse.ArgumentParser) -> None:
    """``bus-guard run``'s policy source options (``--policies`` itself is declared with
    the gateway's files)."""
    g = run.add_argument_group(
        "policy source, reload and canaries",
        "--policies DIR reloads on SIGHUP and when a file changes; --policies nats:// reads "
        "signed bundles from the bus (this gateway's --nats, or nats://HOST:PORT[,...])",
    )
    g.add_argument(
        "--policy-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="the JWKS of the trusted policy publishers (required with --policies nats://)",
    )
    g.add_argument(
        "--deployment",
        default=None,
        metavar="NAME",
        help="bundles must be pushed for this deployment (default: the subject prefix)",
    )
    g.add_argument(
        "--policy-max-age",
        type=duration,
        default=None,
        metavar="DURATION",
        help="deny every intent policy_stale once the active set is older than this "
        "(a bundle's signed issue time; a directory's last read) until a fresh one arrives: "
        "90s, 30m, 24h (default: no maximum)",
    )
    poll = field_default(PolicySourceSettings, "poll_s")
    g.add_argument(
        "--policy-poll",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"look at the policy source this often (default: {poll:g})",
    )
    every = field_default(PolicySourceSettings, "canary_interval_s")
    g.add_argument(
        "--canary-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run the active set's canaries (test cases of principal guard-canary) through "
        f"the gateway's path this often; a wrong answer makes it not ready (default: "
        f"{every:g}; 0: off)",
    )
    g.add_argument(
        "--constitution-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="the JWKS of the constitution's signers: the gateway then requires a constitution "
        "on the bus, signed by --constitution-quorum of them, and refuses to start without",
    )
    g.add_argument(
        "--constitution-quorum",
        type=int,
        default=None,
        metavar="M",
        help="signatures of distinct constitution keys a constitution needs",
    )
    limit = field_default(PolicySourceSettings, "max_bundle_bytes")
    g.add_argument(
        "--policy-max-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help=f"refuse bundles larger than this (default: {limit})",
    )


# `run`'s option -> the PolicySourceSettings field it sets (not given: the field's default).
_SOURCE_OPTIONS: Final = {
    "policy_keys": "publishers_file",
    "deployment": "deployment",
    "policy_max_age": "max_age_s",
    "policy_poll": "poll_s",
    "policy_max_bytes": "max_bundle_bytes",
    "canary_interval": "canary_interval_s",
    "constitution_keys": "constitution_keys_file",
    "constitution_quorum": "constitution_quorum",
}


def policy_source_settings(args: argparse.Namespace) -> PolicySourceSettings:
    """Where ``bus-guard run --policies`` reads from, and how the set is kept."""
    given = {
        field: getattr(args, dest)
        for dest, field in _SOURCE_OPTIONS.items()
        if getattr(args, dest) is not None
    }
    where = str(args.policies)
    if not where.startswith(BUS_SCHEMES):
        return PolicySourceSettings(directory=Path(where), **given)
    if args.policy_keys is None:
        raise ConfigError(
            "--policies nats:// needs --policy-keys FILE (the publishers' JWKS): a gateway "
            "takes signed bundles only"
        )
    host = where.split("://", 1)[1] if "://" in where else ""
    return PolicySourceSettings(nats_url=where if host else None, **given)


def add_policy_commands(pol: argparse._SubParsersAction[Any]) -> None:
    push = pol.add_parser(
        "push",
        help="compile, test, sign and store a policy directory as the next bundle revision",
        epilog=_PUSH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("path", type=Path, metavar="DIR", help="the policy directory to push")
    push.add_argument(
        "--nats", required=True, metavar="URL[,URL...]", help="the bus the gateways load from"
    )
    push.add_argument(
        "--key",
        required=True,
        type=Path,
        action="append",
        metavar="PUBLISHER_KEY",
        help="the publisher's Ed25519 key (PEM), from 'bus-guard keys new'; a constitution: "
        "one --key per signer here (more sign later with 'policy sign')",
    )
    push.add_argument(
        "--kind",
        choices=["policy", "constitution"],
        default="policy",
        help="an ordinary policy bundle (default), or the constitution (deny and escalate "
        "rules only, signed by a quorum of the constitution keys)",
    )
    push.add_argument(
        "--deployment", default=None, metavar="NAME", help="default: the subject prefix"
    )
    push.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file")
    push.add_argument("--replicas", type=int, default=1, help="of the stores, if created")
    push.add_argument("--prefix", default="guard", help="subject prefix (default: guard)")
    sign = pol.add_parser(
        "sign",
        help="add a signature to the current constitution (its quorum of signers, one by one)",
    )
    sign.add_argument(
        "--nats", required=True, metavar="URL[,URL...]", help="the bus holding the bundle"
    )
    sign.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="CONSTITUTION_KEY",
        help="one constitution signer's Ed25519 key (PEM)",
    )
    sign.add_argument(
        "--kind",
        choices=["constitution"],
        default="constitution",
        help="what to sign (only the constitution takes several signatures)",
    )
    sign.add_argument(
        "--deployment", default=None, metavar="NAME", help="default: the subject prefix"
    )
    sign.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file")
    sign.add_argument("--prefix", default="guard", help="subject prefix (default: guard)")
    status = pol.add_parser(
        "status", help="what policy set each gateway has active (digest, revision, stale)"
    )
    status.add_argument(
        "--nats", required=True, metavar="URL[,URL...]", help="the bus the gateways are on"
    )
    status.add_argument("--creds", default=None, metavar="FILE", help="NATS credentials file")
    status.add_argument("--prefix", default="guard", help="subject prefix (default: guard)")
    status.add_argument("--json", action="store_true", help="one JSON object per line")


async def cmd_push(args: argparse.Namespace, out: TextIO) -> int:
    import nats.js.errors

    from bus_guard.cli._connect import connect
    from bus_guard.intake._policy_bus import ensure_stores, pointer_key
    from bus_guard.policy._bundle import (
        Manifest,
        compile_directory,
        content_digest,
        encode_content,
        peek_revision,
        sign_manifest,
    )
    from bus_guard.policy._constitution import check_constitution, sign_constitution
    from bus_guard.signing._keys import kid_for, load_private_key

    kind = args.kind
    keys = [load_private_key(k) for k in args.key]
    if kind == "policy" and len(keys) != 1:
        raise ConfigError("a policy bundle is signed by one publisher key (one --key)")
    try:
        compiled = compile_directory(args.path)
        if kind == "constitution":
            check_constitution(compiled)
    except BundleRefused as exc:
        say(out, f"not pushed: {args.path}: {exc}")
        return 1
    data = encode_content(compiled.content)
    digest = content_digest(data)
    streams = Subjects(args.prefix).streams
    deployment = args.deployment or args.prefix
    key_name = pointer_key(deployment, kind)
    nc = await connect(args.nats, creds=args.creds, name="bus-guard policy push")
    try:
        js = nc.jetstream()
        kv, store = await ensure_stores(
            js, streams.policy_bucket, streams.policy_store, replicas=args.replicas
        )
        name = digest.replace(":", "-")
        try:
            info = await store.get_info(name)
            stored = info.size == len(data)
        except nats.js.errors.ObjectNotFoundError:
            stored = False
        if not stored:
            await store.put(name, data)
        for _ in range(_PUSH_ATTEMPTS):
            history = await _pointer_history(js, streams.policy_bucket, key_name)
            last = max((seq for seq, _ in history), default=0)
            newest = max((peek_revision(value) for _, value in history), default=0)
            manifest = Manifest(
                kind=kind,
                deployment=deployment,
                revision=newest + 1,
                digest=compiled.digest,
                version=compiled.policies.version,
                content=digest,
                size=len(data),
                cases=compiled.cases.passed,
                issued_at=time.time(),
            )
            if kind == "constitution":
                token = sign_constitution(manifest, keys)
            else:
                token = sign_manifest(keys[0], kid_for(keys[0]), manifest)
            try:
                if last:
                    await kv.update(key_name, token, last=last)
                else:
                    await kv.create(key_name, token)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another push moved the pointer: number after it
            signed = f", {len(keys)} signature{'s' if len(keys) > 1 else ''}" * (kind != "policy")
            say(
                out,
                f"pushed {kind} revision {manifest.revision} of {deployment}{signed}: "
                f"{manifest.version} "
                f"({manifest.digest}), {compiled.cases.passed} test cases passed, "
                f"{len(data):,} bytes as {name}",
            )
            return 0
        raise GatewayError(f"the pointer {key_name} kept moving; not pushed")
    finally:
        await nc.close()


async def _pointer_history(js: JetStreamContext, bucket: str, key: str) -> list[tuple[int, bytes]]:
    """The values the bucket keeps for *key*, oldest first, as ``(revision, value)``:
    message gets by subject (``$JS.API.STREAM.MSG.GET``), not a consumer, so that a
    publisher needs no right to create consumers (a consumer's deliver subject is the
    creator's choice: README, "Deployment topology")."""
    import nats.js.errors

    stream, subject = f"KV_{bucket}", f"$KV.{bucket}.{key}"
    out: list[tuple[int, bytes]] = []
    seq = 1
    while len(out) <= _MAX_HISTORY:
        try:
            raw = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        out.append((raw.seq or 0, raw.data or b""))
        seq = (raw.seq or 0) + 1
    return out


async def cmd_sign(args: argparse.Namespace, out: TextIO) -> int:
    """Add the signature of ``--key`` to the current constitution pointer (compare-and-set;
    the manifest itself is never changed: every signer signs the same bytes)."""
    import nats.js.errors

    from bus_guard.cli._connect import connect
    from bus_guard.intake._policy_bus import pointer_key
    from bus_guard.policy._bundle import peek_revision
    from bus_guard.policy._constitution import add_signature
    from bus_guard.signing._keys import load_private_key

    key = load_private_key(args.key)
    streams = Subjects(args.prefix).streams
    name = pointer_key(args.deployment or args.prefix, "constitution")
    nc = await connect(args.nats, creds=args.creds, name="bus-guard policy sign")
    try:
        kv = await nc.jetstream().key_value(streams.policy_bucket)
        for _ in range(_PUSH_ATTEMPTS):
            try:
                entry = await kv.get(name)
            except nats.js.errors.KeyNotFoundError:
                raise GatewayError(f"no constitution at {streams.policy_bucket}/{name}") from None
            signed = add_signature(entry.value or b"", key)
            if signed == entry.value:
                say(out, f"already signed by this key: revision {peek_revision(signed)}")
                return 0
            try:
                await kv.update(name, signed, last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            count = len(json.loads(signed)["signatures"])
            say(out, f"signed constitution revision {peek_revision(signed)}: {count} signatures")
            return 0
        raise GatewayError(f"the pointer {name} kept moving; not signed")
    except nats.js.errors.BucketNotFoundError:
        raise GatewayError(f"no bucket {streams.policy_bucket}: no constitution") from None
    finally:
        await nc.close()


async def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    import nats.js.errors

    from bus_guard.cli._connect import connect
    from bus_guard.intake._policy_bus import read_statuses

    streams = Subjects(args.prefix).streams
    nc = await connect(args.nats, creds=args.creds, name="bus-guard policy status")
    try:
        try:
            kv = await nc.jetstream().key_value(streams.policy_bucket)
        except nats.js.errors.BucketNotFoundError:
            raise GatewayError(f"no bucket {streams.policy_bucket}: no gateway reported") from None
        statuses = await read_statuses(kv)
    finally:
        await nc.close()
    now = time.time()
    constitutions = {s.gateway: s for s in statuses if s.kind == "constitution"}
    ordinary = {s.gateway: s for s in statuses if s.kind != "constitution"}
    for gateway in sorted(ordinary.keys() | constitutions.keys()):
        _print_status(
            ordinary.get(gateway), constitutions.get(gateway), gateway, now, out, as_json=args.json
        )
    if not statuses and not args.json:
        say(out, "no gateway has reported a policy status")
    return 0


def _print_status(
    status: PolicyStatus | None,
    constitution: PolicyStatus | None,
    gateway: str,
    now: float,
    out: TextIO,
    *,
    as_json: bool,
) -> None:
    """One gateway's line: its ordinary set (a directory's is not reported: ``-``) and,
    with a constitution, the constitution's revision, digest and state."""
    if as_json:
        import msgspec

        doc: dict[str, Any] = (
            msgspec.to_builtins(status) if status is not None else {"gateway": gateway}
        )
        if constitution is not None:
            doc["constitution"] = msgspec.to_builtins(constitution)
        say(out, json.dumps(doc))
        return
    line = f"{gateway}  " + (_state(status, now) if status is not None else "policy not reported")
    if constitution is not None:
        line += f"  constitution {_state(constitution, now)}"
    say(out, line)


def _state(status: PolicyStatus, now: float) -> str:
    rev = "-" if status.revision is None else str(status.revision)
    state = "STALE" if status.stale else "fresh"
    return (
        f"rev {rev}  {status.digest}  {status.version}  {state}  "
        f"refused {status.refusals}  updated {now - status.updated_at:.0f}s ago  "
        f"({status.source})"
    )
