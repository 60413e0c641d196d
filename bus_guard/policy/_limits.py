"""What one intent counts against, and costs, under one limit: pure, total and cheap.

The intake calls these two for every limit of every allow it spends, so neither raises,
allocates only what it returns on the common path, and neither looks at anything but
the :class:`~bus_guard.decision.LimitSpec` and the :class:`~bus_guard.decision.Request`
(``policy explain`` shows the same values).

- :func:`limit_key`: the value of the limit's ``per`` for this intent: its principal, the
  rule's group name (every intent of the rule shares it), its resource, or its lineage
  root (a root intent is its own lineage's root: its principal).
- :func:`limit_amount`: what the intent costs: ``1.0`` for a count; for a sum the param's
  value as a float, which must be a finite number >= 0 (not a boolean). Otherwise a
  ``str``: why it cannot be counted (the param is missing, null, not a number, negative,
  NaN or infinite); the intake must not allow such an intent under the limit.
"""

from __future__ import annotations

import math
from typing import Any, Final

from bus_guard.decision import LimitSpec, Request

__all__ = ("limit_amount", "limit_key")

_MAX_INT: Final = 1 << 1023  # float() of an int from 2**1024 on raises OverflowError


def limit_key(spec: LimitSpec, request: Request) -> str:
    """The value of ``spec.per`` that *request* counts against (may be ``""``: an intent
    without a resource counts against the empty resource)."""
    per = spec.per
    if per == "principal":
        return request.principal
    if per == "group":
        return spec.group
    if per == "resource":
        return request.resource
    return request.lineage_root or request.principal  # lineage_root


def limit_amount(spec: LimitSpec, request: Request) -> float | str:
    """What *request* spends of *spec*: a float >= 0, or a ``str`` saying why the intent
    cannot be counted (then nothing may be spent and the intent does not stand)."""
    if spec.kind == "count":
        return 1.0
    params = request.params
    value: Any = params.get(spec.param) if type(params) is dict else None
    kind = type(value)  # exact types: a bool is an int, and never an amount
    if kind is float and 0.0 <= value < math.inf:  # NaN fails both comparisons
        return float(value + 0.0)  # -0.0 -> 0.0
    if kind is int and 0 <= value < _MAX_INT:
        return float(value)
    return _not_a_number(spec.param, value)


def _not_a_number(param: str, value: object) -> str:
    if value is None:
        got = "it is missing"
    elif isinstance(value, bool):
        got = f"it is {str(value).lower()}"
    elif isinstance(value, int | float):
        big = isinstance(value, int) and abs(value) >= 10**20  # no 400-digit messages
        got = "it is too large" if big else f"it is {value!r}"
    elif isinstance(value, str):
        got = "it is a string"
    elif isinstance(value, list | tuple):
        got = "it is a list"
    elif isinstance(value, dict):
        got = "it is an object"
    else:
        got = f"it is {type(value).__name__}"
    return f"params.{param} must be a finite number >= 0 ({got})"
