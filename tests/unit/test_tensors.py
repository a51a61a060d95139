"""Tensor codec: round trip, canonical form, caps, and the parser fuzz invariant."""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.tensors import DTYPES, arrays_digest, decode_arrays, encode_arrays

_dtypes = st.sampled_from(["<f2", "<f4", "<f8", "<i4", "<i8", "|u1", ">f4", ">f8", ">i4", ">i8", ">f2"])


@st.composite
def array_lists(draw: st.DrawFn) -> list[np.ndarray]:
    n = draw(st.integers(min_value=0, max_value=5))
    out = []
    for _ in range(n):
        dtype = np.dtype(draw(_dtypes))
        a = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
        if a.ndim == 2 and draw(st.booleans()):
            a = a.T  # non-contiguous input must encode as C order
        out.append(a)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape
        and a.dtype.newbyteorder("<") == b.dtype
        and a.astype(b.dtype).tobytes() == b.tobytes()
    )


@settings(max_examples=100, deadline=None)
@given(array_lists())
def test_round_trip_and_reencode_equality(arrays: list[np.ndarray]) -> None:
    data = encode_arrays(arrays)
    back = decode_arrays(data)
    assert len(back) == len(arrays)
    assert all(_same(a, b) for a, b in zip(arrays, back, strict=True))  # bitwise, NaNs included
    assert encode_arrays(back) == data
    assert arrays_digest(back) == arrays_digest(arrays) == hashlib.sha256(data).hexdigest()


def test_wire_form_is_pinned() -> None:
    # A golden encoding: changing key order, dtype spelling or int widths must break this.
    data = encode_arrays([np.array([[1.0, 2.0]], dtype=np.float32), np.array(7, dtype=np.int64)])
    expected = [
        "92",  # array of 2
        "83 a464617461 c408 0000803f00000040 a56474797065 a33c6634 a57368617065 92 01 02",
        "83 a464617461 c408 0700000000000000 a56474797065 a33c6938 a57368617065 90",
    ]
    assert data == bytes.fromhex(" ".join(expected))


def test_decoded_arrays_are_read_only_views() -> None:
    (a,) = decode_arrays(encode_arrays([np.arange(4, dtype=np.float32)]))
    assert not a.flags.writeable
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_digest_depends_on_dtype_shape_and_values() -> None:
    base = np.arange(6, dtype=np.float32)
    digests = {
        arrays_digest([base]),
        arrays_digest([base.reshape(2, 3)]),
        arrays_digest([base.astype(np.float64)]),
        arrays_digest([base + 1]),
        arrays_digest([base, base]),
        arrays_digest([]),
    }
    assert len(digests) == 6
    # Byte order is not part of the identity: the wire form is little-endian.
    assert arrays_digest([base.astype(">f4")]) == arrays_digest([base])


@pytest.mark.parametrize(
    "bad",
    [np.array([True]), np.array([1 + 2j]), np.array(["x"]), np.array([1], dtype=np.int16), np.array([None])],
)
def test_encode_refuses_other_dtypes(bad: np.ndarray) -> None:
    with pytest.raises(LocalProtocolError):
        encode_arrays([bad])


def test_encode_refuses_non_arrays() -> None:
    with pytest.raises(LocalProtocolError):
        encode_arrays([[1.0, 2.0]])  # type: ignore[list-item]


# --- decoder rejections -------------------------------------------------------------------------


