"""Conditions: compiled once into closures, type-checked against what the bundle declares.

Semantics (two-valued, no errors at request time):

* A comparison holds only if the field is **present** (a JSON ``null`` counts as missing)
  and of the type its operator expects: numbers for ``lt le gt ge``, strings for
  ``matches``, the literal's type for ``eq ne`` (``1`` equals ``1.0``; ``true`` never
  equals ``1``), the types of the listed values for ``in not_in``. Otherwise it does not
  hold; it is never an error.
* Consequently ``not`` of a comparison over a missing or wrong-typed value **holds**.
  Require presence with ``{field: ..., exists: true}`` next to a ``not`` in allow rules.
* When the field's value is a list (``lineage.labels``, list params or attributes),
  ``in`` holds if any element is one of the values and ``not_in`` if none is.
* ``exists: true`` holds when the field is present and not null; ``exists: false`` when
  it is missing or null. ``matches`` searches like ``re.search`` (anchor with ``^``/``$``)
  but with RE2, in linear time, over RE2 syntax: see :mod:`bus_guard.policy._regex`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from bus_guard.decision import Request
from bus_guard.policy._model import AllOf, AnyOf, Condition, Leaf, NotOf, Scalar, parse_field
from bus_guard.policy._regex import searcher

__all__ = (
    "Attributes",
    "ConditionNode",
    "ConditionTrace",
    "LeafNode",
    "Scope",
    "compile_condition",
    "conjuncts",
    "predicate",
    "trace",
)

Getter = Callable[[Request], Any]
Test = Callable[[Any], bool]
Predicate = Callable[[Request], bool]
Loc = tuple[str | int, ...]

_NUM: Final = frozenset({int, float})
_KIND_OF: Final = {str: "string", int: "number", float: "number", bool: "boolean"}
# The kind of each fixed field; params and principal attributes are looked up.
_FIXED_KINDS: Final = {
    "resource": "string",
    "action": "string",
    "principal": "string",
    "lineage.root": "string",
    "lineage.depth": "integer",
    "lineage.labels": "labels",
}


@dataclass(frozen=True, slots=True)
class LeafNode:
    field: str
    op: str
    value: Any
    get: Getter = dataclasses.field(repr=False, compare=False)
    test: Test = dataclasses.field(repr=False, compare=False)

    @property
    def text(self) -> str:
        return f"{self.field} {self.op} {json.dumps(self.value)}"


@dataclass(frozen=True, slots=True)
class GroupNode:
    kind: str  # "all" | "any" | "not" (one child)
    children: tuple[ConditionNode, ...]


ConditionNode: TypeAlias = LeafNode | GroupNode


@dataclass(frozen=True, slots=True)
class ConditionTrace:
    """How one (sub)condition evaluated for one request, for ``explain``."""

    text: str  # "params.amount le 1000", or "all" / "any" / "not"
    held: bool
    actual: Any = None  # leaves: the value found (None when missing)
    present: bool = False
    children: tuple[ConditionTrace, ...] = ()


class Attributes:
    """A bundle's principal attributes, read once when the bundle compiles.

    Per attribute name: every principal's value in one table, and one getter over it that
    every condition on that attribute shares; the kinds of value it takes and the names
    declared, for the compile-time checks. Built from ``principals:`` in one pass, so a
    bundle's conditions cost nothing per principal (each used to scan every principal's
    attributes and build its own table: 10,000 rules x 1,200 principals took seconds).
    """

    __slots__ = ("_getters", "_kinds", "_tables", "by_principal", "names")

    def __init__(self, by_principal: Mapping[str, Mapping[str, Any]]) -> None:
        tables: dict[str, dict[str, Any]] = {}
        for pid, attrs in by_principal.items():
            for name, value in attrs.items():
                tables.setdefault(name, {})[pid] = value
        self.by_principal = by_principal  # principal id -> attribute -> value
        self.names = tuple(sorted(tables))
        self._tables = tables
        self._kinds = {name: frozenset(map(_kind, t.values())) for name, t in tables.items()}
        self._getters: dict[str, Getter] = {}

    def table(self, name: str) -> Mapping[str, Any]:
        """Principal id -> value of attribute *name* (principals without it are absent)."""
        return self._tables.get(name, {})

    def kinds(self, name: str) -> frozenset[str]:
        return self._kinds.get(name, frozenset())

    def getter(self, name: str) -> Getter:
        """The value of attribute *name* for a request's principal (``None``: missing);
        one object per attribute, which is what lets conditions on it be shared."""
        get = self._getters.get(name)
        if get is None:
            values = self._tables.get(name, {})
            get = self._getters[name] = lambda r: values.get(r.principal)
        return get


@dataclass(frozen=True, slots=True)
class Scope:
    """What a rule's condition may refer to, from its bundle."""

    attributes: Attributes
    # (schema key, declared params) for every schema covering one of the rule's actions
    schemas: Sequence[tuple[str, Mapping[str, str]]] = ()
    complete: bool = False  # every action of the rule is covered by some schema
    # The comparisons compiled so far in the bundle, with their problems: rules repeat
    # them (a department, a limit), and a comparison compiles the same in the same scope.
    leaves: dict[Any, tuple[LeafNode, tuple[str, ...]]] | None = None


