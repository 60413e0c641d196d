"""Hostile input to the policy language: patterns and values an agent or a careless author
can shape to make matching or loading slow.

* Globs (principal and resource patterns) match without backtracking: checked against the
  backtracking regex translation they replace, and timed on the issue's shapes.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus_guard.decision import Effect, Request
from bus_guard.policy import load_policy_sources
from bus_guard.policy._patterns import glob_covers, glob_matcher, set_matcher

# Generous against a noisy shared machine: the backtracking matchers these tests replace
# took seconds to minutes on the same inputs; the linear ones take microseconds.
FAST_S = 0.05


def fastest(call: Callable[[], object], rounds: int = 3) -> float:
    """The best of a few timed calls: a slow machine can stall one, not all."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


# --- globs -----------------------------------------------------------------------------


@functools.cache
def reference_glob(pattern: str) -> re.Pattern[str]:
    """What globs meant before: ``*`` as ``.*``, ``?`` as ``.``, the rest literal."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL)


def reference_matches(pattern: str, value: str) -> bool:
    return reference_glob(pattern).fullmatch(value) is not None


# Few letters, so that segments recur and overlap in the values; '\n' and 'é' because '?'
# is one character of any kind.
GLOB_CHARS = "ab/*?"
VALUE_CHARS = "ab/\né"
globs = st.text(alphabet=GLOB_CHARS, min_size=1, max_size=10)
values = st.text(alphabet=VALUE_CHARS, max_size=14)


@st.composite
def glob_and_values(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A glob and values: random ones, some built to match it (each '*' and '?' filled
    in), and near misses (a match with one character left out or replaced), so that both
    outcomes and the boundaries between them come up often."""
    pattern = draw(globs)
    out = draw(st.lists(values, max_size=3))
    for _ in range(draw(st.integers(1, 3))):
        filled = "".join(
            draw(values) if c == "*" else draw(st.sampled_from(VALUE_CHARS)) if c == "?" else c
            for c in pattern
        )
        cut = draw(st.integers(0, max(len(filled) - 1, 0)))
        other = draw(st.sampled_from(VALUE_CHARS))
        out += [filled, filled[:cut] + filled[cut + 1 :], filled[:cut] + other + filled[cut + 1 :]]
    return pattern, out


@settings(max_examples=1500, deadline=None)
@given(glob_and_values())
def test_glob_matcher_agrees_with_the_regex_translation(case: tuple[str, list[str]]) -> None:
    pattern, candidates = case
    match = glob_matcher(pattern)
    for value in candidates:
        assert match(value) == reference_matches(pattern, value), (pattern, value)


@settings(max_examples=500, deadline=None)
@given(st.lists(globs, min_size=1, max_size=4), st.lists(values, max_size=6))
def test_set_matcher_agrees_with_the_regex_translation(
    patterns: list[str], candidates: list[str]
) -> None:
    match = set_matcher(patterns)
    for value in [*candidates, *patterns]:
        expected = any(reference_matches(p, value) for p in patterns)
        assert match(value) == expected, (patterns, value)


@settings(max_examples=500, deadline=None)
@given(globs, st.text(alphabet="ab/", min_size=1, max_size=10))
def test_glob_covers_a_literal_exactly_when_it_matches_it(outer: str, inner: str) -> None:
    # The unreachable-rule check asks whether a glob covers a literal id or resource.
    assert glob_covers(outer, inner) == reference_matches(outer, inner)


def test_glob_shapes_that_need_leftmost_matching() -> None:
    # Overlapping and repeated segments, where a wrong split of the value would fail.
    assert glob_matcher("*aa*aa")("aaaa")
    assert not glob_matcher("*aa*aa")("aaa")
    assert glob_matcher("a*a")("aa") and not glob_matcher("a*a")("a")
    assert glob_matcher("*ab*b?")("xabbbx")
    assert glob_matcher("*a*a*")("aa") and not glob_matcher("*a*a*")("a")  # no reuse
    assert glob_matcher("*a?*a?*")("abab") and not glob_matcher("*a?*a?*")("abxb")
    assert not glob_matcher("ab*ba")("aba")  # head and tail must not share characters
    assert glob_matcher("?*?")("é\n") and not glob_matcher("?*?")("é")
    assert glob_matcher("**a**")("xa") and glob_matcher("a?")("a\n")


# Shapes that made the backtracking matcher take time growing like len(value) ** stars.
PATHOLOGICAL = [
    # The issue's case: 20 s for a 407-character resource.
    ("bucket:*/*/*/*/*.csv", "bucket:" + "/a" * 200),
    ("bucket:*/*/*/*/*.csv", "bucket:" + "/ab" * 20_000),
    ("*a*a*a*a*a*a*a*b", "a" * 400),
    ("*a*a*a*a*a*a*a*b", "a" * 60_000),
    ("*?*?*?*?*?*?*?!", "x" * 400),
    ("*a?*a?*a?*a?*b", "a" * 60_000),
    ("?" * 30 + "*" + "a*" * 30 + "b", "a" * 60_000),
]


@pytest.mark.parametrize(("pattern", "value"), PATHOLOGICAL)
def test_glob_matching_is_fast_on_pathological_shapes(pattern: str, value: str) -> None:
    match = glob_matcher(pattern)
    assert not match(value)
    assert fastest(lambda: match(value)) < FAST_S
    matches_set = set_matcher(["exact", "prefix*", pattern])
    assert fastest(lambda: matches_set(value)) < FAST_S


def test_the_issue_resource_is_decided_fast_end_to_end() -> None:
    policies = load_policy_sources(
        {
            "b.yaml": b"bundle: b\nversion: '1'\nrules:\n"
            b"  - {id: csv, effect: allow, actions: [files.read],"
            b" resources: ['bucket:*/*/*/*/*.csv']}\n"
        }
    )
    slow = Request("agent-1", "files.read", "bucket:" + "/a" * 200, {})
    assert policies.evaluate(slow).effect is Effect.DENY
    assert fastest(lambda: policies.evaluate(slow)) < FAST_S
    ok = Request("agent-1", "files.read", "bucket:a/b/c/d/e.csv", {})
    assert policies.evaluate(ok).effect is Effect.ALLOW