def _item(data: bytes = b"\0" * 4, dtype: str = "<f4", shape: list[int] | None = None) -> dict[str, object]:
    return {"data": data, "dtype": dtype, "shape": [1] if shape is None else shape}


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"not": "a list"}, "malformed_tensors"),
        ([1, 2], "malformed_tensors"),
        ([{"dtype": "<f4", "data": b"\0" * 4, "shape": [1]}], "malformed_tensors"),  # key order
        ([{**_item(), "extra": 1}], "malformed_tensors"),
        ([_item(dtype="<i2", data=b"\0\0")], "malformed_tensors"),
        ([_item(dtype=">f4")], "malformed_tensors"),
        ([_item(dtype="|O8", data=b"\0" * 8)], "malformed_tensors"),
        ([_item(data=b"\0" * 3)], "malformed_tensors"),  # size != prod(shape)·itemsize
        ([_item(shape=[-1])], "malformed_tensors"),
        ([_item(shape=[True])], "malformed_tensors"),
        ([_item(shape=[1] * 33, data=b"\0" * 4)], "malformed_tensors"),
        ([_item(shape=[0, 1 << 63], data=b"")], "malformed_tensors"),
        ([{"data": "text", "dtype": "<f4", "shape": [1]}], "malformed_tensors"),
    ],
)
def test_decode_rejects_bad_structure(obj: object, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        decode_arrays(msgpack.packb(obj, use_bin_type=True))
    assert ei.value.reason == reason


def test_decode_rejects_non_canonical_encodings() -> None:
    good = encode_arrays([np.zeros(2, dtype=np.float32)])
    # Same object, but the shape's int written as a uint64 (0xcf) instead of a fixint.
    wide = good.replace(b"\xa5shape\x91\x02", b"\xa5shape\x91\xcf" + (2).to_bytes(8, "big"))
    # bin written with a 16-bit length header instead of bin8.
    long_hdr = good.replace(b"\xc4\x08", b"\xc5\x00\x08")
    for data in (wide, long_hdr):
        assert data != good
        with pytest.raises(RemoteProtocolError) as ei:
            decode_arrays(data)
        assert ei.value.reason == "non_canonical"


def test_decode_caps() -> None:
    data = encode_arrays([np.zeros(100, dtype=np.float64)])
    with pytest.raises(RemoteProtocolError) as ei:
        decode_arrays(data, max_bytes=len(data) - 1)
    assert ei.value.reason == "oversized"
    assert len(decode_arrays(data, max_bytes=len(data))) == 1
    many = encode_arrays([np.zeros(1, dtype=np.uint8)] * 40)
    with pytest.raises(RemoteProtocolError) as ei:
        decode_arrays(many, max_arrays=39)
    assert ei.value.reason in {"oversized", "malformed_tensors"}
    assert len(decode_arrays(many, max_arrays=40)) == 40


def test_decode_rejects_trailing_bytes_and_truncation() -> None:
    data = encode_arrays([np.ones(3, dtype=np.float32)])
    for bad in (data + b"\x00", data[:-1], b"", b"\xc1"):
        with pytest.raises(RemoteProtocolError):
            decode_arrays(bad)


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        decode_arrays("text")  # type: ignore[arg-type]


def test_the_seed_model_size() -> None:
    # Seed MLP (784·128+128, 128·10+10 float32 = 407,080 bytes) costs ~120 bytes of framing.
    shapes = [(784, 128), (128,), (128, 10), (10,)]
    weights = [np.zeros(s, dtype=np.float32) for s in shapes]
    data = encode_arrays(weights)
    assert 407_080 < len(data) < 407_080 + 200
    assert [a.shape for a in decode_arrays(data)] == shapes


# --- fuzz: only ProtocolError may escape --------------------------------------------------------


def _decode_or_error(data: bytes) -> list[np.ndarray] | None:
    try:
        out = decode_arrays(data, max_bytes=1 << 16, max_arrays=64)
    except ProtocolError:
        return None
    assert isinstance(out, list) and all(isinstance(a, np.ndarray) for a in out)
    assert all(a.dtype.str in DTYPES for a in out)
    assert encode_arrays(out) == data  # anything accepted is canonical
    return out


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_any_bytes(data: bytes) -> None:
    _decode_or_error(data)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=16)
    | st.sampled_from(["data", "dtype", "shape", *sorted(DTYPES)]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["data", "dtype", "shape", "x"]), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_msgpack_values)
def test_fuzz_structured_msgpack(obj: object) -> None:
    _decode_or_error(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=120, deadline=None)
@given(array_lists(), st.data())
def test_fuzz_mutated_valid_encodings(arrays: list[np.ndarray], data: st.DataObject) -> None:
    good = bytearray(encode_arrays(arrays))
    if not good:
        return
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(good) - 1))
        good[pos] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(good)))
    _decode_or_error(bytes(good[:cut]))
    _decode_or_error(bytes(good))
