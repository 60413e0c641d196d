"""The value types of the policy language: names, patterns, field paths and literals.

Each type checks one value with an error message a policy author understands, and carries
the JSON Schema an editor uses to flag the same mistake while typing.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeGuard

from pydantic import (
    AfterValidator,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from bus_guard.policy._patterns import parse_action_pattern
from bus_guard.policy._regex import MAX_REGEX_CHARS, compile_regex

__all__ = (
    "FIELD_HELP",
    "MAX_COUNT",
    "MAX_TTL_S",
    "MAX_WINDOW_S",
    "OPERATORS",
    "ActionPattern",
    "Amount",
    "ApproverId",
    "AttrName",
    "Attribute",
    "Count",
    "Duration",
    "FieldPath",
    "GroupName",
    "KeyFile",
    "Label",
    "LimitName",
    "Name",
    "NonNegative",
    "Number",
    "ParamName",
    "ParamType",
    "PrincipalId",
    "PrincipalPattern",
    "Quorum",
    "Regex",
    "ResourcePattern",
    "RuleId",
    "Scalar",
    "ScalarList",
    "ScalarValue",
    "Version",
    "Window",
    "WithinField",
    "describe",
    "parse_field",
)

Scalar: TypeAlias = str | int | float | bool
ParamType = Literal["string", "number", "integer", "boolean", "list", "object", "any"]

OPERATORS: Final = ("eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "matches", "exists")

_NAME = r"[A-Za-z0-9_-]{1,64}"
_FIELD_RE: Final = re.compile(
    rf"params(?:\.{_NAME})+|resource|action|principal(?:\.{_NAME})?"
    r"|lineage\.(?:depth|root|labels)"
)
FIELD_HELP: Final = (
    "fields are params.<name>[.<sub>...], resource, action, principal, principal.<attribute>,"
    " lineage.depth, lineage.root, lineage.labels"
)


def describe(value: object) -> str:
    """How a YAML value reads in an error message: its kind, then the value."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"  # e.g. a YAML date


@dataclass(frozen=True, slots=True)
class _Text:
    """``Annotated`` metadata: a string matching ``pattern``, with a friendly error, and a
    JSON Schema ``pattern`` for editors."""

    pattern: str
    what: str
    max_len: int = 64

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        compiled, what = re.compile(self.pattern), self.what

        def check(value: str) -> str:
            if compiled.fullmatch(value) is None:
                raise ValueError(f"{value!r} is not a valid {what}")
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": f"^(?:{self.pattern})$", "maxLength": self.max_len}


def _finite(value: object) -> TypeGuard[int | float]:
    """A finite number, not a boolean. A YAML integer is exact however many digits it has:
    ``math.isfinite`` would convert it to a float and raise ``OverflowError`` past 1e308
    (which pydantic does not turn into a validation error: the load would crash)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _scalar(value: object) -> Scalar:
    if isinstance(value, str | bool) or _finite(value):
        return value
    raise ValueError(f"expected a string, number or boolean, got {describe(value)}")


def _number(value: object) -> int | float:
    if _finite(value):
        return value
    hint = " (quoted numbers are strings)" if isinstance(value, str) else ""
    raise ValueError(f"expected a number, got {describe(value)}{hint}")


def _scalar_list(value: object) -> list[Scalar]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list like [a, b], got {describe(value)}")
    if not value:
        raise ValueError("the list is empty")
    return [_scalar(item) for item in value]


def _attribute(value: object) -> Scalar | list[Scalar]:
    return _scalar_list(value) if isinstance(value, list) else _scalar(value)


def _regex(value: str) -> str:
    try:
        compile_regex(value)
    except ValueError as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


def _action_pattern(value: str) -> str:
    parse_action_pattern(value)
    return value


@functools.lru_cache(maxsize=4096)  # a policy names a few fields in many comparisons
def parse_field(path: str) -> tuple[str, tuple[str, ...]]:
    """``"params.a.b"`` → ``("params", ("a", "b"))``; ``ValueError`` for unknown fields."""
    if _FIELD_RE.fullmatch(path) is None:
        raise ValueError(f"unknown field {path!r}; {FIELD_HELP}")
    root, *rest = path.split(".")
    return root, tuple(rest)


def _field(path: str) -> str:
    parse_field(path)
    return path


MAX_TTL_S: Final = 30 * 86400.0
"""The longest a hold may wait for its approvers: 30 days. A hold keeps its whole payload
and a place in every gateway's open-holds view until it is resolved."""

