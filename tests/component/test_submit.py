"""Submitter.submit against real parts (config, signer, sequence, inbox, store, blob store, task
book), without a network: what is checked and announced at submit (issue 7).

The worker pool is not touched by ``submit``; the p2p node and the peer table are fakes that
answer the task's machine, which runs in the submitter's own nursery until the call returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from peerd.blobs import BlobStore
from peerd.config import Config, load_config
from peerd.counters import Counters
from peerd.inbox import Inbox
from peerd.node import MAX_GOSSIP_BYTES, Node
from peerd.seqstore import SequenceStore
from peerd.store import Store
from peerd.submitter import RTO_MIN_MS, SubmitError, Submitter, bid_window_for
from peerd.taskbook import TaskBook
from protocol.awards import allocate
from protocol.envelope import Signed, Signer, open_envelope
from protocol.errors import RemoteProtocolError
from protocol.messages import Bid, TaskAnnounce


class _P2P:
    """Nobody connected; what is published is recorded; round trips as a test sets them."""

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.rtts: dict[str, float] = {}

    def connected_peers(self) -> list[str]:
        return []

    def round_trip_s(self, peer_id: str) -> float | None:
        return self.rtts.get(peer_id)

    def relayed(self, peer_id: str) -> bool:
        return False  # every peer reached directly

    async def publish(self, topic: str, raw: bytes) -> None:
        self.published.append(raw)


class _Table:
    def __init__(self) -> None:
        self.entries: list[Any] = []

    def alive(self, now_ms: int) -> list[Any]:
        return self.entries


def _entry(peer_id: str, kinds: list[str], draining: bool = False) -> Any:
    return SimpleNamespace(
        peer_id=peer_id, advert=SimpleNamespace(offer={"kinds": kinds, "draining": draining})
    )


def run_submit(sub: Submitter, spec: dict[str, Any]) -> str:
    """``sub.submit(spec)`` with the submitter running (its machine starts in the submitter's own
    nursery, cancelled once submit returned)."""
    out: list[str | SubmitError] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sub.run)
            try:
                out.append(await sub.submit(spec))
            except SubmitError as exc:
                out.append(exc)
            nursery.cancel_scope.cancel()

    trio.run(main)
    if isinstance(out[0], SubmitError):
        raise out[0]
    return out[0]


def make_config(tmp: Path, market: str = "") -> Config:
    path = tmp / "peerd.toml"
    path.write_text(
        f'[node]\nstate_dir = "{tmp / "state"}"\nruntime_dir = "{tmp / "run"}"\n'
        f"[offer]\ncores = 1\nmemory_mb = 1024\n[market]\n{market}\n"
    )
    return load_config(path, env={})


def make_submitter(tmp: Path, market: str = "") -> tuple[Submitter, Node]:
    cfg = make_config(tmp, market)
    counters = Counters()
    signer = Signer(b"\x07" * 32)
    node = Node(
        config=cfg,
        signer=signer,
        seq=SequenceStore(tmp / "sequence"),
        counters=counters,
        inbox=Inbox(counters),
        store=Store(tmp / "db.sqlite"),
        blobs=BlobStore(tmp / "blobs", max_blob_bytes=1 << 20),
        p2p=cast(Any, _P2P()),
        pool=cast(Any, None),
        table=cast(Any, _Table()),
    )
    return Submitter(node, TaskBook(signer.peer_id, counters)), node


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _announce(node: Node, task_id: str) -> TaskAnnounce:
    row = node.store.task(task_id)
    assert row is not None and row.announce is not None
    msg = open_envelope(row.announce, kinds=frozenset({"announce"})).message
    assert isinstance(msg, TaskAnnounce)
    return msg


def _bid(n: int, task_id: str, c0: float, load: float) -> Signed:
    msg = Bid(seq=1, issued_at=1, expires_at=2, task_id=task_id, c0=c0, load=load)
    return open_envelope(Signer(bytes([n]) * 32).seal(msg), kinds=frozenset({"bid"}))


def test_market_t_max_reaches_the_award_rule(tmp: Path) -> None:
    sub, node = make_submitter(tmp, "t_max = 50.0")
    spec = {"kind": "echo", "work": 100.0, "deadline_s": 1, "max_shards": 2, "params": {"data": "x"}}
    task_id = run_submit(sub, spec)
    ann = _announce(node, task_id)
    assert ann.net["t_max"] == 50.0
    # R = 100: one peer covers it at cost C·L = 100.02 · 0.5 > t_max; two idle ones cost 0.
    busy, idle_a, idle_b = (
        _bid(1, task_id, 100.0, 0.5),
        _bid(2, task_id, 60.0, 0.0),
        _bid(3, task_id, 60.0, 0.0),
    )
    assert not allocate(ann, [busy, idle_a, idle_b]).under_capacity
    # Only the busy peer and one idle one bid: every covering set costs > t_max.
    alloc = allocate(ann, [busy, idle_a])
    assert alloc.under_capacity and "t_max=50" in alloc.reasons[alloc.chosen[0]]


def test_the_default_bid_window_follows_the_round_trip_to_the_farthest_offering_peer(tmp: Path) -> None:
    sub, node = make_submitter(tmp)  # market.bid_window_ms: the default 300
    p2p, table = cast(_P2P, node.p2p), cast(_Table, node.table)
    spec = {"kind": "echo", "work": 1.0, "deadline_s": 1, "params": {"data": "x"}}
    assert _announce(node, run_submit(sub, spec)).bid_window_ms == 300  # nobody known
    table.entries = [
        _entry("far", ["echo"]),
        _entry("near", ["echo"]),
        _entry("farther-but-no-echo", ["python"]),
        _entry("farthest-but-draining", ["echo"], draining=True),
    ]
    p2p.rtts = {"near": 0.002, "farther-but-no-echo": 2.0, "farthest-but-draining": 1.5}
    assert _announce(node, run_submit(sub, spec)).bid_window_ms == 300  # "far" not measured yet
    p2p.rtts["far"] = 0.4
    assert _announce(node, run_submit(sub, spec)).bid_window_ms == 3 * 400 + RTO_MIN_MS
    # A spec's own window is the submitter's choice, kept as given.
    assert _announce(node, run_submit(sub, {**spec, "bid_window_ms": 250})).bid_window_ms == 250


def test_bid_window_for_keeps_the_configured_floor_and_a_cap() -> None:
    assert bid_window_for(300, []) == 300
    assert bid_window_for(300, [0.001, 0.02]) == 300  # a LAN: the floor
    assert bid_window_for(300, [0.08, 0.02]) == 440  # the 40 ms-each-way WAN devnet
    assert bid_window_for(1_000, [0.08]) == 1_000  # an operator's longer window stands
    assert bid_window_for(300, [30.0]) == 5_000  # one dreadful link does not stall every award


def test_an_unbounded_t_max_is_not_on_the_wire(tmp: Path) -> None:
    sub, node = make_submitter(tmp)
    assert math.isinf(node.config.market.t_max)
    task_id = run_submit(sub, {"kind": "echo", "params": {"data": "x"}})
    assert "t_max" not in _announce(node, task_id).net


def test_an_announce_above_the_gossip_cap_is_refused_at_submit(tmp: Path) -> None:
    sub, node = make_submitter(tmp)
    # Below the 64 KiB envelope limit, above the gossip cap.
    spec = {"kind": "echo", "params": {"data": "x" * (MAX_GOSSIP_BYTES + 600)}}
    with pytest.raises(SubmitError, match=r"^params: .*gossip"):
        run_submit(sub, spec)
    assert node.store.tasks() == []
    # Just below the cap it is announced (and would be published).
    ok = run_submit(sub, {"kind": "echo", "params": {"data": "x" * (MAX_GOSSIP_BYTES - 1000)}})
    assert node.store.task(ok) is not None


def test_node_fetch_from_any_skips_itself_and_repeats_and_uses_a_local_copy(tmp: Path) -> None:
    _, node = make_submitter(tmp)
    asked: list[str] = []

    async def fetch_blob(peer: str, digest: str, *, max_bytes: int | None = None) -> Path:
        asked.append(peer)
        raise RemoteProtocolError("no", reason="not_found")

    node.fetch_blob = fetch_blob  # type: ignore[method-assign,assignment]
    digest = node.blobs.put_bytes(b"here")
    assert trio.run(node.fetch_from_any, digest, ["a"]) == node.blobs.path(digest)
    assert asked == []
    with pytest.raises(RemoteProtocolError):
        trio.run(node.fetch_from_any, "0" * 64, ["a", node.peer_id, "b", "a"])
    assert asked == ["a", "b"]
