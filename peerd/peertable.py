"""The table of peers: only verified, unexpired adverts (issue 2 item 7).

An entry is replaced only by a newer advert of the same signer (the inbox already
refused lower sequences); a peer that stops advertising disappears once its advert
expires — no separate liveness protocol is needed for the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.allocation import NetworkParams, effective_capacity
from protocol.envelope import Signed
from protocol.messages import Advert


@dataclass(frozen=True)
class PeerEntry:
    peer_id: str
    advert: Advert
    received_ms: int
    is_self: bool = False

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
    def __init__(self) -> None:
        self._entries: dict[str, PeerEntry] = {}

    def upsert(self, signed: Signed, now_ms: int, *, is_self: bool = False) -> bool:
        """Store a verified advert; return True if it is new information for this peer."""
        assert isinstance(signed.message, Advert)
        old = self._entries.get(signed.signer)
        if old is not None and old.advert.seq >= signed.message.seq:
            return False
        self._entries[signed.signer] = PeerEntry(signed.signer, signed.message, now_ms, is_self)
        return True

    def prune(self, now_ms: int) -> list[str]:
        gone = [pid for pid, e in self._entries.items() if e.advert.expires_at <= now_ms]
        for pid in gone:
            del self._entries[pid]
        return gone

    def alive(self, now_ms: int) -> list[PeerEntry]:
        return sorted(
            (e for e in self._entries.values() if e.advert.expires_at > now_ms), key=lambda e: e.peer_id
        )

    def get(self, peer_id: str, now_ms: int) -> PeerEntry | None:
        e = self._entries.get(peer_id)
        return e if e is not None and e.advert.expires_at > now_ms else None
