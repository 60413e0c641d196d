"""Operator output is safe: ``cli._safe`` escapes what a terminal would obey, keeps the rest."""

from __future__ import annotations

import io
import json
import re
import traceback
import unicodedata
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus_guard.cli import _safe
from bus_guard.cli._safe import safe, safe_json, safe_lines, safe_traceback, say

# What a terminal would obey (or an operator misread), each with how it is shown.
ATTACKS = [
    ("\x1b[2J", "\\x1b[2J"),  # clear screen
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),  # window title
    ("\x1b]52;c;cm0gLXJmIH4=\x07", "\\x1b]52;c;cm0gLXJmIH4=\\x07"),  # OSC 52: the clipboard
    ("x\r\nALLOW     agent-7", "x\\r\\nALLOW     agent-7"),  # a fake line
    ("x\rALLOW", "x\\rALLOW"),  # overwrite the line so far
    ("\t\x00\x7f", "\\t\\x00\\x7f"),
    ("\x9b2J\x85", "\\x9b2J\\x85"),  # C1: 8-bit CSI, NEL
    ("evil\u202egnp.exe", "evil\\u202egnp.exe"),  # right-to-left override
    ("\u2066a\u2069\u202a\u202c", "\\u2066a\\u2069\\u202a\\u202c"),  # isolates, embedding
    ("a\u200db\u200bc\ufeff", "a\\u200db\\u200bc\\ufeff"),  # zero-width joiner/space, BOM
    ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),  # line and paragraph separators
    ("tok.\udcff.x", "tok.\\udcff.x"),  # a subject byte decoded with surrogateescape
    ("hidden\U000e0041\U000e0042", "hidden\\U000e0041\\U000e0042"),  # tag characters
    ("agent\xa07", "agent\\xa07"),  # a space that is not the space
]

PRINTABLE = [
    "agent-7 payments.transfer account:acct-1",
    "Zoë, José, Łódź, 東京, مرحبا, שלום, Ωμέγα 🎉",
    'payload {"q": "a\\nb"} C:\\path [bold]not markup[/]',
    "",
]

# Every category, with the ones a terminal obeys made common (hypothesis draws Cs rarely).
_chars = st.one_of(
    st.characters(exclude_categories=()),
    st.sampled_from("\x1b\x07\r\n\t\x7f\x85\x9b\u200d\u2028\u2029\u202e\u2066\ufeff"),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.integers(0xE0000, 0xE007F).map(chr),
)
_texts = st.text(_chars, max_size=40)
_UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs"}

_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|([tnr]))")
_SHORT = {"t": "\t", "n": "\n", "r": "\r"}


def _unescape(shown: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m[4]:
            return _SHORT[m[4]]
        return chr(int(m[1] or m[2] or m[3], 16))

    return _ESCAPE.sub(one, shown)


@pytest.mark.parametrize(("text", "shown"), ATTACKS)
def test_what_a_terminal_would_obey_is_shown_escaped(text: str, shown: str) -> None:
    assert safe(text) == shown
    assert shown == repr(text)[1:-1]  # the form repr() uses, as documented


@pytest.mark.parametrize("text", PRINTABLE)
def test_printable_text_is_unchanged(text: str) -> None:
    assert safe(text) is text
    assert safe_json(json.dumps(text, ensure_ascii=False)) == json.dumps(text, ensure_ascii=False)


@settings(max_examples=500, deadline=None)
@given(_texts)
def test_nothing_a_terminal_obeys_survives(text: str) -> None:
    shown = safe(text)
    assert not {unicodedata.category(c) for c in shown} & _UNSAFE
    assert shown.isprintable()  # stronger: no private-use, unassigned or odd spaces either
    assert len(shown.splitlines()) <= 1


@settings(max_examples=500, deadline=None)
@given(_texts)
def test_printable_text_is_kept_and_anything_else_is_changed(text: str) -> None:
    assert (safe(text) == text) == text.isprintable()


@settings(max_examples=500, deadline=None)
@given(_texts.filter(lambda t: "\\" not in t))
def test_escaping_tells_inputs_apart(text: str) -> None:
    # Injective on text without backslashes (with them, a typed "\x1b" reads like an escaped
    # ESC: the documented price of leaving printable text alone).
    assert _unescape(safe(text)) == text


@settings(max_examples=500, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | _texts,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
        max_leaves=8,
    )
)
def test_json_stays_the_same_value_and_is_safe(value: object) -> None:
    text = json.dumps(value, ensure_ascii=False)  # DEL, C1, bidi, U+2028, surrogates raw
    shown = safe_json(text)
    assert shown.isprintable()
    # The value ensure_ascii's escapes give: the same but for a high+low surrogate pair of
    # lone surrogates, which JSON cannot tell from the character the pair spells.
    assert json.loads(shown) == json.loads(json.dumps(value))


def test_safe_lines_keeps_our_line_breaks_and_escapes_within() -> None:
    assert safe_lines("a\x1b\n  b\u202e") == "a\\x1b\n  b\\u202e"
    assert safe_lines('{\n  "a": "\x7f"\n}', safe_json) == '{\n  "a": "\\u007f"\n}'


def test_say_prints_one_line_whatever_the_values() -> None:
    out = io.StringIO()
    say(out, "decision x: \x1b[2J\r\nALLOW agent-7")
    assert out.getvalue() == "decision x: \\x1b[2J\\r\\nALLOW agent-7\n"


def test_the_table_stops_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_safe, "_CACHE_MAX", 100)
    table = _safe._Table(_safe._repr_escape)
    text = "".join(map(chr, range(0xE000, 0xE000 + 1000)))  # private use: all escaped
    assert text.translate(table) == "".join(f"\\u{cp:04x}" for cp in range(0xE000, 0xE3E8))
    assert len(table) == 100


_E = TypeVar("_E", bound=BaseException)


def _raised(exc: _E) -> _E:
    """*exc*, raised once: it has a traceback."""
    try:
        raise exc
    except BaseException:
        return exc


def test_a_traceback_is_pythons_when_there_is_nothing_to_escape() -> None:
    exc: Exception = _raised(ValueError("invalid literal"))
    for i in range(3):  # a chain: causes and contexts
        link = KeyError(i)
        if i % 2:
            link.__cause__ = exc
        else:
            link.__context__ = exc
        exc = _raised(link)
    assert safe_traceback(exc) == "".join(traceback.format_exception(exc)).removesuffix("\n")


def test_a_traceback_keeps_only_its_own_line_breaks() -> None:
    inner = _raised(KeyError("x\r\nALLOW agent-7"))
    group = ExceptionGroup("two\nALLOW", [ValueError("in\nALLOW\x1b[2J"), inner])
    group.__context__ = inner
    outer = RuntimeError("outer\nALLOW")
    outer.__cause__ = _raised(group)
    outer.add_note("note\nALLOW \u202e")
    text = safe_traceback(_raised(outer))
    lines = text.split("\n")
    assert all(line.isprintable() and not line.lstrip("| ").startswith("ALLOW") for line in lines)
    assert "RuntimeError: outer\\nALLOW\\nnote\\nALLOW \\u202e" in lines
    assert "| ValueError: in\\nALLOW\\x1b[2J" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
    assert "During handling of the above exception, another exception occurred:" in lines
    assert sum(line.startswith("Traceback (most recent call last):") for line in lines) == 3
