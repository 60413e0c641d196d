"""Benchmark rule sets: families of policies of any size, each written three ways (bus_guard,
Cedar, Rego) with the same semantics, and seeded requests over them.

A family is a function ``n -> Spec``: *n* rules in a small rule language (:class:`IRule`:
principals, actions, resources and a conjunction of comparisons) plus the bundles' groups
and principal attributes, the pools requests are drawn from, and how params are drawn.
Each engine gets the family rendered in its own idiom:

* bus_guard: bundle dicts (one per bundle), validated and compiled in memory;
* Cedar: ``permit`` / ``forbid`` (an escalate is a ``forbid``: a hold is not an allow)
  with ``principal == Agent::…`` / ``principal in Group::…`` scopes, ``action in [...]``,
  ``context.resource like "…"`` and ``principal.<attr>`` conditions; groups and
  attributes as an entity store (attributes named ``<bundle>_<attr>``: bus_guard reads a
  principal's attributes from the rule's own bundle);
* Rego (regorus): one ``permit`` / ``deny`` body per rule, ``allow if { not deny;
  permit }``, with groups and attributes as ``data`` (keyed by bundle).

The families (``FAMILIES``):

* ``per_principal``: a rule per principal (every tenth a conditional deny), one
  any-action deny on a resource prefix, one allow for everyone (the original benchmark);
* ``prefix_denies``: deny rules for any principal and any action, each on its own
  resource prefix, over three allows;
* ``layered``: deny and escalate rules layered over team allows: ``svc.>`` and
  any-action rules, ``prefix*-env`` and ``*-env`` resources, principal-attribute
  conditions;
* ``rbac``: hundreds of roles (groups; users in one to three), allows on actions and
  project prefixes, escalations and denies per role, a suspended group;
* ``abac``: rules for any principal guarded by principal attributes (department, level,
  status) and params (classification, region);
* ``denylist``: thousands of exact resources denied to everyone, under broad allows;
* ``tenants``: one bundle per tenant (its own groups and attributes), ~40 rules each.

Requests (:func:`request_lists`): a *cold* list over at least 50,000 distinct
(principal, action) pairs (every pair of the principal and action pools, each once, with
a resource and params drawn for it; plus requests aimed at random rules), and a *warm*
list over a few hundred pairs. :class:`Engines` loads one spec into every engine and
:meth:`Engines.check` compares every engine's decision, and bus_guard's whole outcome with
the reference interpreter of the S16 test (``tests/reference.py``), before anything is
timed.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bus_guard.decision import Request
from bus_guard.policy._evaluator import PolicySet, compile_policy_set
from bus_guard.policy._model import Bundle
from tests.reference import RefBundle, reference

_enc = msgspec.json.Encoder()

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

Leaf = tuple[str, str, Any]  # (field, op, literal): "params.amount", "le", 100


@dataclass(frozen=True, slots=True)
class IRule:
    """One rule, in the subset of the language all three engines express alike: principals
    ``*``, ids, ``group:<g>`` or a ``p*`` glob; actions exact, ``x.>`` or ``>``; resources
    ``*``, exact or globs of ``*`` only; ``when``: every comparison holds."""

    id: str
    effect: str  # allow | deny | escalate
    principals: tuple[str, ...] = ("*",)
    actions: tuple[str, ...] = (">",)
    resources: tuple[str, ...] = ("*",)
    when: tuple[Leaf, ...] = ()
    bundle: str = "bench"


@dataclass(frozen=True, slots=True)
class BundleData:
    name: str
    groups: dict[str, list[str]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    principal: str
    action: str
    resource: str
    params: dict[str, Any]

    @property
    def subject(self) -> str:
        return f"guard.in.{self.principal}.{self.action}"


@dataclass(frozen=True)
class Spec:
    family: str
    n: int
    bundles: tuple[BundleData, ...]
    rules: tuple[IRule, ...]
    principals: tuple[str, ...]  # the pool of requesting principals
    actions: tuple[str, ...]  # the pool of requested actions
    resource: Callable[[random.Random], str]  # a resource drawn without a rule in mind
    params: Callable[[random.Random], dict[str, Any]]


# --- the families ------------------------------------------------------------------------

POOL_PRINCIPALS = 1200  # x at least 50 actions: >= 60,000 distinct pairs in the cold list


def _amount(rng: random.Random) -> dict[str, Any]:
    return {"amount": rng.randrange(0, 1500)}


def _pool(names: Sequence[str], size: int, filler: str) -> tuple[str, ...]:
    """*names* cut or padded (with ``<filler>-<i>``) to *size*."""
    out = list(dict.fromkeys(names))[:size]
    out += [f"{filler}-{i}" for i in range(size - len(out))]
    return tuple(out)


def per_principal(n: int) -> Spec:
    """Rule ``i`` lets ``agent-<i>`` do ``svc<i % 50>.read`` on ``doc:<i>/*`` while
    ``params.amount <= 100 + 10 * (i % 90)``; every tenth is a deny when ``amount > 500``.
    Two rules cover everyone: a deny of any action on ``doc:sanctioned*`` and an allow of
    ``tools.search``."""
    rules = []
    for i in range(max(0, n - 2)):
        deny = i % 10 == 9
        rules.append(
            IRule(
                f"r{i}",
                "deny" if deny else "allow",
                (f"agent-{i}",),
                (f"svc{i % 50}.read",),
                (f"doc:{i}/*",),
                (("params.amount", "gt", 500),)
                if deny
                else (("params.amount", "le", 100 + 10 * (i % 90)),),
            )
        )
    rules.append(IRule("sanctioned", "deny", resources=("doc:sanctioned*",)))
    rules.append(IRule("search", "allow", actions=("tools.search",)))
    actions = [f"svc{i}.{op}" for i in range(50) for op in ("read", "write")] + ["tools.search"]

    def resource(rng: random.Random) -> str:
        roll = rng.random()
        if roll < 0.05:
            return "doc:sanctioned-3"
        return f"doc:{rng.randrange(POOL_PRINCIPALS)}/{rng.randrange(100)}"

    return Spec(
        "per_principal",
        n,
        (BundleData("bench"),),
        tuple(rules[:n]),
        tuple(f"agent-{i}" for i in range(POOL_PRINCIPALS)),
        tuple(actions),
        resource,
        _amount,
    )


def prefix_denies(n: int) -> Spec:
    """``n - 3`` deny rules, each for any principal and any action on its own resource
    prefix ``zone<i>/``, over three allows (``agent-*`` on ``app.>``, everyone's
    ``tools.search``, the admins group on everything)."""
    admins = [f"admin-{i}" for i in range(20)]
    rules = [
        IRule("apps", "allow", ("agent-*",), ("app.>",)),
        IRule("search", "allow", actions=("tools.search",)),
        IRule("admins", "allow", ("group:admins",)),
    ]
    rules += [IRule(f"d{i}", "deny", resources=(f"zone{i}/*",)) for i in range(n - 3)]
    actions = [f"app.s{s}.{op}" for s in range(12) for op in ("read", "write", "list", "delete")]
    actions += ["tools.search", "tools.shell"]
    zones = max(n, 10)

    def resource(rng: random.Random) -> str:
        if rng.random() < 0.1:
            return f"home/{rng.randrange(100)}"
        return f"zone{rng.randrange(2 * zones)}/f{rng.randrange(100)}"

    return Spec(
        "prefix_denies",
        n,
        (BundleData("bench", {"admins": admins}),),
        tuple(rules[:n]),
        _pool([f"agent-{i}" for i in range(POOL_PRINCIPALS - 20)] + admins, POOL_PRINCIPALS, "x"),
        tuple(actions),
        resource,
        _amount,
    )


def layered(n: int) -> Spec:
    """Team allows (``group:team<t>`` on ``svc<s>.>``) under denies and escalations for any
    principal: ``svc<s>.>`` on ``prod<j>*-env`` when ``principal.clearance < 3``, any
    action on ``*-x<j>-env`` when ``clearance < 2``, ``svc<s>.write`` on ``*-e<j>-env``
    when ``amount > 500`` (escalate), team rules for contractors (``principal.tier``),
    any action on ``secret<j>*``; public reads on ``pub<j>-*``."""
    services = max(12, n // 20)
    teams = max(4, n // 50)
    rng = random.Random(f"layered-{n}")
    users = [f"u{k}" for k in range(POOL_PRINCIPALS)]
    groups: dict[str, list[str]] = {f"team{t}": [] for t in range(teams)}
    attrs: dict[str, dict[str, Any]] = {}
    for k, user in enumerate(users):
        groups[f"team{k % teams}"].append(user)
        if rng.random() < 0.3:
            groups[f"team{rng.randrange(teams)}"].append(user)
        attrs[user] = {
            "clearance": rng.randint(1, 5),
            "tier": "contractor" if rng.random() < 0.2 else "staff",
        }
    groups = {g: sorted(set(m)) for g, m in groups.items()}
    rules = []
    when: tuple[Leaf, ...]
    for i in range(n):
        j, kind = divmod(i, 10)
        s = j % services
        team = f"group:team{(3 * j + kind) % teams}"
        match kind:
            case 0 | 1:
                rules.append(IRule(f"a{i}", "allow", (team,), (f"svc{(s + kind) % services}.>",)))
            case 2:
                when = (("params.amount", "le", 1000),)
                rules.append(IRule(f"a{i}", "allow", (team,), (f"svc{s}.>",), when=when))
            case 3:
                rules.append(IRule(f"a{i}", "allow", ("*",), (f"svc{s}.read",), (f"pub{j}-*",)))
            case 4:
                when = (("principal.clearance", "lt", 3),)
                res = (f"prod{j}*-env",)
                rules.append(IRule(f"d{i}", "deny", ("*",), (f"svc{s}.>",), res, when))
            case 5:
                when = (("principal.clearance", "lt", 2),)
                rules.append(IRule(f"d{i}", "deny", ("*",), (">",), (f"*-x{j}-env",), when))
            case 6:
                when = (("params.amount", "gt", 500),)
                res = (f"*-e{j}-env",)
                rules.append(IRule(f"e{i}", "escalate", ("*",), (f"svc{s}.write",), res, when))
            case 7:
                when = (("principal.tier", "eq", "contractor"),)
                rules.append(IRule(f"e{i}", "escalate", (team,), (">",), (f"prod{j}*",), when))
            case 8:
                when = (("principal.clearance", "lt", 4),)
                rules.append(IRule(f"d{i}", "deny", ("*",), (f"svc{s}.admin",), ("*",), when))
            case _:
                rules.append(IRule(f"d{i}", "deny", ("*",), (">",), (f"secret{j}*",)))
    blocks = max(1, n // 10)
    actions = [
        f"svc{s}.{op}" for s in range(services) for op in ("read", "write", "admin", "list", "op")
    ]

    def resource(rng: random.Random) -> str:
        j = rng.randrange(blocks + 2)
        return rng.choice(
            [
                *(f"prod{j}-db-env", f"app-x{j}-env", f"app-e{j}-env", f"pub{j}-doc"),
                *(f"secret{j}-k", f"prod{j}{rng.randrange(9)}-web-env", f"misc/{rng.randrange(9)}"),
            ]
        )

    return Spec(
        "layered",
        n,
        (BundleData("bench", groups, attrs),),
        tuple(rules),
        tuple(users),
        tuple(actions),
        resource,
        _amount,
    )


def rbac(n: int) -> Spec:
    """Roles as groups (``n / 20`` of them, hundreds at 10,000 rules; 2,000 users in one to
    three roles each): allows of exact actions or action lists on a project prefix or on
    everything, escalations of deletes above an amount, denies of another app's actions on
    a project's secrets, and a ``suspended`` group denied everything on each project."""
    roles = max(1, n // 20)
    apps = max(10, roles // 2)
    rng = random.Random(f"rbac-{n}")
    users = [f"user{k}" for k in range(2000)]
    groups: dict[str, set[str]] = {f"role{r}": set() for r in range(roles)}
    for k, user in enumerate(users):  # every role has members; users have one to three
        groups[f"role{k % roles}"].add(user)
        for r in rng.sample(range(roles), min(roles, rng.randint(0, 2))):
            groups[f"role{r}"].add(user)
    groups["suspended"] = set(rng.sample(users, 40))
    ops = ("read", "list", "write", "delete", "admin")
    rules = []
    for i in range(n):
        r = i % roles
        role, app = f"group:role{r}", f"app{(r + i // roles) % apps}"
        roll = rng.random()
        if roll < 0.65:
            picked = rng.sample(ops[:3], rng.randint(1, 2))
            acts = tuple(f"{app}.{op}" for op in sorted(picked))
            res = rng.choice([f"proj{r}/*", f"proj{r}/{i}/*", "*"])
            when: tuple[Leaf, ...] = ()
            if "write" in picked and rng.random() < 0.5:
                when = (("params.amount", "le", 1000),)
            rules.append(IRule(f"allow{i}", "allow", (role,), acts, (res,), when))
        elif roll < 0.8:
            when = (("params.amount", "gt", 100 * rng.randint(1, 9)),)
            acts = (f"{app}.delete",)
            rules.append(IRule(f"hold{i}", "escalate", (role,), acts, (f"proj{r}/*",), when))
        elif roll < 0.95:
            acts = (f"app{(r + 1) % apps}.>",)
            rules.append(IRule(f"deny{i}", "deny", (role,), acts, (f"proj{r}/secret*",)))
        else:
            rules.append(IRule(f"susp{i}", "deny", ("group:suspended",), (">",), (f"proj{r}/*",)))
    actions = [f"app{a}.{op}" for a in range(apps) for op in ops]

    def resource(rng: random.Random) -> str:
        r = rng.randrange(roles + 1)
        return rng.choice([f"proj{r}/{rng.randrange(n)}/x", f"proj{r}/secret-1", f"proj{r}/doc"])

    return Spec(
        "rbac",
        n,
        (BundleData("bench", {g: sorted(m) for g, m in groups.items()}),),
        tuple(rules),
        tuple(users[:POOL_PRINCIPALS]),
        tuple(actions),
        resource,
        _amount,
    )


def abac(n: int) -> Spec:
    """Rules for any principal, guarded by attributes: department ``d<k>`` reads (level at
    least L) and writes (level at least 3, classification at most 2) its documents;
    restricted documents escalate from classification 4; exports to some regions are
    denied to principals without the export flag; suspended principals are denied."""
    depts = max(3, n // 8)
    rng = random.Random(f"abac-{n}")
    users = [f"emp{k}" for k in range(POOL_PRINCIPALS)]
    attrs = {
        user: {
            "dept": f"d{rng.randrange(depts)}",
            "level": rng.randint(1, 5),
            "status": "suspended" if rng.random() < 0.03 else "active",
            "export": rng.random() < 0.5,
        }
        for user in users
    }
    rules = []
    for i in range(n):
        d, kind = i % depts, (i // depts) % 5
        dept = ("principal.dept", "eq", f"d{d}")
        match kind:
            case 0:
                when: tuple[Leaf, ...] = (dept, ("principal.level", "ge", 1 + i % 3))
                rules.append(
                    IRule(f"r{i}", "allow", ("*",), (f"docs{d}.read",), (f"dept{d}/*",), when)
                )
            case 1:
                when = (dept, ("principal.level", "ge", 3), ("params.classification", "le", 2))
                acts = (f"docs{d}.write", f"docs{d}.update")
                rules.append(IRule(f"w{i}", "allow", ("*",), acts, (f"dept{d}/*",), when))
            case 2:
                when = (("params.classification", "ge", 4),)
                res = (f"dept{d}/restricted/*",)
                rules.append(IRule(f"e{i}", "escalate", ("*",), (f"docs{d}.>",), res, when))
            case 3:
                when = (
                    ("params.region", "in", ["cn", "ru", "ir"]),
                    ("principal.export", "eq", False),
                )
                rules.append(IRule(f"x{i}", "deny", ("*",), (f"docs{d}.>",), ("*",), when))
            case _:
                when = (("principal.status", "eq", "suspended"), dept)
                rules.append(IRule(f"s{i}", "deny", ("*",), (">",), (f"dept{d}/*",), when))
    actions = [
        f"docs{d}.{op}" for d in range(max(depts, 13)) for op in ("read", "write", "update", "list")
    ]

    def resource(rng: random.Random) -> str:
        d = rng.randrange(depts + 1)
        return rng.choice([f"dept{d}/doc{rng.randrange(50)}", f"dept{d}/restricted/r1", "misc"])

    def params(rng: random.Random) -> dict[str, Any]:
        return {
            "amount": rng.randrange(1500),
            "classification": rng.randrange(6),
            "region": rng.choice(["eu", "us", "cn", "ru"]),
        }

    return Spec(
        "abac",
        n,
        (BundleData("bench", {}, attrs),),
        tuple(rules),
        tuple(users),
        tuple(actions),
        resource,
        params,
    )


def denylist(n: int) -> Spec:
    """``n - 3`` deny rules for anyone on one to three exact resources each (``file:<k>``,
    thousands in all), under allows of ``files.>`` on ``file:*`` for everyone, of
    everything for the ops group, and of ``tools.search``."""
    rng = random.Random(f"denylist-{n}")
    ops = [f"ops-{i}" for i in range(10)]
    rules = [
        IRule("files", "allow", actions=("files.>",), resources=("file:*",)),
        IRule("ops", "allow", ("group:ops",)),
        IRule("search", "allow", actions=("tools.search",)),
    ]
    k = 0
    for i in range(n - 3):
        count = rng.randint(1, 3)
        acts = ("files.>",) if i % 2 else (">",)
        res = tuple(f"file:{k + j}" for j in range(count))
        k += count
        rules.append(IRule(f"block{i}", "deny", actions=acts, resources=res))
    actions = [f"files.{op}.{x}" for op in ("get", "put", "list", "del") for x in range(12)]
    actions += ["tools.search", "tools.shell"]
    files = max(k, 10)

    def resource(rng: random.Random) -> str:
        return f"file:{rng.randrange(2 * files)}" if rng.random() < 0.95 else "file:"

    return Spec(
        "denylist",
        n,
        (BundleData("bench", {"ops": ops}),),
        tuple(rules[:n]),
        _pool([f"agent-{i}" for i in range(POOL_PRINCIPALS - 10)] + ops, POOL_PRINCIPALS, "x"),
        tuple(actions),
        resource,
        _amount,
    )


def tenants(n: int) -> Spec:
    """One bundle per tenant (``n / 40`` tenants, 40 rules each): its users and admins as
    groups, a tier attribute, allows of API reads and writes per project prefix, the
    admins on everything of the tenant, escalated billing above an amount, denies of
    locked projects and of suspended users (by attribute)."""
    per = 40
    count = max(1, -(-n // per))
    bundles = []
    rules: list[IRule] = []
    principals: list[str] = []
    rng = random.Random(f"tenants-{n}")
    for t in range(count):
        name = f"tenant{t}"
        users = [f"t{t}-u{k}" for k in range(10)]
        admins = [f"t{t}-a{k}" for k in range(2)]
        principals += users + admins
        attrs = {
            u: {"tier": rng.choice(["free", "pro", "suspended"] if k == 0 else ["free", "pro"])}
            for k, u in enumerate(users)
        }
        bundles.append(BundleData(name, {f"t{t}-users": users, f"t{t}-admins": admins}, attrs))
        mine: list[IRule] = [
            IRule(f"t{t}-admins", "allow", (f"group:t{t}-admins",), ("api.>",), (f"t{t}/*",)),
            IRule(
                f"t{t}-billing",
                "escalate",
                (f"group:t{t}-users",),
                ("billing.>",),
                (f"t{t}/*",),
                (("params.amount", "gt", 100),),
            ),
            IRule(f"t{t}-locked", "deny", ("*",), ("api.>",), (f"t{t}/locked/*",)),
            IRule(
                f"t{t}-suspended",
                "deny",
                ("*",),
                (">",),
                (f"t{t}/*",),
                (("principal.tier", "eq", "suspended"),),
            ),
        ]
        for p in range(per - len(mine)):
            acts = (
                (f"api.p{p % 8}.read", f"api.p{p % 8}.list") if p % 3 else (f"api.p{p % 8}.write",)
            )
            when: tuple[Leaf, ...] = (("principal.tier", "eq", "pro"),) if p % 3 == 0 else ()
            rule = IRule(
                f"t{t}-p{p}", "allow", (f"group:t{t}-users",), acts, (f"t{t}/p{p}/*",), when
            )
            mine.append(rule)
        rules += [
            IRule(r.id, r.effect, r.principals, r.actions, r.resources, r.when, name) for r in mine
        ]
    rules = rules[:n]
    used = {r.bundle for r in rules}
    bundles = [b for b in bundles if b.name in used]
    actions = [f"api.p{p}.{op}" for p in range(8) for op in ("read", "list", "write", "delete")]
    actions += [f"billing.{op}" for op in ("pay", "refund", "view")] + [
        f"misc.op{i}" for i in range(15)
    ]

    def resource(rng: random.Random) -> str:
        t = rng.randrange(count)
        return rng.choice([f"t{t}/p{rng.randrange(per)}/x", f"t{t}/locked/y", f"t{t}/z"])

    return Spec(
        "tenants",
        n,
        tuple(bundles),
        tuple(rules),
        _pool(principals, POOL_PRINCIPALS, "guest"),
        tuple(actions),
        resource,
        _amount,
    )


FAMILIES: dict[str, Callable[[int], Spec]] = {
    "per_principal": per_principal,
    "prefix_denies": prefix_denies,
    "layered": layered,
    "rbac": rbac,
    "abac": abac,
    "denylist": denylist,
    "tenants": tenants,
}


# --- bus_guard -----------------------------------------------------------------------------


def _leaf_dict(leaf: Leaf) -> dict[str, Any]:
    name, op, value = leaf
    return {"field": name, op: value}


def rule_dict(rule: IRule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rule.id,
        "effect": rule.effect,
        "principals": list(rule.principals),
        "actions": list(rule.actions),
        "resources": list(rule.resources),
    }
    if len(rule.when) == 1:
        out["when"] = _leaf_dict(rule.when[0])
    elif rule.when:
        out["when"] = {"all": [_leaf_dict(leaf) for leaf in rule.when]}
    return out


def bundle_dicts(spec: Spec) -> list[tuple[str, dict[str, Any]]]:
    """(file name, bundle data) per bundle, in file order."""
    out = []
    for b in spec.bundles:
        data: dict[str, Any] = {
            "bundle": b.name,
            "version": str(spec.n),
            "rules": [rule_dict(r) for r in spec.rules if r.bundle == b.name],
        }
        if b.groups:
            data["groups"] = b.groups
        if b.attrs:
            data["principals"] = b.attrs
        out.append((f"{b.name}.yaml", data))
    return out


def bus_guard_load(
    bundles: list[tuple[str, dict[str, Any]]], digest: str
) -> tuple[PolicySet, float]:
    """Validate and compile (what loading does after YAML); the policy set and the seconds
    compiling alone took."""
    validated = [(file, Bundle.model_validate(data)) for file, data in bundles]
    t0 = time.perf_counter()
    policies, problems = compile_policy_set(validated, digest)
    compile_s = time.perf_counter() - t0
    if policies is None:
        raise RuntimeError(f"bench rule set does not compile: {problems[:3]}")
    return policies, compile_s


def reference_bundles(spec: Spec) -> list[RefBundle]:
    return [
        RefBundle(data.get("groups", {}), data.get("principals", {}), data["rules"])
        for _, data in bundle_dicts(spec)
    ]


# --- Cedar ---------------------------------------------------------------------------------

_CEDAR_OPS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def _q(value: Any) -> str:
    return json.dumps(value)


def _cedar_attr(bundle: str, name: str) -> str:
    return f"{bundle}_{name}".replace("-", "_")


def _cedar_principal(pattern: str, bundle: str) -> str:
    if pattern.startswith("group:"):
        return f"principal in Group::{_q(bundle + '/' + pattern.removeprefix('group:'))}"
    if pattern.endswith("*"):
        return f"context.principal like {_q(pattern)}"
    return f"principal == Agent::{_q(pattern)}"


def _cedar_leaf(leaf: Leaf, bundle: str) -> str:
    name, op, value = leaf
    root, _, rest = name.partition(".")
    if root == "params":
        subject, guard = f"context.{rest}", f"context has {rest}"
    else:
        attr = _cedar_attr(bundle, rest)
        subject, guard = f"principal.{attr}", f"principal has {attr}"
    if op == "in":
        return f"({guard} && {_q(value)}.contains({subject}))"
    return f"({guard} && {subject} {_CEDAR_OPS[op]} {_q(value)})"


def _cedar_rule(rule: IRule) -> str:
    scope_p, scope_a = "principal", "action"
    when: list[str] = []
    if rule.principals != ("*",):
        if len(rule.principals) == 1 and not rule.principals[0].endswith("*"):
            scope_p = _cedar_principal(rule.principals[0], rule.bundle)
        else:
            when.append(
                "(" + " || ".join(_cedar_principal(p, rule.bundle) for p in rule.principals) + ")"
            )
    if ">" not in rule.actions:
        if all(not a.endswith(">") for a in rule.actions):
            acts = ", ".join(f"Action::{_q(a)}" for a in rule.actions)
            scope_a = f"action in [{acts}]"
        else:
            parts = [
                f"context.action like {_q(a[:-1] + '*')}"
                if a.endswith(".>")
                else f"context.action == {_q(a)}"
                for a in rule.actions
            ]
            when.append("(" + " || ".join(parts) + ")")
    if "*" not in rule.resources:
        exact = [r for r in rule.resources if "*" not in r]
        parts = [f"context.resource like {_q(r)}" for r in rule.resources if "*" in r]
        if len(exact) == 1:
            parts.append(f"context.resource == {_q(exact[0])}")
        elif exact:
            parts.append(f"{_q(exact)}.contains(context.resource)")
        when.append("(" + " || ".join(parts) + ")")
    when += [_cedar_leaf(leaf, rule.bundle) for leaf in rule.when]
    head = "permit" if rule.effect == "allow" else "forbid"
    body = f" when {{ {' && '.join(when)} }}" if when else ""
    return f"@id({_q(rule.id)})\n{head} ({scope_p}, {scope_a}, resource){body};"


def cedar_text(spec: Spec) -> str:
    return "\n".join(_cedar_rule(r) for r in spec.rules) + "\n"


def cedar_entities(spec: Spec) -> str:
    agents: dict[str, dict[str, Any]] = {}
    groups = []
    for b in spec.bundles:
        for group, members in b.groups.items():
            gid = f"{b.name}/{group}"
            groups.append({"uid": {"type": "Group", "id": gid}, "attrs": {}, "parents": []})
            for m in members:
                agent = agents.setdefault(m, {"attrs": {}, "parents": []})
                agent["parents"].append({"type": "Group", "id": gid})
        for principal, attrs in b.attrs.items():
            agent = agents.setdefault(principal, {"attrs": {}, "parents": []})
            agent["attrs"].update({_cedar_attr(b.name, k): v for k, v in attrs.items()})
    entities = [{"uid": {"type": "Agent", "id": a}, **e} for a, e in sorted(agents.items())]
    return json.dumps(groups + entities)


def cedar_request(r: BenchRequest) -> dict[str, Any]:
    return {
        "principal": f"Agent::{_q(r.principal)}",
        "action": f"Action::{_q(r.action)}",
        "resource": 'Doc::"d"',
        "context": {"principal": r.principal, "action": r.action, "resource": r.resource}
        | r.params,
    }


# --- Rego ----------------------------------------------------------------------------------


def _rego_set(values: Sequence[Any]) -> str:
    return "{" + ", ".join(_q(v) for v in values) + "}"


def _rego_rule(rule: IRule) -> list[str]:
    body = []
    if rule.principals != ("*",):
        (p,) = rule.principals  # the families give one pattern, or "*"
        if p.startswith("group:"):
            group = p.removeprefix("group:")
            body.append(f"data.groups[{_q(rule.bundle)}][{_q(group)}][input.principal]")
        elif p.endswith("*"):
            body.append(f"startswith(input.principal, {_q(p[:-1])})")
        else:
            body.append(f"input.principal == {_q(p)}")
    if ">" not in rule.actions:
        if len(rule.actions) == 1 and rule.actions[0].endswith(".>"):
            body.append(f"startswith(input.action, {_q(rule.actions[0][:-1])})")
        elif len(rule.actions) == 1:
            body.append(f"input.action == {_q(rule.actions[0])}")
        else:
            assert not any(a.endswith(">") for a in rule.actions)
            body.append(f"input.action in {_rego_set(rule.actions)}")
    if "*" not in rule.resources:
        if all("*" not in r for r in rule.resources):
            if len(rule.resources) == 1:
                body.append(f"input.resource == {_q(rule.resources[0])}")
            else:
                body.append(f"input.resource in {_rego_set(rule.resources)}")
        else:
            (glob,) = rule.resources
            head, *middle, tail = glob.split("*")
            assert not middle, glob
            if head:
                body.append(f"startswith(input.resource, {_q(head)})")
            if tail:
                body.append(f"endswith(input.resource, {_q(tail)})")
            if head and tail:  # a glob's head and tail never share characters
                body.append(f"count(input.resource) >= {len(head) + len(tail)}")
    for name, op, value in rule.when:
        root, _, rest = name.partition(".")
        subject = (
            f"input.params.{rest}"
            if root == "params"
            else f"data.attrs[{_q(rule.bundle)}][input.principal].{rest}"
        )
        if op == "in":
            body.append(f"{subject} in {_rego_set(value)}")
        else:
            body.append(f"{subject} {_CEDAR_OPS[op]} {_q(value)}")
    head = "permit" if rule.effect == "allow" else "deny"
    return [f"{head} if {{  # {rule.id}", *(f"\t{line}" for line in body), "}", ""]


def rego_text(spec: Spec) -> str:
    out = ["package authz", "import rego.v1", "", "default allow := false", ""]
    out += ["allow if {", "\tnot deny", "\tpermit", "}", ""]
    for rule in spec.rules:
        out += _rego_rule(rule)
    return "\n".join(out)


def rego_data(spec: Spec) -> str:
    return json.dumps(
        {
            "groups": {
                b.name: {g: dict.fromkeys(m, True) for g, m in b.groups.items()}
                for b in spec.bundles
            },
            "attrs": {b.name: b.attrs for b in spec.bundles},
        }
    )


def rego_input(r: BenchRequest) -> str:
    return json.dumps(
        {"principal": r.principal, "action": r.action, "resource": r.resource, "params": r.params}
    )


# --- requests ------------------------------------------------------------------------------


def _instance(pattern: str, rng: random.Random) -> str:
    return pattern.replace("*", f"q{rng.randrange(1000)}")


def aimed(
    spec: Spec, rng: random.Random, _having: dict[tuple[str, Any], list[str]] | None = None
) -> BenchRequest:
    """A request at a random rule: one of its principals, actions and resources.
    *_having*: a memo of the principals having attribute values, across calls."""
    if _having is None:
        _having = {}
    rule = rng.choice(spec.rules)
    bundle = next(b for b in spec.bundles if b.name == rule.bundle)
    p = rng.choice(rule.principals)
    # For a rule that asks for a principal attribute's value, often someone who has it.
    wanted = tuple(
        (name.removeprefix("principal."), v)
        for name, op, v in rule.when
        if op == "eq" and name.startswith("principal.")
    )
    having = _having.get((bundle.name, wanted)) if wanted else None
    if wanted and having is None:
        having = _having[(bundle.name, wanted)] = [
            pid for pid, attrs in bundle.attrs.items() if all(attrs.get(k) == v for k, v in wanted)
        ]
    if p == "*" and having and rng.random() < 0.7:
        principal = rng.choice(having)
    elif p == "*":
        principal = rng.choice(spec.principals)
    elif p.startswith("group:"):
        principal = rng.choice(bundle.groups[p.removeprefix("group:")])
    else:
        principal = p.replace("*", str(rng.randrange(POOL_PRINCIPALS)))
    a = rng.choice(rule.actions)
    action = (
        rng.choice(spec.actions)
        if a == ">"
        else a[:-1] + rng.choice(["read", "write", "x.y"])
        if a.endswith(">")
        else a
    )
    r = rng.choice(rule.resources)
    resource = spec.resource(rng) if r == "*" else _instance(r, rng)
    return BenchRequest(principal, action, resource, spec.params(rng))


def _drawn(spec: Spec, pair: tuple[str, str], rng: random.Random) -> BenchRequest:
    """A request for a given (principal, action): half the time a resource some rule
    names, else one drawn by the family."""
    if rng.random() < 0.5:
        resource = _instance(rng.choice(rng.choice(spec.rules).resources), rng)
    else:
        resource = spec.resource(rng)
    return BenchRequest(pair[0], pair[1], resource, spec.params(rng))


COLD_PAIRS = 60_000
WARM_PAIRS = 400


def request_lists(
    spec: Spec, seed: int = 1, cold_pairs: int = COLD_PAIRS, warm_count: int = 20_000
) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """(cold, warm). Cold: *cold_pairs* distinct (principal, action) pairs of the pools,
    one request each, and a third as many aimed at random rules, shuffled. Warm:
    *warm_count* requests over :data:`WARM_PAIRS` of those pairs and aimed ones."""
    rng = random.Random(f"{spec.family}-{spec.n}-{seed}")
    total = len(spec.principals) * len(spec.actions)
    chosen = rng.sample(range(total), min(cold_pairs, total))
    width = len(spec.actions)
    pairs = [(spec.principals[i // width], spec.actions[i % width]) for i in chosen]
    cold = [_drawn(spec, pair, rng) for pair in pairs]
    having: dict[tuple[str, Any], list[str]] = {}
    cold += [aimed(spec, rng, having) for _ in range(len(pairs) // 3)]
    rng.shuffle(cold)
    few = pairs[:WARM_PAIRS]
    warm = [
        aimed(spec, rng, having) if rng.random() < 0.25 else _drawn(spec, rng.choice(few), rng)
        for _ in range(warm_count)
    ]
    return cold, warm


def distinct_pairs(reqs: Sequence[BenchRequest]) -> int:
    return len({(r.principal, r.action) for r in reqs})


def bus_guard_request(r: BenchRequest) -> Request:
    return Request(principal=r.principal, action=r.action, resource=r.resource, params=r.params)


def intent_bytes(r: BenchRequest, now: float, i: int) -> bytes:
    return _enc.encode(
        {
            "id": uuid.UUID(int=i).hex,
            "action": r.action,
            "resource": r.resource,
            "params": r.params,
            "ts": now,
        }
    )


# --- the engines ---------------------------------------------------------------------------


class Engines:
    """One spec loaded into every engine (the peers only when installed)."""

    def __init__(self, spec: Spec, tmp: Path) -> None:
        self.spec = spec
        self.bundles = bundle_dicts(spec)
        self.digest = f"sha256:bench-{spec.family}-{spec.n}"
        t0 = time.perf_counter()
        self.policies, self.compile_s = bus_guard_load(self.bundles, self.digest)
        self.load_s = {"bus_guard": time.perf_counter() - t0}
        self.cedar: Any = None
        self.rego: Any = None
        if HAVE_CEDAR:
            t0 = time.perf_counter()
            self.cedar = (
                cedarpy,
                cedarpy.PolicySet.from_str(cedar_text(spec)),
                cedarpy.Entities.from_json_str(cedar_entities(spec)),
            )
            self.load_s["cedar"] = time.perf_counter() - t0
        if HAVE_REGO:
            path = tmp / f"{spec.family}-{spec.n}.rego"
            path.write_text(rego_text(spec))
            t0 = time.perf_counter()
            self.rego = opa_eval.OpaEval(str(path), rego_data(spec), "data.authz.allow")
            self.load_s["rego"] = time.perf_counter() - t0

    def load(self) -> PolicySet:
        """A fresh bus_guard policy set (for cold measurements)."""
        return bus_guard_load(self.bundles, self.digest)[0]

    def check(self, reqs: Sequence[BenchRequest]) -> dict[str, Any]:
        """bus_guard's whole outcome against the reference interpreter, and every peer's
        allow/deny against bus_guard's, for every request; raises on a disagreement."""
        ref = reference_bundles(self.spec)
        outcomes: dict[str, int] = {}
        for r in reqs:
            request = bus_guard_request(r)
            decision = self.policies.evaluate(request)
            expected = reference(ref, request)
            got = (decision.effect, decision.reason, decision.rules)
            if got != expected[:3]:
                raise AssertionError(f"reference disagrees on {r}: {expected[:3]} vs {got}")
            ours = decision.allowed
            if self.cedar is not None:
                cedar, ps, ents = self.cedar
                theirs = cedar.is_authorized(cedar_request(r), ps, ents).allowed
                if theirs != ours:
                    raise AssertionError(f"cedar disagrees on {r}: {theirs} vs {ours}")
            if self.rego is not None:
                theirs = self.rego.evaluate_parsed(rego_input(r))
                if theirs is not ours:
                    raise AssertionError(f"rego disagrees on {r}: {theirs} vs {ours}")
            outcomes[decision.reason] = outcomes.get(decision.reason, 0) + 1
        return {"checked": len(reqs), "outcomes": dict(sorted(outcomes.items()))}


def specs(families: Sequence[str], sizes: Sequence[int]) -> Iterator[Spec]:
    for family in families:
        for n in sizes:
            yield FAMILIES[family](n)
