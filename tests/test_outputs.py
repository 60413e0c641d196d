"""HeaderValue: str's exact results, without nats-py's per-character copy when clean."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import _HEADER_VALUE_NEWLINES

from bus_guard.pipeline import HeaderValue, forwarded_headers

_TABLES = st.one_of(
    st.just(_HEADER_VALUE_NEWLINES),
    st.dictionaries(
        st.integers(-5, 0x2FF) | st.integers(0x10FFFE, 2**70),
        st.one_of(st.none(), st.text(max_size=2)),
    ),
    st.dictionaries(st.characters(), st.text(max_size=1)).map(str.maketrans),
)


@given(st.text(), _TABLES)
def test_header_value_translate_and_strip_equal_str(
    text: str, table: dict[int, str | int | None]
) -> None:
    value = HeaderValue(text)
    assert value.translate(table) == text.translate(table)
    assert value.strip() == text.strip()
    assert value.strip("ab ") == text.strip("ab ")


def test_a_clean_value_is_not_copied() -> None:
    # What nats-py does to every header value on every publish; a batched artifact is
    # ~1.4 KiB of base64url, which str would walk a character at a time.
    token = HeaderValue("gb1~7~" + "eyJhbGciOiJFZERTQSJ9-_" * 64)
    assert token.strip() is token
    assert token.translate(_HEADER_VALUE_NEWLINES) is token
    dirty = HeaderValue(" a\r\nb ")
    assert dirty.strip() == "a\r\nb"
    assert dirty.translate(_HEADER_VALUE_NEWLINES) == " a  b "


def test_outputs_hand_nats_py_header_values() -> None:
    # Every header value the gateway publishes goes out as a HeaderValue: nats-py's
    # str.translate costs ~2 µs even for a decision id, several per output.
    forwarded = forwarded_headers({"traceparent": "00-abc-01", "Nats-Msg-Id": "x", "guard-a": "y"})
    assert forwarded == {"traceparent": "00-abc-01"}  # untrusted namespaces dropped
    assert all(type(v) is HeaderValue for v in forwarded.values())
