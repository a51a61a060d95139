"""Circuit relay v2 through peerd.p2p (docs/design.md §10.7 "Reachability"): a node behind a
NAT, here one that listens on no address at all, is reached through a relay peer.

Real P2PNodes on 127.0.0.1 in one trio run. The NAT'd node ``n`` has no listener, so every
connection to it is one it dialled or a circuit through the relay ``r``. The dialer ``d`` knows
``n`` only by the circuit address ``n`` announces. Every wait is a bounded loop.
"""

from __future__ import annotations

import os

import pytest
import trio

from peerd import p2p
from peerd.p2p import P2PConfig, P2PNode
from peerd.streams import FrameStream
from protocol.errors import TransportError
from tests.integration.test_p2p import ECHO, echo, eventually, free_port, running

pytestmark = pytest.mark.slow


def node(**config: object) -> P2PNode:
    return P2PNode(os.urandom(32), P2PConfig(**config))  # type: ignore[arg-type]


async def round_trip(stream: FrameStream, payload: bytes) -> bytes:
    await stream.send(payload)
    return await stream.receive()


async def test_a_node_with_no_listener_is_reached_through_its_relay() -> None:
    relay = node(relay_service=True)
    async with running(relay) as nursery:
        relay_addr = relay.listen_addrs()[0]
        natted = node(listen=(), relays=(relay_addr,))
        natted.add_stream_handler(ECHO, echo)
        dialer = node()
        await nursery.start(natted.run)
        await nursery.start(dialer.run)
        await eventually(lambda: natted.stats()["relay_reservations"] >= 1, "a reservation at the relay")
        # It announces only its circuit address through the relay: the one way in.
        (circuit,) = natted.listen_addrs()
        assert circuit == f"{relay_addr}/p2p-circuit/p2p/{natted.peer_id}"

        # Known only by its circuit address (through the dialer's address book), before any
        # connection: relayed.
        dialer.set_address_book(lambda peer: [circuit] if peer == natted.peer_id else ())
        assert dialer.relayed(natted.peer_id)
        assert await dialer.connect(circuit) == natted.peer_id
        assert dialer.stats()["dials_relayed"] == 1
        # Both ends see a circuit connection; the relay is reached directly.
        assert dialer.relayed(natted.peer_id) and natted.relayed(dialer.peer_id)
        assert not dialer.relayed(relay.peer_id) and not natted.relayed(relay.peer_id)
        stream = await dialer.open_stream(natted.peer_id, ECHO)
        assert await round_trip(stream, b"through the relay") == b"yaler eht hguorht"
        await stream.aclose()

        # The connection goes; the dialer opens a stream again, with only the circuit address
        # in its peer store (libp2p's own dial would try none of it).
        host = dialer._host
        assert host is not None
        (peer,) = [p for p in host.get_connected_peers() if p.to_base58() == natted.peer_id]
        await host.disconnect(peer)
        await eventually(lambda: natted.peer_id not in dialer.connected_peers(), "the circuit closed")
        stream = await dialer.open_stream(natted.peer_id, ECHO)
        assert await round_trip(stream, b"again") == b"niaga"
        await stream.aclose()
        assert dialer.stats()["dials_relayed"] == 2
        nursery.cancel_scope.cancel()


async def test_a_peer_without_a_reservation_cannot_be_reached_through_the_relay() -> None:
    relay, other, dialer = node(relay_service=True), node(), node()
    async with running(relay, other, dialer):
        # ``other`` is connected to the relay but never reserved: the relay refuses the circuit.
        await other.connect(relay.listen_addrs()[0])
        circuit = f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{other.peer_id}"
        with pytest.raises(TransportError):
            await dialer.connect(circuit)
        assert dialer.stats()["dials_relayed"] == 0
        assert other.peer_id not in dialer.connected_peers()


async def test_a_node_that_serves_no_relay_refuses_circuits() -> None:
    not_a_relay = node()
    async with running(not_a_relay) as nursery:
        natted = node(listen=(), relays=(not_a_relay.listen_addrs()[0],))
        await nursery.start(natted.run)
        await eventually(lambda: natted.stats()["relay_reservations_failed"] >= 1, "the reservation refused")
        assert natted.stats()["relay_reservations"] == 0
        nursery.cancel_scope.cancel()


async def test_a_peer_libp2p_knows_no_way_to_is_dialled_at_the_addresses_it_announced() -> None:
    a, b, c = node(), node(), node()
    a.add_stream_handler(ECHO, echo)
    book: dict[str, list[str]] = {}
    b.set_address_book(lambda peer: book.get(peer, ()))
    async with running(a, b, c):
        # Never connected and not in b's peer store: libp2p alone has nothing to dial.
        with pytest.raises(TransportError):
            await b.open_stream(a.peer_id, ECHO)
        # An entry that names another peer's ID is not a's to give: ignored.
        book[a.peer_id] = c.listen_addrs()
        with pytest.raises(TransportError):
            await b.open_stream(a.peer_id, ECHO)
        assert b.stats()["dials_ok"] == 0
        book[a.peer_id] = c.listen_addrs() + a.listen_addrs()
        stream = await b.open_stream(a.peer_id, ECHO)
        assert await round_trip(stream, b"booked") == b"dekoob"
        await stream.aclose()
        assert b.stats()["dials_ok"] == 1
        assert c.peer_id not in b.connected_peers()