MAX_WINDOW_S: Final = 31 * 86400.0
"""The longest window of a limit: 31 days (a monthly budget)."""

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE: Final = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)([smhd])")


def _duration(most_s: float) -> Any:
    """Seconds from a number of seconds or ``"90s"`` / ``"15m"`` / ``"24h"`` / ``"7d"``:
    more than 0 and at most *most_s*."""
    most = f"{most_s / 86400:g} days"

    def check(value: object) -> float:
        found = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
        if found is not None:
            seconds = float(found[1]) * _UNITS[found[2]]
        elif _finite(value):
            seconds = float(value) if abs(value) < 1e300 else math.inf  # an int may be huge
        else:
            raise ValueError(
                'expected seconds or a duration like "90s", "15m", "24h", "7d",'
                f" got {describe(value)}"
            )
        if not 0 < seconds <= most_s:
            raise ValueError(f"must be more than 0 and at most {most}, got {describe(value)}")
        return seconds

    return PlainValidator(check)


def _duration_schema(most_s: float) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": most_s},
                {"type": "string", "pattern": f"^(?:{_DURATION_RE.pattern})$"},
            ]
        }
    )


def _whole(minimum: int, maximum: int | None = None, shown: str = "") -> Any:
    def check(value: object) -> int:
        if type(value) is not int:
            hint = " (quoted numbers are strings)" if isinstance(value, str) else ""
            raise ValueError(f"expected a whole number, got {describe(value)}{hint}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {shown or maximum}, got {value}")
        return value

    return PlainValidator(check)


def _key_file(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a file path, got {describe(value)}")
    parts = value.split("/")
    if (
        not value
        or len(value) > 1024
        or value.startswith("/")
        or "\\" in value
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(c) < 0x20 or c == "\x7f" for c in value)
    ):
        raise ValueError(
            f"{value!r} is not a relative path inside the policy directory"
            " (like approvers/alice.jwks.json: no '..', '.', empty parts or leading '/')"
        )
    return value


def _key_files(value: object) -> list[str]:
    if isinstance(value, list):
        if not value:
            raise ValueError("the list is empty")
        return [_key_file(item) for item in value]
    return [_key_file(value)]


