"""A witness for the ledger: chain heads kept, and countersigned, outside the gateway's reach.

The audit (:mod:`bus_guard.ledger._audit`) proves a ledger is internally consistent; it
cannot prove it is the ledger that was written: an admin with stream rights can delete
``GUARD_LEDGER``, re-create it and publish the records back without a tail, or without one
gateway's chain, and the copy audits clean. A witness closes that gap, in the spirit of
Certificate Transparency witnesses: a separate process, with its own Ed25519 key and its own
storage (a directory the gateway's account cannot touch), follows the ledger, audits each
record as it arrives (the same :class:`~bus_guard.ledger._audit.Auditor`), and appends a
countersigned line for every chain start and checkpoint that extends a consistent chain:
``{gateway, seq, hash, kind, epoch, final, ts, witnessed_at}`` signed by the witness key
(compact JWS, ``typ: guard-witness+jwt``). It refuses to countersign a record the audit
finds a problem with (a gap, a fork, a bad signature), and says so.

:func:`check_against_witness` then tells, for a ledger as read now, every witnessed head it
does not hold byte for byte (rebuilt, truncated, pruned or rewritten: the record at that seq
is missing or has another hash) and every witnessed gateway whose chain is gone (dropped).
What a witness cannot see is what was cut after its last countersigned checkpoint: the
checkpoint interval (``--checkpoint-interval``, 10 s) bounds that tail in seconds.

The witness also follows the gateway registry (the ``<prefix>-gateways`` bucket: one lease
per gateway id, whose history says when each gateway process started, with which chain epoch,
and when it ended; :mod:`bus_guard.intake._lease`) and countersigns each run it sees, as a
line of kind ``registered`` (``seq`` -1, ``epoch`` the run's, ``ts`` when it started,
``final`` once it ended). A run is countersigned once its chain start is certainly written:
the lease was renewed after it (renewals start after the chain start) or it ended. So a
gateway chain dropped from the ledger is found even when the witness never countersigned a
checkpoint of it (it was dropped before the witness read it): its registered run has no
record in the ledger.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.errors import ConfigError
from bus_guard.ledger._audit import Auditor
from bus_guard.ledger._records import (
    CHAIN_START,
    CHECKPOINT,
    Stored,
    decode_record,
    record_hash,
)
from bus_guard.signing._keys import kid_for
from bus_guard.verify import Jwks, b64url_decode, b64url_encode

__all__ = (
    "REGISTERED",
    "WITNESS_TYP",
    "LedgerIndex",
    "Witness",
    "Witnessed",
    "check_against_witness",
    "load_witnessed",
)

WITNESS_TYP: Final = "guard-witness+jwt"
LOG_NAME: Final = "witnessed.jsonl"
REGISTERED: Final = "registered"  # a Witnessed line's kind for a gateway run (registry)


class _Run(msgspec.Struct, kw_only=True):
    """What the witness reads of a gateway registry value (intake._lease.LeaseValue)."""

    epoch: str
    started: float
    heartbeat: float
    state: str = "live"
    ended: float | None = None


class Witnessed(msgspec.Struct, frozen=True, kw_only=True):
    """One countersigned chain head."""

    gateway: str
    seq: int
    hash: str  # record_hash of the record's exact bytes
    kind: str
    epoch: str
    final: bool
    ts: float  # the record's
    witnessed_at: float


@dataclass
class Witness:
    """Follows a ledger (feed every stored message in stream order) and countersigns."""

    directory: Path
    key: Ed25519PrivateKey
    gateway_jwks: Jwks
    prefix: str = "guard"
    auditor: Auditor = field(init=False)
    heads: dict[str, Witnessed] = field(default_factory=dict)  # latest per gateway
    refused: list[str] = field(default_factory=list)
    countersigned: int = 0

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.auditor = Auditor(self.prefix, self.gateway_jwks)
        self._kid = kid_for(self.key.public_key())
        header = msgspec.json.encode({"alg": "EdDSA", "kid": self._kid, "typ": WITNESS_TYP})
        self._prefix = b64url_encode(header) + b"."
        self._log = self.directory / LOG_NAME
        earlier = list(_read_lines(self._log, None))
        self._earlier = {(w.gateway, w.seq): w for w in earlier if w.kind != REGISTERED}
        self._registered = {(w.gateway, w.epoch, w.final) for w in earlier if w.kind == REGISTERED}
        self.registered = len(self._registered)

    def register(self, gateway: str, data: bytes) -> Witnessed | None:
        """A gateway registry value of *gateway* (its lease): countersign the run it
        describes once its chain start is certainly written (renewed, or ended), and again
        when it ended."""
        try:
            run = msgspec.json.decode(data, type=_Run)
        except msgspec.DecodeError:
            return None  # a delete marker, or not a lease
        ended = run.state == "ended"
        if not (ended or run.heartbeat > run.started):
            return None  # its chain start may not be written yet: not evidence of a chain
        if (gateway, run.epoch, ended) in self._registered:
            return None
        witnessed = Witnessed(
            gateway=gateway,
            seq=-1,
            hash="",
            kind=REGISTERED,
            epoch=run.epoch,
            final=ended,
            ts=run.started,
            witnessed_at=time.time(),
        )
        self._append(witnessed)
        self._registered.add((gateway, run.epoch, ended))
        self.registered += 1
        return witnessed

    def feed(self, stored: Stored) -> Witnessed | None:
        """Audit *stored*; countersign it if it is a sound chain start or checkpoint."""
        problems_before = len(self.auditor._problems)
        self.auditor.feed(stored)
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            return None
        if record.kind not in (CHAIN_START, CHECKPOINT):
            return None
        digest = record_hash(stored.data)
        earlier = self._earlier.get((record.gateway, record.seq))
        if earlier is not None:  # witnessed in an earlier life: the same bytes, or tampering
            if earlier.hash != digest:
                self.refused.append(
                    f"{record.gateway} seq {record.seq}: the ledger now holds another record "
                    "than the one witnessed (rewritten or forked)"
                )
            self.heads[record.gateway] = earlier
            return None
        new_problems = self.auditor._problems[problems_before:]
        if new_problems or self._broken(record.gateway):
            self.refused.append(
                f"{record.gateway} seq {record.seq}: not countersigned: "
                + ("; ".join(str(p) for p in new_problems) or "its chain is broken")
            )
            return None
        witnessed = Witnessed(
            gateway=record.gateway,
            seq=record.seq,
            hash=digest,
            kind=record.kind,
            epoch=record.epoch,
            final=record.final,
            ts=record.ts,
            witnessed_at=time.time(),
        )
        self._append(witnessed)
        self.heads[record.gateway] = witnessed
        self.countersigned += 1
        return witnessed

    def _broken(self, gateway: str) -> bool:
        chain = self.auditor._chains.get(gateway)
        return chain is None or chain.broken

    def _append(self, witnessed: Witnessed) -> None:
        claims = msgspec.json.encode(witnessed)
        signing_input = self._prefix + b64url_encode(claims)
        token = signing_input + b"." + b64url_encode(self.key.sign(signing_input))
        line = json.dumps({"jws": token.decode()}) + "\n"
        with self._log.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def load_witnessed(directory: Path, witness_jwks: Jwks) -> list[Witnessed]:
    """A witness's countersigned heads, each signature checked (:class:`ConfigError` on a
    line that does not verify: the witness's own log was tampered with)."""
    path = directory / LOG_NAME
    if not path.exists():
        raise ConfigError(f"{path}: no witness log here")
    return list(_read_lines(path, witness_jwks))


