"""peerd/peertable.py: the peer table is bounded, and its eviction rule cannot be used to push
out the peers we rely on (issue 11: 10,000 free identities made a 10,003-entry table).

The table stores adverts already verified by the inbox, so these tests hand it ``Signed``
values directly; peer IDs are plain labels here.
"""

from __future__ import annotations

from typing import Any

import pytest

from peerd.counters import Counters
from peerd.peertable import DEFAULT_MAX_PEERS, PeerTable
from protocol.envelope import Signed
from protocol.messages import Advert
from tests.samples import sample_advert

T0 = 1_700_000_000_000  # ms
SELF = "self"


def advert(seq: int, issued_at: int, ttl_ms: int = 60_000) -> Advert:
    return sample_advert(seq=seq, issued_at=issued_at, ttl_ms=ttl_ms)


def signed(peer: str, seq: int, issued_at: int, ttl_ms: int = 60_000) -> Signed:
    return Signed(advert(seq, issued_at, ttl_ms), peer, b"", b"", f"{peer}/{seq}")


class Net:
    """A table plus who is connected and the clock, as the daemon wires them."""

    def __init__(self, max_peers: int) -> None:
        self.connected: set[str] = set()
        self.counters = Counters()
        self.table = PeerTable(max_peers=max_peers, connected=lambda: self.connected, counters=self.counters)
        self.now = T0
        self.seq: dict[str, int] = {}

    def hear(self, peer: str, *, issued_at: int | None = None, ttl_ms: int = 60_000, **kw: Any) -> bool:
        """``peer``'s next advert arrives now (issued now unless told otherwise)."""
        self.now += 1
        self.seq[peer] = self.seq.get(peer, 0) + 1
        issued = self.now if issued_at is None else issued_at
        return self.table.upsert(signed(peer, self.seq[peer], issued, ttl_ms), self.now, **kw)

    def ids(self) -> set[str]:
        return {e.peer_id for e in self.table.alive(self.now)}


def test_the_default_limit_is_1024() -> None:
    assert PeerTable().max_peers == DEFAULT_MAX_PEERS == 1024


def test_ten_thousand_identities_leave_a_bounded_table_with_the_established_peers_in_it() -> None:
    # The attack: identities are free; the table used to take every one of them.
    net = Net(max_peers=DEFAULT_MAX_PEERS)
    net.hear(SELF, is_self=True)
    real = [f"real-{i}" for i in range(3)]
    net.connected = {"real-0"}  # one neighbour; the other two are known through gossip only
    for _ in range(2):
        for peer in real:
            assert net.hear(peer)
    for i in range(10_000):
        net.hear(f"fake-{i:05d}")
        if i % 500 == 0:
            for peer in real:  # the real peers keep advertising meanwhile
                assert net.hear(peer)
    ids = net.ids()
    assert len(ids) == DEFAULT_MAX_PEERS + 1  # every slot used, plus this node
    assert {SELF, *real} <= ids
    evicted = net.counters.get("peers.evicted")
    assert evicted == 10_000 + 3 - DEFAULT_MAX_PEERS
    assert net.counters.get("dropped.peer_table_full") == 0


def test_connected_peers_are_never_evicted_and_the_newcomer_is_refused() -> None:
    net = Net(max_peers=3)
    net.connected = {"a", "b", "c"}
    for peer in ("a", "b", "c"):
        assert net.hear(peer)
    assert not net.hear("newcomer")
    assert net.ids() == {"a", "b", "c"}
    assert net.counters.get("dropped.peer_table_full") == 1
    assert net.counters.get("peers.evicted") == 0


def test_peers_heard_from_once_go_before_peers_that_keep_advertising() -> None:
    net = Net(max_peers=3)
    assert net.hear("old-but-steady")  # heard first of all...
    assert net.hear("old-but-steady")  # ...and again: it re-advertises like a real peer
    assert net.hear("one-shot-1")
    assert net.hear("one-shot-2")
    assert net.hear("newcomer")
    assert net.ids() == {"old-but-steady", "one-shot-2", "newcomer"}  # one-shot-1 was the stalest
    assert net.counters.get("peers.evicted") == 1


def test_among_steady_peers_the_least_recently_heard_goes() -> None:
    net = Net(max_peers=2)
    for peer in ("x", "y", "x", "y", "x"):  # y heard from last at the fourth advert
        assert net.hear(peer)
    assert net.hear("newcomer")
    assert net.ids() == {"x", "newcomer"}


def test_an_entry_fresher_than_the_newcomer_is_not_evicted_for_it() -> None:
    net = Net(max_peers=2)
    assert net.hear("a")
    assert net.hear("b")
    # An old advert (issued before a's and b's) arriving now cannot displace either.
    assert not net.hear("stale-newcomer", issued_at=T0 - 5_000)
    assert net.ids() == {"a", "b"}
    assert net.counters.get("dropped.peer_table_full") == 1
    assert net.hear("fresh-newcomer")
    assert net.ids() == {"b", "fresh-newcomer"}


def test_expired_entries_make_room_before_anyone_is_evicted() -> None:
    net = Net(max_peers=2)
    assert net.hear("short-lived", ttl_ms=10)
    assert net.hear("steady")
    net.now += 100  # short-lived's advert has expired
    assert net.hear("newcomer")
    assert net.ids() == {"steady", "newcomer"}
    assert net.counters.get("peers.evicted") == 0


def test_this_node_is_neither_counted_nor_evicted() -> None:
    net = Net(max_peers=1)
    assert net.hear(SELF, is_self=True)
    assert net.hear("a")
    assert net.hear("b")  # evicts a, never self
    assert net.ids() == {SELF, "b"}
    assert net.hear(SELF, is_self=True)  # self's next advert updates in place
    assert net.ids() == {SELF, "b"} and len(net.table) == 2


def test_if_connections_cannot_be_read_nobody_is_evicted() -> None:
    net = Net(max_peers=1)
    assert net.hear("a")

    def broken() -> set[str]:
        raise RuntimeError("libp2p said no")

    net.table._connected = broken
    assert not net.hear("b")
    assert net.ids() == {"a"}
    assert net.counters.get("dropped.peer_table_full") == 1


def test_a_refreshed_entry_keeps_its_slot_and_newer_seq_only() -> None:
    net = Net(max_peers=1)
    assert net.hear("a")
    entry = net.table.get("a", net.now)
    assert entry is not None and entry.refreshes == 0
    assert not net.table.upsert(signed("a", 1, net.now), net.now)  # a replayed seq
    assert net.hear("a")
    entry = net.table.get("a", net.now)
    assert entry is not None and entry.refreshes == 1 and entry.advert.seq == 2


def test_max_peers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_peers"):
        PeerTable(max_peers=0)


def test_alive_pages_by_peer_id() -> None:
    net = Net(max_peers=10)
    for peer in ("d", "a", "c", "b", "e"):
        net.hear(peer)
    page = net.table.alive(net.now, limit=2)
    assert [e.peer_id for e in page] == ["a", "b"]
    page = net.table.alive(net.now, after="b", limit=2)
    assert [e.peer_id for e in page] == ["c", "d"]
    assert [e.peer_id for e in net.table.alive(net.now, after="d", limit=2)] == ["e"]
    assert net.table.alive(net.now, after="e") == []