def _within_field(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected params.<name> or resource, got {describe(value)}")
    if value == "resource" or re.fullmatch(rf"params\.{_NAME}", value):
        return value
    if value.startswith("params.") and "." in value[len("params.") :]:
        raise ValueError(f"{value!r}: within_parent compares top-level params only")
    raise ValueError(f"{value!r} is not params.<name> or resource")


def _positive(value: object) -> float:
    """A finite number above 0, as a float (``max`` of a sum limit)."""
    if not _finite(value) or not value > 0 or abs(value) >= 1e300:
        hint = " (quoted numbers are strings)" if isinstance(value, str) else ""
        raise ValueError(f"expected a finite number above 0, got {describe(value)}{hint}")
    return float(value)


def _param_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a param name like amount, got {describe(value)}")
    if re.fullmatch(_NAME, value):
        return value
    if value.startswith("params.") and re.fullmatch(_NAME, value.removeprefix("params.")):
        raise ValueError(f"write the param's name alone: {value.removeprefix('params.')!r}")
    raise ValueError(f"{value!r} is not a top-level param name (1-64 of A-Z a-z 0-9 _ -)")


_PARAM_NAME_SCHEMA: Final = {"type": "string", "pattern": f"^{_NAME}$"}
_SCALAR_SCHEMA: Final = {"type": ["string", "number", "boolean"]}
_LIST_SCHEMA: Final = {"type": "array", "items": _SCALAR_SCHEMA, "minItems": 1}

ScalarValue = Annotated[Scalar, PlainValidator(_scalar), WithJsonSchema(_SCALAR_SCHEMA)]
Number = Annotated[int | float, PlainValidator(_number), WithJsonSchema({"type": "number"})]
ScalarList = Annotated[list[Scalar], PlainValidator(_scalar_list), WithJsonSchema(_LIST_SCHEMA)]
Attribute = Annotated[
    Scalar | list[Scalar],
    PlainValidator(_attribute),
    WithJsonSchema({"anyOf": [_SCALAR_SCHEMA, _LIST_SCHEMA]}),
]
Regex = Annotated[
    str,
    AfterValidator(_regex),
    WithJsonSchema({"type": "string", "maxLength": MAX_REGEX_CHARS}),
]
FieldPath = Annotated[
    str,
    AfterValidator(_field),
    WithJsonSchema({"type": "string", "pattern": f"^(?:{_FIELD_RE.pattern})$"}),
]

Duration = Annotated[float, _duration(MAX_TTL_S), _duration_schema(MAX_TTL_S)]
Window = Annotated[float, _duration(MAX_WINDOW_S), _duration_schema(MAX_WINDOW_S)]
_KEY_FILE_SCHEMA: Final = {"type": "string", "minLength": 1, "maxLength": 1024}
KeyFile = Annotated[
    list[str],
    PlainValidator(_key_files),
    WithJsonSchema(
        {
            "anyOf": [
                _KEY_FILE_SCHEMA,
                {"type": "array", "items": _KEY_FILE_SCHEMA, "minItems": 1},
            ]
        }
    ),
]
WithinField = Annotated[
    str,
    PlainValidator(_within_field),
    WithJsonSchema({"type": "string", "pattern": rf"^(?:params\.{_NAME}|resource)$"}),
]
Quorum = Annotated[int, _whole(1), WithJsonSchema({"type": "integer", "minimum": 1})]
MAX_COUNT: Final = 2**53
"""The largest ``count`` of a limit: every whole number up to it is exact as a float."""
Count = Annotated[
    int,
    _whole(1, MAX_COUNT, "2**53"),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_COUNT}),
]
Amount = Annotated[
    float,
    PlainValidator(_positive),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0}),
]
ParamName = Annotated[str, PlainValidator(_param_name), WithJsonSchema(_PARAM_NAME_SCHEMA)]
LimitName = Annotated[
    str,
    _Text(
        r"[A-Za-z0-9](?:[A-Za-z0-9_./-]{0,126}[A-Za-z0-9])?",
        "limit name (1-128 of A-Z a-z 0-9 - _ . /, beginning and ending with a letter or digit)",
        max_len=128,
    ),
]
NonNegative = Annotated[int, _whole(0), WithJsonSchema({"type": "integer", "minimum": 0})]
Label = Annotated[str, _Text(r"[A-Za-z0-9_.:-]{1,64}", "label (1-64 of A-Z a-z 0-9 _ . : -)")]
ApproverId = Annotated[str, _Text(_NAME, "approver id (1-64 of A-Z a-z 0-9 _ -)")]
Name = Annotated[str, _Text(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "name (letters, digits, _ . -)")]
Version = Annotated[str, _Text(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", 'version (e.g. "1.0.0")')]
RuleId = Annotated[
    str,
    _Text(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", "rule id (letters, digits, _ . : -)", max_len=128),
]
PrincipalId = Annotated[str, _Text(_NAME, "principal id (1-64 of A-Z a-z 0-9 _ -)")]
GroupName = Annotated[str, _Text(_NAME, "group name (1-64 of A-Z a-z 0-9 _ -)")]
AttrName = Annotated[str, _Text(_NAME, "attribute name (1-64 of A-Z a-z 0-9 _ -)")]
PrincipalPattern = Annotated[
    str,
    _Text(
        rf"\*|group:{_NAME}|[A-Za-z0-9_*?-]{{1,64}}",
        "principal pattern: an id, 'group:<name>', a glob like 'agent-*', or '*'",
    ),
]
ResourcePattern = Annotated[
    str, _Text(r"[^\x00-\x1f\x7f]{1,1024}", "resource pattern", max_len=1024)
]
ActionPattern = Annotated[
    str,
    AfterValidator(_action_pattern),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(?:>|(?:[A-Za-z0-9_-]+|\*)(?:\.(?:[A-Za-z0-9_-]+|\*))*(?:\.>)?)$",
        }
    ),
]
