"""peerd/rpc/server.py on a real Unix socket: framing errors, handler failures, permissions by
SO_PEERCRED, streams, stale sockets; and the blocking client and peerctl against it."""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from peerd.ctl.main import main as peerctl
from peerd.rpc import CONTRACT
from peerd.rpc.client import DaemonNotRunning, RpcCallError, RpcClient
from peerd.rpc.jsonrpc import LineBuffer, Params, RpcError
from peerd.rpc.server import (
    CallContext,
    Method,
    MethodTable,
    PeerCred,
    RpcServer,
    RpcServerError,
    WriteAccess,
    read_peer_cred,
)


class Raw:
    """A test client speaking raw lines, so malformed input can be sent."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = LineBuffer(16 << 20)
        self.lines: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self, method: str, params: dict[str, Any] | None = None, req_id: Any = 1
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(json.dumps(msg).encode() + b"\n")
        return await self.recv()

    async def recv(self) -> dict[str, Any]:
        while not self.lines:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.lines += [x for x in self.buf.feed(data) if isinstance(x, bytes)]
        result: dict[str, Any] = json.loads(self.lines.pop(0))
        return result


class Harness:
    def __init__(self) -> None:
        self.hang_cancelled = trio.Event()
        self.calls: list[tuple[str, PeerCred]] = []

    def methods(self) -> MethodTable:
        async def echo(params: dict[str, Any], ctx: CallContext) -> Any:
            self.calls.append(("echo", ctx.cred))
            return params

        async def boom(params: dict[str, Any], ctx: CallContext) -> Any:
            raise ValueError("handler bug")

        async def missing(params: dict[str, Any], ctx: CallContext) -> Any:
            raise RpcError(-32002, "unknown task", {"task_id": params["task_id"]})

        async def write(params: dict[str, Any], ctx: CallContext) -> Any:
            return "written"

        async def not_json(params: dict[str, Any], ctx: CallContext) -> Any:
            return {"raw": b"bytes"}

        async def stream(params: dict[str, Any], ctx: CallContext) -> Any:
            await ctx.reply({"task_id": params["task_id"], "state": "running"})
            for i in range(3):
                await ctx.notify(
                    "task.event", {"task_id": params["task_id"], "state": "running", "message": f"e{i}"}
                )
            await ctx.notify("task.end", {"task": {"task_id": params["task_id"], "state": "done"}})
            return "ignored after reply"

        async def hang(params: dict[str, Any], ctx: CallContext) -> Any:
            await ctx.reply({"state": "running"})
            try:
                await trio.sleep_forever()
            finally:
                self.hang_cancelled.set()

        task_id = CONTRACT["task.get"].params
        return MethodTable(
            [
                Method("echo", echo, "read", Params()),
                Method("echo.any", echo, "read", lambda p: p),
                Method("boom", boom),
                Method("missing", missing, params=task_id),
                Method("write", write, "write"),
                Method("not_json", not_json),
                Method("stream", stream, "read", task_id, streaming=True),
                Method("hang", hang, "read", streaming=True),
            ]
        )


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
async def server(tmp_path: Path, harness: Harness) -> AsyncIterator[RpcServer]:
    srv = RpcServer(tmp_path / "run" / "peerd.sock", harness.methods())
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        nursery.cancel_scope.cancel()


async def connect(srv: RpcServer) -> Raw:
    return Raw(await trio.open_unix_socket(str(srv.path)))


# --- the socket file ----------------------------------------------------------------------------


async def test_socket_is_0660_and_removed_on_exit(tmp_path: Path, harness: Harness) -> None:
    srv = RpcServer(tmp_path / "run" / "peerd.sock", harness.methods())
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        st = os.stat(srv.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(srv.path.parent).st_mode) == 0o700
        nursery.cancel_scope.cancel()
    assert not srv.path.exists()


async def test_socket_group_is_applied(tmp_path: Path, harness: Harness) -> None:
    group = "daemon"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        pytest.skip("no 'daemon' group on this machine")
    if os.geteuid() != 0:
        pytest.skip("chgrp to an arbitrary group needs root")
    srv = RpcServer(tmp_path / "peerd.sock", harness.methods(), group=group)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        assert os.stat(srv.path).st_gid == gid
        nursery.cancel_scope.cancel()


async def test_unknown_group_is_a_startup_error(tmp_path: Path, harness: Harness) -> None:
    with pytest.raises(RpcServerError, match="no such group"):
        await RpcServer(tmp_path / "s.sock", harness.methods(), group="no-such-group-xyz").run()


async def test_stale_socket_from_a_crashed_daemon_is_replaced(tmp_path: Path, harness: Harness) -> None:
    path = tmp_path / "peerd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
    dead.close()
    assert path.exists()
    srv = RpcServer(path, harness.methods())
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        raw = await connect(srv)
        assert (await raw.request("echo"))["result"] == {}
        nursery.cancel_scope.cancel()


async def test_a_live_daemon_on_the_socket_is_not_displaced(
    tmp_path: Path, harness: Harness, server: RpcServer
) -> None:
    with pytest.raises(RpcServerError, match="already running"):
        await RpcServer(server.path, harness.methods()).run()
    raw = await connect(server)  # the first one is unharmed
    assert (await raw.request("echo"))["result"] == {}


async def test_a_regular_file_in_the_way_is_not_removed(tmp_path: Path, harness: Harness) -> None:
    path = tmp_path / "peerd.sock"
    path.write_text("not a socket")
    with pytest.raises(RpcServerError, match="not a socket"):
        await RpcServer(path, harness.methods()).run()
    assert path.read_text() == "not a socket"


# --- requests and errors ------------------------------------------------------------------------


async def test_bad_lines_get_errors_and_the_connection_stays_usable(server: RpcServer) -> None:
    raw = await connect(server)
    await raw.send(b"{this is not json\n")
    assert (await raw.recv())["error"]["code"] == -32700
    await raw.send(b'[{"jsonrpc":"2.0","id":1,"method":"echo"}]\n')
    assert (await raw.recv())["error"]["code"] == -32600
    await raw.send(b"\xff\xfe\n")
    assert (await raw.recv())["error"]["code"] == -32700
    await raw.send(b"x" * (1 << 20) + b"y" * 1000 + b"\n")
    reply = await raw.recv()
    assert reply["error"]["code"] == -32600 and "longer than" in reply["error"]["message"]
    assert await raw.request("echo", req_id="after") == {"jsonrpc": "2.0", "id": "after", "result": {}}


async def test_unknown_method_and_bad_params(server: RpcServer) -> None:
    raw = await connect(server)
    reply = await raw.request("nope")
    assert reply["error"]["code"] == -32601 and "nope" in reply["error"]["message"]
    reply = await raw.request("missing", {"task_id": 5})
    assert reply["error"]["code"] == -32602 and reply["error"]["message"].startswith("task_id:")
    reply = await raw.request("echo", {"unexpected": 1})
    assert reply["error"]["code"] == -32602 and "unexpected" in reply["error"]["message"]


async def test_handler_errors(server: RpcServer, caplog: pytest.LogCaptureFixture) -> None:
    raw = await connect(server)
    reply = await raw.request("missing", {"task_id": "t9"})
    assert reply["error"] == {"code": -32002, "message": "unknown task", "data": {"task_id": "t9"}}
    with caplog.at_level(logging.ERROR, logger="peerd.rpc.server"):
        reply = await raw.request("boom")
    assert reply["error"]["code"] == -32603 and "handler bug" not in reply["error"]["message"]
    assert any("boom" in r.getMessage() and r.exc_info for r in caplog.records)
    reply = await raw.request("not_json")
    assert reply["error"]["code"] == -32603
    assert (await raw.request("echo.any", {"still": "alive"}))["result"] == {"still": "alive"}


async def test_notifications_from_clients_are_not_answered(server: RpcServer, harness: Harness) -> None:
    raw = await connect(server)
    await raw.send(b'{"jsonrpc":"2.0","method":"echo"}\n{"jsonrpc":"2.0","method":"nope"}\n')
    reply = await raw.request("echo.any", {"n": 2}, req_id=2)
    assert reply["id"] == 2  # nothing came back for the two notifications
    assert len(harness.calls) == 2  # the first notification was executed


async def test_caller_identity_comes_from_the_kernel_and_is_logged(
    server: RpcServer, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="peerd.rpc.server"):
        raw = await connect(server)
        await raw.request("echo")
    cred = harness.calls[0][1]
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert any(f"pid={os.getpid()} uid={os.getuid()}" in r.getMessage() for r in caplog.records)


async def test_write_methods_are_allowed_for_the_daemons_own_uid(server: RpcServer) -> None:
    raw = await connect(server)
    assert (await raw.request("write"))["result"] == "written"


async def test_half_closed_clients_still_get_their_answer(server: RpcServer) -> None:
    raw = await connect(server)
    await raw.send(b'{"jsonrpc":"2.0","id":1,"method":"echo.any","params":{"x":1}}\n')
    await raw.stream.send_eof()
    assert (await raw.recv())["result"] == {"x": 1}


# --- streams ------------------------------------------------------------------------------------


async def test_stream_replies_first_then_notifies_until_end(server: RpcServer) -> None:
    raw = await connect(server)
    first = await raw.request("stream", {"task_id": "t1"})
    assert first["result"] == {"task_id": "t1", "state": "running"}
    notes = [await raw.recv() for _ in range(4)]
    assert [n["method"] for n in notes] == ["task.event"] * 3 + ["task.end"]
    assert [n["params"].get("message") for n in notes[:3]] == ["e0", "e1", "e2"]
    assert all("id" not in n for n in notes)
    assert (await raw.request("echo", req_id=5))["id"] == 5  # nothing else queued


async def test_a_stream_ends_when_its_client_leaves(server: RpcServer, harness: Harness) -> None:
    raw = await connect(server)
    assert (await raw.request("hang"))["result"] == {"state": "running"}
    await raw.stream.aclose()
    with trio.fail_after(10):  # a deadlock guard, not a timing claim
        await harness.hang_cancelled.wait()


# --- write permission ---------------------------------------------------------------------------


def test_write_access_rules() -> None:
    access = WriteAccess(daemon_uid=500, group_gid=600, allowed_uids=frozenset({700}))
    assert access.allows(PeerCred(1, 0, 0))  # root
    assert access.allows(PeerCred(1, 500, 1))  # the daemon itself
    assert access.allows(PeerCred(1, 700, 1))  # rpc.allowed_uids
    assert access.allows(PeerCred(1, 1000, 600))  # primary group
    assert access.allows(PeerCred(1, 1000, 1000, (27, 600)))  # supplementary group
    assert not access.allows(PeerCred(1, 1000, 1000, (27,)))
    assert not WriteAccess(daemon_uid=500).allows(PeerCred(1, 1000, 600, (600,)))


def test_peer_credentials_of_a_socketpair_are_our_own() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = read_peer_cred(a)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(os.getgroups()) <= set(cred.groups) | {os.getgid()}


_OTHER_USER_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for i, method in enumerate(("echo", "write")):
    f.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": method}).encode() + b"\n")
    f.flush()
    print(f.readline().decode().strip())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # pytest's tmp_path is private to root; the other user needs to reach the socket.
    path = Path(tempfile.mkdtemp(prefix="peerd-rpc-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize(
    ("extra_groups", "allowed_uids", "write_allowed"),
    [([], [], False), ([0], [], True), ([], [65534], True)],
    ids=["no-group", "supplementary-group", "allowed-uid"],
)
async def test_another_user_can_read_but_needs_rights_to_write(
    shared_dir: Path, harness: Harness, extra_groups: list[int], allowed_uids: list[int], write_allowed: bool
) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root (to run a client as another user) and a system python3")
    srv = RpcServer(shared_dir / "peerd.sock", harness.methods(), allowed_uids=allowed_uids, mode=0o666)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [python, "-I", "-c", _OTHER_USER_CLIENT, str(srv.path)],
                capture_output=True,
                check=True,
                user=65534,
                group=65534,
                extra_groups=extra_groups,
                cwd="/",
            )
        )
        nursery.cancel_scope.cancel()
    read_reply, write_reply = (json.loads(line) for line in proc.stdout.decode().splitlines())
    assert read_reply["result"] == {}
    assert harness.calls[0][1].uid == 65534
    if write_allowed:
        assert write_reply["result"] == "written"
    else:
        assert write_reply["error"]["code"] == -32001
        assert "uid 65534" in write_reply["error"]["message"]


# --- the blocking client ------------------------------------------------------------------------


async def test_blocking_client_calls_errors_and_subscriptions(server: RpcServer) -> None:
    def use_client() -> tuple[Any, Any, list[str], Any]:
        with RpcClient(server.path, timeout=10) as rpc:
            echoed = rpc.call("echo.any", {"a": [1, 2]})
            with pytest.raises(RpcCallError) as err:
                rpc.call("missing", {"task_id": "x"})
            sub = rpc.subscribe("stream", {"task_id": "t2"})
            methods = [note.method for note in sub]
            return echoed, (err.value.code, err.value.data), methods, sub.result

    echoed, err, methods, first = await trio.to_thread.run_sync(use_client)
    assert echoed == {"a": [1, 2]}
    assert err == (-32002, {"task_id": "x"})
    assert methods == ["task.event", "task.event", "task.event", "task.end"]
    assert first == {"task_id": "t2", "state": "running"}


def test_client_reports_a_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="no socket"):
        RpcClient(tmp_path / "none.sock").call("node.info")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    with pytest.raises(DaemonNotRunning, match="refused"):
        RpcClient(tmp_path / "dead.sock").call("node.info")


# --- peerctl against a fake daemon --------------------------------------------------------------

BLOB = b"weights " * 300_000  # 2.4 MB: three blob.read chunks
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
ADVERT = {
    "peer_id": PEER,
    "seq": 4,
    "issued_at": 1.0,
    "expires_at": 11.0,
    "c0": 1000.0,
    "load": 0.5,
    "capacity": 1000.1,
    "cpu": {"cores": 8, "model": "Test CPU", "gflops": 1000.0},
    "memory": {"total_mb": 16384, "available_mb": 8192},
    "gpus": [
        {
            "index": 0,
            "model": "NVIDIA H100",
            "vram_total_mb": 81559,
            "vram_free_mb": 80000,
            "util_pct": 0.0,
            "gflops": 50000.0,
        }
    ],
    "offer": {"cores": 8, "gpus": [0], "memory_mb": 12288, "kinds": ["echo"], "draining": False},
    "params": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
    "addrs": ["/ip4/127.0.0.1/tcp/4001"],
}


def fake_daemon() -> MethodTable:
    def task(state: str) -> dict[str, Any]:
        return {
            "task_id": "t1",
            "kind": "echo",
            "state": state,
            "spec": {"rounds": 1},
            "rounds": [],
            "shards": [{"index": 0, "peer_id": PEER, "state": state, "share": 1.0, "attempts": 1}],
            "result": None,
            "events": [],
        }

    async def node_info(params: dict[str, Any], ctx: CallContext) -> Any:
        return {
            "peer_id": PEER,
            "version": "0.1.0",
            "listen_addrs": [],
            "uptime_s": 3.0,
            "advert": ADVERT,
            "counters": {"adverts_received": 7},
            "sandbox": {"available": True, "detail": "bwrap"},
        }

    async def peers_list(params: dict[str, Any], ctx: CallContext) -> Any:
        return {"peers": [{**ADVERT, "age_s": 1.5, "expires_in_s": 8.5, "self": True}]}

    async def task_watch(params: dict[str, Any], ctx: CallContext) -> Any:
        if params["task_id"] != "t1":
            raise RpcError(-32002, f"unknown task {params['task_id']}")
        await ctx.reply(task("running"))
        await ctx.notify("task.event", {"task_id": "t1", "state": "running", "message": "awarded to 1 peer"})
        await ctx.notify("task.end", {"task": task("failed")})

    async def task_bundle(params: dict[str, Any], ctx: CallContext) -> Any:
        return {"files": [{"name": "outputs/model.bin", "sha256": BLOB_SHA, "size": len(BLOB)}]}

    async def blob_read(params: dict[str, Any], ctx: CallContext) -> Any:
        data = BLOB[params["offset"] : params["offset"] + params["length"]]
        return {"data_b64": base64.b64encode(data).decode(), "eof": params["offset"] + len(data) >= len(BLOB)}

    return MethodTable.from_contract(
        {
            "node.info": node_info,
            "peers.list": peers_list,
            "task.watch": task_watch,
            "task.bundle": task_bundle,
            "blob.read": blob_read,
        }
    )


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Path]:
    srv = RpcServer(tmp_path / "peerd.sock", fake_daemon())
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv.path
        nursery.cancel_scope.cancel()


async def run_peerctl(socket_path: Path, *args: str) -> Any:
    runner = CliRunner()
    return await trio.to_thread.run_sync(
        lambda: runner.invoke(peerctl, ["--socket", str(socket_path), *args])
    )


async def test_peerctl_status_peers_and_id(daemon: Path) -> None:
    status = await run_peerctl(daemon, "status")
    assert status.exit_code == 0, status.output
    assert PEER in status.output and "adverts_received" in status.output and "NVIDIA H100" in status.output
    peers = await run_peerctl(daemon, "peers", "--json")
    assert peers.exit_code == 0 and json.loads(peers.output)["peers"][0]["self"] is True
    table = await run_peerctl(daemon, "peers")
    assert "1000.1" in table.output and "(self)" in table.output
    ident = await run_peerctl(daemon, "id")
    assert ident.output.strip() == PEER


async def test_peerctl_watch_exit_code_follows_the_final_state(daemon: Path) -> None:
    watched = await run_peerctl(daemon, "watch", "t1")
    assert watched.exit_code == 1 and "awarded to 1 peer" in watched.output and "failed" in watched.output
    as_json = await run_peerctl(daemon, "watch", "t1", "--json")
    lines = [json.loads(line) for line in as_json.output.splitlines()]
    assert lines[0]["task"]["state"] == "running" and lines[-1]["method"] == "task.end"
    unknown = await run_peerctl(daemon, "watch", "nope")
    assert unknown.exit_code == 1 and "unknown task nope" in unknown.output


async def test_peerctl_result_writes_the_verified_bundle(daemon: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = await run_peerctl(daemon, "result", "t1", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert (out / "outputs/model.bin").read_bytes() == BLOB
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["model.bin"]  # no partial file left


async def test_peerctl_methods_the_daemon_lacks_are_rpc_errors(daemon: Path) -> None:
    res = await run_peerctl(daemon, "tasks")
    assert res.exit_code == 1 and "method not found" in res.output
