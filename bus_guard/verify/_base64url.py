"""Unpadded base64url (RFC 7515 §2), decoded strictly: one encoding per byte string.

Strict means no padding, no character outside ``A-Z a-z 0-9 - _`` and zero unused
trailing bits, so a token cannot be altered without changing its bytes (no malleable
tokens). Three decoders accept exactly the same strings:

* :func:`b64url_decode`, the reference: raises ``ValueError``;
* :func:`b64url_decode_checked` for a segment already matched against the alphabet (the
  verifier's token regex does that for all three JWS segments at once);
* :func:`b64url_decode_or_none` for a segment of unknown content, one C pass instead of a
  regex scan (the kilobyte-long segments of batched artifacts).

The last two return ``None`` instead of raising: they are on the verifier's hot path,
where the caller turns ``None`` into its own reason code.
"""

from __future__ import annotations

import binascii
import re
from typing import Final

__all__ = ("b64url_decode", "b64url_decode_checked", "b64url_decode_or_none", "b64url_encode")

_B64_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_INDEX: Final = {c: i for i, c in enumerate(_B64_ALPHABET)}
# Bits of the last character that carry no data, by ``len % 4``; they must be zero so that
# every byte string has exactly one encoding (no malleable tokens).
_B64_TAIL_MASK: Final = (0, 0, 0x0F, 0x03)
_B64_PAD: Final = (b"", b"", b"==", b"=")
_B64_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
_ENCODE_TABLE: Final = bytes.maketrans(b"+/", b"-_")
_DECODE_TABLE: Final = bytes.maketrans(b"-_", b"+/")
# For segments not yet checked against the alphabet: '-' and '_' become '+' and '/', and
# a '+', '/' or '=' in the input becomes '!', which strict decoding refuses like any other
# character outside the alphabet. One C pass instead of a regex scan.
_STRICT_TABLE: Final = bytes.maketrans(b"-_+/=", b"+/!!!")


def b64url_encode(data: bytes) -> bytes:
    """Unpadded base64url (RFC 7515 §2)."""
    return binascii.b2a_base64(data, newline=False).translate(_ENCODE_TABLE).rstrip(b"=")


def b64url_decode_checked(seg: str) -> bytes | None:
    """Decode a segment already known to use only the base64url alphabet; None if invalid."""
    rem = len(seg) & 3
    if rem == 1 or (rem and _B64_INDEX[seg[-1]] & _B64_TAIL_MASK[rem]):
        return None
    # binascii directly: base64.urlsafe_b64decode adds two Python-level passes.
    return binascii.a2b_base64(seg.encode("ascii").translate(_DECODE_TABLE) + _B64_PAD[rem])


def b64url_decode_or_none(seg: str) -> bytes | None:
    """Strict unpadded base64url of a segment of unknown content; None if not canonical.

    Same acceptance as :func:`b64url_decode` (the tests compare them), at a fraction of
    the cost for the kilobyte-long segments of batched artifacts.
    """
    rem = len(seg) & 3
    if rem == 1 or not seg.isascii():
        return None
    try:
        out = binascii.a2b_base64(
            seg.encode("ascii").translate(_STRICT_TABLE) + _B64_PAD[rem], strict_mode=True
        )
    except binascii.Error:
        return None
    if rem and _B64_INDEX[seg[-1]] & _B64_TAIL_MASK[rem]:
        return None
    return out


def b64url_decode(value: str) -> bytes:
    """Strict unpadded base64url decoding; ``ValueError`` on anything non-canonical."""
    if not _B64_SEGMENT_RE.fullmatch(value):
        raise ValueError("not unpadded base64url")
    out = b64url_decode_checked(value)
    if out is None:
        raise ValueError("not canonical base64url")
    return out
