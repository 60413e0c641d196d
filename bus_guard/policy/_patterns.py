"""Principal, action and resource patterns: parsing, matching, coverage and the action index.

Action patterns use NATS subject wildcards over dot-separated tokens: ``*`` matches exactly
one token, ``>`` one or more and only as the last token. Principal and resource patterns are
globs where ``*`` matches any run of characters (including none) and ``?`` one character;
every other character is literal (there are no ``[...]`` classes, so nothing surprises).

Everything here runs at compile time except the matchers, which are built once per rule
and specialised (equality, ``startswith``, or a split at ``*`` matched left to right, see
:func:`glob_matcher`) so that a request pays only for the kind of pattern it meets, and
never more than linear time in the value for each pattern.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Generic, TypeVar

__all__ = (
    "ActionIndex",
    "ActionKeys",
    "GlobIndex",
    "action_covers",
    "action_matches",
    "glob_covers",
    "glob_matcher",
    "is_glob",
    "literal_prefix",
    "literal_suffix",
    "parse_action_pattern",
    "set_matcher",
)

Tokens = tuple[str, ...]
Matcher = Callable[[str], bool]
T = TypeVar("T")

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_GLOB_META: Final = frozenset("*?")


@functools.lru_cache(maxsize=8192)  # rules repeat patterns (">", "svc.>"): validated once
def parse_action_pattern(pattern: str) -> Tokens:
    """Split and validate an action pattern; ``ValueError`` says what is wrong."""
    if not pattern:
        raise ValueError("action pattern is empty")
    tokens = tuple(pattern.split("."))
    for i, token in enumerate(tokens):
        if token == "":
            raise ValueError(f"action pattern {pattern!r} has an empty token")
        if token == ">":
            if i != len(tokens) - 1:
                raise ValueError(f"in action pattern {pattern!r}, '>' must be the last token")
        elif token == "*":
            continue
        elif "*" in token or ">" in token:
            raise ValueError(
                f"action pattern {pattern!r}: token {token!r} mixes a wildcard with text;"
                " wildcards stand for whole tokens ('payments.*', 'tools.>')"
            )
        elif _TOKEN_RE.fullmatch(token) is None:
            raise ValueError(
                f"action pattern {pattern!r}: token {token!r} may only use A-Z a-z 0-9 _ -"
            )
    return tokens


def action_matches(pattern: Tokens, action: Tokens) -> bool:
    """Whether a parsed pattern matches the tokens of a concrete action."""
    for i, token in enumerate(pattern):
        if token == ">":
            return len(action) > i
        if i >= len(action) or (token != "*" and token != action[i]):
            return False
    return len(action) == len(pattern)


def action_covers(outer: Tokens, inner: Tokens) -> bool:
    """Whether every action matched by ``inner`` is matched by ``outer`` (exact, not approx)."""
    for i, token in enumerate(outer):
        if token == ">":
            return len(inner) > i  # whatever inner has from here on is one or more tokens
        if i >= len(inner):
            return False
        other = inner[i]
        if token == "*":
            if other == ">":  # '>' may stand for several tokens, '*' for one only
                return False
        elif other != token:
            return False
    return len(inner) == len(outer)


def is_glob(pattern: str) -> bool:
    return not _GLOB_META.isdisjoint(pattern)


def literal_prefix(pattern: str) -> str:
    """The text before the first ``*`` or ``?`` (all of it for a plain value)."""
    for i, ch in enumerate(pattern):
        if ch in _GLOB_META:
            return pattern[:i]
    return pattern


def literal_suffix(pattern: str) -> str:
    """The text after the last ``*`` or ``?`` (all of it for a plain value)."""
    for i in range(len(pattern) - 1, -1, -1):
        if pattern[i] in _GLOB_META:
            return pattern[i + 1 :]
    return pattern


def _always(_: str) -> bool:
    return True


def _fixed(segment: str) -> re.Pattern[str]:
    """A segment with ``?`` as a regex of fixed length: literals and ``.`` only, no
    quantifier and no alternation, so one attempt costs at most ``len(segment)`` steps."""
    return re.compile("".join("." if ch == "?" else re.escape(ch) for ch in segment), re.DOTALL)


def _literal_glob(head: str, middle: tuple[str, ...], tail: str) -> Matcher:
    """``head*m1*m2*...*tail`` without ``?``: C-level string operations only.

    ``endswith(tail, len(head))`` looks for the tail after the head only, so the two never
    share characters (``ab*ba`` does not match ``aba``); once it holds, the middle search
    window ``[len(head), len(value) - len(tail))`` is well formed.
    """
    start, back = len(head), len(tail)
    if not middle:
        return lambda value: value.startswith(head) and value.endswith(tail, start)
    if len(middle) == 1:  # the common 'bucket:*/reports/*.csv': no loop
        (one,) = middle
        return lambda value: (
            value.startswith(head)
            and value.endswith(tail, start)
            and value.find(one, start, len(value) - back) >= 0
        )

    def match(value: str) -> bool:
        if not (value.startswith(head) and value.endswith(tail, start)):
            return False
        pos, end = start, len(value) - back
        for segment in middle:
            found = value.find(segment, pos, end)
            if found < 0:
                return False
            pos = found + len(segment)
        return True

    return match


def _wild_glob(head: str, middle: tuple[str, ...], tail: str) -> Matcher:
    """``head*m1*...*tail`` where some segment has ``?``: each segment a fixed-length regex."""
    need, start, back = len(head) + len(tail) + sum(map(len, middle)), len(head), len(tail)
    head_at, tail_at = _fixed(head).match, _fixed(tail).match
    if not middle:
        return lambda value: (
            len(value) >= need
            and head_at(value) is not None
            and tail_at(value, len(value) - back) is not None
        )
    finders = tuple(_fixed(segment).search for segment in middle)

    def match(value: str) -> bool:
        end = len(value) - back
        if len(value) < need or head_at(value) is None or tail_at(value, end) is None:
            return False
        pos = start
        for search in finders:
            found = search(value, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True

    return match


@functools.lru_cache(maxsize=4096)  # compile-time only: rules and coverage checks repeat globs
def glob_matcher(pattern: str) -> Matcher:
    """A matcher for one glob, specialised by its shape; never backtracks.

    The glob is split at its ``*``: ``head*m1*...*mk*tail``. A value matches when it
    starts with ``head``, ends with ``tail`` (not overlapping), and holds ``m1`` ... ``mk``
    in order in between. Taking each ``mi`` at its leftmost place is enough: all places of
    one segment have the same length, so the leftmost ends first and leaves the most room
    for the rest. One match costs at most ``len(value) * len(pattern)`` character steps,
    in ``str.startswith`` / ``endswith`` / ``find`` (or a fixed-length regex per segment
    holding ``?``), where the backtracking regex this replaces took
    ``len(value) ** stars``: 20 s for ``bucket:*/*/*/*/*.csv`` on a 407-character value.
    """
    if pattern.strip("*") == "":
        return _always
    if not is_glob(pattern):
        return pattern.__eq__
    prefix = literal_prefix(pattern)
    if pattern == prefix + "*":
        return lambda value: value.startswith(prefix)
    if "*" not in pattern:  # only '?': one fixed-length comparison
        size, fullmatch = len(pattern), _fixed(pattern).fullmatch
        return lambda value: len(value) == size and fullmatch(value) is not None
    head, *rest, tail = pattern.split("*")
    middle = tuple(segment for segment in rest if segment)  # '**' is one '*'
    if "?" in pattern:
        return _wild_glob(head, middle, tail)
    return _literal_glob(head, middle, tail)


def only_prefix(patterns: Sequence[str]) -> str | None:
    """``p`` when *patterns* is one ``p*`` glob (``p`` free of glob characters), ``""`` for
    ``*``; else ``None``. What the evaluator tests inline with ``str.startswith``, exactly
    as :func:`set_matcher` would."""
    if len(patterns) != 1:
        return None
    (pattern,) = patterns
    if pattern.strip("*") == "":
        return ""
    if pattern.endswith("*") and not is_glob(pattern[:-1]):
        return pattern[:-1]
    return None


def set_matcher(patterns: Iterable[str]) -> Matcher:
    """One matcher for a list of globs: a set for exact values, a tuple of prefixes for
    ``prefix*`` and :func:`glob_matcher` for each of the rest."""
    exact: set[str] = set()
    prefixes: list[str] = []
    others: list[str] = []
    for pattern in patterns:
        if pattern.strip("*") == "":
            return _always
        if not is_glob(pattern):
            exact.add(pattern)
        elif pattern == literal_prefix(pattern) + "*":
            prefixes.append(pattern[:-1])
        else:
            others.append(pattern)
    frozen = frozenset(exact)
    starts = tuple(prefixes)
    if not starts and not others:
        return frozen.__contains__
    if not others:
        if not frozen:
            if len(starts) == 1:
                # The prefix as a default argument, not a closure cell over a tuple: two
                # fewer objects to fetch per call, which at 10,000 rules are cache misses.
                def starts_with(value: str, _prefix: str = starts[0]) -> bool:
                    return value.startswith(_prefix)

                return starts_with
            return lambda value: value.startswith(starts)
        return lambda value: value in frozen or value.startswith(starts)
    if len(others) == 1:
        other = glob_matcher(others[0])
        if not frozen and not starts:  # one glob alone: its own matcher, no wrapper call
            return other
        return lambda value: value in frozen or value.startswith(starts) or other(value)
    matchers = tuple(glob_matcher(p) for p in others)
    return lambda value: (
        value in frozen or value.startswith(starts) or any(m(value) for m in matchers)
    )


def glob_covers(outer: str, inner: str) -> bool:
    """Whether ``outer`` provably matches everything ``inner`` matches (conservative:
    ``False`` means "could not prove", not "does not cover")."""
    if outer.strip("*") == "" or outer == inner:
        return True
    if not is_glob(outer):
        return False
    if not is_glob(inner):
        return glob_matcher(outer)(inner)
    prefix = literal_prefix(outer)
    # 'p*' covers any glob whose literal start begins with p (e.g. 'acct-*' ⊆ 'acct*').
    return outer == prefix + "*" and literal_prefix(inner).startswith(prefix)


class _Node:
    """A trie node over action tokens; built at compile time and never mutated after."""

    __slots__ = ("children", "here", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.here: list[int] = []  # patterns that end at this node
        self.tail: list[int] = []  # patterns with '>' at this position


class ActionIndex:
    """Maps actions to the ids (ints) of patterns matching them.

    Literal patterns live in a dict; wildcard patterns in a token trie, so a lookup costs
    O(tokens * wildcard branching) whatever the number of patterns.
    """

    __slots__ = ("_exact", "_root")

    def __init__(self, entries: Iterable[tuple[Tokens, int]]) -> None:
        exact: dict[str, set[int]] = {}
        self._root = _Node()
        for tokens, value in entries:
            if "*" not in tokens and ">" not in tokens:
                exact.setdefault(".".join(tokens), set()).add(value)
                continue
            node = self._root
            for token in tokens:
                if token == ">":
                    node.tail.append(value)
                    break
                if token == "*":
                    if node.star is None:
                        node.star = _Node()
                    node = node.star
                else:
                    node = node.children.setdefault(token, _Node())
            else:
                node.here.append(value)
        self._exact = {k: frozenset(v) for k, v in exact.items()}

    def match(self, action: str) -> set[int]:
        """Ids of the patterns that match a concrete action."""
        out = set(self._exact.get(action, ()))
        self._walk(self._root, tuple(action.split(".")), 0, out)
        return out

    def _walk(self, node: _Node, tokens: Tokens, i: int, out: set[int]) -> None:
        if node.tail and i < len(tokens):
            out.update(node.tail)
        if i == len(tokens):
            out.update(node.here)
            return
        child = node.children.get(tokens[i])
        if child is not None:
            self._walk(child, tokens, i + 1, out)
        if node.star is not None:
            self._walk(node.star, tokens, i + 1, out)

    def covering(self, pattern: Tokens) -> set[int]:
        """Ids of the patterns that cover every action ``pattern`` matches."""
        return set().union(*self.covering_parts(pattern))

    def covering_parts(self, pattern: Tokens) -> list[Sequence[int]]:
        """:meth:`covering` as the index's own lists, not copied (they may repeat an id)."""
        out: list[Sequence[int]] = []
        if "*" not in pattern and ">" not in pattern:
            out.append(self._exact.get(".".join(pattern), frozenset()))  # type: ignore[arg-type]
        self._cover(self._root, pattern, 0, out)
        return out

    def _cover(self, node: _Node, pattern: Tokens, i: int, out: list[Sequence[int]]) -> None:
        if node.tail and i < len(pattern):
            out.append(node.tail)
        if i == len(pattern):
            out.append(node.here)
            return
        token = pattern[i]
        if token == ">":
            return  # only a '>' (handled above) covers one-or-more tokens
        if token != "*" and (child := node.children.get(token)) is not None:
            self._cover(child, pattern, i + 1, out)
        if node.star is not None:
            self._cover(node.star, pattern, i + 1, out)


class ActionKeys:
    """Action patterns as written, and for a concrete action the ones that match it.

    The evaluator files rules under their action patterns; a request looks up each
    pattern its action matches. Exact patterns match by equality (the action itself is
    always the first key); ``p.>`` patterns by the action's token prefixes (a dict
    lookup per ``.``), ``>`` always; patterns with ``*`` through a token trie. For the
    actions that rules name exactly, the keys are computed once, here.
    """

    __slots__ = ("_any", "_star_keys", "_stars", "_tails", "named")

    def __init__(self, patterns: Iterable[str]) -> None:
        distinct = dict.fromkeys(patterns)
        self._any = ">" in distinct
        self._tails: dict[str, str] = {}  # 'p' -> 'p.>', p without wildcards
        stars: list[str] = []
        for pattern in distinct:
            if pattern == ">":
                continue
            head, _, last = pattern.rpartition(".")
            if last == ">" and "*" not in head and ">" not in head:
                self._tails[head] = pattern
            elif "*" in pattern or ">" in pattern:
                stars.append(pattern)
        self._star_keys = tuple(stars)
        self._stars = (
            ActionIndex((parse_action_pattern(p), i) for i, p in enumerate(stars))
            if stars
            else None
        )
        # The actions rules name exactly, with their keys computed once.
        self.named: dict[str, tuple[str, ...]] = {}
        for pattern in distinct:
            if "*" not in pattern and ">" not in pattern:
                self.named[pattern] = tuple(self._compute(pattern))

    def keys(self, action: str) -> Sequence[str]:
        """The patterns matching *action*, itself first (a pattern may come twice when an
        action is written like one: ``a.*`` as an action)."""
        found = self.named.get(action)
        if found is not None:
            return found
        return self._compute(action)

    def _compute(self, action: str) -> list[str]:
        out = [action]
        if self._any:
            out.append(">")
        tails = self._tails
        if tails:
            pos = action.find(".")
            while pos > 0:
                key = tails.get(action[:pos])
                if key is not None:
                    out.append(key)
                pos = action.find(".", pos + 1)
        if self._stars is not None:
            out.extend(self._star_keys[i] for i in sorted(self._stars.match(action)))
        return out


class GlobIndex(Generic[T]):
    """Globs (resources, principals) with a payload each; for a value, the payloads of the
    globs that match it, without testing every glob.

    Plain values are a dict. A glob is filed by its literal start (``head`` of
    ``head*…``: a dict per length, looked up with the value's first characters), else
    by its literal end, else (``*x*``) in a short list; ``*`` in a list that every value
    gets. Only a glob that is more than ``head*`` or ``*tail`` is then tested, with its
    own matcher. A lookup costs a dict lookup per distinct head or tail length, whatever
    the number of globs.
    """

    __slots__ = ("_always", "_exact", "_heads", "_rest", "_tails")

    def __init__(self, items: Iterable[tuple[str, T]]) -> None:
        exact: dict[str, list[T]] = {}
        always: list[T] = []
        heads: dict[int, dict[str, list[tuple[Matcher | None, T]]]] = {}
        tails: dict[int, dict[str, list[tuple[Matcher | None, T]]]] = {}
        rest: list[tuple[Matcher, T]] = []
        for pattern, payload in items:
            if pattern.strip("*") == "":
                always.append(payload)
            elif not is_glob(pattern):
                exact.setdefault(pattern, []).append(payload)
            elif head := literal_prefix(pattern):
                verify = None if pattern == head + "*" else glob_matcher(pattern)
                heads.setdefault(len(head), {}).setdefault(head, []).append((verify, payload))
            elif tail := literal_suffix(pattern):
                verify = None if pattern == "*" + tail else glob_matcher(pattern)
                tails.setdefault(len(tail), {}).setdefault(tail, []).append((verify, payload))
            else:
                rest.append((glob_matcher(pattern), payload))
        self._exact = {k: tuple(v) for k, v in exact.items()}
        self._always = tuple(always)
        self._heads = tuple(
            (n, {k: tuple(v) for k, v in d.items()}) for n, d in sorted(heads.items())
        )
        self._tails = tuple(
            (n, {k: tuple(v) for k, v in d.items()}) for n, d in sorted(tails.items())
        )
        self._rest = tuple(rest)

    def __len__(self) -> int:
        return (
            sum(map(len, self._exact.values()))
            + len(self._always)
            + sum(len(v) for _, d in self._heads for v in d.values())
            + sum(len(v) for _, d in self._tails for v in d.values())
            + len(self._rest)
        )

    def payloads(self) -> list[T]:
        """Every payload (in no particular order)."""
        out = [p for v in self._exact.values() for p in v]
        out += self._always
        out += [p for _, d in (*self._heads, *self._tails) for v in d.values() for _, p in v]
        out += [p for _, p in self._rest]
        return out

    def match(self, value: str) -> list[T]:
        """The payloads of every glob matching *value* (one per matching glob)."""
        out = list(self._always)
        found = self._exact.get(value)
        if found is not None:
            out += found
        size = len(value)
        for length, by_head in self._heads:
            if length > size:
                break
            hit = by_head.get(value[:length])
            if hit is not None:
                for verify, payload in hit:
                    if verify is None or verify(value):
                        out.append(payload)
        for length, by_tail in self._tails:
            if length > size:
                break
            hit = by_tail.get(value[size - length :])
            if hit is not None:
                for verify, payload in hit:
                    if verify is None or verify(value):
                        out.append(payload)
        for match, payload in self._rest:
            if match(value):
                out.append(payload)
        return out
