"""JSON-RPC 2.0 messages on newline-delimited JSON, sans-IO.

Everything here is pure: bytes in, message objects out, and back. The trio server
(:mod:`peerd.rpc.server`) and the blocking client (:mod:`peerd.rpc.client`) both build on it,
so the client never needs trio and the parsing rules are tested without sockets.

Framing: one JSON value per line, UTF-8, ``\\n``-terminated. Requests are capped at
:data:`MAX_REQUEST_LINE` (1 MiB) so a local client cannot make the daemon buffer without
bound; responses may be larger (a ``blob.read`` of 1 MiB is ~1.4 MiB once base64-encoded), so
the client accepts up to :data:`MAX_RESPONSE_LINE`.

Batches (a JSON array) are rejected with -32600: nothing peerd offers needs them, and one
request per line keeps per-call permission checks and streaming (``task.watch``) simple.

Nesting is bounded too (:data:`MAX_JSON_DEPTH`), and checked *before* ``json.loads`` runs:
CPython's decoder recurses once per ``[``/``{``, so a 2 KB line of brackets raises
RecursionError, which is not a ValueError and used to end the connection task and with it the
daemon. An over-deep line is answered -32700 like any text we cannot parse (docs/rpc.md,
*Errors*), and the connection stays usable.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

MAX_REQUEST_LINE = 1 << 20
MAX_RESPONSE_LINE = 8 << 20
#: Deepest nesting of arrays/objects accepted in one message, request or response. peerd's own
#: messages nest about 12 deep (a task spec's free-form params are capped at depth 6 by
#: protocol/schema.py; Keras model configs travel as a JSON *string*), so 64 leaves room and
#: stays far below the interpreter's recursion limit whatever the caller's stack depth.
MAX_JSON_DEPTH = 64

RequestId = int | str | None


class ErrorCode(IntEnum):
    """Standard JSON-RPC 2.0 codes, then peerd's application codes (-32000 to -32099)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    PERMISSION_DENIED = -32001
    NOT_FOUND = -32002
    UNAVAILABLE = -32003
    CONFLICT = -32004


class RpcError(Exception):
    """Raised by a method handler to answer with a specific JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.data = data


class ParamsError(RpcError):
    """The params do not fit the method (-32602); the message names the offending field."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(ErrorCode.INVALID_PARAMS, message, data)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    params: dict[str, Any]
    id: RequestId
    #: A request without an ``id`` member is a notification: it is executed but never answered.
    is_notification: bool = False


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    id: RequestId
    code: int
    message: str
    data: Any = None

    def encode(self) -> bytes:
        return encode_error(self.id, self.code, self.message, self.data)


@dataclass(frozen=True, slots=True)
class Response:
    """A successful response as seen by a client."""

    id: RequestId
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    """A server-to-client notification (e.g. ``task.event``)."""

    method: str
    params: dict[str, Any]


def is_stream_end(method: str) -> bool:
    """Streams (``task.watch``) always end with a ``<namespace>.end`` notification (docs/rpc.md)."""
    return method.endswith(".end")


# --- decoding -----------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity, which are not JSON; refusing them keeps both ends honest.
    raise ValueError(f"{name} is not valid JSON")


class TooDeep(ValueError):
    """A document nests arrays/objects deeper than allowed; raised before any parsing."""


# A complete JSON string (escapes included), in the unrolled form that matches in linear time.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text``, without parsing it.

    Brackets inside strings do not count; outside strings they can only be structure (no JSON
    number or literal contains one). Text after an unterminated string is inside that string.
    Everything runs in C (regex, ``itertools.accumulate``), so a 1 MiB line costs milliseconds.
    Invalid JSON may give any number here; ``json.loads`` then refuses it anyway.
    """
    outside = _JSON_STRING.sub("", text)
    quote = outside.find('"')
    if quote >= 0:
        outside = outside[:quote]
    brackets = _NOT_BRACKETS.sub("", outside)
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets))))


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses NaN/Infinity and anything nested deeper than ``max_depth``.

    Only ValueError (incl. :class:`TooDeep`) escapes, never RecursionError.
    """
    # Fewer openers than the limit cannot nest past it: the common case skips the scan.
    if text.count("[") + text.count("{") > max_depth:
        depth = json_depth(text)
        if depth > max_depth:
            raise TooDeep(f"nested {depth} levels deep; at most {max_depth} are accepted")
    return json.loads(text, parse_constant=_reject_constant)


def _loads(line: bytes) -> Any:
    return loads_bounded(line.decode("utf-8"))


