"""Equivalent rule sets of any size for bus_guard, Cedar and Rego, and seeded requests.

Rule ``i`` of ``n`` (``i`` < ``n - 2``) lets principal ``agent-<i>`` do ``svc<i % 50>.read``
on resources ``doc:<i>/*`` while ``params.amount <= 100 + 10 * (i % 90)``; every tenth rule
is a ``deny`` (``forbid``) instead, with ``params.amount > 500``. Two rules cover every
principal: a ``deny`` on resources ``doc:sanctioned*`` and an ``allow`` of ``tools.search``.
The same semantics are written three ways:

* bus_guard: a validated :class:`~bus_guard.policy._model.Bundle`, compiled in memory
  (building it is not timed: YAML or not, loading 10,000 rules takes seconds);
* Cedar: ``permit``/``forbid`` with ``principal ==``, ``action ==`` and
  ``context.resource like "doc:<i>/*"``, parsed once into a ``PolicySet`` handle;
* Rego (regorus): one ``permit``/``deny`` rule body per rule, ``allow if { not deny;
  permit }``, loaded once.

Requests are seeded: mostly a random rule's principal and action with a matching resource
and a random amount (so allow, deny and no-match by condition all occur), plus pairs no
rule covers, searches and sanctioned resources. ``check_agreement`` confirms all engines
decide every request identically before anything is timed.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bus_guard.decision import Request
from bus_guard.policy._evaluator import PolicySet, compile_policy_set
from bus_guard.policy._model import Bundle

_enc = msgspec.json.Encoder()
ACTIONS = 50

try:
    import cedarpy

    HAVE_CEDAR = True
except ImportError:  # the bench extra is not installed: Cedar is skipped
    HAVE_CEDAR = False
try:
    import opa_eval

    HAVE_REGO = True
except ImportError:  # likewise for Rego
    HAVE_REGO = False


def _limit(i: int) -> int:
    return 100 + 10 * (i % 90)


def _is_deny(i: int) -> bool:
    return i % 10 == 9


def specific_rules(n: int) -> int:
    return max(0, n - 2)


def bus_guard_policy(n: int) -> PolicySet:
    rules: list[dict[str, Any]] = []
    for i in range(specific_rules(n)):
        deny = _is_deny(i)
        rules.append(
            {
                "id": f"r{i}",
                "effect": "deny" if deny else "allow",
                "principals": [f"agent-{i}"],
                "actions": [f"svc{i % ACTIONS}.read"],
                "resources": [f"doc:{i}/*"],
                "when": {"field": "params.amount", "gt": 500}
                if deny
                else {"field": "params.amount", "le": _limit(i)},
            }
        )
    rules.append(
        {"id": "sanctioned", "effect": "deny", "actions": [">"], "resources": ["doc:sanctioned*"]}
    )
    rules.append({"id": "search", "effect": "allow", "actions": ["tools.search"]})
    bundle = Bundle.model_validate({"bundle": "bench", "version": str(n), "rules": rules})
    policies, problems = compile_policy_set([("bench.yaml", bundle)], f"sha256:bench-{n}")
    if policies is None:
        raise RuntimeError(f"bench rule set does not compile: {problems[:3]}")
    return policies


def cedar_text(n: int) -> str:
    out = []
    for i in range(specific_rules(n)):
        deny = _is_deny(i)
        cond = "context.amount > 500" if deny else f"context.amount <= {_limit(i)}"
        out.append(
            f'@id("r{i}")\n{"forbid" if deny else "permit"} (principal == Agent::"agent-{i}", '
            f'action == Action::"svc{i % ACTIONS}.read", resource)\n'
            f'when {{ context.resource like "doc:{i}/*" && {cond} }};'
        )
    out.append(
        '@id("sanctioned")\nforbid (principal, action, resource)\n'
        'when { context.resource like "doc:sanctioned*" };'
    )
    out.append('@id("search")\npermit (principal, action == Action::"tools.search", resource);')
    return "\n".join(out) + "\n"


def rego_text(n: int) -> str:
    out = [
        "package authz",
        "import rego.v1",
        "",
        "default allow := false",
        "",
        "allow if {",
        "\tnot deny",
        "\tpermit",
        "}",
        "",
    ]
    for i in range(specific_rules(n)):
        deny = _is_deny(i)
        cond = "input.amount > 500" if deny else f"input.amount <= {_limit(i)}"
        out += [
            f"{'deny' if deny else 'permit'} if {{",
            f'\tinput.principal == "agent-{i}"',
            f'\tinput.action == "svc{i % ACTIONS}.read"',
            f'\tstartswith(input.resource, "doc:{i}/")',
            f"\t{cond}",
            "}",
            "",
        ]
    out += ['deny if startswith(input.resource, "doc:sanctioned")', ""]
    out += ['permit if input.action == "tools.search"', ""]
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    principal: str
    action: str
    resource: str
    amount: int

    @property
    def subject(self) -> str:
        return f"guard.in.{self.principal}.{self.action}"


def requests(n_rules: int, count: int, seed: int = 1) -> list[BenchRequest]:
    rng = random.Random(seed)
    k = max(1, specific_rules(n_rules))
    out = []
    for _ in range(count):
        kind = rng.random()
        i = rng.randrange(k)
        amount = rng.randrange(0, 1200)
        if kind < 0.75 and specific_rules(n_rules):
            resource = f"doc:{i}/{rng.randrange(100)}" if rng.random() < 0.9 else f"doc:{i + 1}/x"
            out.append(BenchRequest(f"agent-{i}", f"svc{i % ACTIONS}.read", resource, amount))
        elif kind < 0.85:  # a pair no specific rule covers
            out.append(
                BenchRequest(f"agent-{i}", f"svc{(i + 1) % ACTIONS}.write", f"doc:{i}/1", amount)
            )
        elif kind < 0.95:
            out.append(BenchRequest(f"agent-{i}", "tools.search", "doc:search", amount))
        else:
            out.append(BenchRequest(f"agent-{i}", "tools.search", "doc:sanctioned-3", amount))
    return out


# --- each engine's natural input, built before timing -----------------------------------


def bus_guard_request(r: BenchRequest) -> Request:
    return Request(
        principal=r.principal, action=r.action, resource=r.resource, params={"amount": r.amount}
    )


def intent_bytes(r: BenchRequest, now: float, i: int) -> bytes:
    return _enc.encode(
        {
            "id": uuid.UUID(int=i).hex,
            "action": r.action,
            "resource": r.resource,
            "params": {"amount": r.amount},
            "ts": now,
        }
    )


def cedar_request(r: BenchRequest) -> dict[str, Any]:
    return {
        "principal": f'Agent::"{r.principal}"',
        "action": f'Action::"{r.action}"',
        "resource": 'Doc::"d"',
        "context": {"resource": r.resource, "amount": r.amount},
    }


def rego_input(r: BenchRequest) -> str:
    return json.dumps(
        {"principal": r.principal, "action": r.action, "resource": r.resource, "amount": r.amount}
    )


class Engines:
    """The three engines loaded with the same *n* rules (peers only when installed)."""

    def __init__(self, n: int, tmp: Path) -> None:
        self.n = n
        t0 = time.perf_counter()
        self.policies = bus_guard_policy(n)
        self.load_s = {"bus_guard": time.perf_counter() - t0}
        self.cedar: Any = None
        self.rego: Any = None
        if HAVE_CEDAR:
            t0 = time.perf_counter()
            self.cedar = (
                cedarpy,
                cedarpy.PolicySet.from_str(cedar_text(n)),
                cedarpy.Entities.from_json_str("[]"),
            )
            self.load_s["cedar"] = time.perf_counter() - t0
        if HAVE_REGO:
            path = tmp / f"bench-{n}.rego"
            path.write_text(rego_text(n))
            t0 = time.perf_counter()
            self.rego = opa_eval.OpaEval(str(path), query="data.authz.allow")
            self.load_s["rego"] = time.perf_counter() - t0

    def check_agreement(self, reqs: list[BenchRequest]) -> dict[str, int]:
        """Every engine's allow/deny for every request; raises on the first disagreement."""
        allowed = 0
        for r in reqs:
            ours = self.policies.evaluate(bus_guard_request(r)).allowed
            if self.cedar is not None:
                cedarpy, ps, ents = self.cedar
                theirs = cedarpy.is_authorized(cedar_request(r), ps, ents).allowed
                if theirs != ours:
                    raise AssertionError(f"cedar disagrees on {r}: {theirs} vs {ours}")
            if self.rego is not None:
                theirs = self.rego.evaluate_parsed(rego_input(r))
                if theirs is not ours:
                    raise AssertionError(f"rego disagrees on {r}: {theirs} vs {ours}")
            allowed += ours
        return {"checked": len(reqs), "allowed": allowed}
