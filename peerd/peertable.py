"""The table of peers: only verified, unexpired adverts (issue 2 item 7).

An entry is replaced only by a newer advert of the same signer (the inbox already
refused lower sequences); a peer that stops advertising disappears once its advert
expires — no separate liveness protocol is needed for the table.

The table is bounded (``network.max_peers``, docs/config.md): identities are free, and 10,000
of them once made a 10,003-entry table and a 6.9 MB ``peers.list`` (issue 11). When a new
peer arrives at a full table, expired entries go first; then one entry may make room, chosen
so that a flood of fresh identities cannot push out the peers we rely on:

* never this node, and never a peer we are connected to;
* first the peers heard from only once (a one-shot identity costs an attacker one advert;
  a real peer re-advertises at least every ``adverts.refresh_s``), then the others;
* within each group, the one heard from least recently;
* and never one whose advert is fresher (issued later) than the newcomer's.

If nothing may go, the newcomer is refused. Evictions and refusals are counted
(``peers.evicted``, ``dropped.peer_table_full`` in ``node.info``'s counters).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from peerd.counters import Counters
from protocol.allocation import NetworkParams, effective_capacity
from protocol.envelope import Signed
from protocol.messages import Advert

#: Default for ``network.max_peers``: far beyond a devnet or a lab cluster, and small enough
#: that ``peers.list`` of a full table stays well under the 8 MiB response cap (~0.7 KB a peer).
DEFAULT_MAX_PEERS = 1024


@dataclass(frozen=True)
class PeerEntry:
    peer_id: str
    advert: Advert
    received_ms: int
    is_self: bool = False
    #: Newer adverts received from this peer after its first one (0: heard from once).
    refreshes: int = 0

    def capacity(self) -> float:
        p = self.advert.params
        dc_max = p["dc_max"] if p["dc_max"] is not None else float("inf")
        return effective_capacity(
            self.advert.c0, self.advert.load, NetworkParams(k=p["k"], dc_min=p["dc_min"], dc_max=dc_max)
        )

    def to_json(self, now_ms: int) -> dict[str, Any]:
        a = self.advert
        return {
            "peer_id": self.peer_id,
            "self": self.is_self,
            "seq": a.seq,
            "issued_at": a.issued_at / 1000,
            "expires_at": a.expires_at / 1000,
            "received_at": self.received_ms / 1000,
            "age_s": round(max(0, now_ms - a.issued_at) / 1000, 3),
            "expires_in_s": round((a.expires_at - now_ms) / 1000, 3),
            "c0": a.c0,
            "load": a.load,
            "capacity": self.capacity(),
            "cpu": dict(a.cpu),
            "memory": dict(a.memory),
            "gpus": [dict(g) for g in a.gpus],
            "offer": {**a.offer, "gpus": list(a.offer["gpus"]), "kinds": list(a.offer["kinds"])},
            "params": dict(a.params),
            "addrs": list(a.addrs),
            "version": a.version,
        }


class PeerTable:
    def __init__(
        self,
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        connected: Callable[[], Iterable[str]] = lambda: (),
        counters: Counters | None = None,
    ) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be at least 1")
        #: Entries besides this node's own; this node's entry never counts and is never evicted.
        self.max_peers = max_peers
        self._connected = connected
        self._counters = counters if counters is not None else Counters()
        self._entries: dict[str, PeerEntry] = {}
        # Eviction order, least recently heard from first: peers heard from once, and the rest.
        self._once: OrderedDict[str, None] = OrderedDict()
        self._repeat: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def upsert(self, signed: Signed, now_ms: int, *, is_self: bool = False) -> bool:
        """Store a verified advert; return True if it is new information for this peer.

        False also when the peer is new and the table is full of entries that may not be
        evicted for it (see the module docstring).
        """
        assert isinstance(signed.message, Advert)
        peer = signed.signer
        old = self._entries.get(peer)
        if old is not None:
            if old.advert.seq >= signed.message.seq:
                return False
            self._entries[peer] = PeerEntry(peer, signed.message, now_ms, is_self, old.refreshes + 1)
            if not is_self:
                self._once.pop(peer, None)
                self._repeat.pop(peer, None)
                self._repeat[peer] = None
            return True
        if not is_self and len(self._once) + len(self._repeat) >= self.max_peers:
            self.prune(now_ms)
            if len(self._once) + len(self._repeat) >= self.max_peers and not self._make_room(signed.message):
                self._counters.inc("dropped.peer_table_full")
                return False
        self._entries[peer] = PeerEntry(peer, signed.message, now_ms, is_self)
        if not is_self:
            self._once[peer] = None
        return True

    def _make_room(self, newcomer: Advert) -> bool:
        try:
            connected = set(self._connected())
        except Exception:
            return False  # without knowing who is connected, evicting could hit one of them
        for order in (self._once, self._repeat):
            for peer in order:
                if peer in connected:
                    continue
                if self._entries[peer].advert.issued_at > newcomer.issued_at:
                    # The stalest evictable entry is fresher than the newcomer: it stays.
                    return False
                self._remove(peer)
                self._counters.inc("peers.evicted")
                return True
        return False

    def _remove(self, peer: str) -> None:
        del self._entries[peer]
        self._once.pop(peer, None)
        self._repeat.pop(peer, None)

    def prune(self, now_ms: int) -> list[str]:
        gone = [pid for pid, e in self._entries.items() if e.advert.expires_at <= now_ms]
        for pid in gone:
            self._remove(pid)
        return gone

    def alive(self, now_ms: int, *, after: str | None = None, limit: int | None = None) -> list[PeerEntry]:
        """Unexpired entries sorted by peer ID; only IDs greater than ``after``, at most ``limit``."""
        entries = sorted(
            (
                e
                for e in self._entries.values()
                if e.advert.expires_at > now_ms and (after is None or e.peer_id > after)
            ),
            key=lambda e: e.peer_id,
        )
        return entries if limit is None else entries[:limit]

    def get(self, peer_id: str, now_ms: int) -> PeerEntry | None:
        e = self._entries.get(peer_id)
        return e if e is not None and e.advert.expires_at > now_ms else None