def _kind(value: object) -> str:
    if isinstance(value, list | frozenset):
        return "list"
    return _KIND_OF.get(type(value), "object")


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _params_getter(path: tuple[str, ...]) -> Getter:
    if len(path) == 1:
        key = path[0]
        return lambda r: r.params.get(key)

    def get(r: Request) -> Any:
        value: Any = r.params
        for key in path:
            if type(value) is not dict:
                return None
            value = value.get(key)
        return value

    return get


def _getter(path: str, scope: Scope) -> Getter:
    root, rest = parse_field(path)
    if root == "params":
        return _params_getter(rest)
    if root == "principal" and rest:
        return scope.attributes.getter(rest[0])
    getters: dict[str, Getter] = {
        "resource": lambda r: r.resource,
        "action": lambda r: r.action,
        "principal": lambda r: r.principal,
        "lineage.depth": lambda r: r.lineage_depth,
        "lineage.root": lambda r: r.lineage_root or None,
        "lineage.labels": lambda r: r.labels,
    }
    return getters[path]


def _member_test(values: Sequence[Scalar]) -> Test:
    """``in``: typed membership; for list values, any element."""
    strs = frozenset(v for v in values if type(v) is str)
    nums = frozenset(v for v in values if type(v) in _NUM)
    bools = frozenset(v for v in values if type(v) is bool)

    def scalar_in(v: Any) -> bool:
        c = type(v)
        if c is str:
            return v in strs
        if c is int or c is float:
            return v in nums
        return c is bool and v in bools

    others = bool(nums or bools)

    def test(v: Any) -> bool:
        c = type(v)
        if c is frozenset:
            # lineage.labels, on every payment of a policy that denies tainted ones: a set
            # operation in C, 0.26-0.37 µs -> 0.07 µs. A string equals no other type, so only
            # number and boolean literals need the element-wise test.
            return not strs.isdisjoint(v) or (others and any(scalar_in(x) for x in v))
        if c is list:
            return any(scalar_in(x) for x in v)
        return scalar_in(v)

    return test


def _not_member_test(values: Sequence[Scalar]) -> Test:
    member = _member_test(values)
    classes = frozenset(type(v) for v in values) | (
        {int, float} if any(type(v) in _NUM for v in values) else set()
    )

    def test(v: Any) -> bool:
        c = type(v)
        if c is frozenset:  # lineage.labels: strings only; member() tests them as a set
            return not member(v)
        if c is list:
            return not any(member(x) for x in v)
        return c in classes and not member(v)

    return test


def _equal_test(lit: Scalar, negate: bool) -> Test:
    if type(lit) is bool:
        return (
            (lambda v: type(v) is bool and v != lit)
            if negate
            else (lambda v: type(v) is bool and v == lit)
        )
    if type(lit) is str:
        return (lambda v: type(v) is str and v != lit) if negate else (lambda v: v == lit)
    if negate:
        return lambda v: type(v) in _NUM and v != lit
    return lambda v: type(v) in _NUM and v == lit


def _test(op: str, lit: Any) -> Test:
    match op:
        case "eq" | "ne":
            return _equal_test(lit, negate=op == "ne")
        case "lt":
            return lambda v: type(v) in _NUM and v < lit
        case "le":
            return lambda v: type(v) in _NUM and v <= lit
        case "gt":
            return lambda v: type(v) in _NUM and v > lit
        case "ge":
            return lambda v: type(v) in _NUM and v >= lit
        case "in":
            return _member_test(lit)
        case "not_in":
            return _not_member_test(lit)
        case "matches":
            search = searcher(lit)
            return lambda v: type(v) is str and search(v)
        case "exists":
            return (lambda v: v is not None) if lit else (lambda v: v is None)
    raise AssertionError(f"unknown operator {op}")  # the model admits no other


