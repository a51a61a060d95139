"""A fact peerd's reachability plan relies on (docs/design.md §10.7 "Reachability"): py-libp2p
0.8.1's circuit relay v2, wired by hand, lets a peer that accepts no inbound connection be
reached through a public relay peer.

peerd wires it in peerd/p2p.py (traps 29 and 30; tests/integration/test_relay.py runs it through
daemons). This test pins what the library does by itself, so a libp2p upgrade that breaks it
shows here. Three hosts on 127.0.0.1: a relay
(hop), a "NAT'd" listener that reserves a slot at it, and a dialer that knows only the
listener's ``/p2p-circuit`` address; an application stream crosses the circuit.
"""

from __future__ import annotations

from typing import Any

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

pytestmark = pytest.mark.slow

APP = TProtocol("/peerd-test/circuit/1.0.0")
LIMITS = RelayLimits(duration=600, data=1 << 24, max_circuit_conns=4, max_reservations=4)
LOCAL = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def _relay_parts(host: Any, hop: bool) -> tuple[CircuitV2Protocol, CircuitV2Transport]:
    proto = CircuitV2Protocol(host, limits=LIMITS, allow_hop=hop)
    host.set_stream_handler(PROTOCOL_ID, proto._handle_hop_stream)
    host.set_stream_handler(STOP_PROTOCOL_ID, proto._handle_stop_stream)
    roles = (RelayRole.HOP if hop else RelayRole.CLIENT) | RelayRole.STOP
    return proto, CircuitV2Transport(host, proto, RelayConfig(roles=roles, limits=LIMITS))


async def _echo(stream: Any) -> None:
    await stream.write(b"echo:" + await stream.read(64))
    await stream.close()


async def test_a_peer_reachable_only_through_a_relay_answers_a_stream() -> None:
    relay, listener, dialer = new_host(), new_host(), new_host()
    listener.set_stream_handler(APP, _echo)
    with trio.fail_after(60):
        async with relay.run([LOCAL]), listener.run([LOCAL]), dialer.run([LOCAL]):
            relay_proto, _ = _relay_parts(relay, hop=True)
            listener_proto, listener_transport = _relay_parts(listener, hop=False)
            dialer_proto, dialer_transport = _relay_parts(dialer, hop=False)
            async with (
                background_trio_service(relay_proto),
                background_trio_service(listener_proto),
                background_trio_service(dialer_proto),
                trio.open_nursery() as nursery,
            ):
                relay_addr = relay.get_addrs()[0]
                relay_info = info_from_p2p_addr(relay_addr)
                # The NAT'd side: an outbound connection to the relay and a reservation on it.
                await listener.connect(relay_info)
                hop = await listener.new_stream(relay_info.peer_id, [PROTOCOL_ID])
                assert await listener_transport.reserve(hop, relay_info.peer_id, nursery)
                # The dialer knows the listener only by its circuit address.
                await dialer.connect(relay_info)
                circuit = multiaddr.Multiaddr(f"{relay_addr}/p2p-circuit/p2p/{listener.get_id()}")
                conn = await dialer_transport.dial(circuit)
                assert any("p2p-circuit" in str(a) for a in conn.get_transport_addresses())
                stream = await dialer.new_stream(listener.get_id(), [APP])
                await stream.write(b"through the relay")
                assert await stream.read(64) == b"echo:through the relay"
                # Only the circuit joins them: the dialer never learned a direct address.
                (only,) = dialer.get_network().get_connections(listener.get_id())
                assert any("p2p-circuit" in str(a) for a in only.get_transport_addresses())
                nursery.cancel_scope.cancel()
