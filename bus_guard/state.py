"""Mutable state the decision core reads: rate windows, budgets, replay memory.

The core never reaches for globals: the gateway owns one :class:`State` and passes it in.
Stateful limits arrive with the limits issue; the class is the place they will live.
"""

from __future__ import annotations

__all__ = ("State",)


class State:
    """Per-gateway decision state. Empty until limits and budgets are enabled."""

    __slots__ = ()
