"""IHAVE on one heartbeat in three (peerd/p2p.py, trap 26), on a stand-in for gossipsub.

The stand-in's ``gossip_heartbeat`` gossips what libp2p's does: the ids in its real
``MessageCache`` window, to one peer; its ``heartbeat`` then shifts the cache as libp2p's
heartbeat does after emitting. The integration tests run the real router.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, cast

from libp2p.peer.id import ID
from libp2p.pubsub.mcache import MessageCache
from libp2p.pubsub.pb import rpc_pb2

from peerd.p2p import _GOSSIP_WINDOW, _install_sparse_ihave

PEER = ID(b"\x01" * 34)


class _Router:
    def __init__(self) -> None:
        self.mcache = MessageCache(_GOSSIP_WINDOW, 5)

    def gossip_heartbeat(self) -> defaultdict[ID, dict[str, list[bytes]]]:
        out: defaultdict[ID, dict[str, list[bytes]]] = defaultdict(dict)
        ids = self.mcache.window("t")
        if ids:
            out[PEER]["t"] = ids
        return out

    def heartbeat(self) -> list[bytes]:
        """One heartbeat: the ids gossiped, then the shift."""
        gossiped = [mid for topics in self.gossip_heartbeat().values() for mid in topics.get("t", [])]
        self.mcache.shift()
        return gossiped


def _message(seqno: int) -> rpc_pb2.Message:
    return rpc_pb2.Message(from_id=b"origin", seqno=seqno.to_bytes(8, "big"), data=b"x", topicIDs=["t"])


def test_every_message_id_is_gossiped_exactly_once() -> None:
    plain, sparse = _Router(), _Router()
    _install_sparse_ihave(cast(Any, sparse))
    told_plain: Counter[bytes] = Counter()
    told_sparse: Counter[bytes] = Counter()
    beats_with_ihave = 0
    seqno = 0
    for beat in range(30):
        # A message arrives between some heartbeats, two between others, none between the rest.
        for _ in range(beat % 3):
            seqno += 1
            for r in (plain, sparse):
                r.mcache.put(_message(seqno))
        told_plain.update(plain.heartbeat())
        sent = sparse.heartbeat()
        told_sparse.update(sent)
        beats_with_ihave += bool(sent)
    # The last message can still be in the window after the last beat: count those that left it.
    settled = [_message(s) for s in range(1, seqno - 3)]
    ids = [m.from_id + m.seqno for m in settled]
    assert ids and all(told_plain[i] == _GOSSIP_WINDOW for i in ids)  # libp2p: once per beat in the window
    assert all(told_sparse[i] == 1 for i in ids)  # ours: once, so the same repair for a third
    assert beats_with_ihave <= 30 // _GOSSIP_WINDOW
