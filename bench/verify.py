"""Artifacts signed and verified per second, per-message vs batched, in one process.

Baseline in the same run: raw Ed25519 sign / verify of the same bytes (the floor of the
per-message mode). Every message gets its own claims and payload; batched artifacts are
verified in arrival order, so each batch's first artifact pays the tree head's Ed25519
verification and the rest hit the head cache (that cost is included). Medians of
``--runs`` runs.

    python -m bench.verify --count 20000 --batch 256 --runs 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import emit, machine, medians, table
from bus_guard.signing._batch import BatchSigner
from bus_guard.signing._signer import ArtifactClaims, Signer
from bus_guard.verify import Verifier

SUBJECT = "guard.exec.agent-1.tools.search"


def _claims(signer: Signer, payloads: list[bytes], now: float) -> list[ArtifactClaims]:
    return [
        signer.build_claims(
            now=now,
            sub="agent-1",
            aud=SUBJECT,
            jti=f"01JD8{i:021d}",
            action="tools.search",
            resource="tool:search",
            intent_id=f"{i:032x}",
            payload=p,
            policy_digest="sha256:" + "ab" * 32,
            policy_version="tools@1.0.0",
            rules=("search-for-all",),
            mode="enforce",
            lineage_root="agent-1",
        )
        for i, p in enumerate(payloads)
    ]


def _rate(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def run_once(count: int, batch: int) -> dict[str, float]:
    key = Ed25519PrivateKey.generate()
    signer = Signer(key, issuer="gw-bench")
    batcher = BatchSigner(signer)
    now = time.time()
    payloads = [
        b'{"id":"%032x","action":"tools.search","params":{"q":"query %d"}}' % (i, i)
        for i in range(count)
    ]
    claims = _claims(signer, payloads, now)
    out: dict[str, float] = {}
    raw = [signer.sign(c).rsplit(".", 1)[0].encode() for c in claims[:2000]]
    sigs = [key.sign(m) for m in raw]
    public = key.public_key()
    out["ed25519_sign_per_s"] = _rate(lambda: sum(1 for m in raw if key.sign(m)))
    out["ed25519_verify_per_s"] = _rate(
        lambda: sum(1 for m, s in zip(raw, sigs, strict=True) if public.verify(s, m) is None)
    )

    per_message: list[str] = []
    batched: list[str] = []

    def sign_each() -> int:
        per_message[:] = [signer.sign(c) for c in claims]
        return len(claims)

    def sign_batched() -> int:
        batched.clear()
        for i in range(0, count, batch):
            batched.extend(batcher.sign_batch(claims[i : i + batch], now=now))
        return len(claims)

    out["sign_per_message_per_s"] = _rate(sign_each)
    out["sign_batched_per_s"] = _rate(sign_batched)

    def verify_all(tokens: list[str]) -> Callable[[], int]:
        verifier = Verifier(signer.jwks())

        def run() -> int:
            for token, payload in zip(tokens, payloads, strict=True):
                verifier.verify(token, subject=SUBJECT, payload=payload, now=now)
            return len(tokens)

        return run

    out["verify_per_message_per_s"] = _rate(verify_all(per_message))
    out["verify_batched_per_s"] = _rate(verify_all(batched))
    out["artifact_bytes_per_message"] = sum(map(len, per_message)) / count
    out["artifact_bytes_batched"] = sum(map(len, batched)) / count
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256, help="leaves per tree")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true", help="JSON only, no table")
    args = p.parse_args()
    run_once(min(args.count, 2000), args.batch)  # warm-up
    med = medians([run_once(args.count, args.batch) for _ in range(args.runs)])
    ratios = {
        "verify_batched_vs_per_message": med["verify_batched_per_s"]
        / med["verify_per_message_per_s"],
        "verify_per_message_vs_raw_ed25519": med["verify_per_message_per_s"]
        / med["ed25519_verify_per_s"],
        "sign_batched_vs_per_message": med["sign_batched_per_s"] / med["sign_per_message_per_s"],
        "sign_per_message_vs_raw_ed25519": med["sign_per_message_per_s"]
        / med["ed25519_sign_per_s"],
    }
    result: dict[str, Any] = {
        "benchmark": "verify",
        "machine": machine(),
        "count": args.count,
        "batch": args.batch,
        "runs": args.runs,
        "median": med,
        "ratios": ratios,
    }
    rows = [
        ["verify", "raw Ed25519 (baseline)", med["ed25519_verify_per_s"], ""],
        [
            "verify",
            "per-message",
            med["verify_per_message_per_s"],
            f"{ratios['verify_per_message_vs_raw_ed25519']:.2f}x raw",
        ],
        [
            "verify",
            f"batched ({args.batch}/tree)",
            med["verify_batched_per_s"],
            f"{ratios['verify_batched_vs_per_message']:.1f}x per-message",
        ],
        ["sign", "raw Ed25519 (baseline)", med["ed25519_sign_per_s"], ""],
        [
            "sign",
            "per-message",
            med["sign_per_message_per_s"],
            f"{ratios['sign_per_message_vs_raw_ed25519']:.2f}x raw",
        ],
        [
            "sign",
            f"batched ({args.batch}/tree)",
            med["sign_batched_per_s"],
            f"{ratios['sign_batched_vs_per_message']:.1f}x per-message",
        ],
    ]
    text = "\n".join(
        [
            f"## verify: artifacts per second, one process, medians of {args.runs}",
            table(["op", "mode", "artifacts/s", "ratio"], rows),
            f"artifact size: per-message {med['artifact_bytes_per_message']:.0f} B, "
            f"batched {med['artifact_bytes_batched']:.0f} B",
        ]
    )
    emit(result, text, json_only=args.json)


if __name__ == "__main__":
    main()
