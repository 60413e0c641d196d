"""Text that is safe to print on an operator's terminal.

Agents control most of what the command-line tools print: subjects, principals, actions,
resources, intent ids, payloads, and the messages and ledger lines built from them. Printed
raw, a control character in any of them is an instruction to the terminal (``ESC [2J``
clears the screen, ``ESC ]0;...BEL`` sets the window title, ``ESC ]52;c;...BEL`` writes the
clipboard), a CR or LF starts a line the gateway did not write (a fake ``ALLOW``), and a
bidi override reorders what the operator reads.

:func:`safe` escapes every character that Python does not call printable (the definition
``repr()`` uses, :meth:`str.isprintable`): C0 and C1 controls, DEL, format characters
(bidi overrides and isolates, zero-width joiners, tag characters), line and paragraph
separators, spaces other than the ASCII space, lone surrogates (a subject decoded with
``surrogateescape``), private-use and unassigned code points. Each is shown as ``repr()``
would show it (``\\x1b``, ``\\n``, ``\\u202e``, ``\\udcff``), so the operator sees that
something was there and what. Printable text, non-ASCII letters included, is unchanged, and
so are backslashes: a payload's own JSON escapes stay readable, at the price that an agent
can type a literal ``\\x1b`` that looks like an escaped one (harmless: it is text).

:func:`safe_json` does the same for JSON text, with JSON escapes (``\\u001b``), so the
output still decodes to the same value.

:func:`say` prints one line of ours with values in it; :func:`safe_traceback` keeps a
traceback's own line breaks and makes each exception message one line.

``watch`` calls :func:`safe` on every field of every record, so it is one
:meth:`str.isprintable` call (C speed) when there is nothing to escape (0.4 us for a
260-character field), else one :meth:`str.translate` over a table filled as characters are
met (8 us for 4 KB ending in an ESC; a loop over the characters in Python: 83 us).
"""

from __future__ import annotations

import textwrap
import traceback
from collections.abc import Callable, Iterator
from typing import Final, TextIO

__all__ = ("safe", "safe_json", "safe_lines", "safe_traceback", "say")

# Distinct code points remembered per table; the rest are computed each time they are met,
# so a stream of ever-new characters cannot grow the table without bound (~100 bytes each).
_CACHE_MAX: Final = 1 << 16

_SHORT: Final = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _repr_escape(cp: int) -> str:
    if cp in _SHORT:
        return _SHORT[cp]
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _json_escape(cp: int) -> str:
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000  # JSON spells a code point beyond the BMP as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


class _Table(dict[int, str]):
    """Code point -> what to print for it, for :meth:`str.translate`, filled on demand.

    A complete table would mean asking about all 1.1M code points at import; this one asks
    once per distinct code point met (``translate`` looks up every character, ``__missing__``
    answers the new ones).
    """

    def __init__(self, escape: Callable[[int], str]) -> None:
        super().__init__()
        self._escape = escape

    def __missing__(self, cp: int) -> str:
        char = chr(cp)
        shown = char if char.isprintable() else self._escape(cp)
        if len(self) < _CACHE_MAX:
            self[cp] = shown
        return shown


_TEXT: Final = _Table(_repr_escape)
_JSON: Final = _Table(_json_escape)


def safe(text: str) -> str:
    """*text* with every non-printable character escaped as ``repr()`` would: one line."""
    return text if text.isprintable() else text.translate(_TEXT)


def safe_json(text: str) -> str:
    """One line of JSON text with every non-printable character as a JSON ``\\u`` escape.

    For compact JSON (no newlines between tokens): outside strings JSON has only ASCII
    punctuation and whitespace, and inside a string ``\\uXXXX`` means the character it
    replaces, so the result decodes to the same value. Indented JSON: :func:`safe_lines`
    with this per line.
    """
    return text if text.isprintable() else text.translate(_JSON)


def safe_lines(text: str, line: Callable[[str], str] = safe) -> str:
    """Multi-line text we formatted (a traceback, indented JSON): each line made safe.

    Only for text whose line breaks are our own; a value that may hold a line break goes
    through :func:`safe` whole, so that it cannot start a line.
    """
    return "\n".join(map(line, text.split("\n")))


_CAUSE: Final = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT: Final = "\nDuring handling of the above exception, another exception occurred:\n\n"


def safe_traceback(exc: BaseException) -> str:
    """*exc*'s traceback laid out as Python does, with every line break in it Python's own.

    The frames (file, line, our source) keep their lines; an exception's message and notes,
    which may quote what an agent sent, line breaks included, become one escaped line. (The
    pieces of ``TracebackException.format()`` cannot be told apart: a note is a piece per
    line, like a message; so this walks the chain itself.)
    """
    te = traceback.TracebackException.from_exception(exc)
    return "".join(_traceback(te, "")).removesuffix("\n")


def _traceback(te: traceback.TracebackException, indent: str) -> Iterator[str]:
    # The chain of causes and contexts, newest first, walked without recursion as Python
    # does (TracebackException has already cut any cycle).
    chain, links = [te], []
    while True:
        last = chain[-1]
        if last.__cause__ is not None:
            links.append(_CAUSE)
            chain.append(last.__cause__)
        elif last.__context__ is not None and not last.__suppress_context__:
            links.append(_CONTEXT)
            chain.append(last.__context__)
        else:
            break
    for i in reversed(range(len(chain))):
        yield from _exception(chain[i], indent)
        if i:
            yield textwrap.indent(links[i - 1], indent)


def _exception(te: traceback.TracebackException, indent: str) -> Iterator[str]:
    if te.stack:
        yield f"{indent}Traceback (most recent call last):\n"
        yield from (textwrap.indent(safe_lines(frame), indent) for frame in te.stack.format())
    yield indent + safe("".join(te.format_exception_only()).removesuffix("\n")) + "\n"
    for i, sub in enumerate(te.exceptions or (), 1):  # an exception group's members
        yield f"{indent}+---------------- {i} ----------------\n"
        yield from _traceback(sub, indent + "| ")


def say(out: TextIO, line: str) -> None:
    """Print one line (ours, with values in it) to *out*: the values cannot break it."""
    print(safe(line), file=out)
