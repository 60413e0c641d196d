"""The policy language as pydantic models: what a ``policies/*.yaml`` file may say.

These models check everything that can be checked one value at a time (types, patterns,
regexes, field paths, exactly one operator per condition) so that one load reports every
such problem at once. Checks that need the whole bundle (groups, schemas, shadowed rules)
are the compiler's (:mod:`bus_guard.policy._evaluator`).

All models are frozen, strict (YAML ``"1000"`` is not the number 1000) and forbid unknown
keys.

Which effect may carry what (``approval`` only escalate rules, ``labels``, ``lineage`` and
``limits`` only allow rules) is the compiler's check, so that the message names the rule's
effect; so are what needs the bundle (a ``sum`` param's declared type, ``per: group``
against the rule's principals) or the whole set (limit names unique).
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from bus_guard.policy._types import (
    FIELD_HELP,
    OPERATORS,
    ActionPattern,
    Amount,
    ApproverId,
    Attribute,
    AttrName,
    Count,
    Duration,
    FieldPath,
    GroupName,
    KeyFile,
    Label,
    LimitName,
    Name,
    NonNegative,
    Number,
    ParamName,
    ParamType,
    PrincipalId,
    PrincipalPattern,
    Quorum,
    Regex,
    ResourcePattern,
    RuleId,
    Scalar,
    ScalarList,
    ScalarValue,
    Version,
    Window,
    WithinField,
    describe,
    parse_field,
)

__all__ = (
    "DEFAULT_TTL_S",
    "MAX_LIMITS",
    "OPERATORS",
    "AllOf",
    "AnyOf",
    "Approval",
    "Approvers",
    "Bundle",
    "Condition",
    "Leaf",
    "Limit",
    "LineageRule",
    "NotOf",
    "ParamType",
    "Rule",
    "Scalar",
    "describe",
    "parse_field",
)

_CONFIG: Final = ConfigDict(extra="forbid", frozen=True, strict=True)

DEFAULT_TTL_S: Final = 86400.0  # a hold waits 24 h for its approvers unless a rule says


class Leaf(BaseModel):
    """``{field: <path>, <op>: <value>}`` with exactly one operator."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        title="Comparison",
        # 'field' plus exactly one operator; the model validator says so in words.
        json_schema_extra={"minProperties": 2, "maxProperties": 2},
    )

    field: FieldPath = Field(description=f"What to test: {FIELD_HELP}.")
    eq: ScalarValue | None = Field(None, description="Equal (same type) to the value.")
    ne: ScalarValue | None = Field(None, description="Present, same type, and not equal.")
    lt: Number | None = Field(None, description="A number less than the value.")
    le: Number | None = Field(None, description="A number less than or equal to the value.")
    gt: Number | None = Field(None, description="A number greater than the value.")
    ge: Number | None = Field(None, description="A number greater than or equal to the value.")
    in_: ScalarList | None = Field(None, alias="in", description="Equal to one of the values.")
    not_in: ScalarList | None = Field(
        None, description="Present, of the values' type, and equal to none of them."
    )
    matches: Regex | None = Field(
        None,
        description="A string in which the regex is found (RE2 syntax; searched like"
        " re.search, so anchor with ^ $).",
    )
    exists: bool | None = Field(
        None, description="true: present and not null; false: missing or null."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_operator(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ops = [key for key in OPERATORS if key in data]
            if not ops:
                unknown = [str(key) for key in data if key != "field"]
                guess = difflib.get_close_matches(unknown[0], OPERATORS, 2) if unknown else []
                hint = f"unknown operator {unknown[0]!r}" if unknown else "no operator"
                if guess:
                    hint += f" (did you mean {' or '.join(map(repr, guess))}?)"
                raise ValueError(f"{hint}; a comparison needs one of: {', '.join(OPERATORS)}")
            if len(ops) > 1:
                raise ValueError(
                    f"one operator per comparison, got {', '.join(ops)};"
                    " combine comparisons with all: [...]"
                )
            if data[ops[0]] is None:
                raise ValueError(f"operator {ops[0]!r} has no value")
        return data

    @property
    def op(self) -> str:
        return next(op for op in OPERATORS if getattr(self, _attr(op)) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, _attr(self.op))


def _attr(op: str) -> str:
    return "in_" if op == "in" else op


class AllOf(BaseModel):
    """Holds when every condition holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="All")
    all_: list[Condition] = Field(alias="all", min_length=1)


class AnyOf(BaseModel):
    """Holds when at least one condition holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="Any")
    any_: list[Condition] = Field(alias="any", min_length=1)


class NotOf(BaseModel):
    """Holds when the condition does not hold (a comparison over a missing value does not
    hold, so its ``not`` does)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="Not")
    not_: Condition = Field(alias="not")


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in ("all", "any", "not"):
            if key in value:
                return "{" + key + "}"
        if "field" in value or any(op in value for op in OPERATORS):
            return "{field}"
    return None


# The tags are written "{...}" so the error formatter can drop them from locations without
# confusing them with the real 'all'/'any'/'not' keys.
Condition = Annotated[
    Union[  # noqa: UP007 - the tagged members need the explicit Union form
        Annotated[Leaf, Tag("{field}")],
        Annotated[AllOf, Tag("{all}")],
        Annotated[AnyOf, Tag("{any}")],
        Annotated[NotOf, Tag("{not}")],
    ],
    Discriminator(
        _condition_kind,
        custom_error_type="condition",
        custom_error_message=(
            "expected a condition: {field: ..., <op>: ...}, all: [...], any: [...] or not: {...}"
        ),
    ),
]

ConditionTag: Final = frozenset({"{field}", "{all}", "{any}", "{not}"})


class Approval(BaseModel):
    """Who may release what an escalate rule holds, how many of them, and for how long."""

    model_config = _CONFIG

    approvers: list[ApproverId] | None = Field(
        None,
        min_length=1,
        description="Approver ids or approver group names of this bundle (default: every"
        " approver of the bundle).",
    )
    quorum: Quorum | None = Field(
        None,
        description="Distinct approvers needed (default 1); at most the number of eligible"
        " approvers.",
    )
    ttl: Duration = Field(
        DEFAULT_TTL_S,
        description='How long the hold waits: seconds, or "90s", "15m", "24h" (default), "7d";'
        " at most 30 days.",
    )


class LineageRule(BaseModel):
    """Constraints on an intent's lineage; an allow rule with them allows only if all hold."""

    model_config = _CONFIG

    max_depth: NonNegative | None = Field(
        None, description="Applies only if the intent's lineage depth is at most this."
    )
    requires_parent: list[ActionPattern] | None = Field(
        None,
        min_length=1,
        description="Action patterns: some parent's action must match one (a root intent"
        " has no parent and fails).",
    )
    within_parent: list[WithinField] | None = Field(
        None,
        min_length=1,
        description="params.<name>: a number at most that param in every parent's scope;"
        " resource: every parent's resource, or below it after '/' or ':'. A root intent"
        " fails.",
    )

    @model_validator(mode="after")
    def _something(self) -> LineageRule:
        if self.max_depth is None and self.requires_parent is None and self.within_parent is None:
            raise ValueError("give at least one of max_depth, requires_parent, within_parent")
        if self.within_parent is not None and len(set(self.within_parent)) != len(
            self.within_parent
        ):
            raise ValueError("within_parent lists a field twice")
        return self


MAX_LIMITS: Final = 16  # per rule: the intake spends each of them for every intent it allows


class Limit(BaseModel):
    """At most ``count`` intents, or at most ``max`` of the numeric param ``sum`` added up,
    per sliding ``window``, per principal (default), group, resource or lineage root."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["count"],
                    "not": {"anyOf": [{"required": ["sum"]}, {"required": ["max"]}]},
                },
                {"required": ["sum", "max"], "not": {"required": ["count"]}},
            ]
        },
    )

    count: Count | None = Field(
        None, description="A rate: at most this many intents per window (a whole number)."
    )
    sum: ParamName | None = Field(
        None,
        description="A budget: the name of a top-level param (declared number or integer in"
        " schemas for every action of the rule) whose values are added up, at most max per"
        " window.",
    )
    max: Amount | None = Field(
        None, description="sum limits: the most the param may add up to per window (above 0)."
    )
    window: Window = Field(
        description='The sliding window: seconds, or "10s", "15m", "1h", "7d"; more than 0'
        " and at most 31 days."
    )
    per: Literal["principal", "group", "resource", "lineage_root"] = Field(
        "principal",
        description="Whose intents share the limit: each principal's own (default), the"
        " rule's group (principals: exactly one group:<name>), each resource's, or each"
        " lineage root's.",
    )
    name: LimitName | None = Field(
        None,
        description="Unique in the policy set; named in decisions and the ledger (default:"
        " <rule id>/<index in limits>).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Limit:
        if (self.count is None) == (self.sum is None):
            raise ValueError(
                "give exactly one of count: <intents per window> or sum: <param name> (with max:)"
            )
        if self.sum is not None and self.max is None:
            raise ValueError(f"a sum limit needs max: the most params.{self.sum} may add up to")
        if self.count is not None and self.max is not None:
            raise ValueError("max is for sum limits; a count limit's max is its count")
        return self


class Approvers(BaseModel):
    """The people who may approve holds: each with the Ed25519 keys they sign with."""

    model_config = _CONFIG

    members: dict[ApproverId, KeyFile] = Field(
        default_factory=dict,
        description="Approver id -> JWKS file(s) of the approver's Ed25519 public keys, relative"
        " to the policy file.",
    )
    groups: dict[GroupName, Annotated[list[ApproverId], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="Named sets of approvers, usable in a rule's approval.approvers.",
    )


class Rule(BaseModel):
    """One rule. It applies when the principal, action and resource each match one of its
    patterns and its condition (if any) holds."""

    model_config = _CONFIG

    id: RuleId = Field(description="Unique across all loaded bundles; named in decisions.")
    effect: Literal["allow", "deny", "escalate"] = Field(
        description="deny beats escalate (hold for a human) beats allow; default is deny."
    )
    description: str = ""
    principals: list[PrincipalPattern] = Field(
        ["*"],
        min_length=1,
        description="Principal ids, 'group:<name>', globs like 'agent-*', or '*' (default).",
    )
    actions: list[ActionPattern] = Field(
        min_length=1,
        description="Exact actions or NATS wildcards: 'payments.*' (one token), 'tools.>'"
        " (one or more), '>' (every action).",
    )
    resources: list[ResourcePattern] = Field(
        ["*"],
        min_length=1,
        description="Exact resources or globs ('*' any run of characters, '?' one).",
    )
    when: Condition | None = Field(None, description="Optional condition.")
    approval: Approval | None = Field(
        None, description="escalate rules: who may approve the hold, how many, how long."
    )
    labels: list[Label] | None = Field(
        None,
        min_length=1,
        description="allow rules: labels (taint) the allowed intent passes to its"
        " descendants' lineage.labels.",
    )
    lineage: LineageRule | None = Field(
        None, description="allow rules: constraints on the intent's parents and depth."
    )
    limits: list[Limit] | None = Field(
        None,
        min_length=1,
        max_length=MAX_LIMITS,
        description="allow rules: rates and budgets per window, spent at run time by the"
        " gateway; an intent the rule allows stands only if all of them have room.",
    )


class Bundle(BaseModel):
    """A policy bundle: one YAML file."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        title="bus_guard policy bundle",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    bundle: Name = Field(description="Bundle name, unique among loaded bundles.")
    version: Version = Field(description='Bundle version, quoted in YAML ("1.0.0").')
    mode: Literal["enforce", "observe"] = Field(
        "enforce",
        description="observe: policy denials and holds are let through, marked would_deny."
        " All bundles loaded together must agree.",
    )
    description: str = ""
    groups: dict[GroupName, Annotated[list[PrincipalId], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="Named sets of principal ids, used in rules as 'group:<name>'.",
    )
    principals: dict[PrincipalId, dict[AttrName, Attribute]] = Field(
        default_factory=dict,
        description="Attributes per principal, usable in conditions as principal.<attribute>.",
    )
    schemas: dict[ActionPattern, dict[AttrName, ParamType]] = Field(
        default_factory=dict,
        description="Declared param types per action pattern, checked against conditions"
        " of rules whose actions the pattern covers.",
    )
    approvers: Approvers = Field(
        default_factory=Approvers,
        description="Who may approve this bundle's holds, with their public keys.",
    )
    rules: list[Rule] = Field(description="The rules; their order never matters.")


AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()
Approval.model_rebuild()
LineageRule.model_rebuild()
Limit.model_rebuild()
Approvers.model_rebuild()
Rule.model_rebuild()
Bundle.model_rebuild()
