"""Canonical msgpack (protocol/codec.py; SPEC.md "Canonical msgpack")."""

from __future__ import annotations

import array
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import LocalProtocolError, RemoteProtocolError


def _reason(exc_info: pytest.ExceptionInfo[Any]) -> str:
    return str(exc_info.value.reason)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "c0"),
        (False, "c2"),
        (True, "c3"),
        (0, "00"),
        (127, "7f"),
        (128, "cc80"),
        (256, "cd0100"),
        (65_536, "ce00010000"),
        (2**32, "cf0000000100000000"),
        (-1, "ff"),
        (-32, "e0"),
        (-33, "d0df"),
        (-129, "d1ff7f"),
        (0.5, "cb3fe0000000000000"),  # float64 even when float32 would be exact
        ("a", "a161"),
        (b"a", "c40161"),  # bytes are bin, never str
        ([1, 2], "920102"),
        ({"b": 1, "a": 2}, "82a16102a16201"),  # keys sorted
    ],
)
def test_known_encodings(value: Any, expected: str) -> None:
    assert codec.pack(value).hex() == expected
    assert codec.unpack(bytes.fromhex(expected)) == value


def test_keys_sorted_by_utf8_bytes() -> None:
    # "B" (0x42) < "a" (0x61) < "z" < "é" (0xc3 0xa9) < U+FFFF (ef bf bf) < U+10000 (f0 90 80 80).
    obj = {"\U00010000": 1, "\uffff": 2, "é": 3, "z": 4, "a": 5, "B": 6, "aa": 7}
    decoded = codec.unpack(codec.pack(obj))
    assert list(decoded) == ["B", "a", "aa", "z", "é", "\uffff", "\U00010000"]


def test_tuples_encode_as_arrays_and_decode_as_lists() -> None:
    assert codec.pack((1, 2)) == codec.pack([1, 2])
    assert codec.unpack(codec.pack((1, (2,)))) == [1, [2]]


def test_negative_zero_keeps_its_sign() -> None:
    out = codec.unpack(codec.pack(-0.0))
    assert out == 0.0 and math.copysign(1.0, out) == -1.0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({1: "a"}, "bad_key"),
        ({b"k": 1}, "bad_key"),
        ({1, 2}, "bad_type"),
        (object(), "bad_type"),
        (bytearray(b"x"), "bad_type"),
        (2**64, "bad_value"),
        (-(2**63) - 1, "bad_value"),
        ("\ud800", "bad_value"),  # a lone surrogate has no UTF-8 encoding
        ({"\ud800": 1}, "bad_value"),
    ],
)
def test_pack_rejects_unencodable(value: Any, reason: str) -> None:
    with pytest.raises(LocalProtocolError) as ei:
        codec.pack(value)
    assert _reason(ei) == reason


def _nest(depth: int) -> Any:
    obj: Any = None
    for _ in range(depth):
        obj = [obj]
    return obj


def test_depth_limit() -> None:
    # The outermost value is at depth 0; a value may sit at depth 16 at most.
    assert codec.unpack(codec.pack(_nest(16))) == _nest(16)
    with pytest.raises(LocalProtocolError) as ei:
        codec.pack(_nest(17))
    assert _reason(ei) == "too_deep"
    with pytest.raises(RemoteProtocolError) as ei2:
        codec.unpack(b"\x91" * 17 + b"\xc0")
    assert _reason(ei2) == "non_canonical"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xcc\x05", "non_canonical"),  # 5 as uint8
        (b"\xd0\x05", "non_canonical"),  # 5 as int8
        (b"\xca" + struct.pack(">f", 0.5), "non_canonical"),  # float32
        (b"\xd9\x01a", "non_canonical"),  # str8 for a 1-byte string
        (b"\x82\xa1b\x01\xa1a\x02", "non_canonical"),  # unsorted keys
        (b"\x82\xa1a\x01\xa1a\x01", "non_canonical"),  # duplicate key (even with equal values)
        (b"\x81\xc4\x01a\x01", "non_canonical"),  # bin key
        (b"\x81\x01\x01", "malformed"),  # int key
        (b"\xd4\x01\x00", "malformed"),  # ext
        (b"\xc1", "malformed"),
        (b"", "malformed"),
        (b"\xc0\xc0", "malformed"),  # trailing object
        (b"\xa3ab", "malformed"),  # truncated
        (b"\xa1\xff", "malformed"),  # invalid UTF-8
    ],
)
def test_unpack_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        codec.unpack(data)
    assert _reason(ei) == reason


def test_cap_is_checked_before_decoding() -> None:
    ok = codec.pack(b"x" * 100)
    assert codec.unpack(ok, max_bytes=len(ok)) == b"x" * 100
    with pytest.raises(RemoteProtocolError) as ei:
        codec.unpack(ok, max_bytes=len(ok) - 1)
    assert _reason(ei) == "oversized"


def test_cap_counts_bytes_of_wide_memoryviews() -> None:
    # len() of a memoryview counts items: 100 int32 items are 400 bytes and must not pass a
    # 100-byte cap (this was a bug: the cap compared len(), not nbytes).
    payload = codec.pack(b"x" * 397)  # bin16 header (3 bytes) + 397 = 400 bytes
    assert len(payload) == 400
    view = memoryview(array.array("i", payload))
    assert len(view) == 100
    with pytest.raises(RemoteProtocolError) as ei:
        codec.unpack(view, max_bytes=100)
    assert _reason(ei) == "oversized"
    assert codec.unpack(memoryview(payload)) == b"x" * 397


@pytest.mark.parametrize("data", ["text", 5, None, [b"\xc0"]])
def test_unpack_rejects_non_bytes(data: Any) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        codec.unpack(data)
    assert _reason(ei) == "malformed"


def test_msgpack_length_limits_apply() -> None:
    # A declared array length far beyond the input must fail cleanly, not allocate.
    with pytest.raises(RemoteProtocolError):
        codec.unpack(b"\xdd\xff\xff\xff\xff")


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_trees = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(_trees)
def test_round_trip_is_exact(value: Any) -> None:
    data = codec.pack(value)
    assert codec.unpack(data) == value
    assert codec.pack(codec.unpack(data)) == data


@given(_trees)
def test_any_other_encoding_of_the_same_value_is_rejected(value: Any) -> None:
    """msgpack-python's default output (insertion-order maps) is accepted only if it is canonical."""
    other = msgpack.packb(value, use_bin_type=True)
    try:
        decoded = codec.unpack(other)
    except RemoteProtocolError as exc:
        assert exc.reason == "non_canonical"
        assert other != codec.pack(value)
    else:
        assert other == codec.pack(value) and decoded == value
