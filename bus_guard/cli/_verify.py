"""``bus-guard verify``: check an artifact as an executor would."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import msgspec

from bus_guard.cli._safe import safe_json, safe_lines, say
from bus_guard.errors import ConfigError, VerificationError
from bus_guard.verify import Verifier

__all__ = ("main_verify",)


def main_verify(
    *,
    jwks: Path,
    subject: str,
    payload: Path,
    artifact: str,
    out: TextIO,
    now: float | None = None,
) -> int:
    """``bus-guard verify``: 0 and the claims as JSON if valid, 1 if invalid, 2 on bad input.

    *artifact* is the token itself, or ``@FILE`` to read it from a file.
    """
    try:
        verifier = Verifier(jwks)
        if artifact.startswith("@"):
            token = Path(artifact[1:]).read_text(encoding="ascii").strip()
        else:
            token = artifact.strip()
        body = payload.read_bytes()
    except OSError as exc:  # the @FILE or the payload: named, without an errno
        say(out, f"error: {exc.filename}: {(exc.strerror or str(exc)).lower()}")
        return 2
    except (ConfigError, UnicodeDecodeError) as exc:
        say(out, f"error: {exc}")
        return 2
    try:
        claims = verifier.verify(token, subject=subject, payload=body, now=now)
    except VerificationError as exc:
        say(out, f"invalid: {exc}")
        return 1
    # Claims carry the agent's action and resource: JSON escapes for DEL, C1, bidi and the
    # like, line by line (the encoder escapes C0 in strings, so the line breaks are its own).
    text = msgspec.json.format(msgspec.json.encode(claims), indent=2).decode()
    out.write(safe_lines(text, safe_json) + "\n")
    return 0
