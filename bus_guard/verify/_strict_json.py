"""Strict JSON: the standard library's parser, refusing duplicate members and NaN/Infinity.

msgspec keeps the last of duplicate members without a word, so where duplicates matter
this parser, which can see them, has the last word: a JWS header, claims that are not
our encoder's exact bytes, a JWKS file, and an intent when the cheap duplicate-key proof
of :func:`bus_guard.intent.decode_intent` cannot decide. It lives here, not next to the
intent, because :mod:`bus_guard.verify` may import nothing of the gateway's; it needs
only ``json``.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ("DuplicateMember", "strict_loads")


class DuplicateMember(ValueError):
    """A JSON object names the member :attr:`name` more than once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"duplicate member {self.name!r}"


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    # Equal lengths prove there is no duplicate; only a refused object pays the search.
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateMember(key)
            seen.add(key)
    return result


def _constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)


def strict_loads(raw: bytes | str) -> Any:
    """``json.loads`` of UTF-8 *raw* that refuses duplicate members (:class:`DuplicateMember`)
    and NaN/Infinity; ``ValueError`` (``UnicodeDecodeError``, ``json.JSONDecodeError``) or
    ``RecursionError`` for anything else that is not JSON."""
    text = raw if isinstance(raw, str) else raw.decode("utf-8")
    if text.startswith("\ufeff"):
        # json.loads' own check, which JSONDecoder.decode leaves out: say what is wrong.
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)
