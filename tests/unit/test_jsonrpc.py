"""peerd/rpc/jsonrpc.py: request parsing, encoding, line framing, params schemas; and that the
method contract in peerd/rpc/__init__.py is the one docs/rpc.md documents."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.rpc import CONTRACT, NOTIFICATIONS
from peerd.rpc.jsonrpc import (
    LINE_TOO_LONG,
    NO_PARAMS,
    ErrorCode,
    ErrorResponse,
    Field,
    LineBuffer,
    Notification,
    Params,
    ParamsError,
    Request,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    is_stream_end,
    non_empty_id,
    parse_request,
    parse_server_message,
)

ROOT = Path(__file__).resolve().parents[2]


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- parse_request ------------------------------------------------------------------------------


def test_parses_a_request_with_named_params() -> None:
    req = parse_request(line({"jsonrpc": "2.0", "id": 7, "method": "task.get", "params": {"task_id": "t1"}}))
    assert req == Request(method="task.get", params={"task_id": "t1"}, id=7, is_notification=False)


def test_missing_params_means_empty_and_string_ids_are_kept() -> None:
    req = parse_request(line({"jsonrpc": "2.0", "id": "abc", "method": "node.info"}))
    assert isinstance(req, Request)
    assert req.params == {} and req.id == "abc"


def test_request_without_id_is_a_notification_but_null_id_is_not() -> None:
    note = parse_request(line({"jsonrpc": "2.0", "method": "node.info"}))
    with_null = parse_request(line({"jsonrpc": "2.0", "method": "node.info", "id": None}))
    assert isinstance(note, Request) and note.is_notification
    assert isinstance(with_null, Request) and not with_null.is_notification


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", ErrorCode.PARSE_ERROR),
        (b"\xff\xfe{}", ErrorCode.PARSE_ERROR),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"v": NaN}}', ErrorCode.PARSE_ERROR),
        (b"[]", ErrorCode.INVALID_REQUEST),
        (line([{"jsonrpc": "2.0", "id": 1, "method": "node.info"}]), ErrorCode.INVALID_REQUEST),
        (b"42", ErrorCode.INVALID_REQUEST),
        (line({"id": 1, "method": "node.info"}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "1.0", "id": 1, "method": "node.info"}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1, "method": ""}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1, "method": 5}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": True, "method": "node.info"}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1.5, "method": "node.info"}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1, "method": "node.info", "extra": 1}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1, "method": "node.info", "params": "x"}), ErrorCode.INVALID_REQUEST),
        (line({"jsonrpc": "2.0", "id": 1, "method": "node.info", "params": [1]}), ErrorCode.INVALID_PARAMS),
    ],
)
def test_bad_requests_get_the_standard_error_code(raw: bytes, code: int) -> None:
    result = parse_request(raw)
    assert isinstance(result, ErrorResponse)
    assert result.code == code


def test_an_error_keeps_the_request_id_when_it_is_valid() -> None:
    result = parse_request(line({"jsonrpc": "1.0", "id": 9, "method": "x"}))
    assert isinstance(result, ErrorResponse) and result.id == 9


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_or_an_error_response(data: bytes) -> None:
    assert isinstance(parse_request(data), Request | ErrorResponse)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_any_json_value_gives_a_request_or_an_error_response(value: Any) -> None:
    raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m", "params": value}).encode()
    assert isinstance(parse_request(raw), Request | ErrorResponse)


# --- encoding -----------------------------------------------------------------------------------


def test_result_round_trips_and_infinity_becomes_null() -> None:
    data = encode_result(3, {"dc_max": math.inf, "k": 0.2, "nested": [{"t_max": -math.inf}]})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    msg = parse_server_message(data)
    assert msg == Response(3, {"dc_max": None, "k": 0.2, "nested": [{"t_max": None}]})


def test_error_round_trips_with_data_and_drops_unserialisable_data() -> None:
    msg = parse_server_message(encode_error(4, ErrorCode.NOT_FOUND, "unknown task", {"task_id": "x"}))
    assert msg == ErrorResponse(4, -32002, "unknown task", {"task_id": "x"})
    msg = parse_server_message(encode_error(5, -32603, "boom", data=object()))
    assert msg == ErrorResponse(5, -32603, "boom", None)


def test_notification_round_trips() -> None:
    msg = parse_server_message(encode_notification("task.event", {"task_id": "t", "state": "running"}))
    assert msg == Notification("task.event", {"task_id": "t", "state": "running"})


def test_unserialisable_result_raises_type_error() -> None:
    with pytest.raises(TypeError):
        encode_result(1, {"blob": b"bytes are not JSON"})


def test_request_encoding_is_parseable_by_the_server_side() -> None:
    req = parse_request(encode_request(12, "blob.read", {"sha256": "a" * 64, "offset": 0, "length": 10}))
    assert req == Request("blob.read", {"sha256": "a" * 64, "offset": 0, "length": 10}, 12)


def test_non_utf8_is_never_produced_for_text() -> None:
    data = encode_result(1, {"model": "Grüße ✓"})
    assert json.loads(data.decode("utf-8"))["result"]["model"] == "Grüße ✓"


def test_stream_end_convention() -> None:
    assert is_stream_end("task.end") and not is_stream_end("task.event")


# --- line framing -------------------------------------------------------------------------------


def test_lines_split_across_chunks_are_reassembled() -> None:
    buf = LineBuffer(100)
    assert buf.feed(b'{"a":') == []
    assert buf.feed(b'1}\n{"b"') == [b'{"a":1}']
    assert buf.feed(b":2}\r\n\n  \n") == [b'{"b":2}']
    assert buf.pending == 0


def test_an_overlong_line_is_reported_once_and_the_next_line_still_parses() -> None:
    buf = LineBuffer(10)
    out = buf.feed(b"x" * 8)
    out += buf.feed(b"y" * 8)
    out += buf.feed(b"z" * 50)
    out += buf.feed(b"\nok\n")
    assert out == [LINE_TOO_LONG, b"ok"]


def test_a_line_of_exactly_the_limit_is_accepted() -> None:
    assert LineBuffer(5).feed(b"12345\n") == [b"12345"]
    assert LineBuffer(5).feed(b"123456\n") == [LINE_TOO_LONG]


# --- params schemas -----------------------------------------------------------------------------

SCHEMA = Params((Field("task_id", str, check=non_empty_id), Field("limit", int, required=False)))


def test_params_schema_accepts_valid_params() -> None:
    assert SCHEMA({"task_id": "t1", "limit": 3}) == {"task_id": "t1", "limit": 3}
    assert SCHEMA({"task_id": "t1"}) == {"task_id": "t1"}


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({}, "task_id: missing"),
        ({"task_id": 5}, "task_id: expected a string, got 5"),
        ({"task_id": ""}, "task_id: expected a non-empty id"),
        ({"task_id": "t", "limit": True}, "limit: expected an integer, got true"),
        ({"task_id": "t", "bogus": 1}, "bogus: unknown parameter"),
    ],
)
def test_params_errors_name_the_field(params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(fragment)) as info:
        SCHEMA(params)
    assert info.value.code == ErrorCode.INVALID_PARAMS


def test_no_params_rejects_any_key() -> None:
    assert NO_PARAMS({}) == {}
    with pytest.raises(ParamsError, match="takes none"):
        NO_PARAMS({"x": 1})


def test_blob_read_contract_bounds_the_chunk_length() -> None:
    params = CONTRACT["blob.read"].params
    params({"sha256": "0" * 64, "offset": 0, "length": 1 << 20})
    with pytest.raises(ParamsError, match="length"):
        params({"sha256": "0" * 64, "offset": 0, "length": (1 << 20) + 1})
    with pytest.raises(ParamsError, match="sha256"):
        params({"sha256": "0" * 63, "offset": 0, "length": 1})
    with pytest.raises(ParamsError, match="offset"):
        params({"sha256": "0" * 64, "offset": -1, "length": 1})


# --- the contract and its documentation ---------------------------------------------------------


def test_every_contract_method_and_notification_is_documented() -> None:
    doc = (ROOT / "docs/rpc.md").read_text()
    headings = set(re.findall(r"^### `([a-z.]+)`", doc, flags=re.M))
    assert headings == set(CONTRACT) | set(NOTIFICATIONS)


def test_documented_permissions_match_the_contract() -> None:
    doc = (ROOT / "docs/rpc.md").read_text()
    for name, spec in CONTRACT.items():
        section = doc.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert f"Permission: **{spec.permission}**" in section, name


def test_only_task_watch_streams_and_writes_are_the_state_changing_methods() -> None:
    assert {n for n, s in CONTRACT.items() if s.streaming} == {"task.watch"}
    assert {n for n, s in CONTRACT.items() if s.permission == "write"} == {
        "network.connect",
        "task.submit",
        "task.cancel",
        "peer.ban",
        "peer.unban",
    }
