"""Strict JSON: the standard library's parser, refusing duplicate members and NaN/Infinity.

msgspec keeps the last of duplicate members without a word, so where duplicates matter
(a JWS header, claims not in our encoder's exact bytes, a JWKS file) this parser, which
can see them, has the last word.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ("strict_loads",)


def strict_loads(raw: bytes | str) -> Any:
    """``json.loads`` that refuses duplicate members and NaN/Infinity."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate member")
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