def _valid_id(value: Any) -> bool:
    # bool is an int subclass in Python but not a JSON-RPC id; fractional ids are discouraged by
    # the spec and would not round-trip reliably, so only ints, strings and null are accepted.
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_request(line: bytes) -> Request | ErrorResponse:
    """Parse one request line (without or with its trailing newline)."""
    try:
        obj = _loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        return ErrorResponse(None, ErrorCode.PARSE_ERROR, f"parse error: {exc}")
    if isinstance(obj, list):
        return ErrorResponse(None, ErrorCode.INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(obj, dict):
        return ErrorResponse(None, ErrorCode.INVALID_REQUEST, "a request must be a JSON object")
    req_id = obj.get("id")
    if not _valid_id(req_id):
        return ErrorResponse(None, ErrorCode.INVALID_REQUEST, "id must be a string, an integer or null")
    if obj.get("jsonrpc") != "2.0":
        return ErrorResponse(req_id, ErrorCode.INVALID_REQUEST, 'jsonrpc must be exactly "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return ErrorResponse(req_id, ErrorCode.INVALID_REQUEST, "method must be a non-empty string")
    unknown = set(obj) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        return ErrorResponse(
            req_id, ErrorCode.INVALID_REQUEST, f"unknown members: {', '.join(sorted(unknown))}"
        )
    params = obj.get("params", {})
    if isinstance(params, list):
        # Structurally valid JSON-RPC, but every peerd method takes named params.
        return ErrorResponse(req_id, ErrorCode.INVALID_PARAMS, "params must be an object (named params)")
    if not isinstance(params, dict):
        return ErrorResponse(req_id, ErrorCode.INVALID_REQUEST, "params must be an object")
    return Request(method=method, params=params, id=req_id, is_notification="id" not in obj)


def parse_server_message(line: bytes) -> Response | ErrorResponse | Notification:
    """Client side: parse one line from the server. Raises ValueError if it is not JSON-RPC."""
    obj = _loads(line)
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        raise ValueError("not a JSON-RPC 2.0 message")
    if "method" in obj and "id" not in obj:
        params = obj.get("params", {})
        if not isinstance(obj["method"], str) or not isinstance(params, dict):
            raise ValueError("malformed notification")
        return Notification(obj["method"], params)
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), int):
            raise ValueError("malformed error response")
        return ErrorResponse(obj.get("id"), err["code"], str(err.get("message", "")), err.get("data"))
    if "result" in obj:
        return Response(obj.get("id"), obj["result"])
    raise ValueError("message is neither a response nor a notification")


# --- encoding -----------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null: JSON has no infinity, and peerd's unbounded values
    (``dc_max``, ``t_max``) are documented as ``null`` in docs/rpc.md."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _dumps(obj: Any) -> bytes:
    text = json.dumps(_json_safe(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"


def encode_request(req_id: RequestId, method: str, params: Mapping[str, Any]) -> bytes:
    return _dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": dict(params)})


def encode_result(req_id: RequestId, result: Any) -> bytes:
    """Raises TypeError/ValueError if ``result`` is not JSON-serialisable."""
    return _dumps({"jsonrpc": "2.0", "id": req_id, "result": result})


def encode_error(req_id: RequestId, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    try:
        return _dumps({"jsonrpc": "2.0", "id": req_id, "error": error})
    except (TypeError, ValueError):
        error.pop("data", None)
        return _dumps({"jsonrpc": "2.0", "id": req_id, "error": error})


def encode_notification(method: str, params: Mapping[str, Any]) -> bytes:
    return _dumps({"jsonrpc": "2.0", "method": method, "params": dict(params)})


# --- line framing -------------------------------------------------------------------------------


class LineTooLong:
    """Marker yielded by :class:`LineBuffer` in place of a line over the limit."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong()


class LineBuffer:
    """Split a byte stream into lines of at most ``max_line`` bytes (newline excluded).

    An overlong line yields :data:`LINE_TOO_LONG` once and its remaining bytes are discarded up
    to the next newline, so the connection stays in sync and usable after the error.
    """

    def __init__(self, max_line: int = MAX_REQUEST_LINE) -> None:
        self._max = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        out: list[bytes | LineTooLong] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._append(data[start:], out)
                return out
            self._append(data[start:nl], out)
            if self._discarding:
                self._discarding = False
            else:
                line = bytes(self._buf).rstrip(b"\r")
                if line.strip():
                    out.append(line)
            self._buf.clear()
            start = nl + 1

    def _append(self, chunk: bytes, out: list[bytes | LineTooLong]) -> None:
        if self._discarding:
            return
        self._buf += chunk
        if len(self._buf) > self._max:
            self._buf.clear()
            self._discarding = True
            out.append(LINE_TOO_LONG)

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held in the buffer."""
        return len(self._buf)


# --- params validation --------------------------------------------------------------------------

ParamsValidator = Callable[[dict[str, Any]], dict[str, Any]]
Check = Callable[[Any], str | None]

_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


@dataclass(frozen=True, slots=True)
class Field:
    """One named parameter. ``check`` returns a problem description, or None when the value is fine."""

    name: str
    type: type
    required: bool = True
    check: Check | None = None
    doc: str = ""

    def validate(self, value: Any) -> None:
        if not _is_type(value, self.type):
            raise ParamsError(
                f"{self.name}: expected {_TYPE_NAMES.get(self.type, self.type.__name__)}, "
                f"got {_describe(value)}"
            )
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ParamsError(f"{self.name}: {problem}")


def _is_type(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class Params:
    """A params schema: named fields, no others allowed. Calling it validates and returns the params."""

    fields: tuple[Field, ...] = field(default_factory=tuple)

    def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        known = {f.name for f in self.fields}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ParamsError(
                f"{unknown[0]}: unknown parameter"
                + (f" (expected: {', '.join(sorted(known))})" if known else " (this method takes none)")
            )
        for f in self.fields:
            if f.name in params:
                f.validate(params[f.name])
            elif f.required:
                raise ParamsError(f"{f.name}: missing required parameter")
        return params

    @property
    def names(self) -> Iterable[str]:
        return (f.name for f in self.fields)


NO_PARAMS = Params()

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def non_empty_id(value: str) -> str | None:
    if not value or len(value) > 128:
        return "expected a non-empty id of at most 128 characters"
    return None


def sha256_hex(value: str) -> str | None:
    return None if _SHA256_RE.fullmatch(value) else "expected 64 lowercase hex digits"


def non_negative(value: int) -> str | None:
    return None if value >= 0 else "must be >= 0"


def chunk_length(value: int) -> str | None:
    return None if 1 <= value <= MAX_REQUEST_LINE else f"must be between 1 and {MAX_REQUEST_LINE}"


def multiaddr(value: str) -> str | None:
    return (
        None
        if value.startswith("/") and "/p2p/" in value
        else "expected a multiaddr ending in /p2p/<peer id>"
    )
