"""The regexes of the ``matches`` operator: RE2, so that a match takes linear time.

Python's ``re`` backtracks: ``^(\\w+\\s?)*$`` against a 28-character memo took 9 s, and
an agent chooses the memo. RE2 (the engine behind Go's ``regexp`` and OPA's Rego) runs
every regex as an automaton, in time linear in the value (at most ``len(value)`` times
the size of the regex), and refuses what an automaton cannot do: lookahead, lookbehind,
backreferences, atomic groups and possessive quantifiers. Those are refused when the
policy is compiled, with the reason, so ``policy check`` finds them.

Semantics are ``re.search`` (unanchored: anchor with ``^`` and ``$``) over RE2 syntax,
which differs from Python's ``re`` in a few places a policy author may meet:

* ``$`` (without ``(?m)``) matches only at the very end; Python's also before a final
  newline, so ``^[a-z]+$`` no longer admits ``"abc\\n"``. ``\\Z`` is refused (write
  ``\\z``);
* ``\\d \\w \\s \\b`` are ASCII (``\\s`` is ``[\\t\\n\\f\\r ]``); Python's are Unicode. Use
  ``\\pN``, ``\\pL`` or explicit classes for more;
* ``{,n}`` and ``{,}`` are literal text in RE2 and repetitions in Python: refused here,
  so that no regex silently changes meaning (write ``{0,n}`` or ``*``, or ``\\{`` for the
  text);
* ``[[:alpha:]]`` is a POSIX class (Python reads the characters ``[:alph`` and a ``]``);
* ``\\B`` matches an empty value (Python's does not);
* repetition counts go up to 1000.

A random search (300,000 short regexes of metacharacters, each against some 30 values,
where both engines accept the regex) found no other difference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

import re2

__all__ = ("MAX_REGEX_CHARS", "MAX_REGEX_MEMORY_BYTES", "compile_regex", "searcher")

MAX_REGEX_CHARS: Final = 4096
"""The longest regex a policy may hold: far above what a readable condition needs, and a
bound on what compiling and checking one costs (the ``{,n}`` scan below is quadratic at
worst)."""

MAX_REGEX_MEMORY_BYTES: Final = 1 << 20
"""RE2's memory budget for one regex: its compiled program and its DFA cache. Larger
programs are refused at compile time ("pattern too large"); a cache that fills up is
flushed, or the search falls back to RE2's NFA, still in linear time."""

# RE2's messages for what an automaton cannot do, and what to tell a policy author.
_UNSUPPORTED: Final = (
    ("invalid perl operator: (?=", "lookahead '(?=...)'"),
    ("invalid perl operator: (?!", "negative lookahead '(?!...)'"),
    ("invalid perl operator: (?<=", "lookbehind '(?<=...)'"),
    ("invalid perl operator: (?<!", "negative lookbehind '(?<!...)'"),
    ("invalid perl operator: (?>", "an atomic group '(?>...)'"),
    ("invalid perl operator: (?P=", "a backreference '(?P=name)'"),
    ("invalid perl operator: (?(", "a conditional '(?(...)...)'"),
    ("bad repetition operator: *+", "a possessive quantifier '*+'"),
    ("bad repetition operator: ++", "a possessive quantifier '++'"),
    ("bad repetition operator: ?+", "a possessive quantifier '?+'"),
)


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # the reason goes into the policy error, not to stderr
    options.never_capture = True  # only "is there a match": no submatch bookkeeping
    options.max_mem = MAX_REGEX_MEMORY_BYTES
    return options


_OPTIONS: Final = _options()


