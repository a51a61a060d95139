"""Canonical msgpack, sans-IO.

msgpack is not canonical: the same object has many encodings (map key order, integer
and float widths, str vs bin, duplicate keys all decode). peerd therefore signs *bytes*,
never objects (docs/design.md §3.2), and every decoder re-encodes what it decoded and rejects the
input unless the bytes are identical. The canonical form is:

* maps: string keys only, sorted by their UTF-8 bytes, no duplicates;
* integers: the shortest msgpack encoding (msgpack-python's default);
* floats: always float64 (never float32), finite unless a message field says otherwise;
* strings are ``str`` (UTF-8), byte strings are ``bin``; arrays are msgpack arrays.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError

#: Default cap for one decoded object. Adverts and bids are ~1 KiB; an award lists at
#: most a few dozen signed bids. Bulk data never rides here (docs/design.md §3.5).
DEFAULT_MAX_BYTES = 256 * 1024

_MAX_DEPTH = 16


def _canonicalize(obj: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise LocalProtocolError("object nests too deeply", reason="too_deep")
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise LocalProtocolError(f"map key {key!r} is not a string", reason="bad_key")
        return {k: _canonicalize(obj[k], depth + 1) for k in sorted(obj, key=lambda s: s.encode())}
    if isinstance(obj, (list, tuple)):
        return [_canonicalize(v, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    raise LocalProtocolError(f"type {type(obj).__name__} has no canonical encoding", reason="bad_type")


def pack(obj: Any) -> bytes:
    """Encode ``obj`` canonically. Raises LocalProtocolError for unencodable input."""
    try:
        return msgpack.packb(_canonicalize(obj), use_bin_type=True, use_single_float=False)
    except LocalProtocolError:
        raise
    except (OverflowError, ValueError, TypeError) as exc:
        raise LocalProtocolError(f"cannot encode: {exc}", reason="bad_value") from exc


def unpack(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode canonical msgpack. Only :class:`RemoteProtocolError` escapes, whatever ``data`` is."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("expected bytes", reason="malformed")
    # The cap is checked before decoding, so a hostile peer costs at most max_bytes of work.
    # nbytes, not len(): len() of a memoryview counts items, which may be wider than a byte.
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise RemoteProtocolError(f"{size} bytes exceeds the {max_bytes}-byte cap", reason="oversized")
    data = bytes(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, ValueError, ...)
        raise RemoteProtocolError(f"malformed msgpack: {type(exc).__name__}", reason="malformed") from exc
    try:
        again = pack(obj)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"not canonical: {exc}", reason="non_canonical") from exc
    if again != data:
        raise RemoteProtocolError("encoding is not canonical", reason="non_canonical")
    return obj