def _read_lines(path: Path, jwks: Jwks | None) -> Iterable[Witnessed]:
    if not path.exists():
        return
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token = json.loads(line)["jws"]
            header_seg, claims_seg, sig_seg = token.split(".")
            header = json.loads(b64url_decode(header_seg))
            witnessed = msgspec.json.decode(b64url_decode(claims_seg), type=Witnessed)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{n}: not a witness line ({exc})") from None
        if jwks is not None:
            public = jwks.get(header.get("kid", "")) if isinstance(header, dict) else None
            if public is None or header.get("typ") != WITNESS_TYP:
                raise ConfigError(f"{path}:{n}: signed by a key the witness JWKS does not hold")
            try:
                public.verify(b64url_decode(sig_seg), f"{header_seg}.{claims_seg}".encode())
            except (InvalidSignature, ValueError):
                raise ConfigError(f"{path}:{n}: the witness signature does not verify") from None
        yield witnessed


class LedgerIndex:
    """What a ledger holds, as :func:`check_against_witness` needs it: each gateway's
    record hash per seq (fed in stream order, without keeping the records)."""

    def __init__(self) -> None:
        self.by_position: dict[tuple[str, int], str] = {}
        self.last_seq: dict[str, int] = {}
        self.epochs: set[tuple[str, str]] = set()  # (gateway, epoch) of its runs' records

    def feed(self, stored: Stored) -> None:
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            return
        self.by_position.setdefault((record.gateway, record.seq), record_hash(stored.data))
        self.last_seq[record.gateway] = max(self.last_seq.get(record.gateway, -1), record.seq)
        if record.epoch:  # chain starts and checkpoints name their run
            self.epochs.add((record.gateway, record.epoch))

    def problems(self, witnessed: Iterable[Witnessed]) -> list[str]:
        """What the witness saw that this ledger does not hold: one line each."""
        problems: list[str] = []
        dropped: set[str] = set()
        gone: set[tuple[str, str]] = set()
        for w in witnessed:
            if w.gateway not in self.last_seq:
                if w.gateway not in dropped:
                    dropped.add(w.gateway)
                    seen = (
                        f"registered a run of it (epoch {w.epoch}, started {_utc(w.ts)})"
                        if w.kind == REGISTERED
                        else f"countersigned it up to at least seq {w.seq}"
                    )
                    problems.append(
                        f"gateway {w.gateway}: its chain is gone from the ledger (dropped), "
                        f"though the witness {seen}"
                    )
                continue
            if w.kind == REGISTERED:
                if (w.gateway, w.epoch) not in self.epochs and (w.gateway, w.epoch) not in gone:
                    gone.add((w.gateway, w.epoch))
                    problems.append(
                        f"gateway {w.gateway}: its run started {_utc(w.ts)} (epoch {w.epoch}, "
                        "registered) left no record in the ledger (truncated, pruned or "
                        "rebuilt without it)"
                    )
                continue
            held = self.by_position.get((w.gateway, w.seq))
            if held is None:
                problems.append(
                    f"gateway {w.gateway} seq {w.seq} ({w.kind}, witnessed): missing from the "
                    f"ledger, whose chain ends at seq {self.last_seq[w.gateway]} (truncated, "
                    "pruned or rebuilt)"
                )
            elif held != w.hash:
                problems.append(
                    f"gateway {w.gateway} seq {w.seq} ({w.kind}, witnessed): the ledger holds "
                    "another record there (rewritten or forked)"
                )
        return problems


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check_against_witness(ledger: Iterable[Stored], witnessed: Iterable[Witnessed]) -> list[str]:
    """What the witness saw that *ledger* (as read now) does not hold: one line each."""
    index = LedgerIndex()
    for stored in ledger:
        index.feed(stored)
    return index.problems(witnessed)