def _mismatch(kind: str, op: str, lit: Any) -> str | None:
    """Why ``op lit`` can never hold for values of ``kind``; ``None`` when it can."""
    if kind == "any" or op == "exists":
        return None
    if op in ("lt", "le", "gt", "ge"):
        return None if kind in ("number", "integer") else f"'{op}' compares numbers"
    if op == "matches":
        return None if kind == "string" else "'matches' tests strings"
    if kind in ("list", "object"):
        return (
            None if kind == "list" and op in ("in", "not_in") else f"'{op}' compares single values"
        )
    want = {"integer": "number"}.get(kind, kind)
    for value in lit if isinstance(lit, list) else [lit]:
        if _kind(value) != want:
            return f"the value {value!r} is a {_kind(value)}"
        if kind == "integer" and isinstance(value, float) and not value.is_integer():
            return f"the value {value!r} is not whole"
    return None


def _check(node: LeafNode, scope: Scope, loc: Loc, problems: list[tuple[Loc, str]]) -> None:
    root, rest = parse_field(node.field)
    op, lit = node.op, node.value
    if node.field in _FIXED_KINDS:
        kind = _FIXED_KINDS[node.field]
        if kind == "labels":
            if op not in ("in", "not_in") or not all(type(v) is str for v in lit):
                problems.append((loc, "lineage.labels supports in / not_in with strings"))
            return
        if (why := _mismatch(kind, op, lit)) is not None:
            problems.append((loc, f"{why}, but {node.field} is {_a(kind)}"))
    elif root == "principal":
        name = rest[0]
        kinds = set(scope.attributes.kinds(name))
        known = scope.attributes.names
        if not kinds:
            listed = ", ".join(known) if known else "none are declared under principals:"
            problems.append((loc, f"no principal has attribute {name!r} ({listed})"))
        elif all(_mismatch(k, op, lit) for k in kinds):
            why = _mismatch(kinds.pop(), op, lit)
            problems.append((loc, f"{why}, but principal.{name} is never of that type"))
    elif root == "params":
        _check_param(rest, op, lit, scope, loc, problems)


