"""Field validators shared by every message type.

Each message field carries a *converter*: a function that takes a decoded wire value and
returns the validated Python value, or raises :class:`ProtocolError`. The same converter
runs when we build a message locally (bad input is then our bug: LocalProtocolError)
and when we parse one from a peer (RemoteProtocolError). Bounds are part of the
protocol: absurd values (negative capacity, 10^300 GFLOP/s, a 5 MB peer name) are
rejected here, before any of the daemon's logic sees them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from protocol.errors import ProtocolError

Conv = Callable[[Any], Any]


class FieldError(ProtocolError):
    """A field failed validation (re-raised as Local or Remote by the caller)."""


def _fail(msg: str, reason: str = "malformed") -> FieldError:
    return FieldError(msg, reason=reason)


def integer(lo: int = 0, hi: int = 2**63 - 1) -> Conv:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _fail(f"{v} not in [{lo}, {hi}]", "absurd")
        return v

    return conv


def real(lo: float = -math.inf, hi: float = math.inf, *, allow_int_local: bool = True) -> Conv:
    """A finite float64 in [lo, hi]. On the wire it must be a float (canonical form)."""

    def conv(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(f"expected a number, got {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f):
            raise _fail("number is not finite", "absurd")
        if not lo <= f <= hi:
            raise _fail(f"{f} not in [{lo}, {hi}]", "absurd")
        return f

    return conv


def text(max_len: int = 256, pattern: str | None = None) -> Conv:
    rx = re.compile(pattern) if pattern else None

    def conv(v: Any) -> str:
        if not isinstance(v, str):
            raise _fail(f"expected a string, got {type(v).__name__}")
        if len(v) > max_len:
            raise _fail(f"string longer than {max_len}", "oversized")
        if rx is not None and not rx.fullmatch(v):
            raise _fail(f"string {v[:40]!r} does not match {rx.pattern}")
        return v

    return conv


def binary(max_len: int, exact: int | None = None) -> Conv:
    def conv(v: Any) -> bytes:
        if not isinstance(v, (bytes, bytearray)):
            raise _fail(f"expected bytes, got {type(v).__name__}")
        if exact is not None and len(v) != exact:
            raise _fail(f"expected {exact} bytes, got {len(v)}")
        if len(v) > max_len:
            raise _fail(f"byte string longer than {max_len}", "oversized")
        return bytes(v)

    return conv


def boolean() -> Conv:
    def conv(v: Any) -> bool:
        if not isinstance(v, bool):
            raise _fail(f"expected a boolean, got {type(v).__name__}")
        return v

    return conv


def optional(inner: Conv) -> Conv:
    def conv(v: Any) -> Any:
        return None if v is None else inner(v)

    return conv


def one_of(*choices: str) -> Conv:
    def conv(v: Any) -> str:
        if v not in choices:
            raise _fail(f"{str(v)[:40]!r} is not one of {', '.join(choices)}")
        return str(v)

    return conv


def seq_of(inner: Conv, max_len: int = 64) -> Conv:
    def conv(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, (list, tuple)):
            raise _fail(f"expected a list, got {type(v).__name__}")
        if len(v) > max_len:
            raise _fail(f"list longer than {max_len}", "oversized")
        return tuple(inner(x) for x in v)

    return conv


def map_of(key: Conv, value: Conv, max_len: int = 64) -> Conv:
    def conv(v: Any) -> dict[str, Any]:
        if not isinstance(v, Mapping):
            raise _fail(f"expected a map, got {type(v).__name__}")
        if len(v) > max_len:
            raise _fail(f"map larger than {max_len}", "oversized")
        return {key(k): value(x) for k, x in v.items()}

    return conv


def struct(fields: Mapping[str, Conv], optional_keys: frozenset[str] = frozenset()) -> Conv:
    """A nested map with exactly these keys (those in ``optional_keys`` may be absent)."""

    def conv(v: Any) -> dict[str, Any]:
        if not isinstance(v, Mapping):
            raise _fail(f"expected a map, got {type(v).__name__}")
        unknown = set(v) - set(fields)
        if unknown:
            raise _fail(f"unknown field {sorted(map(str, unknown))[0]!r}")
        out: dict[str, Any] = {}
        for name, c in fields.items():
            if name not in v:
                if name in optional_keys:
                    continue
                raise _fail(f"missing field {name!r}")
            try:
                out[name] = c(v[name])
            except FieldError as exc:
                raise FieldError(f"{name}: {exc}", reason=exc.reason) from None
        return out

    return conv


def anything(max_depth: int = 6, max_items: int = 256) -> Conv:
    """Free-form msgpack value (kind-specific task params), bounded in depth and width."""

    def conv(v: Any, depth: int = 0) -> Any:
        if depth > max_depth:
            raise _fail("value nests too deeply", "oversized")
        if isinstance(v, Mapping):
            if len(v) > max_items:
                raise _fail("map too large", "oversized")
            return {text(128)(k): conv(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            if len(v) > max_items:
                raise _fail("list too long", "oversized")
            return tuple(conv(x, depth + 1) for x in v)
        if isinstance(v, float) and not math.isfinite(v):
            raise _fail("number is not finite", "absurd")
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            return v
        raise _fail(f"unsupported type {type(v).__name__}")

    return conv


# Common field shapes.
PEER_ID = text(64, r"12D3KooW[1-9A-HJ-NP-Za-km-z]{44}")
SHA256 = text(64, r"[0-9a-f]{64}")
TASK_ID = text(32, r"[0-9a-f]{32}")
NAME = text(64, r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
TIMESTAMP_MS = integer(0, 2**53)
