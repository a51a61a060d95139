"""``peers.list`` pages (issue 11: a table of free identities once came back as one 6.9 MB
reply): the daemon's real handler over a real peer table and a real socket, read by the
blocking client and by ``peerctl peers``, which follows every page."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from peerd.api import Api
from peerd.ctl import peers as peers_cmd
from peerd.ctl.main import main as peerctl
from peerd.inbox import wall_ms
from peerd.peertable import PeerTable
from peerd.rpc import CONTRACT, PEERS_PAGE_DEFAULT, PEERS_PAGE_MAX
from peerd.rpc.client import RpcCallError, RpcClient
from peerd.rpc.server import CallContext, MethodTable, RpcServer
from protocol.envelope import Signer, open_envelope
from protocol.messages import Advert
from tests.samples import sample_advert


def advert(seq: int, now: int) -> Advert:
    return sample_advert(seq=seq, issued_at=now, ttl_ms=600_000)


def table_of(n: int) -> tuple[PeerTable, list[str]]:
    """A table holding this node and ``n - 1`` other peers, each a real signed advert; the
    IDs sorted."""
    table = PeerTable(max_peers=n)
    now = wall_ms()
    ids = []
    for i in range(n):
        signer = Signer(os.urandom(32))
        signed = open_envelope(signer.seal(advert(1, now)), kinds=frozenset({"advert"}))
        assert table.upsert(signed, now, is_self=i == 0)
        ids.append(signer.peer_id)
    return table, sorted(ids)


class Daemon:
    def __init__(self, path: Path, table: PeerTable) -> None:
        self.path = path
        self.self_id = next(e.peer_id for e in table.alive(wall_ms()) if e.is_self)
        self.calls: list[dict[str, Any]] = []
        #: Round trips the stand-in transport has measured, by peer ID (the rest: None).
        self.rtts: dict[str, float] = {}
        node = SimpleNamespace(table=table, p2p=SimpleNamespace(round_trip_s=self.rtts.get))
        api = Api(node, None, None, None, 0.0)  # type: ignore[arg-type]

        async def peers_list(params: dict[str, Any], ctx: CallContext) -> Any:
            self.calls.append(dict(params))
            return await api.peers_list(params, ctx)

        self.methods = MethodTable.from_contract({"peers.list": peers_list})


async def serve(tmp_path: Path, n: int) -> AsyncIterator[tuple[Daemon, list[str]]]:
    table, ids = table_of(n)
    daemon = Daemon(tmp_path / "peerd.sock", table)
    srv = RpcServer(daemon.path, daemon.methods)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield daemon, ids
        nursery.cancel_scope.cancel()


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[tuple[Daemon, list[str]]]:
    async for pair in serve(tmp_path, 8):
        yield pair


@pytest.fixture
async def large(tmp_path: Path) -> AsyncIterator[tuple[Daemon, list[str]]]:
    async for pair in serve(tmp_path, PEERS_PAGE_DEFAULT + 44):
        yield pair


def call(path: Path, params: dict[str, Any]) -> Any:
    with RpcClient(path, timeout=30) as rpc:
        return rpc.call("peers.list", params)


async def test_pages_follow_the_cursor_in_peer_id_order(small: tuple[Daemon, list[str]]) -> None:
    daemon, ids = small
    # A peer other than this node, whose own entry never has a round trip. (Not simply
    # ids[4]: the IDs are random, and one run in eight this node's own sorted there.)
    far = next(i for i in ids[4:] + ids[:4] if i != daemon.self_id)
    daemon.rtts[far] = 0.0421
    rtts: dict[str, Any] = {}
    seen: list[str] = []
    selves = 0
    pages = []
    after = None
    for _ in range(10):  # bounded: 8 peers in pages of 3
        params: dict[str, Any] = {"limit": 3} if after is None else {"limit": 3, "after": after}
        page = await trio.to_thread.run_sync(call, daemon.path, params)
        pages.append([p["peer_id"] for p in page["peers"]])
        seen += pages[-1]
        selves += sum(bool(p["self"]) for p in page["peers"])
        rtts.update((p["peer_id"], p["rtt_ms"]) for p in page["peers"])
        after = page["next"]
        if after is None:
            break
        assert after == pages[-1][-1]
    assert [len(p) for p in pages] == [3, 3, 2]
    assert seen == ids  # all of them, sorted, none twice
    assert selves == 1  # this node's own entry is on exactly one page
    # The round trip this node measured, in ms; null where it has none.
    assert rtts == {i: (42.1 if i == far else None) for i in ids}


async def test_the_default_page_and_its_next(large: tuple[Daemon, list[str]]) -> None:
    daemon, ids = large
    first = await trio.to_thread.run_sync(call, daemon.path, {})
    assert [p["peer_id"] for p in first["peers"]] == ids[:PEERS_PAGE_DEFAULT]
    assert first["next"] == ids[PEERS_PAGE_DEFAULT - 1]
    rest = await trio.to_thread.run_sync(call, daemon.path, {"after": first["next"]})
    assert [p["peer_id"] for p in rest["peers"]] == ids[PEERS_PAGE_DEFAULT:]
    assert rest["next"] is None
    # An exact fit has no next either: nothing follows.
    whole = await trio.to_thread.run_sync(call, daemon.path, {"limit": len(ids)})
    assert len(whole["peers"]) == len(ids) and whole["next"] is None


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": 0}, f"limit: must be between 1 and {PEERS_PAGE_MAX}"),
        ({"limit": PEERS_PAGE_MAX + 1}, f"limit: must be between 1 and {PEERS_PAGE_MAX}"),
        ({"after": ""}, "after: expected a non-empty id"),
        ({"after": 5}, "after: expected a string"),
        ({"cursor": "x"}, "cursor: unknown parameter"),
    ],
)
async def test_bad_page_params_are_invalid_params(
    small: tuple[Daemon, list[str]], params: dict[str, Any], fragment: str
) -> None:
    daemon, _ = small
    with pytest.raises(RpcCallError) as info:
        await trio.to_thread.run_sync(call, daemon.path, params)
    assert info.value.code == -32602 and fragment in info.value.message


async def test_peerctl_peers_follows_every_page(large: tuple[Daemon, list[str]]) -> None:
    daemon, ids = large
    runner = CliRunner()
    res = await trio.to_thread.run_sync(
        lambda: runner.invoke(peerctl, ["--socket", str(daemon.path), "peers", "--json"])
    )
    assert res.exit_code == 0, res.output
    assert [p["peer_id"] for p in json.loads(res.output)["peers"]] == ids
    assert daemon.calls == [{}, {"after": ids[PEERS_PAGE_DEFAULT - 1]}]
    daemon.calls.clear()
    res = await trio.to_thread.run_sync(
        lambda: runner.invoke(peerctl, ["--socket", str(daemon.path), "peers", "--page-size", "100"])
    )
    assert res.exit_code == 0, res.output
    assert f"{len(ids)} peers" in res.output
    assert [c.get("limit") for c in daemon.calls] == [100, 100, 100]


# --- the request builder --------------------------------------------------------------------------


def test_the_request_builder_fits_the_contract() -> None:
    for after, limit, params in [
        (None, None, {}),
        ("12D3KooWabc", None, {"after": "12D3KooWabc"}),
        (None, 50, {"limit": 50}),
        ("12D3KooWabc", 50, {"after": "12D3KooWabc", "limit": 50}),
    ]:
        method, built = peers_cmd.request(after, limit)
        assert (method, built) == ("peers.list", params)
        assert CONTRACT[method].params(dict(built)) == params


def test_page_size_outside_the_range_is_a_usage_error(tmp_path: Path) -> None:
    for bad in ("0", str(PEERS_PAGE_MAX + 1)):
        res = CliRunner().invoke(peerctl, ["--socket", str(tmp_path / "s.sock"), "peers", "--page-size", bad])
        assert res.exit_code == 2 and "--page-size" in res.output
