"""Canonical codec for lists of numpy arrays (model weights, shard outputs O_i).

Wire form (docs/design.md appendix B.3, "Moving weights")::

    msgpack array of maps, one per tensor, keys in exactly this order:
      "data"  : bin   — the elements, C order, little-endian, prod(shape)·itemsize bytes
      "dtype" : str   — one of "<f2" "<f4" "<f8" "<i4" "<i8" "|u1" (numpy dtype.str)
      "shape" : array of non-negative ints (at most 32 of them; [] for a scalar)

with msgpack's shortest encodings (ints in the smallest form, str/bin length headers in the
smallest form). The encoding is *canonical*: one list of arrays has exactly one encoding, so
its sha256 (:func:`arrays_digest`) is what a participant commits to and what the committee
votes on (docs/design.md §6). The decoder accepts only canonical input (decode → re-encode → the bytes
must be identical), as the envelope rule of docs/design.md §3.1 requires for every signed payload.

Keys are in alphabetical order; little-endian because every machine we run on is, so encoding
is a memcpy. Only numeric dtypes Keras weights and label/index tensors use are allowed: no
object, string, complex or bool dtypes, nothing whose decoding could run code or surprise
the aggregation rules.

Decoded arrays are read-only, zero-copy views of the input bytes (Keras ``set_weights``
accepts them); copy before writing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from protocol.errors import LocalProtocolError, RemoteProtocolError

#: Allowed wire dtypes (numpy ``dtype.str``; "|" = byte order not applicable).
DTYPES = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "|u1"})

#: numpy allows 64 dimensions; no model tensor comes close to 32.
MAX_DIMS = 32

#: Defaults for decode_arrays: 256 MiB is ~600x the seed's MLP (407 KB) and enough for models
#: that fit one worker; 4096 tensors is far more than any Keras model's weight list.
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_MAX_ARRAYS = 4096

_KEYS = ("data", "dtype", "shape")


def _wire_dtype(a: np.ndarray) -> np.dtype[Any]:
    # newbyteorder("<") turns ">f4" into "<f4" and leaves "|u1" alone; native order prints as "<".
    wire = a.dtype.newbyteorder("<")
    if wire.str not in DTYPES:
        raise LocalProtocolError(
            f"dtype {a.dtype} cannot be encoded; allowed: {', '.join(sorted(DTYPES))}", reason="bad_dtype"
        )
    return wire


def encode_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    """Encode arrays canonically (see the module docstring). Big-endian input is converted."""
    items = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise LocalProtocolError(f"item {i} is {type(a).__name__}, not an ndarray", reason="bad_dtype")
        if a.ndim > MAX_DIMS:
            raise LocalProtocolError(f"item {i} has {a.ndim} dimensions (max {MAX_DIMS})", reason="bad_shape")
        wire = _wire_dtype(a)
        data = a.astype(wire, copy=False).tobytes(order="C")
        items.append({"data": data, "dtype": wire.str, "shape": [int(d) for d in a.shape]})
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def arrays_digest(arrays: Sequence[np.ndarray]) -> str:
    """Hex sha256 of :func:`encode_arrays` — the hash an aggregation commit names."""
    return hashlib.sha256(encode_arrays(arrays)).hexdigest()


def _malformed(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, reason="malformed_tensors")


def decode_arrays(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_arrays: int = DEFAULT_MAX_ARRAYS
) -> list[np.ndarray]:
    """Decode and check :func:`encode_arrays` output; only ProtocolError escapes.

    Raises RemoteProtocolError with reason ``oversized`` (input or array count beyond the caps,
    checked before decoding anything), ``malformed_tensors`` (not msgpack, wrong structure,
    dtype not allowed, size != prod(shape)·itemsize) or ``non_canonical`` (decodes, but is not
    the one canonical encoding).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"expected bytes, got {type(data).__name__}", reason="bad_input")
    data = bytes(data)
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"{len(data)} bytes of tensors (max {max_bytes})", reason="oversized")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            # Per-container caps, so a short header cannot make msgpack preallocate a lot.
            max_bin_len=max_bytes,
            max_str_len=8,
            max_array_len=max(max_arrays, MAX_DIMS),
            max_map_len=len(_KEYS),
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises ValueError, TypeError, StackError, ExtraData, ...
        raise _malformed(f"not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(obj, list):
        raise _malformed("top level is not an array")
    if len(obj) > max_arrays:
        raise RemoteProtocolError(f"{len(obj)} tensors (max {max_arrays})", reason="oversized")

    out: list[np.ndarray] = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict) or tuple(item) != _KEYS:
            raise _malformed(f"tensor {i} is not a map with keys {_KEYS} in that order")
        raw, dtype_s, shape = item["data"], item["dtype"], item["shape"]
        if not isinstance(dtype_s, str) or dtype_s not in DTYPES:
            raise _malformed(f"tensor {i} has dtype {dtype_s!r}")
        if not isinstance(raw, bytes):
            raise _malformed(f"tensor {i} data is not bin")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape)
        ):
            raise _malformed(f"tensor {i} has shape {shape!r}")
        dtype = np.dtype(dtype_s)
        expected = math.prod(shape) * dtype.itemsize  # Python ints: cannot overflow
        if expected != len(raw):
            raise _malformed(f"tensor {i}: {len(raw)} bytes for {dtype_s}{shape} ({expected} expected)")
        try:
            out.append(np.frombuffer(raw, dtype=dtype).reshape(shape))
        except Exception as e:  # e.g. a zero-size shape numpy cannot represent
            raise _malformed(f"tensor {i}: {type(e).__name__}: {e}") from None

    try:
        canonical = msgpack.packb(obj, use_bin_type=True)
    except Exception as e:  # pragma: no cover - obj came from msgpack and passed the checks
        raise _malformed(f"cannot re-encode: {e}") from None
    if canonical != data:
        raise RemoteProtocolError("tensor list is not canonically encoded", reason="non_canonical")
    return out