def _check_param(
    path: tuple[str, ...],
    op: str,
    lit: Any,
    scope: Scope,
    loc: Loc,
    problems: list[tuple[Loc, str]],
) -> None:
    name = path[0]
    declared = [(key, decl[name]) for key, decl in scope.schemas if name in decl]
    if not declared and scope.complete:
        names = sorted({n for _, decl in scope.schemas for n in decl})
        guess = difflib.get_close_matches(name, names, 1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        problems.append(
            (
                loc,
                f"param {name!r} is not declared in the schema"
                f" ({hint}declared: {', '.join(names)})",
            )
        )
    for key, kind in declared:
        if len(path) > 1:
            if kind not in ("object", "any"):
                problems.append(
                    (
                        loc,
                        f"params.{name} is {_a(kind)} in schema {key!r};"
                        f" it has no field {path[1]!r}",
                    )
                )
        elif (why := _mismatch(kind, op, lit)) is not None:
            problems.append((loc, f"{why}, but params.{name} is {_a(kind)} in schema {key!r}"))


def compile_condition(
    cond: Condition, scope: Scope, loc: Loc, problems: list[tuple[Loc, str]]
) -> ConditionNode:
    """Compile a validated condition; type problems are appended as ``(loc, message)``."""
    if isinstance(cond, Leaf):
        op = cond.op  # a scan of the model's fields (``value`` would scan them again)
        value = getattr(cond, "in_" if op == "in" else op)
        memo, key = scope.leaves, None
        if memo is not None:
            # What the type check sees: the bundle (its attributes), and for a param the
            # schemas covering the rule's actions.
            schemas = (
                (tuple(k for k, _ in scope.schemas), scope.complete)
                if cond.field.startswith("params.")
                else None
            )
            key = (cond.field, op, _literal(value), schemas)
            if (found := memo.get(key)) is not None:
                problems += [(loc, message) for message in found[1]]
                return found[0]
        node = LeafNode(cond.field, op, value, _getter(cond.field, scope), _test(op, value))
        mine: list[tuple[Loc, str]] = []
        _check(node, scope, loc, mine)
        problems += mine
        if memo is not None:
            memo[key] = (node, tuple(message for _, message in mine))
        return node
    if isinstance(cond, NotOf):
        return GroupNode("not", (compile_condition(cond.not_, scope, (*loc, "not"), problems),))
    kind, items = ("all", cond.all_) if isinstance(cond, AllOf) else ("any", cond.any_)
    assert isinstance(cond, AllOf | AnyOf)
    return GroupNode(
        kind,
        tuple(
            compile_condition(item, scope, (*loc, kind, i), problems)
            for i, item in enumerate(items)
        ),
    )


def predicate(node: ConditionNode, shared: dict[Any, Predicate] | None = None) -> Predicate:
    """One closure per node; combinators short-circuit like ``and`` / ``or``.

    *shared* holds the predicates already built in one compilation, by the condition's
    structure: rules with the same condition share one closure. Ten thousand rules with a
    few distinct limits then touch a few closures, which stay in the CPU cache, instead of
    ten thousand spread over megabytes (the evaluator's time at 10,000 rules was mostly
    cache misses). Leaves on principal attributes are shared within their bundle only:
    their lookup table is the bundle's (the shape names its getter).
    """
    if shared is None:
        shared = {}
    key = _shape(node)
    found = shared.get(key) if key is not None else None
    if found is not None:
        return found
    made = _predicate(node, shared)
    if key is not None:
        shared[key] = made
    return made


def _literal(value: Any) -> Any:
    """A literal as a key that keeps ``1``, ``1.0`` and ``true`` apart (equal, with equal
    hashes, in Python): each scalar with its type. (``json.dumps`` did the same at
    several times the cost, a third of compiling 10,000 conditions.)"""
    if type(value) is list:
        return tuple((type(v), v) for v in value)
    return (type(value), value)


def _shape(node: ConditionNode) -> tuple[Any, ...] | None:
    """What decides a node's result, hashable; ``None`` for what must not be shared."""
    if isinstance(node, LeafNode):
        shape = ("leaf", node.field, node.op, _literal(node.value))
        if node.field.startswith("principal."):  # the bundle's table: one getter per bundle
            return (*shape, id(node.get))
        return shape
    parts = tuple(_shape(child) for child in node.children)
    return None if None in parts else (node.kind, parts)


def _predicate(node: ConditionNode, shared: dict[Any, Predicate]) -> Predicate:
    if isinstance(node, LeafNode):
        get, test = node.get, node.test
        return lambda r: test(get(r))
    parts = tuple(predicate(child, shared) for child in node.children)
    if node.kind == "not":
        (inner,) = parts
        return lambda r: not inner(r)
    if len(parts) == 1:
        return parts[0]
    if node.kind == "all":
        if len(parts) == 2:
            a, b = parts
            return lambda r: a(r) and b(r)
        return lambda r: all(p(r) for p in parts)
    if len(parts) == 2:
        a, b = parts
        return lambda r: a(r) or b(r)
    return lambda r: any(p(r) for p in parts)


def conjuncts(node: ConditionNode | None) -> tuple[LeafNode, ...]:
    """The comparisons that must all hold for *node* to hold (its top-level ``all``,
    flattened); the evaluator indexes rules by some of them."""
    if node is None:
        return ()
    if isinstance(node, LeafNode):
        return (node,)
    if node.kind == "all" or (node.kind == "any" and len(node.children) == 1):
        return tuple(leaf for child in node.children for leaf in conjuncts(child))
    return ()


def trace(node: ConditionNode, request: Request) -> ConditionTrace:
    """Evaluate every part of a condition (no short-circuit) and record the values seen."""
    if isinstance(node, LeafNode):
        actual = node.get(request)
        if isinstance(actual, frozenset):
            actual = sorted(actual)
        return ConditionTrace(node.text, node.test(node.get(request)), actual, actual is not None)
    children = tuple(trace(child, request) for child in node.children)
    if node.kind == "not":
        held = not children[0].held
    elif node.kind == "all":
        held = all(c.held for c in children)
    else:
        held = any(c.held for c in children)
    return ConditionTrace(node.kind, held, children=children)
