"""Garbage on a real daemon's JSON-RPC socket (issue 2 item 8 and "Bad input").

Raw ``socket`` on purpose: the client library would refuse to send most of this. Requests go
one at a time and each answer is read before the next is sent, so the test does not depend on
the order in which the server answers concurrent requests.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TestNet

from peerd.rpc.jsonrpc import MAX_REQUEST_LINE, ErrorCode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def net(devnet_module: Any) -> Iterator[TestNet]:
    yield devnet_module(1)


class Conn:
    """One raw connection to the daemon's socket, line by line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return dict(json.loads(line))

    def ask(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.line()

    def call(self, method: str, params: Any = None, req_id: Any = 1) -> dict[str, Any]:
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            req["params"] = params
        return self.ask(json.dumps(req).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(net: TestNet) -> Iterator[Conn]:
    c = Conn(str(net.socket(0)))
    yield c
    c.close()


def error_of(reply: dict[str, Any], code: int, req_id: Any = None) -> str:
    assert reply.get("jsonrpc") == "2.0", reply
    assert "result" not in reply, reply
    assert reply["error"]["code"] == code, reply
    assert reply["id"] == req_id, reply
    return str(reply["error"]["message"])


def assert_still_good(net: TestNet, conn: Conn) -> None:
    reply = conn.call("node.info", req_id="after")
    assert reply["id"] == "after" and reply["result"]["peer_id"] == net.peer_id(0), reply
    # A fresh connection too, and the daemon's own state is untouched.
    assert net.info(0)["peer_id"] == net.peer_id(0)
    assert net.pid(0) is not None
    assert "Traceback" not in net.log(0)


GARBAGE: list[tuple[str, bytes, int]] = [
    ("not-json", b"this is not json\n", ErrorCode.PARSE_ERROR),
    ("truncated-json", b'{"jsonrpc": "2.0", "id": 1, "method": "node.in\n', ErrorCode.PARSE_ERROR),
    ("invalid-utf8", b'{"jsonrpc": "2.0", "id": 1, "method": "\xff\xfe"}\n', ErrorCode.PARSE_ERROR),
    ("nan", b'{"jsonrpc": "2.0", "id": NaN, "method": "node.info"}\n', ErrorCode.PARSE_ERROR),
    ("nul-bytes", b"\x00\x00\x00\x00\n", ErrorCode.PARSE_ERROR),
    ("a-number", b"42\n", ErrorCode.INVALID_REQUEST),
    ("a-string", b'"node.info"\n', ErrorCode.INVALID_REQUEST),
    ("null", b"null\n", ErrorCode.INVALID_REQUEST),
    ("batch", b'[{"jsonrpc": "2.0", "id": 1, "method": "node.info"}]\n', ErrorCode.INVALID_REQUEST),
    ("empty-batch", b"[]\n", ErrorCode.INVALID_REQUEST),
    ("object-id", b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "node.info"}\n', ErrorCode.INVALID_REQUEST),
    ("bool-id", b'{"jsonrpc": "2.0", "id": true, "method": "node.info"}\n', ErrorCode.INVALID_REQUEST),
]


@pytest.mark.parametrize(("data", "code"), [(d, c) for _, d, c in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_garbage_gets_a_json_rpc_error_and_the_connection_survives(
    net: TestNet, conn: Conn, data: bytes, code: int
) -> None:
    error_of(conn.ask(data), code)
    assert_still_good(net, conn)


def test_invalid_requests_echo_their_id(net: TestNet, conn: Conn) -> None:
    # Whenever the id could be read, the error carries it back.
    cases = [
        ({"jsonrpc": "1.0", "id": 7, "method": "node.info"}, ErrorCode.INVALID_REQUEST),
        ({"id": 8, "method": "node.info"}, ErrorCode.INVALID_REQUEST),  # no jsonrpc member
        ({"jsonrpc": "2.0", "id": 9}, ErrorCode.INVALID_REQUEST),  # no method
        ({"jsonrpc": "2.0", "id": 10, "method": ""}, ErrorCode.INVALID_REQUEST),
        ({"jsonrpc": "2.0", "id": 11, "method": 42}, ErrorCode.INVALID_REQUEST),
        ({"jsonrpc": "2.0", "id": 12, "method": "node.info", "extra": 1}, ErrorCode.INVALID_REQUEST),
        ({"jsonrpc": "2.0", "id": 13, "method": "node.info", "params": "x"}, ErrorCode.INVALID_REQUEST),
    ]
    for request, code in cases:
        error_of(conn.ask(json.dumps(request).encode() + b"\n"), code, request["id"])
    assert_still_good(net, conn)


def test_unknown_methods_and_bad_params(net: TestNet, conn: Conn) -> None:
    assert "no.such.method" in error_of(conn.call("no.such.method", {}, 1), ErrorCode.METHOD_NOT_FOUND, 1)
    error_of(conn.call("__init__", {}, 2), ErrorCode.METHOD_NOT_FOUND, 2)
    error_of(conn.call("node.info", [1, 2], 3), ErrorCode.INVALID_PARAMS, 3)  # positional params
    assert "bogus" in error_of(conn.call("node.info", {"bogus": 1}, 4), ErrorCode.INVALID_PARAMS, 4)
    assert "addr" in error_of(conn.call("network.connect", {}, 5), ErrorCode.INVALID_PARAMS, 5)
    assert "addr" in error_of(conn.call("network.connect", {"addr": 4001}, 6), ErrorCode.INVALID_PARAMS, 6)
    assert "task_id" in error_of(conn.call("task.get", {"task_id": ""}, 7), ErrorCode.INVALID_PARAMS, 7)
    # Well-formed but impossible: an application error, not a crash.
    bogus = f"/ip4/127.0.0.1/tcp/1/p2p/{net.peer_id(0)}"
    reply = conn.call("network.connect", {"addr": bogus}, 8)
    assert reply["id"] == 8 and "error" in reply, reply
    assert_still_good(net, conn)


def test_a_notification_is_never_answered(net: TestNet, conn: Conn) -> None:
    # No id member: executed (or not) but never answered, even for an unknown method.
    conn.send(b'{"jsonrpc": "2.0", "method": "no.such.method"}\n')
    conn.send(b'{"jsonrpc": "2.0", "method": "node.info"}\n')
    assert_still_good(net, conn)  # the next line read is the answer to this request


def test_a_huge_line_is_refused_and_the_stream_resyncs(net: TestNet, conn: Conn) -> None:
    # Over the 1 MiB cap, sent in pieces: the daemon must not buffer it, and must find the
    # next request after its newline.
    piece = b"x" * 65536
    for _ in range(MAX_REQUEST_LINE // len(piece) + 2):
        conn.send(piece)
    message = error_of(conn.ask(b"\n"), ErrorCode.INVALID_REQUEST)
    assert "longer than" in message
    # A huge line that is valid JSON is refused the same way.
    big = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "node.info", "params": {"x": "y" * MAX_REQUEST_LINE}}
    )
    error_of(conn.ask(big.encode() + b"\n"), ErrorCode.INVALID_REQUEST)
    assert_still_good(net, conn)


def test_blank_lines_and_crlf_are_tolerated(net: TestNet, conn: Conn) -> None:
    conn.send(b"\n\r\n   \n")
    reply = conn.ask(b'{"jsonrpc": "2.0", "id": "crlf", "method": "node.info"}\r\n')
    assert reply["id"] == "crlf" and "result" in reply
    assert_still_good(net, conn)


def test_clients_that_vanish_mid_request_leave_the_daemon_unaffected(net: TestNet) -> None:
    for data in (b'{"jsonrpc": "2.0", "id": 1, "method": "node', os.urandom(5000), b""):
        c = Conn(str(net.socket(0)))
        c.send(data)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    # A client that asks and leaves before the answer is written.
    c = Conn(str(net.socket(0)))
    c.send(b'{"jsonrpc": "2.0", "id": 1, "method": "peers.list"}\n')
    c.close()
    # Many connections at once, each with one bad line.
    conns = [Conn(str(net.socket(0))) for _ in range(50)]
    for c in conns:
        c.send(b"}{\n")
    for c in conns:
        error_of(c.line(), ErrorCode.PARSE_ERROR)
        c.close()
    good = Conn(str(net.socket(0)))
    try:
        assert_still_good(net, good)
    finally:
        good.close()


def test_the_socket_is_0660_and_callers_are_logged_with_their_credentials(net: TestNet, conn: Conn) -> None:
    mode = net.socket(0).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    conn.call("node.info")
    # SO_PEERCRED: the daemon logs who connected (this test process).
    assert f"rpc connection pid={os.getpid()} uid={os.getuid()}" in net.log(0)