async def test_garbage_on_the_stop_protocol_leaves_a_natted_node_reachable() -> None:
    relay = node(relay_service=True)
    async with running(relay) as nursery:
        natted = node(listen=(), relays=(relay.listen_addrs()[0],))
        natted.add_stream_handler(ECHO, echo)
        evil, dialer = node(), node()
        for n in (natted, evil, dialer):
            await nursery.start(n.run)
        await eventually(lambda: natted.stats()["relay_reservations"] >= 1, "a reservation at the relay")
        # A peer the NAT'd node is connected to (it dialled out) sends junk where a relay's
        # circuit would start: it must neither crash the node nor open a connection.
        await natted.connect(evil.listen_addrs()[0])
        # It dialled out: a direct connection, even once identify has filed the circuit
        # addresses it announces in evil's peer store.
        host = evil._host
        assert host is not None
        (peer,) = [p for p in host.get_connected_peers() if p.to_base58() == natted.peer_id]

        def filed() -> bool:
            try:
                return any("/p2p-circuit" in str(a) for a in host.get_peerstore().addrs(peer))
            except Exception:  # PeerStoreError: no address filed yet
                return False

        await eventually(filed, "evil's peer store holds the NAT'd node's circuit address")
        assert not evil.relayed(natted.peer_id) and not natted.relayed(evil.peer_id)
        for junk in (b"\x05\xff\xff\xff\xff\xff", b"\x80" * 10 + b"\x01", os.urandom(300)):
            try:
                stream = await evil.open_stream(natted.peer_id, "/libp2p/circuit/relay/0.2.0/stop")
                await stream.send(junk)
                await stream.aclose()
            except TransportError:
                pass  # reset at once is fine; that the node lives on is the point
        (circuit,) = natted.listen_addrs()
        await dialer.connect(circuit)
        stream = await dialer.open_stream(natted.peer_id, ECHO)
        assert await round_trip(stream, b"still here") == b"ereh llits"
        await stream.aclose()
        assert set(natted.connected_peers()) == {relay.peer_id, evil.peer_id, dialer.peer_id}
        nursery.cancel_scope.cancel()


async def test_a_natted_node_reserves_again_at_a_relay_that_restarted() -> None:
    # A relay that restarts has forgotten every reservation; the NAT'd node notices the new
    # connection (its bootstrap-style redial) and reserves again, so it is reachable again.
    seed, listen = os.urandom(32), (f"/ip4/127.0.0.1/tcp/{free_port()}",)
    first = P2PNode(seed, P2PConfig(listen=listen, relay_service=True))
    async with trio.open_nursery() as outer:
        async with running(first):
            relay_addr = first.listen_addrs()[0]
            natted = node(listen=(), relays=(relay_addr,), dial_backoff_max_s=1.0)
            natted.add_stream_handler(ECHO, echo)
            await outer.start(natted.run)
            await eventually(lambda: natted.stats()["relay_reservations"] == 1, "the first reservation")
        await eventually(lambda: first.peer_id not in natted.connected_peers(), "the relay gone")
        again = P2PNode(seed, P2PConfig(listen=listen, relay_service=True))
        dialer = node()
        async with running(again, dialer):
            await eventually(lambda: natted.stats()["relay_reservations"] == 2, "a reservation again")
            await dialer.connect(natted.listen_addrs()[0])
            stream = await dialer.open_stream(natted.peer_id, ECHO)
            assert await round_trip(stream, b"back") == b"kcab"
            await stream.aclose()
        outer.cancel_scope.cancel()


async def test_a_relay_that_finds_itself_among_its_relays_skips_itself() -> None:
    # One config shared by a fleet may list the relay among the relays of every node.
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    seed = os.urandom(32)
    own = f"{listen}/p2p/{P2PNode(seed, P2PConfig()).peer_id}"
    relay = P2PNode(seed, P2PConfig(listen=(listen,), relay_service=True, relays=(own,)))
    async with running(relay) as nursery:
        assert relay.listen_addrs() == [own]  # no circuit address through itself
        natted = node(listen=(), relays=(own,))
        await nursery.start(natted.run)
        await eventually(lambda: natted.stats()["relay_reservations"] >= 1, "a reservation at the relay")
        assert relay.stats()["relay_reservations"] == 0
        nursery.cancel_scope.cancel()


async def test_a_relay_caps_reservations_per_source_address(monkeypatch: pytest.MonkeyPatch) -> None:
    # Identities are free: one machine (here 127.0.0.1) gets at most the cap, not all 128.
    monkeypatch.setattr(p2p, "_RELAY_RESERVATIONS_PER_SOURCE", 2)
    relay = node(relay_service=True)
    async with running(relay) as nursery:
        nodes = [node(listen=(), relays=(relay.listen_addrs()[0],)) for _ in range(3)]
        for n in nodes:
            await nursery.start(n.run)
        await eventually(
            lambda: (
                sum(n.stats()["relay_reservations"] + n.stats()["relay_reservations_failed"] for n in nodes)
                >= 3
            ),
            "every node asked for a reservation",
        )
        assert sorted(n.stats()["relay_reservations"] for n in nodes) == [0, 1, 1]
        assert relay.stats()["relay_reservations_refused"] >= 1
        # A refresh of a reservation held is never refused.
        (holder, *_) = [n for n in nodes if n.stats()["relay_reservations"] == 1]
        host, transport = holder._host, holder._relay_transport
        assert host is not None and transport is not None
        (relay_peer,) = [p for p in host.get_connected_peers() if p.to_base58() == relay.peer_id]
        assert await holder._reserve(host, transport, relay_peer)
        nursery.cancel_scope.cancel()
