"""peerd.p2p survives peers that leave and peers that attack (issue 11, "Attacks that hurt the daemon").

Real libp2p hosts on 127.0.0.1, several in one trio run, as in test_p2p.py. Each test names
the finding it covers. Waits are bounded loops; nothing asserts how long anything took.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

import pytest
import trio
from test_p2p import TOPIC, Recorder, eventually, gossip_ready, make_node, port_of, running

from peerd.p2p import P2PNode, _parse_p2p_addr, _parse_peer_id
from protocol.errors import TransportError

pytestmark = pytest.mark.slow


def _dht_peers(node: P2PNode) -> set[str]:
    dht = node._dht
    assert dht is not None
    return {p.to_base58() for p in dht.routing_table.get_peer_ids()}


async def test_a_departed_peer_whose_addresses_lapsed_does_not_end_any_node() -> None:
    """The crash: discovery asked the peer store for a departed peer's addresses after they
    had lapsed; py-libp2p raised PeerStoreError ('peer ID is expired') outside any try, and
    the p2p task, then the daemon, ended. Every node that had dialled the peer died."""
    recorders = [Recorder() for _ in range(3)]
    boot = make_node(recorders[0], peer_addr_ttl_s=1.0)
    async with running(boot):
        others = [
            make_node(r, bootstrap=(boot.listen_addrs()[0],), peer_addr_ttl_s=1.0) for r in recorders[1:]
        ]
        async with running(*others):
            nodes = [boot, *others]
            leaver = make_node(peer_addr_ttl_s=1.0)
            async with running(leaver) as nursery:
                await leaver.connect(boot.listen_addrs()[0])
                await eventually(
                    lambda: all(leaver.peer_id in n.connected_peers() for n in nodes),
                    "every node connected to the newcomer",
                )
                leaver_addr = leaver.listen_addrs()[0]
                nursery.cancel_scope.cancel()  # it leaves
            # The nodes that dialled it see it go. (The bootstrap peer, which it dialled,
            # may keep the dead in-process connection: see the closing note of issue 11.)
            await eventually(
                lambda: all(leaver.peer_id not in n.connected_peers() for n in others), "the peer gone"
            )
            # The state the crash needed, at every node: the departed peer still in the
            # routing table (lookups hand it out) and its peer-store entry lapsed, so no
            # answer carries its addresses either. The lifetime is 1 s here; these
            # entries are made to have lapsed long ago.
            gone = _parse_peer_id(leaver.peer_id)
            for node in nodes:
                assert node._host is not None and node._dht is not None
                store = node._host.get_peerstore()
                store.add_addrs(gone, _parse_p2p_addr(leaver_addr).addrs, 1)
                store.peer_data_map[gone].last_identified -= 3600
                await node._dht.routing_table.add_peer(_parse_p2p_addr(leaver_addr))
                assert leaver.peer_id in _dht_peers(node)
            # Several discovery rounds at every node: each one meets the lapsed entry.
            for _ in range(3):
                for node in nodes:
                    await node._discover_once()
            # Every node is still up and still gossiping.
            for i, node in enumerate(nodes):
                await gossip_ready(node, [r for j, r in enumerate(recorders) if j != i])
            # And nobody it left hands the departed peer out any more.
            for node in others:
                assert leaver.peer_id not in _dht_peers(node)


async def test_peers_that_come_and_go_are_forgotten_and_never_end_a_node() -> None:
    """Churn for longer than the peer store's address lifetime (1 s here): newcomers join
    through the bootstrap peer, are discovered and dialled, and leave; discovery keeps
    running at every node. Afterwards every node is up, and no routing table names a
    departed peer that discovery met again."""
    recorders = [Recorder() for _ in range(3)]
    boot = make_node(recorders[0], peer_addr_ttl_s=1.0)
    async with running(boot):
        others = [
            make_node(r, bootstrap=(boot.listen_addrs()[0],), peer_addr_ttl_s=1.0) for r in recorders[1:]
        ]
        async with running(*others):
            nodes = [boot, *others]
            departed: set[str] = set()
            for _round in range(3):
                comers = [make_node(peer_addr_ttl_s=1.0) for _ in range(2)]
                async with running(*comers) as nursery:
                    for comer in comers:
                        await comer.connect(boot.listen_addrs()[0])
                    await eventually(
                        lambda: all(c.peer_id in n.connected_peers() for c in comers for n in nodes),  # noqa: B023
                        "the newcomers discovered by every node",
                    )
                    nursery.cancel_scope.cancel()
                departed |= {c.peer_id for c in comers}
                await eventually(
                    lambda: not any(set(n.connected_peers()) & departed for n in others),  # noqa: B023
                    "them gone",
                )
                await trio.sleep(1.5)  # past the 1 s address lifetime
                for node in nodes:
                    await node._discover_once()
            for node in nodes:
                await node._discover_once()
            for i, node in enumerate(nodes):
                await gossip_ready(node, [r for j, r in enumerate(recorders) if j != i])
            for node in nodes:
                assert node.stats()["discovery_errors"] == 0
            # No node that saw them go still names a departed peer. (The bootstrap peer,
            # which they dialled, may keep their dead in-process connections.)
            for node in others:
                assert not (set(node.connected_peers()) & departed)
                assert not (_dht_peers(node) & departed), _dht_peers(node) & departed


async def test_stalled_libp2p_streams_are_capped_per_peer_and_idle_ones_closed() -> None:
    """750 stalled /meshsub streams from 3 identities took a daemon from 112 MB to 901 MB;
    /ipfs/kad streams were held past 40 s. Now each (peer, protocol) has a cap, and a
    Kademlia stream that sends nothing is closed after its idle time (30 s)."""
    victim, attacker = make_node(Recorder()), make_node(Recorder())
    for node in (victim, attacker):
        node._discovery_loop = trio.sleep_forever  # type: ignore[method-assign]
    async with running(victim, attacker):
        await attacker.connect(victim.listen_addrs()[0])
        held = []
        for protocol in ("/meshsub/1.1.0", "/ipfs/kad/1.0.0"):
            for _ in range(12):
                try:
                    held.append(await attacker.open_stream(victim.peer_id, protocol))
                except TransportError:
                    pass  # reset by the victim as it opened: a refusal seen from this side
        # Streams beyond the caps (meshsub 2 including gossip's own, kad 4) are refused.
        await eventually(lambda: victim.stats()["streams_capped"] >= 12 + 8 - 1, "the excess refused")
        assert victim.stats()["inbound_streams_open"] <= 2 + 4 + 2  # + identify/ping in flight
        # The stalled Kademlia streams are closed once idle; gossip keeps flowing.
        await eventually(lambda: victim.stats()["streams_idle_closed"] >= 1, "idle kad streams closed", 60)
        at_victim = victim._validators[TOPIC]
        assert isinstance(at_victim, Recorder)
        await gossip_ready(attacker, [at_victim])
        for stream in held:
            await stream.aclose()


@asynccontextmanager
async def _stalled_connections(port: int, count: int, source: str) -> AsyncIterator[int]:
    """``count`` TCP connections from ``source`` that never speak: each holds a handshake.

    Async, so the victim (same event loop) keeps accepting while they are opened.
    """
    with ExitStack() as stack:
        opened = 0
        for _ in range(count):
            s = stack.enter_context(trio.socket.socket())
            await s.bind((source, 0))
            with trio.move_on_after(5.0):
                try:
                    await s.connect(("127.0.0.1", port))
                    opened += 1
                except OSError:
                    break
        yield opened


async def test_one_address_cannot_hold_every_pending_handshake() -> None:
    """~124 cheap connects/s kept py-libp2p's ~250 handshake slots full: a new peer was
    refused 5 of 5 times. Now one source address holds at most a few handshakes."""
    victim = make_node(Recorder())
    async with running(victim):
        port = port_of(victim)
        # 127.0.0.2 is the attacker (all of 127/8 is loopback); the honest peer dials from 127.0.0.1.
        async with _stalled_connections(port, 300, "127.0.0.2") as opened:
            assert opened >= 260, opened
            await eventually(lambda: victim.stats()["handshakes_refused"] >= 1, "the flood refused")
            newcomer = make_node(Recorder())
            async with running(newcomer):
                await newcomer.connect(victim.listen_addrs()[0])
                assert victim.peer_id in newcomer.connected_peers()
        assert victim.stats()["handshakes_refused"] >= opened - 250


async def test_many_origins_through_one_neighbour_are_limited_as_one() -> None:
    """500 free identities at 500 adverts/s cost a victim 67% of a core, because the rate
    limit was per origin only. Now what a neighbour relays for other origins has its own
    bucket: two origins behind one neighbour share it, and the neighbour's own messages
    and other neighbours' relays are not affected."""
    at_victim = Recorder()
    origins = [make_node(Recorder()), make_node(Recorder())]
    relay = make_node(Recorder())
    victim = make_node(at_victim, max_relayed_per_neighbour_per_s=2.0)  # burst 4
    for node in (*origins, relay, victim):
        node._discovery_loop = trio.sleep_forever  # type: ignore[method-assign]
    async with running(*origins, relay, victim):
        for node in (*origins, victim):
            await node.connect(relay.listen_addrs()[0])
        await gossip_ready(relay, [at_victim])  # the relay's own messages: never relay-limited
        for i in range(20):
            for origin in origins:
                await origin.publish(TOPIC, b"flood-%d-" % i + origin.peer_id.encode())

        def judged() -> int:
            s = victim.stats()
            return s["gossip_accepted"] + s["gossip_rate_limited"] + s["gossip_relay_limited"]

        sent = 40
        await eventually(lambda: victim.stats()["gossip_relay_limited"] >= 1, "the relay limited")
        flood = [m for m in at_victim.seen if m.data.startswith(b"flood")]
        assert all(m.received_from == relay.peer_id for m in flood)
        assert {m.origin for m in flood} <= {o.peer_id for o in origins}
        # Far fewer than the 40 got through; the per-origin limit (200/s) played no part.
        assert victim.stats()["gossip_rate_limited"] == 0
        assert victim.stats()["gossip_relay_limited"] >= 1
        assert len(flood) < sent
        assert judged() >= len(flood) + victim.stats()["gossip_relay_limited"]
        # The relay's own messages still pass at once.
        await relay.publish(TOPIC, b"from the relay itself")
        await eventually(lambda: b"from the relay itself" in at_victim.payloads(), "the relay's own message")
