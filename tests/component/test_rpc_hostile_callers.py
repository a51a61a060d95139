"""peerd/rpc/server.py on a real Unix socket against callers that attack it (issue 11, "Attacks
that hurt the daemon"): an over-deep JSON line gets an error reply, and the connection, other
connections and the server stay up."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.rpc.jsonrpc import MAX_JSON_DEPTH, LineBuffer, Params
from peerd.rpc.server import CallContext, Method, MethodTable, RpcServer


class Raw:
    """Raw lines, so malformed input can be sent."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = LineBuffer(16 << 20)
        self.lines: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(20):  # a safety bound: the bug was "no reply at all"
            while not self.lines:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.lines += [x for x in self.buf.feed(data) if isinstance(x, bytes)]
        result: dict[str, Any] = json.loads(self.lines.pop(0))
        return result

    async def echo(self, req_id: Any) -> dict[str, Any]:
        await self.send(json.dumps({"jsonrpc": "2.0", "id": req_id, "method": "echo"}).encode() + b"\n")
        return await self.recv()


def methods() -> MethodTable:
    async def echo(params: dict[str, Any], ctx: CallContext) -> Any:
        return params

    return MethodTable(
        [Method("echo", echo, "read", Params()), Method("echo.any", echo, "read", lambda p: p)]
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RpcServer]:
    srv = RpcServer(tmp_path / "run" / "peerd.sock", methods())
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        nursery.cancel_scope.cancel()


async def connect(srv: RpcServer) -> Raw:
    return Raw(await trio.open_unix_socket(str(srv.path)))


@pytest.mark.parametrize("depth", [975, 990, 1500, 100_000])
async def test_an_over_deep_line_gets_an_error_and_everything_stays_up(server: RpcServer, depth: int) -> None:
    raw = await connect(server)
    await raw.send(b"[" * depth + b"]" * depth + b"\n")
    reply = await raw.recv()
    assert reply["id"] is None
    assert reply["error"]["code"] == -32700
    assert f"nested {depth} levels deep" in reply["error"]["message"]
    # The same connection still answers, and so does a new one.
    assert await raw.echo("same") == {"jsonrpc": "2.0", "id": "same", "result": {}}
    other = await connect(server)
    assert await other.echo("other") == {"jsonrpc": "2.0", "id": "other", "result": {}}


async def test_an_over_deep_object_in_a_valid_request_is_refused(server: RpcServer) -> None:
    raw = await connect(server)
    deep = '{"a":' * 2000 + "1" + "}" * 2000
    await raw.send(f'{{"jsonrpc":"2.0","id":3,"method":"echo.any","params":{{"x":{deep}}}}}\n'.encode())
    reply = await raw.recv()
    assert reply["error"]["code"] == -32700 and "nested 2002 levels deep" in reply["error"]["message"]
    # Nesting up to the limit is served normally.
    ok = "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)
    await raw.send(f'{{"jsonrpc":"2.0","id":4,"method":"echo.any","params":{{"x":{ok}}}}}\n'.encode())
    reply = await raw.recv()
    assert reply["id"] == 4 and "error" not in reply


async def test_a_failing_connection_ends_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever bug one caller's input reaches in the connection loop closes that connection,
    # logged, and the listener keeps serving others.
    import peerd.rpc.server as server_module

    real = server_module.parse_request

    def parse(line: bytes) -> Any:
        if line == b"crash":
            raise RuntimeError("a bug in the connection loop")
        return real(line)

    monkeypatch.setattr(server_module, "parse_request", parse)
    srv = RpcServer(tmp_path / "peerd.sock", methods())
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        victim = await connect(srv)
        with caplog.at_level(logging.ERROR, logger="peerd.rpc.server"):
            await victim.send(b"crash\n")
            with pytest.raises(EOFError):
                await victim.recv()
        assert any("failed; closing it" in r.getMessage() and r.exc_info for r in caplog.records)
        other = await connect(srv)
        assert (await other.echo(1))["result"] == {}
        nursery.cancel_scope.cancel()
