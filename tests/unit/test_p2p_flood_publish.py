"""Flood publishing (peerd/p2p.py, trap 23), on a stand-in for gossipsub.

The stand-in has only what :func:`_install_flood_publish` touches: libp2p's own
``_get_peers_to_send`` (here: the mesh minus forwarder and origin, as libp2p computes it),
``pubsub.my_id``, ``pubsub.peer_topics`` and ``peer_protocol``. The integration tests
(tests/integration/test_p2p.py, test_adverts.py) run the real router.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any, cast

from libp2p.peer.id import ID

from peerd.p2p import _install_flood_publish

ME, A, B, C, D, JS = (ID(bytes([i]) * 34) for i in range(6))


class _Router:
    def __init__(self) -> None:
        self.mesh = {"t": {A, B}}
        # C and D are subscribed neighbours outside our mesh; JS is connected but has not
        # finished the gossipsub handshake (no protocol yet), so it must not be sent to.
        self.pubsub = SimpleNamespace(my_id=ME, peer_topics={"t": {A, B, C, D, JS}, "other": {D}})
        self.peer_protocol = {p: "/meshsub/1.1.0" for p in (A, B, C, D)}

    def _get_peers_to_send(
        self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterator[ID]:
        peers: set[ID] = set()
        for t in topic_ids:
            peers |= self.mesh.get(t, set())
        yield from peers - {msg_forwarder, origin}


def _router() -> Any:
    r = _Router()
    _install_flood_publish(cast(Any, r))
    return r


def test_own_message_goes_to_every_subscribed_neighbour() -> None:
    r = _router()
    assert set(r._get_peers_to_send(["t"], msg_forwarder=ME, origin=ME, msg_id=b"m")) == {A, B, C, D}


def test_only_the_topics_subscribers() -> None:
    r = _router()
    assert set(r._get_peers_to_send(["other"], msg_forwarder=ME, origin=ME)) == {D}


def test_a_forwarded_message_goes_to_the_mesh_only() -> None:
    r = _router()
    # From A, originated by C: libp2p's own choice, the mesh minus forwarder and origin.
    assert set(r._get_peers_to_send(["t"], msg_forwarder=A, origin=C, msg_id=b"m")) == {B}


def test_never_back_to_ourselves() -> None:
    r = _router()
    r.pubsub.peer_topics["t"].add(ME)
    r.peer_protocol[ME] = "/meshsub/1.1.0"
    assert ME not in set(r._get_peers_to_send(["t"], msg_forwarder=ME, origin=ME))

