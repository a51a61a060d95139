"""peerd/rpc/jsonrpc.py: nesting depth is bounded before ``json.loads`` runs, on both the
server's (requests) and the client's (responses) side (issue 11, "A 2 KB line kills the daemon")."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.rpc.jsonrpc import (
    MAX_JSON_DEPTH,
    ErrorCode,
    ErrorResponse,
    Request,
    Response,
    TooDeep,
    json_depth,
    loads_bounded,
    parse_request,
    parse_server_message,
)


def nested_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def request_nested(depth: int) -> bytes:
    """A well-formed request whose params hold ``depth - 2`` nested arrays (total depth ``depth``)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return f'{{"jsonrpc":"2.0","id":5,"method":"echo","params":{{"x":{inner}}}}}'.encode()


@pytest.mark.parametrize("depth", [990, 975, 5000, 200_000])
def test_an_over_deep_array_is_a_parse_error_not_a_recursion_error(depth: int) -> None:
    # 990 is what crashed the daemon in issue 11; 975 got -32600 (parsed, then "batch").
    reply = parse_request(nested_array(depth))
    assert isinstance(reply, ErrorResponse)
    assert reply.code == ErrorCode.PARSE_ERROR
    assert f"nested {depth} levels deep" in reply.message
    assert f"at most {MAX_JSON_DEPTH}" in reply.message


def test_objects_count_as_nesting_too() -> None:
    line = b'{"a":' * 3000 + b"1" + b"}" * 3000
    reply = parse_request(line)
    assert isinstance(reply, ErrorResponse) and reply.code == ErrorCode.PARSE_ERROR
    assert "nested 3000 levels deep" in reply.message


def test_the_limit_itself_is_accepted_and_one_more_is_refused() -> None:
    ok = parse_request(request_nested(MAX_JSON_DEPTH))
    assert isinstance(ok, Request)
    assert json_depth(json.dumps(ok.params)) == MAX_JSON_DEPTH - 1
    too_deep = parse_request(request_nested(MAX_JSON_DEPTH + 1))
    assert isinstance(too_deep, ErrorResponse) and too_deep.code == ErrorCode.PARSE_ERROR
    assert f"nested {MAX_JSON_DEPTH + 1} levels deep" in too_deep.message


def test_brackets_inside_strings_do_not_count() -> None:
    noise = '[{"' * 2000
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"s": noise, "t": '\\"[['}})
    req = parse_request(line.encode())
    assert isinstance(req, Request) and req.params["s"] == noise


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a":[1,{"b":[]}]}', 4),
        ('["]]]]", "[[[[[["]', 1),
        ('["\\"[[[", "\\\\", [[]]]', 3),  # an escaped quote does not end the string
        ('["abc', 1),  # unterminated: everything after the quote is string
        ("]]]][", 0),  # invalid (json.loads stops at the first "]"); the count never goes negative
    ],
)
def test_json_depth(text: str, depth: int) -> None:
    assert json_depth(text) == depth


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n'),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=20,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


# Load-proof: no per-example deadline, no too-slow health check (CI runs on busy machines).
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_json_depth_agrees_with_the_parsed_structure(value: Any) -> None:
    assert json_depth(json.dumps(value)) == _depth(value)


def test_loads_bounded_raises_value_error_only() -> None:
    with pytest.raises(TooDeep, match="nested 100000 levels deep"):
        loads_bounded("[" * 100_000)
    assert issubclass(TooDeep, ValueError)
    with pytest.raises(ValueError, match="NaN is not valid JSON"):
        loads_bounded("[NaN]")
    assert loads_bounded('{"a": [1, 2]}') == {"a": [1, 2]}


def test_the_client_refuses_an_over_deep_response_with_a_value_error() -> None:
    # A fake daemon behind a swapped socket must not crash peerctl with RecursionError either.
    line = b'{"jsonrpc":"2.0","id":1,"result":' + nested_array(50_000) + b"}"
    with pytest.raises(TooDeep, match="nested 50001 levels deep"):
        parse_server_message(line)
    ok = b'{"jsonrpc":"2.0","id":1,"result":' + nested_array(10) + b"}"
    assert isinstance(parse_server_message(ok), Response)