def _why(pattern: str, error: Exception) -> str:
    raw = error.args[0] if error.args else ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if text == "invalid perl operator: (?P" and "(?P=" in pattern:
        text = "invalid perl operator: (?P="  # RE2 names only the first three characters
    for prefix, construct in _UNSUPPORTED:
        if text.startswith(prefix):
            return f"regex uses {construct}, which the linear-time engine (RE2) does not support"
    if text.startswith("invalid escape sequence: \\") and text[-1:].isdigit():
        return (
            f"regex uses a backreference '{text.rpartition(' ')[2]}', which the linear-time"
            " engine (RE2) does not support"
        )
    if text == "invalid escape sequence: \\Z":
        return "'\\Z' is not supported; write '\\z' for the end of the text"
    if text.startswith("pattern too large"):
        return (
            f"regex is too large for the linear-time engine (RE2, at most"
            f" {MAX_REGEX_MEMORY_BYTES >> 20} MiB compiled)"
        )
    return text


def _open_brace_with_no_minimum(pattern: str) -> int:
    """Where ``{,n}`` or ``{,}`` stands outside a character class, or -1."""
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("\\Q", i):  # \Q...\E quotes text
            end = pattern.find("\\E", i + 2)
            i = end + 2 if end >= 0 else len(pattern)
            continue
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if pattern.startswith("[:", i):  # [:alpha:] inside a class
                end = pattern.find(":]", i + 2)
                i = end + 2 if end >= 0 else i + 1
                continue
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += 1
            if pattern.startswith("^", i):
                i += 1
            if pattern.startswith("]", i):  # a ']' first in a class is literal
                i += 1
            continue
        elif ch == "{" and pattern.startswith("{,", i):
            j = i + 2
            while j < len(pattern) and pattern[j].isdigit():
                j += 1
            if pattern.startswith("}", j):
                return i
        i += 1
    return -1


def compile_regex(pattern: str) -> Any:
    """Compile a policy regex with RE2; ``ValueError`` says why it cannot be used."""
    if len(pattern) > MAX_REGEX_CHARS:
        raise ValueError(f"regex is longer than {MAX_REGEX_CHARS} characters")
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise ValueError(_why(pattern, exc)) from None
    at = _open_brace_with_no_minimum(pattern)
    if at >= 0:
        raise ValueError(
            f"'{{,n}}' at position {at} is literal text in RE2 but a repetition in Python;"
            " write '{0,n}' (or '*') for the repetition, or '\\{' for the text"
        )
    return compiled


def searcher(pattern: str) -> Callable[[str], bool]:
    """``re.search`` semantics: whether the regex matches anywhere in a string.

    The value is passed as UTF-8 bytes: the wrapper then skips mapping byte offsets back
    to characters, which we do not need (1.4 µs a call instead of 3.5 µs). A string with
    a lone surrogate has no UTF-8 form: it goes through ``surrogatepass`` rather than
    raising in the evaluator.
    """
    compiled = compile_regex(pattern)
    match = _raw_match(compiled)
    if match is None:  # another google-re2 layout: its public API
        search = compiled.search
        return lambda value: search(value.encode("utf-8", "surrogatepass")) is not None
    # The compiled RE2 object's own Match, unanchored, on the whole value: what search
    # does on bytes without its generator and its _Match object (0.6 against 0.9-1.3 µs).
    anchor, null = _UNANCHORED, _NULL_SPAN

    def found(value: str) -> bool:
        data = value.encode("utf-8", "surrogatepass")
        return bool(match(anchor, data, 0, len(data))[0] != null)

    return found


_UNANCHORED: Final[Any] = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
_NULL_SPAN: Final[Any] = getattr(re2, "_NULL_SPAN", None)


def _raw_match(compiled: Any) -> Callable[..., Any] | None:
    """google-re2's C++ ``RE2.Match`` of *compiled*, if this version has the layout we
    know (checked on a known answer); else ``None``."""
    match = getattr(getattr(compiled, "_regexp", None), "Match", None)
    if match is None or _UNANCHORED is None or _NULL_SPAN is None:
        return None
    try:
        probe = b"x"
        spans = match(_UNANCHORED, probe, 0, len(probe))
        if not isinstance(spans, (list, tuple)) or not spans:
            return None
    except Exception:
        return None
    return cast("Callable[..., Any]", match)
